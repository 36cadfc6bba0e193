"""More threads or asyncio tasks than pooled connections, on a healthy Redis: every call waits its
turn and none fails. Connections kept between ledger calls used to go from caller to caller while
callers that had found none kept waited in redis-py's pool, some past its timeout: their calls were
denied as ``store_unavailable`` (77 of 4,000 lifecycles of 200 tasks on 8 connections). On a
cluster, whose client refuses a call beyond its per-node pool at once (MaxConnectionsError), 920
of 1,000 lifecycles of 100 tasks on 8 connections were denied."""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import pytest
import redis as redis_py

from clearance import Action, Authority, Budget, Decision
from clearance.stores.lending import Loan
from clearance.stores.redis import RedisStore

ACTION = Action("step", "s", {"calls": 1})


def _url(redis_url: str, connections: int) -> str:
    return f"{redis_url}&max_connections={connections}&socket_timeout=0.5&connect_timeout=0.5"


def _crowd(authority: Authority, scope: str, threads: int, lifecycles: int) -> list[str]:
    """``threads`` threads each running ``lifecycles`` reserve+commit at once: the denials' messages."""
    denied: list[str] = []
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(lifecycles):
            decision = authority.reserve(ACTION, scope)
            if decision.reservation is None:
                denied.append(decision.reasons[0].message)
                continue
            authority.commit(decision.reservation)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return denied


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_threads_outnumbering_connections_all_get_their_turn(kind: str, request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
    authority = Authority(_url(redis_url, 3))
    authority.set_budget(Budget("tenant:crowd", "calls", 10**9))
    assert _crowd(authority, "tenant:crowd", threads=16, lifecycles=60) == []
    balance = authority.balance("tenant:crowd")["calls"]
    assert (balance.spent, balance.held) == (Decimal(16 * 60), Decimal(0))
    authority.close()


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_tasks_outnumbering_connections_all_get_their_turn(kind: str, request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")

    async def main() -> list[str]:
        authority = Authority(_url(redis_url, 8))
        authority.set_budget(Budget("tenant:acrowd", "calls", 10**9))
        denied: list[str] = []

        async def work() -> None:
            for _ in range(20):
                decision = await authority.areserve(ACTION, "tenant:acrowd")
                if decision.reservation is None:
                    denied.append(decision.reasons[0].message)
                    continue
                await authority.acommit(decision.reservation)

        await asyncio.gather(*(work() for _ in range(200)))
        balance = authority.balance("tenant:acrowd")["calls"]
        assert (balance.spent + len(denied), balance.held) == (Decimal(4000), Decimal(0))
        await authority.store.aclose()
        return denied

    assert asyncio.run(main()) == []


def test_no_connection_in_time_is_not_retried_nor_in_doubt(redis_url: str) -> None:
    # The request was never sent: waiting a second time would outlast the timeout, and no hold can
    # have landed, so there is nothing to release later.
    authority = Authority(f"{redis_url}&max_connections=2&socket_timeout=2&connect_timeout=0.2")
    authority.set_budget(Budget("tenant:busy", "calls", 10))
    store = authority.store
    assert isinstance(store, RedisStore)
    client, _ = store._sync_client()
    taken = Loan()
    store._lender.borrow(client.connection_pool, taken)  # the one connection ledger calls may use
    try:
        decision = authority.reserve(ACTION, "tenant:busy")
    finally:
        store._lender.give_back(client.connection_pool, taken)
    assert decision.reservation is None and decision.reasons[0].code == "store_unavailable"
    assert "No connection available" in decision.reasons[0].message
    assert not store._in_doubt
    assert authority.reserve(ACTION, "tenant:busy").reservation is not None
    authority.close()


def test_calls_stuck_on_a_hung_cluster_node_do_not_hold_the_turns_of_other_nodes(redis_cluster_url: str) -> None:
    # Turns are per node, as the cluster client's pools are: threads waiting on a paused node must
    # not leave tenants on a healthy node without a turn.
    authority = Authority(_url(redis_cluster_url, 8))
    store = authority.store
    assert isinstance(store, RedisStore)
    client, _ = store._sync_client()
    roots = [f"tenant:n{i}" for i in range(30)]
    for root in roots:
        authority.set_budget(Budget(root, "calls", 10**9))
    ports = {root: client.get_node_from_key("{" + root + "}").port for root in roots}
    hung = roots[0]
    healthy = next(root for root in roots if ports[root] != ports[hung])
    for root in (hung, healthy):
        assert authority.reserve(ACTION, root).reservation is not None
    pauser = redis_py.Redis(port=ports[hung])
    pauser.execute_command("CLIENT", "PAUSE", "2500", "ALL")  # type: ignore[no-untyped-call]
    denied: dict[str, list[str]] = {"hung": [], "healthy": []}

    def work(kind: str, root: str) -> None:
        for _ in range(5):
            decision = authority.reserve(ACTION, root)
            if decision.reservation is None:
                denied[kind].append(decision.reasons[0].message)

    stuck = [threading.Thread(target=work, args=("hung", hung)) for _ in range(10)]
    for thread in stuck:
        thread.start()
    time.sleep(0.05)  # the paused node's callers hold its turns first
    others = [threading.Thread(target=work, args=("healthy", healthy)) for _ in range(4)]
    for thread in others:
        thread.start()
    for thread in stuck + others:
        thread.join()
    pauser.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
    pauser.close()
    assert denied["hung"]  # (the paused node's calls timed out: the test did pause it)
    assert denied["healthy"] == []
    authority.close()


def test_a_one_connection_cluster_store_still_takes_turns(redis_cluster_url: str) -> None:
    # The cluster client refuses a second call at once on a one-connection pool: turns, one at a time.
    authority = Authority(_url(redis_cluster_url, 1))
    authority.set_budget(Budget("tenant:one", "calls", 10**9))
    assert _crowd(authority, "tenant:one", threads=4, lifecycles=20) == []
    authority.close()


def test_a_burst_of_new_tenants_on_a_cluster_takes_turns_too(redis_cluster_url: str) -> None:
    # Each new tenant's first budget registers it (SADD on the registry's node): 100 at once on a
    # 4-connection pool failed 96 times with MaxConnectionsError before they took turns.
    authority = Authority(_url(redis_cluster_url, 4))
    store = authority.store
    assert isinstance(store, RedisStore)

    async def main() -> list[str]:
        failed: list[str] = []

        async def provision(n: int) -> None:
            try:
                await authority.aset_budget(Budget(f"tenant:burst{n}", "calls", 10))
            except Exception as error:  # counted, not raised
                failed.append(repr(error))

        await asyncio.gather(*(provision(n) for n in range(100)))
        await store.aclose()
        return failed

    assert asyncio.run(main()) == []
    assert {f"tenant:burst{n}" for n in range(100)} <= set(store._roots())  # every one registered
    authority.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_hold_that_waited_for_a_connection_lives_its_ttl_from_when_it_is_made(redis_url: str, face: str) -> None:
    """The reserve's arguments (its clock and expiry) were fixed before it waited for a pooled
    connection: a TTL shorter than the wait made a hold born expired — its budget handed out again
    by the next call while the action it was made for ran."""
    authority = Authority(f"{redis_url}&max_connections=2&connect_timeout=2")
    authority.set_budget(Budget("tenant:late", "calls", 1))
    store = authority.store
    assert isinstance(store, RedisStore)

    def sync_reserve() -> Decision:
        client, _ = store._sync_client()
        pool, lender = client.connection_pool, store._lender
        taken = Loan()
        lender.borrow(pool, taken)  # the one connection ledger calls may use, busy for 0.6 s
        timer = threading.Timer(0.6, lambda: lender.give_back(pool, taken))
        timer.start()
        try:
            return authority.reserve(ACTION, "tenant:late", ttl=0.3)
        finally:
            timer.join()

    async def async_reserve() -> Decision:
        client, _, lender = await store._async_client()
        taken, _ = await lender.borrow(client.connection_pool)
        asyncio.get_running_loop().call_later(0.6, lender.give_back, taken)
        decision = await authority.areserve(ACTION, "tenant:late", ttl=0.3)
        await store.aclose()
        return decision

    decision = sync_reserve() if face == "sync" else asyncio.run(async_reserve())
    assert decision.reservation is not None
    assert decision.reservation.expires_at > time.time() + 0.1
    assert authority.reserve(ACTION, "tenant:late").denied  # its budget is still held
    authority.close()
