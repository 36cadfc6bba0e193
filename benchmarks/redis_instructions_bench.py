"""Instructions the Redis *server* executes per reserve+commit lifecycle, counted by callgrind, beside
the same count for redis_bench.py's bare pair and a one-line script.

    python benchmarks/redis_instructions_bench.py [--depths 1,3,6] [--lifecycles 500] [--live-holds]

Starts its own ``redis-server`` under ``valgrind --tool=callgrind`` (about 50x slower, so it is never
used for timing), warms each workload up, then zeroes the counters (``callgrind_control -z``), runs
``--lifecycles`` lifecycles and dumps them (``callgrind_control -d``). The server is single-threaded
and nothing else talks to it, so the count is the server's own work for those calls, repeatable to
within a fraction of a percent whatever the machine is doing — unlike the p50s of redis_bench.py.
Also printed: the commands our scripts issue per lifecycle (``redis.call``), from INFO commandstats.
On Redis 7.0 each costs ~4.7k instructions, command included (callgrind by function, 2026-11-27):
15% of our lifecycle; two thirds of it is the Lua VM running our statements. Needs ``valgrind``
(with ``callgrind_control``) and ``redis-server``.

``--live-holds`` then counts a depth-3 lifecycle again with 10, 10,000 and 100,000 held reservations
parked in its tenant (a few minutes more): whether the server's work stays flat as holds pile up,
which redis_bench.py's p50s (measured one size after the other on a drifting host) cannot settle.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redis_bench import KINDS, Bare, add_live_holds

from clearance import Action, Authority, Budget

WARM_UP = 1000


class Server:
    """redis-server under callgrind on a free loopback port."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="clearance-redis-instructions-"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.folder}/out",
             binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis(port=self.port)
        for _ in range(600):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server under valgrind did not start")

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.process.pid)], capture_output=True, check=True)

    def commands(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name: int(value["calls"]) for name, value in stats.items()}

    def count(self, run: Callable[[int], None], lifecycles: int) -> tuple[float, float]:
        """(server instructions, commands run inside scripts) per lifecycle for ``run(lifecycles)``."""
        before = set(self.folder.glob("out.*"))
        commands = self.commands()
        self._control("-z")
        run(lifecycles)
        self._control("-d")
        after = self.commands()
        for _ in range(100):
            dumps = set(self.folder.glob("out.*")) - before
            if dumps:
                break
            time.sleep(0.05)
        (dump,) = dumps
        time.sleep(0.2)  # let callgrind finish writing
        found = re.search(r"^(?:summary|totals):\s*(\d+)", dump.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no instruction total in {dump}")
        dump.unlink()
        inner = sum(
            calls - commands.get(name, 0)
            for name, calls in after.items()
            if name not in ("cmdstat_evalsha", "cmdstat_info", "cmdstat_script|load", "cmdstat_ping")
        )
        return int(found.group(1)) / lifecycles, inner / lifecycles

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.folder, ignore_errors=True)


def ours(port: int, depth: int, tokens: bool = False) -> Callable[[int], None]:
    """Our lifecycle; ``tokens``: a model call's, holding usd and tokens (a tokens budget at the root)."""
    authority = Authority(f"redis://127.0.0.1:{port}/0")
    scope = "/".join(f"{KINDS[i]}:d{depth}n{i}{'t' if tokens else ''}" for i in range(depth))
    levels = scope.split("/")
    for i in range(depth):
        authority.set_budget(Budget("/".join(levels[: i + 1]), "usd", 10**6))
    amounts: dict[str, object] = {"usd": "0.001"}
    actual: dict[str, object] = {"usd": "0.0007"}
    if tokens:
        authority.set_budget(Budget(levels[0], "tokens", 10**12))
        amounts["tokens"], actual["tokens"] = 1000, 700
    action = Action("model_call", "m", amounts)

    def run(count: int) -> None:
        for _ in range(count):
            authority.commit(authority.reserve(action, scope).reservation, actual)  # type: ignore[arg-type]

    return run


def ours_tokens(port: int, depth: int) -> Callable[[int], None]:
    return ours(port, depth, tokens=True)


def bare(port: int, depth: int) -> Callable[[int], None]:
    lifecycle, _ = Bare(port, depth, f"bare{depth}").sync()

    def run(count: int) -> None:
        for _ in range(count):
            lifecycle()

    return run


def trivial(port: int) -> Callable[[int], None]:
    client = redis.Redis(port=port)
    script = client.register_script("return 1")

    def run(count: int) -> None:
        for _ in range(count):
            script()
            script()

    return run


def live_holds(server: Server, lifecycles: int) -> None:
    """A depth-3 lifecycle's count with more and more held reservations (1 h TTL) in its tenant."""
    run = ours(server.port, 3)
    run(WARM_UP)
    scope = "/".join(f"{KINDS[i]}:d3n{i}" for i in range(3))
    # (parking 100,000 holds takes minutes under valgrind: no clock check, a long timeout)
    url = f"redis://127.0.0.1:{server.port}/0?socket_timeout=120&max_clock_skew=0"
    print(f"\n{'live holds':>10} {'ours, depth 3':>14} {'vs 10 holds':>12} {'calls':>6}")
    parked, first = 0, 0.0
    for target in (10, 10_000, 100_000):
        add_live_holds(url, scope, target - parked)
        parked = target
        run(300)
        count, calls = server.count(run, lifecycles)
        first = first or count
        print(f"{target:>10,} {count:>14,.0f} {count / first:>12.3f} {calls:>6.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="1,3,6", help="comma-separated scope depths")
    parser.add_argument("--lifecycles", type=int, default=500, help="lifecycles counted per figure")
    parser.add_argument("--live-holds", action="store_true", help="also: depth 3 with 10 to 100,000 live holds")
    options = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    server = Server()
    try:
        version = server.client.info("server")["redis_version"]
        print(f"redis-server {version} under callgrind: server instructions per reserve+commit lifecycle")
        print("a usd budget on every level of the scope; bare = redis_bench.py's bare pair;")
        print("usd+tokens = ours for a model call's hold of usd and tokens (a tokens budget at the root too)")
        run = trivial(server.port)
        run(WARM_UP)
        floor, _ = server.count(run, options.lifecycles)
        print(f"floor: two trivial script calls {floor:>12,.0f}")
        print(
            f"{'depth':>5} {'ours':>12} {'bare':>12} {'ours/bare':>10} {'ours: calls':>12} {'bare: calls':>12}"
            f" {'usd+tokens':>12} {'its calls':>10}"
        )
        for depth in (int(d) for d in options.depths.split(",")):
            figures = []
            for workload in (ours, bare, ours_tokens):
                run = workload(server.port, depth)
                run(WARM_UP)
                figures.append(server.count(run, options.lifecycles))
            (mine, my_calls), (theirs, their_calls), (model, model_calls) = figures
            print(
                f"{depth:>5} {mine:>12,.0f} {theirs:>12,.0f} {mine / theirs:>10.2f} {my_calls:>12.1f}"
                f" {their_calls:>12.1f} {model:>12,.0f} {model_calls:>10.1f}",
                flush=True,
            )
        if options.live_holds:
            live_holds(server, options.lifecycles)
    finally:
        server.close()


if __name__ == "__main__":
    main()
