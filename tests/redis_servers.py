"""Throwaway Redis servers for the tests: ``redis_url``, ``redis_url_factory``, ``redis_cluster_url``.

One ``redis-server`` and one 3-master cluster per test session, on free loopback ports (never 6379),
in temporary directories, without persistence unless a test asks for AOF. Each test gets an empty
ledger through a fresh key prefix, so tests never see each other's keys and no FLUSHALL is needed.

When ``redis-server`` is missing these fixtures skip with the reason, except under ``CI=true``,
where a missing server fails the run (a CI job that silently skips Redis proves nothing).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on a loopback port, which tests may kill, stop and restart."""

    def __init__(self, *, appendonly: bool = False, extra: tuple[str, ...] = (), port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="clearance-redis-"))
        self.appendonly = appendonly
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
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
        while not _ping(self.port):
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
    """Three masters with ``cluster-enabled yes`` joined by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "2000", "--cluster-port", str(free_port())))
            for _ in range(masters)
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        create = [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
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

    @staticmethod
    def _cluster_ok(port: int) -> bool:
        out = subprocess.run(
            [REDIS_CLI, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5, check=False
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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """The session's throwaway 3-master Redis Cluster."""
    require_redis()
    if not (os.path.isfile(REDIS_CLI) and os.access(REDIS_CLI, os.X_OK)):
        if IN_CI:
            pytest.fail(f"CI=true but redis-cli not found at {REDIS_CLI}")
        pytest.skip(f"redis-cli not found at {REDIS_CLI}; it is needed to create the test cluster")
    cluster = RedisClusterServers()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
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
