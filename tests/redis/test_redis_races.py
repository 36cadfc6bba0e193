"""Races on Redis and Redis Cluster: several processes x threads x asyncio tasks at depth 6.

Afterwards the ledger must balance to the step: nothing held, spent equal to the sum of what every
worker committed, never above a limit, and a budget that only holds (never settles) grants exactly
``limit`` holds however the calls interleave.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from typing import Any

import pytest

from clearance import Action, Authority, Budget, Caps, Plan

LEVELS = ("tenant:race", "workspace:w", "app:a", "workflow:f", "agent:g", "run:r{n}")
DEEP = "/".join(LEVELS)
HOLD_ONLY = "tenant:hold/workspace:w/app:a/workflow:f/agent:g/run:r{n}"
HOLD_LIMIT = 97
PROCESSES, THREADS, TASKS = 3, 2, 8
ATTEMPTS = 40  # per thread and per task

ACTION = Action("model_call", "m", {"usd": "0.1", "calls": 1, "tokens": 100})
PLANS = [
    Plan({"usd": "0.1", "calls": 1, "tokens": 100}),
    Plan({"usd": "0.03", "calls": 1, "tokens": 40}, caps=Caps(model="mini")),
]


def _budgets(authority: Authority) -> None:
    chain = DEEP.split("/")
    path = lambda depth: "/".join(chain[:depth])  # noqa: E731
    authority.set_budget(Budget(path(1), "calls", 900))
    authority.set_budget(Budget(path(2), "usd", "30"))
    authority.set_budget(Budget(path(3), "tokens", 40_000))
    authority.set_budget(Budget(path(4), "usd", "25", period="day"))
    authority.set_budget(Budget(path(5), "calls", 800))
    for n in range(PROCESSES):
        authority.set_budget(Budget(DEEP.format(n=n), "usd", "8"))
    authority.set_budget(Budget("tenant:hold/workspace:w/app:a/workflow:f/agent:g", "calls", HOLD_LIMIT))


def _one(authority: Authority, run: int, i: int, totals: dict[str, int]) -> None:
    """One reserve and its settlement; adds to ``totals`` what was committed (in steps)."""
    decision = authority.reserve(ACTION, DEEP.format(n=run), plans=PLANS)
    hold = authority.reserve(Action("step", "h", {"calls": 1}), HOLD_ONLY.format(n=run), ttl=600)
    totals["holds"] += hold.allowed
    if not decision.allowed:
        return
    assert decision.reservation is not None
    if i % 5 == 0:
        authority.release(decision.reservation)
        return
    usd, tokens = (70_000_000, 90) if decision.plan_index == 0 else (20_000_000, 40)
    authority.commit(decision.reservation, {"usd": f"{usd / 1e9:.2f}", "tokens": tokens})  # calls: as held
    totals["usd"] += usd
    totals["tokens"] += tokens
    totals["calls"] += 1


async def _aone(authority: Authority, run: int, i: int, totals: dict[str, int]) -> None:
    decision = await authority.areserve(ACTION, DEEP.format(n=run), plans=PLANS)
    hold = await authority.areserve(Action("step", "h", {"calls": 1}), HOLD_ONLY.format(n=run), ttl=600)
    totals["holds"] += hold.allowed
    if not decision.allowed:
        return
    assert decision.reservation is not None
    if i % 5 == 0:
        await authority.arelease(decision.reservation)
        return
    usd, tokens = (70_000_000, 90) if decision.plan_index == 0 else (20_000_000, 40)
    await authority.acommit(decision.reservation, {"usd": f"{usd / 1e9:.2f}", "tokens": tokens})
    totals["usd"] += usd
    totals["tokens"] += tokens
    totals["calls"] += 1


def _zero() -> dict[str, int]:
    return {"usd": 0, "tokens": 0, "calls": 0, "holds": 0}


def _process(url: str, run: int, queue: Any) -> None:
    """One worker process: THREADS sync threads and one thread running TASKS asyncio tasks."""
    authority = Authority(url)
    results: list[dict[str, int]] = []

    def sync_thread() -> None:
        totals = _zero()
        for i in range(ATTEMPTS):
            _one(authority, run, i, totals)
        results.append(totals)

    def async_thread() -> None:
        async def main() -> None:
            async def task() -> None:
                totals = _zero()
                for i in range(ATTEMPTS):
                    await _aone(authority, run, i, totals)
                results.append(totals)

            await asyncio.gather(*(task() for _ in range(TASKS)))
            await authority.store.aclose()

        asyncio.run(main())

    threads = [threading.Thread(target=sync_thread) for _ in range(THREADS)]
    threads.append(threading.Thread(target=async_thread))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    authority.close()
    total = _zero()
    for totals in results:
        for key, value in totals.items():
            total[key] += value
    queue.put((len(results), total))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", [pytest.param("redis", marks=pytest.mark.redis), pytest.param("cluster", marks=pytest.mark.cluster)]
)
def test_processes_threads_and_tasks_balance_exactly(kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
    authority = Authority(url)
    _budgets(authority)
    context = multiprocessing.get_context("spawn")  # fork() of a threaded pytest process may deadlock
    queue = context.Queue()
    processes = [context.Process(target=_process, args=(url, n, queue)) for n in range(PROCESSES)]
    for process in processes:
        process.start()
    outcomes = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert all(workers == THREADS + TASKS for workers, _ in outcomes)
    total = _zero()
    for _, totals in outcomes:
        for key, value in totals.items():
            total[key] += value

    chain = DEEP.split("/")
    balances = {b.scope: b for b in authority.budgets("tenant:race")}
    expected = {"usd": total["usd"], "tokens": total["tokens"], "calls": total["calls"]}
    for depth, unit in ((1, "calls"), (2, "usd"), (3, "tokens"), (4, "usd"), (5, "calls")):
        balance = balances["/".join(chain[:depth])]
        assert balance.unit == unit
        assert balance.held == 0
        steps = int(balance.spent * (10**9 if unit == "usd" else 1))
        assert steps == expected[unit], (balance.scope, unit)
        assert balance.spent <= balance.limit
    run_spent = sum(int(balances[DEEP.format(n=n)].spent * 10**9) for n in range(PROCESSES))
    assert run_spent == total["usd"]
    assert all(balances[DEEP.format(n=n)].spent <= balances[DEEP.format(n=n)].limit for n in range(PROCESSES))
    # Demand beat supply somewhere, so some budget is (nearly) used up: the races were real.
    assert total["calls"] < PROCESSES * (THREADS + TASKS) * ATTEMPTS
    # Holds only, never settled: exactly the limit was granted, not one more or less.
    assert total["holds"] == HOLD_LIMIT
    hold = authority.balance("tenant:hold/workspace:w/app:a/workflow:f/agent:g")["calls"]
    assert (hold.held, hold.spent, hold.remaining) == (HOLD_LIMIT, 0, 0)
    authority.close()
