"""Throwaway Redis servers for the tests: ``redis_url``, ``redis_url_factory``, ``redis_cluster_url``,
``redis_tls_url`` and ``redis_tls_cluster_url``.

One ``redis-server`` and one 3-master cluster per test session, on free loopback ports (never 6379),
in temporary directories, without persistence unless a test asks for AOF. Each test gets an empty
ledger through a fresh key prefix, so tests never see each other's keys and no FLUSHALL is needed.
The TLS ones (started only when a test asks for them) speak TLS alone and demand a client
certificate (mutual TLS, the strict setup docs/redis.md recommends), from a throwaway CA trustme
makes.

When ``redis-server`` is missing these fixtures skip with the reason, except under ``CI=true``,
where a missing server fails the run (a CI job that silently skips Redis proves nothing).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

REDIS_SERVER = os.environ.get("CLEARANCE_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = os.environ.get("CLEARANCE_REDIS_CLI") or shutil.which("redis-cli") or "/usr/bin/redis-cli"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_RESERVED_PORTS = {6379, 16379}


def redis_missing_reason() -> str | None:
    """Why the Redis tests cannot run here, or None."""
    if not (os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK)):
        return f"redis-server not found (looked for {REDIS_SERVER}); install redis-server to run the Redis tests"
    return None


def require_redis() -> None:
    """Skip (or fail under CI=true) when no redis-server binary is available."""
    reason = redis_missing_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


def free_port() -> int:
    """A free loopback TCP port (never the machine's own Redis ports)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _RESERVED_PORTS and port < 55000:
            return port


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA, the servers' certificate (for 127.0.0.1 and localhost) and a client's."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, folder: Path) -> TLSFiles:
        import trustme  # (dev extra; only the TLS tests need it)

        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("worker@clearance.test")
        files = cls(*(folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
        ca.cert_pem.write_to_path(str(files.ca))
        server.cert_chain_pems[0].write_to_path(str(files.cert))
        server.private_key_pem.write_to_path(str(files.key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        return files

    def server_args(self, port: int) -> list[str]:
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes",
        ]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.client_cert), "--key", str(self.client_key)]

    def query(self) -> str:
        """The URL options of a client that trusts the CA and shows the client certificate."""
        return urlencode({"ssl_ca_certs": self.ca, "ssl_certfile": self.client_cert, "ssl_keyfile": self.client_key})

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _ping(port: int, timeout: float = 0.2, tls: TLSFiles | None = None) -> bool:
    try:
        with contextlib.ExitStack() as stack:
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout))
            if tls is not None:  # (the wrapped socket takes the plain one over: closed with it)
                conn = stack.enter_context(tls.client_context().wrap_socket(conn, server_hostname="127.0.0.1"))
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:  # (ssl.SSLError included)
        return False


class RedisServer:
    """One ``redis-server`` process on a loopback port, which tests may kill, stop and restart;
    with ``tls``, that port speaks TLS only and wants a client certificate."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        extra: tuple[str, ...] = (),
        port: int | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="clearance-redis-"))
        self.appendonly = appendonly
        self.extra = extra
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?{self.tls.query()}"
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            REDIS_SERVER,
            *(["--port", str(self.port)] if self.tls is None else self.tls.server_args(self.port)),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--maxmemory-policy", "noeviction",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        return args + list(self.extra)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port, tls=self.tls):
            if self.process.poll() is not None or time.monotonic() > deadline:
                logfile = self.dir / "redis.log"
                log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {log}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye — what a crash looks like."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """Three masters with ``cluster-enabled yes`` joined by ``redis-cli --cluster create``; with
    ``tls``, clients and the cluster bus speak TLS only."""

    def __init__(self, masters: int = 3, tls: TLSFiles | None = None, replicas: int = 0) -> None:
        bus = ("--tls-cluster", "yes") if tls is not None else ()
        self.tls = tls
        self.replicas = replicas
        self.nodes = [
            RedisServer(extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "2000", "--cluster-port", str(free_port()), *bus), tls=tls)
            for _ in range(masters * (1 + replicas))
        ]  # fmt: skip

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss+cluster://127.0.0.1:{self.nodes[0].port}?{self.tls.query()}"
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def cli(self) -> list[str]:
        """``redis-cli`` with this cluster's TLS options."""
        return [REDIS_CLI, *(self.tls.cli_args() if self.tls is not None else ())]

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        create = [*self.cli(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        subprocess.run(
            [*create, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not all(self._cluster_ok(node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def _cluster_ok(self, port: int) -> bool:
        out = subprocess.run(
            [*self.cli(), "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        return "cluster_state:ok" in out

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def fresh_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's throwaway redis-server (no persistence)."""
    require_redis()
    server = RedisServer().start()
    yield server
    server.stop()


def _require_cli() -> None:
    if not (os.path.isfile(REDIS_CLI) and os.access(REDIS_CLI, os.X_OK)):
        if IN_CI:
            pytest.fail(f"CI=true but redis-cli not found at {REDIS_CLI}")
        pytest.skip(f"redis-cli not found at {REDIS_CLI}; it is needed to create the test cluster")


def _started_cluster(tls: TLSFiles | None) -> RedisClusterServers:
    cluster = RedisClusterServers(tls=tls)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """The session's throwaway 3-master Redis Cluster."""
    require_redis()
    _require_cli()
    cluster = _started_cluster(None)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA with a server and a client certificate; also checks this redis-server has TLS
    (Debian's and the official images' do; one built without ``BUILD_TLS`` does not start with
    ``--tls-port``): skipped without it, failed under ``CI=true``."""
    require_redis()
    files = TLSFiles.make(tmp_path_factory.mktemp("tls"))
    probe = RedisServer(tls=files)
    try:
        probe.start()
    except RuntimeError as error:
        reason = f"this redis-server cannot serve TLS ({REDIS_SERVER}): {error}"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    finally:
        probe.stop()
    return files


@pytest.fixture(scope="session")
def redis_tls_server(redis_tls_files: TLSFiles) -> Iterator[RedisServer]:
    """The session's throwaway redis-server speaking TLS only, with client certificates required."""
    server = RedisServer(tls=redis_tls_files).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_tls_cluster(redis_tls_files: TLSFiles) -> Iterator[RedisClusterServers]:
    """The session's throwaway 3-master Redis Cluster over TLS (clients and the cluster bus)."""
    _require_cli()
    cluster = _started_cluster(redis_tls_files)
    yield cluster
    cluster.stop()


def _with_prefix(url: str, prefix: str) -> str:
    # The tests drive time with a FakeClock (2027): the store's check of workers' clocks against the
    # server's is off here, and tested on its own (test_redis_store.py).
    return f"{url}{'&' if '?' in url else '?'}key_prefix={prefix}&max_clock_skew=0"


@pytest.fixture
def redis_url_factory(redis_server: RedisServer) -> Callable[[], str]:
    """Call it for a URL of another empty ledger on the session's redis-server."""
    counter = itertools.count()
    base = fresh_prefix()
    return lambda: _with_prefix(redis_server.url, f"{base}{next(counter)}:")


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL of an empty ledger on the session's redis-server (a fresh key prefix)."""
    return _with_prefix(redis_server.url, fresh_prefix())


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """A URL of an empty ledger on the session's Redis Cluster (a fresh key prefix)."""
    return _with_prefix(redis_cluster.url, fresh_prefix())


@pytest.fixture
def redis_tls_url(redis_tls_server: RedisServer) -> str:
    """A ``rediss://`` URL (CA and client certificate included) of an empty ledger on the session's TLS server."""
    return _with_prefix(redis_tls_server.url, fresh_prefix())


@pytest.fixture
def redis_tls_cluster_url(redis_tls_cluster: RedisClusterServers) -> str:
    """A ``rediss+cluster://`` URL of an empty ledger on the session's TLS cluster."""
    return _with_prefix(redis_tls_cluster.url, fresh_prefix())
