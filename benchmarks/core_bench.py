"""Reserve+commit lifecycles on the embedded stores, each beside a bare baseline from the same run.

    python benchmarks/core_bench.py [--seconds 0.4] [--rounds 5]

Baselines: a bare dict+lock ledger doing the same check-and-hold / settle arithmetic at the same
depth (memory), and a bare SQLite transaction pair (BEGIN IMMEDIATE; one UPDATE over the same
rows; COMMIT — twice) at the same durability, WAL + synchronous=NORMAL (SQLite). Rounds are
interleaved (ours, baseline, ours, …) and the medians are reported, because this machine is shared
and noisy; read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from clearance import Action, Authority, Budget

DEPTHS = (1, 3, 6)
KINDS = ("tenant", "workspace", "app", "workflow", "agent", "run")


def scope_at(depth: int) -> str:
    return "/".join(f"{KINDS[i]}:n{i}" for i in range(depth))


def authority_lifecycle(url: str, depth: int) -> tuple[Callable[[], None], Callable[[], None]]:
    authority = Authority(url)
    scope = scope_at(depth)
    levels = scope.split("/")
    for i in range(depth):  # a budget on every level: the worst case for the ledger
        authority.set_budget(Budget("/".join(levels[: i + 1]), "usd", 10**6))
    action = Action("model_call", "m", {"usd": "0.001"})
    actual = {"usd": "0.0007"}

    def lifecycle() -> None:
        decision = authority.reserve(action, scope)
        authority.commit(decision.reservation, actual)  # type: ignore[arg-type]

    return lifecycle, authority.close


def bare_memory(depth: int) -> tuple[Callable[[], None], Callable[[], None]]:
    lock = threading.Lock()
    accounts = {i: [10**15, 0, 0] for i in range(depth)}  # limit, spent, held

    def lifecycle() -> None:
        with lock:
            for account in accounts.values():
                if account[0] - account[1] - account[2] < 1_000_000:
                    raise RuntimeError("exhausted")
            for account in accounts.values():
                account[2] += 1_000_000
        with lock:
            for account in accounts.values():
                account[2] -= 1_000_000
                account[1] += 700_000

    return lifecycle, lambda: None


def bare_sqlite(path: Path, depth: int) -> tuple[Callable[[], None], Callable[[], None]]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE a(k INTEGER PRIMARY KEY, lim INTEGER, spent INTEGER, held INTEGER)")
    db.executemany("INSERT INTO a VALUES (?, ?, 0, 0)", [(i, 10**15) for i in range(depth)])
    keys = tuple(range(depth))
    marks = ", ".join("?" * depth)
    hold = f"UPDATE a SET held = held + 1000000 WHERE k IN ({marks}) AND lim - spent - held >= 1000000"
    settle = f"UPDATE a SET held = held - 1000000, spent = spent + 700000 WHERE k IN ({marks})"

    def lifecycle() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute(hold, keys)
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        db.execute(settle, keys)
        db.execute("COMMIT")

    return lifecycle, db.close


def rate(fn: Callable[[], None], seconds: float) -> float:
    """Lifecycles per second over about ``seconds``."""
    for _ in range(50):
        fn()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.4, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (median reported)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for store in ("memory", "sqlite"):
            for depth in DEPTHS:
                if store == "memory":
                    ours, close_ours = authority_lifecycle("memory://", depth)
                    base, close_base = bare_memory(depth)
                else:
                    ours, close_ours = authority_lifecycle(f"sqlite:///{folder}/ours{depth}.db", depth)
                    base, close_base = bare_sqlite(Path(folder) / f"bare{depth}.db", depth)
                ours_rates, base_rates = [], []
                for _ in range(args.rounds):
                    ours_rates.append(rate(ours, args.seconds))
                    base_rates.append(rate(base, args.seconds))
                close_ours()
                close_base()
                ours_rate, base_rate = statistics.median(ours_rates), statistics.median(base_rates)
                rows.append((store, depth, ours_rate, 1e6 / ours_rate, base_rate, 1e6 / base_rate))
    print(f"clearance core benchmark — medians of {args.rounds} interleaved rounds of {args.seconds}s")
    print("reserve+commit lifecycle, a usd budget on every level of the scope")
    print(f"{'store':<7} {'depth':>5} {'ours/s':>9} {'ours µs':>8} {'base/s':>9} {'base µs':>8} {'ours/base':>9}")
    for store, depth, ours_rate, ours_us, base_rate, base_us in rows:
        print(
            f"{store:<7} {depth:>5} {ours_rate:>9.0f} {ours_us:>8.1f} {base_rate:>9.0f} {base_us:>8.1f}"
            f" {ours_rate / base_rate:>9.2f}"
        )
    memory_us = max(us for store, _, _, us, _, _ in rows if store == "memory")
    sqlite_ratio = min(o / b for store, _, o, _, b, _ in rows if store == "sqlite")
    print(f"target memory <= 15 µs per lifecycle: worst {memory_us:.1f} µs -> {'met' if memory_us <= 15 else 'MISSED'}")
    print(f"target sqlite >= 50% of bare: worst {sqlite_ratio:.0%} -> {'met' if sqlite_ratio >= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
