"""Real races: many threads (every store) and several processes (SQLite) on the same budgets.

Each worker reserves and commits as fast as it can against a tight budget at depth 6; afterwards the
ledger must balance exactly: nothing held, spent equal to the sum of what the workers committed,
and never more than the limit (ledger contract point 1).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from clearance import Action, Authority, Budget, Caps, Plan, Store

DEEP = "tenant:race/workspace:w/app:a/workflow:f/agent:g/run:{n}"
LIMIT_CALLS = 300


def _budgets(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:race", "calls", LIMIT_CALLS))
    authority.set_budget(Budget("tenant:race/workspace:w/app:a", "usd", "25"))
    authority.set_budget(Budget("tenant:race/workspace:w/app:a/workflow:f", "usd", "20", period="day"))


def _worker(target: str | Store, worker: int, attempts: int, results: list[tuple[int, int, int]]) -> None:
    """Returns (allowed, committed usd nano, committed calls) through ``results``."""
    authority = Authority(target)
    allowed = committed_usd = committed_calls = 0
    action = Action("model_call", "m", {"usd": "0.1", "calls": 1})
    plans = [Plan({"usd": "0.1", "calls": 1}), Plan({"usd": "0.03", "calls": 1}, caps=Caps(model="mini"))]
    try:
        for i in range(attempts):
            decision = authority.reserve(action, DEEP.format(n=worker % 3), plans=plans)
            if not decision.allowed:
                continue
            allowed += 1
            assert decision.reservation is not None
            if i % 7 == 0:
                authority.release(decision.reservation)
                continue
            usd = 50_000_000 if decision.plan_index == 0 else 20_000_000
            authority.commit(decision.reservation, {"usd": f"{usd / 1e9:.2f}", "calls": 1})
            committed_usd += usd
            committed_calls += 1
    finally:
        if isinstance(target, str):
            authority.close()
    results.append((allowed, committed_usd, committed_calls))


def _check(authority: Authority, results: list[tuple[int, int, int]]) -> None:
    committed_usd = sum(r[1] for r in results)
    committed_calls = sum(r[2] for r in results)
    calls = authority.balance("tenant:race")["calls"]
    assert calls.held == 0
    assert calls.spent == committed_calls <= LIMIT_CALLS
    for scope in ("tenant:race/workspace:w/app:a", "tenant:race/workspace:w/app:a/workflow:f"):
        usd = authority.balance(scope)["usd"]
        assert usd.held == 0
        assert usd.spent * 10**9 == committed_usd
        assert usd.spent <= usd.limit
    # The budget bound: the calls budget or the usd budgets must have been exhausted.
    assert (
        committed_calls == LIMIT_CALLS
        or authority.balance("tenant:race/workspace:w/app:a/workflow:f")["usd"].remaining < 1
    )


def test_threads_never_overspend(store_url: str) -> None:
    authority = Authority(store_url)
    _budgets(authority)
    results: list[tuple[int, int, int]] = []
    # In-memory threads must share one store; the others each open their own connection from the URL.
    target: str | Store = authority.store if store_url.startswith("memory") else store_url
    threads = [threading.Thread(target=_worker, args=(target, n, 120, results)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    _check(authority, results)
    authority.close()


def _process_main(url: str, worker: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    results: list[tuple[int, int, int]] = []
    threads = [threading.Thread(target=_worker, args=(url, worker * 10 + t, 60, results)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        queue.put(result)


@pytest.mark.sqlite
@pytest.mark.slow
def test_processes_never_overspend_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    authority = Authority(url)
    _budgets(authority)
    context = multiprocessing.get_context("spawn")  # fork() of a threaded pytest process may deadlock
    queue = context.Queue()
    processes = [context.Process(target=_process_main, args=(url, n, queue)) for n in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode == 0
    results = [queue.get(timeout=5) for _ in range(12)]
    _check(authority, results)
    authority.close()


@pytest.mark.asyncio
async def test_asyncio_tasks_never_overspend(store_url: str) -> None:
    import asyncio

    authority = Authority(store_url)
    _budgets(authority)
    action = Action("model_call", "m", {"usd": "0.1", "calls": 1})
    committed: list[int] = []

    async def task(n: int) -> None:
        for _ in range(15):
            decision = await authority.areserve(action, DEEP.format(n=n % 3))
            if decision.reservation is None:
                continue
            await asyncio.sleep(0)  # let the other tasks interleave while this one holds budget
            await authority.acommit(decision.reservation, {"usd": "0.05", "calls": 1})
            committed.append(50_000_000)

    await asyncio.gather(*(task(n) for n in range(40)))
    _check(authority, [(len(committed), sum(committed), len(committed))])
    await authority.aclose()
