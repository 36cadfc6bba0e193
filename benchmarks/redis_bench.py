"""Reserve+commit lifecycles on the Redis store, each beside its floors measured in the same run.

    python benchmarks/redis_bench.py [--seconds 0.3] [--rounds 5] [--quick]

Starts its own throwaway ``redis-server`` (free loopback port, no persistence) and measures:

* **ours**: ``Authority.reserve`` + ``Authority.commit`` at depth 1, 3, 6 with a budget on every level
  (the worst case), with 1 plan, or 3 plans where the ladder has to reject two and hold the third;
* **trivial**: one ``return 1`` Lua script call through the same redis-py ``Script`` path — the cost of
  one round trip from this client;
* **bare pair**: a minimal reserve script (check + hold every level) and a minimal commit script
  (settle every level) at the same depth — no idempotency, no plans, no reclaim, no audit, no
  reservation record: what a feature-less ledger costs; called through redis-py's ``Script``, and
  (sync table, **bare-raw**) also the way the store sends its own scripts — packed by hand and
  written straight to a pooled connection — so that ours/bare-raw compares the ledger's work alone;
* **naive**: a GET-check-INCRBY counter (two round trips, not atomic), and how far it overspends in
  the same race in which ours must overspend by exactly 0.

Modes: a sync single client (p50/p99 µs per lifecycle and lifecycles/s), asyncio with 64 tasks, and
4 processes. Then the cost as live holds grow from 10 to 100,000 in the tenant. Rounds are
interleaved (ours, floor, ours, floor, …) and medians reported: this 2-core machine is shared and
noisy (a loopback round trip is 7 µs or 80 µs depending on core placement), so read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio

from clearance import Action, Authority, Budget, Plan
from clearance.ledger import HoldRequest, PlanSpec
from clearance.periods import windows_at
from clearance.stores.redis import RedisStore

KINDS = ("tenant", "workspace", "app", "workflow", "agent", "run")
TASKS = 64
PROCESSES = 4

TRIVIAL = "return 1"
BARE_RESERVE = """
local amount = tonumber(ARGV[1])
for i = 2, #ARGV do
  local v = redis.call('HMGET', KEYS[1], 'l' .. ARGV[i], 's' .. ARGV[i], 'h' .. ARGV[i])
  if tonumber(v[1]) - tonumber(v[2] or '0') - tonumber(v[3] or '0') < amount then
    return 0
  end
end
for i = 2, #ARGV do
  redis.call('HINCRBY', KEYS[1], 'h' .. ARGV[i], ARGV[1])
end
return 1
"""
BARE_COMMIT = """
for i = 2, #ARGV do
  redis.call('HINCRBY', KEYS[1], 'h' .. ARGV[i], '-' .. ARGV[1])
  redis.call('HINCRBY', KEYS[1], 's' .. ARGV[i], ARGV[1])
end
return 1
"""


# --- the server ------------------------------------------------------------------------------------
def start_server() -> tuple[subprocess.Popen[bytes], int, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    folder = tempfile.mkdtemp(prefix="clearance-bench-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder,
         "--maxmemory-policy", "noeviction", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    return process, port, folder


# --- workloads: each returns (sync lifecycle, async lifecycle factory, close) -----------------------
def scope_at(depth: int, tag: str = "t") -> str:
    return "/".join(f"{KINDS[i]}:{tag}{i}" for i in range(depth))


Lifecycle = Callable[[], Any]
AsyncLifecycle = Callable[[], Awaitable[Any]]


class Ours:
    def __init__(self, url: str, depth: int, plans: int, tag: str) -> None:
        self.url = url
        self.scope = scope_at(depth, tag)
        authority = Authority(url)
        levels = self.scope.split("/")
        for i in range(depth):
            authority.set_budget(Budget("/".join(levels[: i + 1]), "usd", 10**6))
        if plans > 1:  # the ladder rejects two plans at the deepest level, holds the third
            authority.set_budget(Budget(self.scope, "tokens", 10**12))
        authority.close()
        self.action = Action("model_call", "m", {"usd": "0.001"})
        self.plans = None
        if plans > 1:
            self.plans = [Plan({"usd": "0.001", "tokens": 10**13}), Plan({"usd": "0.001", "tokens": 10**13 - 1})]
            self.plans += [Plan({"usd": "0.001", "tokens": 100})] * (plans - 2)
        self.actual = {"usd": "0.0007"}

    def sync(self) -> tuple[Lifecycle, Callable[[], None]]:
        authority = Authority(self.url)

        def lifecycle() -> None:
            decision = authority.reserve(self.action, self.scope, plans=self.plans)
            authority.commit(decision.reservation, self.actual)  # type: ignore[arg-type]

        return lifecycle, authority.close

    def asynchronous(self) -> tuple[AsyncLifecycle, Callable[[], Awaitable[None]]]:
        authority = Authority(self.url)

        async def lifecycle() -> None:
            decision = await authority.areserve(self.action, self.scope, plans=self.plans)
            await authority.acommit(decision.reservation, self.actual)  # type: ignore[arg-type]

        async def close() -> None:
            await authority.store.aclose()

        return lifecycle, close


class StoreOnly(Ours):
    """The same ledger calls without the Authority around them: ``RedisStore.hold`` + ``commit`` with
    a prepared request (fresh id and clock each call). Separates the store's cost from the facade's."""

    def sync(self) -> tuple[Lifecycle, Callable[[], None]]:
        store = RedisStore.from_url(self.url)
        chain = tuple("/".join(self.scope.split("/")[: i + 1]) for i in range(len(self.scope.split("/"))))
        zeros = (0,) * len(chain)
        if self.plans is None:
            specs = (PlanSpec((("usd", 1_000_000),), zeros),)
        else:
            specs = tuple(PlanSpec(tuple(plan.steps), zeros) for plan in self.plans)
        actual = (("usd", 700_000),)

        def lifecycle() -> None:
            now = time.time()
            request = HoldRequest(f"{os.urandom(10).hex()}.{chain[0]}", chain, specs, now, now + 60, windows_at(now))
            result = store.hold(request)
            store.commit(result.reservation_id, actual, now)  # type: ignore[arg-type]

        return lifecycle, store.close


class Bare:
    def __init__(self, port: int, depth: int, tag: str) -> None:
        self.port = port
        self.key = f"bare:{{{tag}}}"
        self.args = ["1000000", *(str(i) for i in range(depth))]
        client = redis.Redis(port=port)
        client.hset(self.key, mapping={f"l{i}": 10**15 for i in range(depth)})
        client.close()

    def sync(self) -> tuple[Lifecycle, Callable[[], None]]:
        client = redis.Redis(port=self.port)
        reserve, commit = client.register_script(BARE_RESERVE), client.register_script(BARE_COMMIT)
        keys = [self.key]

        def lifecycle() -> None:
            reserve(keys, self.args)
            commit(keys, self.args)

        return lifecycle, client.close

    def asynchronous(self) -> tuple[AsyncLifecycle, Callable[[], Awaitable[None]]]:
        client = redis.asyncio.Redis(port=self.port, max_connections=TASKS)
        reserve, commit = client.register_script(BARE_RESERVE), client.register_script(BARE_COMMIT)
        keys = [self.key]

        async def lifecycle() -> None:
            await reserve(keys, self.args)
            await commit(keys, self.args)

        return lifecycle, client.aclose


class BareRaw(Bare):
    """The bare pair sent the way the store sends its scripts: EVALSHA packed by hand and written straight
    to a pooled connection, skipping redis-py's command layer. Ours minus this is the cost of the ledger's
    features, with the client path the same on both sides."""

    def sync(self) -> tuple[Lifecycle, Callable[[], None]]:
        client = redis.Redis(port=self.port)
        reserve, commit = client.register_script(BARE_RESERVE), client.register_script(BARE_COMMIT)
        reserve([self.key], self.args)  # loaded
        commit([self.key], self.args)
        pool = client.connection_pool

        def packed(sha: str) -> bytes:
            parts = ["EVALSHA", sha, "1", self.key, *self.args]
            return f"*{len(parts)}\r\n".encode() + b"".join(b"$%d\r\n%b\r\n" % (len(p), p.encode()) for p in parts)

        commands = (packed(reserve.sha), packed(commit.sha))

        def lifecycle() -> None:
            for command in commands:
                connection = pool.get_connection()
                try:
                    connection.send_packed_command([command])  # type: ignore[no-untyped-call]
                    connection.read_response()
                finally:
                    pool.release(connection)

        return lifecycle, client.close


class Trivial:
    def __init__(self, port: int) -> None:
        self.port = port

    def sync(self) -> tuple[Lifecycle, Callable[[], None]]:
        client = redis.Redis(port=self.port)
        script = client.register_script(TRIVIAL)
        return (lambda: script(["k"], [])), client.close

    def asynchronous(self) -> tuple[AsyncLifecycle, Callable[[], Awaitable[None]]]:
        client = redis.asyncio.Redis(port=self.port, max_connections=TASKS)
        script = client.register_script(TRIVIAL)
        return (lambda: script(["k"], [])), client.aclose


# --- measuring -------------------------------------------------------------------------------------
def server_usec(port: int) -> int:
    """Microseconds the server has spent running EVALSHA so far (``INFO commandstats``)."""
    client = redis.Redis(port=port)
    try:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))
    finally:
        client.close()


def run_sync(workload: Any, seconds: float, port: int | None = None) -> tuple[float, float, float, float]:
    """(lifecycles/s, p50 µs, p99 µs, server µs) for one client calling in a loop. With ``port``, the
    last is the server's own time per lifecycle in scripts (``INFO commandstats``): the Lua work alone,
    without the round trip and the client; otherwise 0."""
    lifecycle, close = workload.sync()
    for _ in range(20):
        lifecycle()
    before = server_usec(port) if port is not None else 0
    samples: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    start = clock()
    while True:
        t0 = clock()
        lifecycle()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= end:
            break
    elapsed = (clock() - start) / 1e9
    server = (server_usec(port) - before) / len(samples) if port is not None else 0.0
    close()
    samples.sort()
    return len(samples) / elapsed, samples[len(samples) // 2] / 1e3, samples[int(len(samples) * 0.99)] / 1e3, server


def run_async(workload: Any, seconds: float) -> float:
    async def main() -> float:
        lifecycle, close = workload.asynchronous()
        await asyncio.gather(*(lifecycle() for _ in range(TASKS)))
        count = 0
        end = time.perf_counter() + seconds

        async def task() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await lifecycle()
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(task() for _ in range(TASKS)))
        elapsed = time.perf_counter() - start
        await close()
        return count / elapsed

    return asyncio.run(main())


def _proc_main(workload: Any, seconds: float, ready: Any, go: Any, out: Any) -> None:
    lifecycle, close = workload.sync()
    for _ in range(20):
        lifecycle()
    ready.release()
    go.wait()
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        lifecycle()
        count += 1
    close()
    out.put(count / seconds)


def run_processes(workload: Any, seconds: float) -> float:
    context = multiprocessing.get_context("fork")
    ready, go, out = context.Semaphore(0), context.Event(), context.Queue()
    processes = [context.Process(target=_proc_main, args=(workload, seconds, ready, go, out)) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.acquire()
    go.set()
    total = sum(out.get(timeout=60) for _ in processes)
    for process in processes:
        process.join()
    return total


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- the naive counter and its race ----------------------------------------------------------------
def _naive_race(port: int, key: str, attempts: int, out: Any, go: Any) -> None:
    client = redis.Redis(port=port)
    go.wait()
    granted = 0
    for _ in range(attempts):
        spent = int(client.get(key) or 0)
        if spent + 1 <= RACE_LIMIT:
            client.incrby(key, 1)
            granted += 1
    client.close()
    out.put(granted)


def _ours_race(url: str, scope: str, attempts: int, out: Any, go: Any) -> None:
    authority = Authority(url)
    action = Action("tool_call", "t", {"calls": 1})
    go.wait()
    granted = 0
    for _ in range(attempts):
        decision = authority.reserve(action, scope)
        if decision.allowed:
            authority.commit(decision.reservation)  # type: ignore[arg-type]
            granted += 1
    authority.close()
    out.put(granted)


RACE_LIMIT = 2000


def race(port: int, url: str) -> dict[str, int]:
    """4 processes, 1,000 attempts each, against a limit of 2,000 — then 64 asyncio tasks the same."""
    context = multiprocessing.get_context("fork")
    client = redis.Redis(port=port)
    results: dict[str, int] = {}
    for name in ("naive", "ours"):
        go, out = context.Event(), context.Queue()
        key = f"naive:{os.getpid()}:{time.time_ns()}"
        scope = f"tenant:race{time.time_ns()}/run:r"
        if name == "ours":
            authority = Authority(url)
            authority.set_budget(Budget(scope.split("/", maxsplit=1)[0], "calls", RACE_LIMIT))
            authority.close()
        target = _naive_race if name == "naive" else _ours_race
        first = (port, key) if name == "naive" else (url, scope)
        processes = [context.Process(target=target, args=(*first, 1000, out, go)) for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        time.sleep(0.3)
        go.set()
        granted = sum(out.get(timeout=120) for _ in processes)
        for process in processes:
            process.join()
        if name == "naive":
            results["naive_processes"] = int(client.get(key) or 0) - RACE_LIMIT
        else:
            authority = Authority(url)
            spent = int(authority.balance(scope.split("/", maxsplit=1)[0])["calls"].spent)
            authority.close()
            results["ours_processes"] = max(0, spent - RACE_LIMIT)
            assert granted == spent

    async def naive_tasks() -> int:
        aclient = redis.asyncio.Redis(port=port, max_connections=TASKS)
        key = f"naive:a:{time.time_ns()}"

        async def task() -> None:
            for _ in range(100):
                spent = int(await aclient.get(key) or 0)
                if spent + 1 <= RACE_LIMIT:
                    await aclient.incrby(key, 1)

        await asyncio.gather(*(task() for _ in range(TASKS)))
        final = int(await aclient.get(key) or 0)
        await aclient.aclose()
        return final - RACE_LIMIT

    async def ours_tasks() -> int:
        authority = Authority(url)
        scope = f"tenant:arace{time.time_ns()}/run:r"
        await authority.aset_budget(Budget(scope.split("/", maxsplit=1)[0], "calls", RACE_LIMIT))
        action = Action("tool_call", "t", {"calls": 1})

        async def task() -> None:
            for _ in range(100):
                decision = await authority.areserve(action, scope)
                if decision.allowed:
                    await authority.acommit(decision.reservation)  # type: ignore[arg-type]

        await asyncio.gather(*(task() for _ in range(TASKS)))
        spent = int((await authority.abalance(scope.split("/", maxsplit=1)[0]))["calls"].spent)
        await authority.store.aclose()
        return max(0, spent - RACE_LIMIT)

    results["naive_tasks"] = asyncio.run(naive_tasks())
    results["ours_tasks"] = asyncio.run(ours_tasks())
    client.close()
    return results


class Naive:
    """The GET-check-INCRBY counter as a lifecycle (its 'commit' is the INCRBY)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def sync(self) -> tuple[Lifecycle, Callable[[], None]]:
        client = redis.Redis(port=self.port)
        key = f"naive:{time.time_ns()}"

        def lifecycle() -> None:
            spent = int(client.get(key) or 0)
            if spent + 1 <= 10**15:
                client.incrby(key, 1)

        return lifecycle, client.close


# --- live holds ------------------------------------------------------------------------------------
def add_live_holds(url: str, scope: str, count: int) -> None:
    """Park ``count`` held reservations (1 h TTL) in the tenant, pipelined through the reserve script."""
    store = RedisStore.from_url(url)
    client, scripts = store._sync_client()
    chain = tuple(scope.split("/")[: i + 1] for i in range(len(scope.split("/"))))
    chain_paths = tuple("/".join(parts) for parts in chain)
    keys = store._keys(chain_paths[0])
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        now = time.time()  # (per request: parking 100,000 took past max_clock_skew on a slow host)
        request = HoldRequest(
            reservation_id=f"{os.urandom(10).hex()}.{chain_paths[0]}",
            chain=chain_paths,
            plans=(PlanSpec((("calls", 1),), (0,) * len(chain_paths)),),
            now=now,
            expires_at=now + 3600,
            windows=windows_at(now),
        )
        scripts["reserve"](keys, store._hold_args(request), client=pipe)
        if n % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    store.close()


# --- the report ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (medians reported)")
    parser.add_argument("--quick", action="store_true", help="depth 1 and 6 only, 3 rounds")
    options = parser.parse_args()
    rounds = 3 if options.quick else options.rounds
    seconds = options.seconds
    depths = (1, 6) if options.quick else (1, 3, 6)

    process, port, folder = start_server()
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=2&connect_timeout=2"
    try:
        info = redis.Redis(port=port).info("server")
        python = sys.version.split()[0]
        print(
            f"redis-server {info['redis_version']} on 127.0.0.1:{port}; python {python}; "
            f"redis-py {redis.__version__}; {os.cpu_count()} cores; {rounds} rounds x {seconds}s, medians"
        )
        trivial = Trivial(port)
        naive = Naive(port)

        # sync single client -----------------------------------------------------------------------
        print("\n== sync, one client: lifecycle = reserve + commit ==")
        print(f"{'depth':>5} {'plans':>5} | {'ours/s':>8} {'p50us':>7} {'p99us':>7} | {'bare/s':>8} {'p50us':>7}"
              f" {'p99us':>7} | {'p50 ours/bare':>13} {'rate ours/bare':>14} | {'store-only p50us':>16}"
              f" {'/bare':>6} | {'bare-raw p50us':>14} {'ours/bare-raw':>13}")  # fmt: skip
        rates_by_depth: dict[tuple[int, int], float] = {}
        server_lines: list[str] = []
        trivial_samples: list[tuple[float, float, float, float]] = []
        naive_samples: list[tuple[float, float, float, float]] = []
        for depth in depths:
            bare = Bare(port, depth, f"b{depth}")
            bare_raw = BareRaw(port, depth, f"b{depth}")
            raw_p50s: list[float] = []  # the bare pair does not depend on the plans: measured once per depth
            for plans in (1, 3):
                ours = Ours(url, depth, plans, f"s{depth}p{plans}")
                store_only = StoreOnly(url, depth, plans, f"s{depth}p{plans}")
                mine, floor, stored = [], [], []
                for _ in range(rounds):
                    mine.append(run_sync(ours, seconds, port))
                    floor.append(run_sync(bare, seconds, port))
                    stored.append(run_sync(store_only, seconds))
                    if plans == 1:
                        raw_p50s.append(run_sync(bare_raw, seconds)[1])
                    if depth == depths[0] and plans == 1:
                        trivial_samples.append(run_sync(trivial, seconds))
                        naive_samples.append(run_sync(naive, seconds))
                r, p50, p99 = (median([m[i] for m in mine]) for i in range(3))
                br, bp50, bp99 = (median([f[i] for f in floor]) for i in range(3))
                rates_by_depth[(depth, plans)] = r
                ours_text = f"{r:>8.0f} {p50:>7.1f} {p99:>7.1f}"
                bare_text = f"{br:>8.0f} {bp50:>7.1f} {bp99:>7.1f}"
                server, bare_server = median([m[3] for m in mine]), median([f[3] for f in floor])
                server_lines.append(
                    f"{depth:>5} {plans:>5} | {server:>10.1f} {bare_server:>10.1f} {server / bare_server:>9.2f}"
                    f" | {p50 - server:>10.1f} {bp50 - bare_server:>10.1f}"
                )
                sp50 = median([x[1] for x in stored])
                rp50 = median(raw_p50s)
                print(
                    f"{depth:>5} {plans:>5} | {ours_text} | {bare_text} | {p50 / bp50:>13.2f} {r / br:>14.2f}"
                    f" | {sp50:>16.1f} {sp50 / bp50:>6.2f} | {rp50:>14.1f} {p50 / rp50:>13.2f}"
                )
        tr, tp50, tp99 = (median([s[i] for s in trivial_samples]) for i in range(3))
        nr, np50, np99 = (median([s[i] for s in naive_samples]) for i in range(3))
        print(f"floor: trivial script call  {tr:>8.0f}/s  p50 {tp50:.1f} us  p99 {tp99:.1f} us")
        print(f"floor: naive GET+INCRBY     {nr:>8.0f}/s  p50 {np50:.1f} us  p99 {np99:.1f} us")
        for plans in (1, 3):
            ratio = rates_by_depth[(depths[-1], plans)] / rates_by_depth[(1, plans)]
            print(f"depth {depths[-1]} rate / depth 1 rate ({plans} plan{'s' if plans > 1 else ''}): {ratio:.2f}")
        print("\n== where a sync lifecycle's time goes: the server's own time in scripts (INFO commandstats) ==")
        print(f"{'depth':>5} {'plans':>5} | {'server us':>10} {'bare':>10} {'ours/bare':>9}"
              f" | {'rest of p50':>10} {'bare':>10}   (rest = round trips + client)")  # fmt: skip
        for line in server_lines:
            print(line)

        # asyncio, 64 tasks ------------------------------------------------------------------------
        print(f"\n== asyncio, {TASKS} tasks on one loop: lifecycles/s ==")
        print(f"{'depth':>5} {'plans':>5} | {'ours/s':>8} | {'bare/s':>8} | {'ours/bare':>9}")
        for depth in depths:
            bare = Bare(port, depth, f"ab{depth}")
            for plans in (1, 3):
                ours = Ours(url, depth, plans, f"a{depth}p{plans}")
                mine, floor = [], []
                for _ in range(rounds):
                    mine.append(run_async(ours, seconds))
                    floor.append(run_async(bare, seconds))
                r, br = median(mine), median(floor)
                print(f"{depth:>5} {plans:>5} | {r:>8.0f} | {br:>8.0f} | {r / br:>9.2f}")
        print(f"floor: trivial script call  {median([run_async(trivial, seconds) for _ in range(rounds)]):>8.0f}/s")

        # processes --------------------------------------------------------------------------------
        print(f"\n== {PROCESSES} processes, one sync client each: lifecycles/s ==")
        print(f"{'depth':>5} {'plans':>5} | {'ours/s':>8} | {'bare/s':>8} | {'ours/bare':>9}")
        proc_rates: dict[tuple[int, int], float] = {}
        for depth in depths:
            bare = Bare(port, depth, f"pb{depth}")
            for plans in (1, 3):
                ours = Ours(url, depth, plans, f"p{depth}p{plans}")
                mine, floor = [], []
                for _ in range(rounds):
                    mine.append(run_processes(ours, seconds))
                    floor.append(run_processes(bare, seconds))
                r, br = median(mine), median(floor)
                proc_rates[(depth, plans)] = r
                print(f"{depth:>5} {plans:>5} | {r:>8.0f} | {br:>8.0f} | {r / br:>9.2f}")
        print(f"floor: trivial script call  {median([run_processes(trivial, seconds) for _ in range(rounds)]):>8.0f}/s")
        for plans in (1, 3):
            ratio = proc_rates[(depths[-1], plans)] / proc_rates[(1, plans)]
            print(f"depth {depths[-1]} rate / depth 1 rate ({plans} plan{'s' if plans > 1 else ''}): {ratio:.2f}")

        # live holds -------------------------------------------------------------------------------
        # The sizes are measured one after the other, so the host's drift shows in the raw p50; the
        # ratio to the floor measured beside it, and the server's own µs per lifecycle, do not drift.
        print("\n== live holds in the tenant (sync, depth 3, 1 plan) ==")
        print(f"{'holds':>7} | {'ours/s':>8} {'p50us':>7} {'p99us':>7} {'server us':>10} | {'bare/s':>8} | "
              f"{'ours/bare':>9} | vs 10 holds: {'p50':>5} {'ours/bare':>9} {'server us':>9}")  # fmt: skip
        ours = Ours(url, 3, 1, "live")
        bare = Bare(port, 3, "live")
        parked = 0
        first: tuple[float, float, float] | None = None
        for target in (10, 1_000, 10_000, 100_000):
            add_live_holds(url, ours.scope, target - parked)
            parked = target
            mine, floor = [], []
            for _ in range(rounds):
                mine.append(run_sync(ours, seconds, port))
                floor.append(run_sync(bare, seconds))
            r, p50, p99, server = (median([m[i] for m in mine]) for i in range(4))
            br = median([f[0] for f in floor])
            first = first or (p50, r / br, server)
            print(f"{target:>7} | {r:>8.0f} {p50:>7.1f} {p99:>7.1f} {server:>10.1f} | {br:>8.0f} | {r / br:>9.2f} | "
                  f"{'':>13} {p50 / first[0]:>5.2f} {r / br / first[1]:>9.2f} {server / first[2]:>9.2f}")  # fmt: skip

        # the race ---------------------------------------------------------------------------------
        print(f"\n== overspend in a race against a limit of {RACE_LIMIT} ==")
        results = race(port, url)
        print(f"{PROCESSES} processes x 1000 attempts: naive GET-check-INCRBY overspent by "
              f"{results['naive_processes']}, ours by {results['ours_processes']}")  # fmt: skip
        print(f"{TASKS} asyncio tasks x 100 attempts:  naive GET-check-INCRBY overspent by "
              f"{results['naive_tasks']}, ours by {results['ours_tasks']}")  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
