"""Redis-specific behaviour beyond the contract suite: one round trip, key layout, Lua number traps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from decimal import Decimal
from typing import Any

import pytest
import redis as redis_py
from redis_servers import RedisServer, free_port, require_redis

from clearance import (
    Action,
    Authority,
    Budget,
    Caps,
    ClockSkew,
    Decision,
    InvalidRequest,
    Outcome,
    Plan,
    ReservationNotFound,
    StoreUnavailable,
)
from clearance.periods import windows_at
from clearance.policy_file import PolicyDocument
from clearance.stores import store_from_url
from clearance.stores.base import DEFAULT_RETENTION, root_of
from clearance.stores.redis import RedisStore
from clearance.testing import FakeClock
from clearance.units import MAX_AMOUNT

pytestmark = pytest.mark.redis

CHAIN6 = "tenant:acme/workspace:eu/app:support/workflow:triage/agent:planner/run:r1"


def _calls(client: redis_py.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _raw(redis_url: str, *, decode: bool = False) -> redis_py.Redis:
    """A plain client on the test server, for looking at the keys the store wrote."""
    return redis_py.Redis.from_url(redis_url.split("?", maxsplit=1)[0], decode_responses=decode)


def _budgeted_chain6(redis_url: str, clock: FakeClock) -> tuple[Authority, RedisStore]:
    """An Authority on Redis with a usd budget of 100 on every level of CHAIN6."""
    authority = Authority(redis_url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    for level in range(1, 7):
        authority.set_budget(Budget("/".join(CHAIN6.split("/")[:level]), "usd", 100))
    return authority, store


def _pause(address: tuple[str, int], millis: int, mode: str) -> redis_py.Redis:
    """Hang a Redis node (CLIENT PAUSE): connections are accepted, commands wait."""
    node = redis_py.Redis(host=address[0], port=address[1])
    node.execute_command("CLIENT", "PAUSE", str(millis), mode)
    return node


def _unpause(node: redis_py.Redis) -> None:
    node.execute_command("CLIENT", "UNPAUSE")
    node.close()


def test_reserve_and_commit_are_one_command_each(redis_url: str, clock: FakeClock) -> None:
    authority, _ = _budgeted_chain6(redis_url, clock)
    plans = [Plan({"usd": 200}), Plan({"usd": 150}), Plan({"usd": 1, "tokens": 10})]
    warm = authority.reserve(Action("step", "warm", {"usd": 1}), CHAIN6)  # scripts loaded, root registered
    assert warm.reservation is not None
    authority.commit(warm.reservation)
    raw = _raw(redis_url)
    before = sum(_calls(raw, c) for c in ("evalsha", "eval", "sadd", "script|load"))
    decision = authority.reserve(Action("step", "s", {"usd": 200}), CHAIN6, plans=plans)
    assert decision.plan_index == 2
    middle = sum(_calls(raw, c) for c in ("evalsha", "eval", "sadd", "script|load"))
    assert decision.reservation is not None
    authority.commit(decision.reservation, {"usd": 1})
    after = sum(_calls(raw, c) for c in ("evalsha", "eval", "sadd", "script|load"))
    # INFO itself is not counted among these; each ledger call is exactly one EVALSHA.
    assert (middle - before, after - middle) == (1, 1)
    raw.close()
    authority.close()


def test_every_key_of_a_tenant_shares_one_slot(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(redis_url, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "usd", 10, period="day"))
    decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6, idempotency_key="k{1}")
    assert decision.reservation is not None
    prefix = redis_url.split("key_prefix=")[1].split("&", maxsplit=1)[0]
    raw = _raw(redis_url, decode=True)
    keys = sorted(raw.scan_iter(match=f"{prefix}*"))
    tenant_keys = [k for k in keys if k != f"{prefix}roots"]
    assert tenant_keys and all(k.startswith(f"{prefix}{{tenant:acme}}:") for k in tenant_keys)
    slots = {redis_py.cluster.key_slot(k.encode()) for k in tenant_keys}
    assert len(slots) == 1
    raw.close()
    authority.close()


def test_largest_exact_amounts_survive_lua(redis_url: str, clock: FakeClock) -> None:
    """2e14 is where Redis 7.0's Lua tostring() switches to exponent notation; 2^53-1 is the last exact double."""
    authority = Authority(redis_url, clock=clock)
    authority.set_budget(Budget("tenant:big", "tokens", MAX_AMOUNT))
    decision = authority.reserve(Action("step", "s", {"tokens": 2 * 10**14}), "tenant:big/run:1")
    assert decision.allowed and decision.reservation is not None
    balance = authority.balance("tenant:big")["tokens"]
    assert balance.held == 2 * 10**14
    authority.commit(decision.reservation, {"tokens": 2 * 10**14 + 1})
    rest = MAX_AMOUNT - (2 * 10**14 + 1)
    full = authority.reserve(Action("step", "s", {"tokens": rest}), "tenant:big/run:1")
    assert full.allowed and full.reservation is not None
    assert authority.reserve(Action("step", "s", {"tokens": 1}), "tenant:big/run:1").denied
    authority.commit(full.reservation)
    balance = authority.balance("tenant:big")["tokens"]
    assert (balance.limit, balance.spent, balance.held, balance.remaining) == (MAX_AMOUNT, MAX_AMOUNT, 0, 0)
    with pytest.raises(InvalidRequest):
        Action("step", "s", {"tokens": MAX_AMOUNT + 1})
    # min_headroom on a huge limit: ceil(limit * ppm / 1e6) exactly, no double rounding
    authority.set_budget(Budget("tenant:huge", "tokens", MAX_AMOUNT))
    required = -(-MAX_AMOUNT * 100_000 // 1_000_000)  # 900_719_925_474_100, beyond a double's exact products
    short = Plan({"tokens": MAX_AMOUNT - required + 1}, min_headroom=0.1)  # would keep required - 1
    near = authority.reserve(Action("step", "s", {"tokens": 1}), "tenant:huge/run:1", plans=[short])
    assert near.denied and near.reasons[0].code == "min_headroom"
    assert near.reasons[0].threshold == Decimal(required)
    exact = Plan({"tokens": MAX_AMOUNT - required}, min_headroom=0.1)  # keeps exactly required
    assert authority.reserve(Action("step", "s", {"tokens": 1}), "tenant:huge/run:1", plans=[exact]).allowed
    authority.close()


def test_url_options_and_prefix_validation(redis_url: str) -> None:
    store = store_from_url(redis_url + "&socket_timeout=0.2&connect_timeout=0.1&max_connections=8&retention=90000")
    assert isinstance(store, RedisStore)
    assert store._timeouts == (0.2, 0.1)
    assert store._max_connections == 8
    store.close()
    with pytest.raises(InvalidRequest):
        RedisStore("redis://127.0.0.1:1/0", key_prefix="a{b}")
    with pytest.raises(InvalidRequest):
        store_from_url(redis_url + "&socket_timeout=soon")
    # A misspelled redis-py option, or a database that is not a number, is refused when the store is
    # built (not a bare TypeError on every call, not silently database 0).
    with pytest.raises(InvalidRequest, match="socket_timout"):
        store_from_url(redis_url + "&socket_timout=0.2")
    with pytest.raises(InvalidRequest, match="socket_timout"):
        store_from_url("redis+cluster://127.0.0.1:1/?socket_timout=0.2")
    with pytest.raises(InvalidRequest, match="database must be a number"):
        store_from_url("redis://127.0.0.1:1/ledger2")
    for broken in (
        "redis+cluster://127.0.0.1:1?ssl=true",
        "redis+cluster://127.0.0.1:1?timeout=3",
        "redis+cluster://127.0.0.1:1?retry_on_timeout=true",  # the asyncio cluster client refuses it
    ):
        with pytest.raises(InvalidRequest):  # redis-py's cluster client would hand them to every connection
            store_from_url(broken)
    with pytest.raises(InvalidRequest, match="ssl_cert_reqs"):
        store_from_url("redis://127.0.0.1:1/0?ssl_cert_reqs=none")  # a TLS option without TLS
    for good in (
        "rediss://127.0.0.1:1/0?ssl_cert_reqs=none",
        "unix:///tmp/none.sock?db=2",
        "redis+cluster://127.0.0.1:1?read_from_replicas=true",
        "redis://127.0.0.1:1/",
        "redis://127.0.0.1:1/0?timeout=3",  # the blocking pool's wait
    ):
        store_from_url(good).close()


@pytest.mark.parametrize(
    "option",
    [
        "retention=nan",  # taken: a commit then wrote the settlement and failed at the due index
        "retention=inf",
        "retention=0",
        "audit_capacity=9223372036854775808",  # taken: every write applied, then reported failed
        "reclaim_batch=9223372036854775808",
        "max_connections=10000000000000",  # taken: the first call hung filling redis-py's pool
        "max_connections=0",
        "encoding=rot13",  # taken: every reserve raised a bare LookupError
        "encoding=nonesuch",
        "encoding=latin-1",  # the scripts' own text is UTF-8 (a bare UnicodeEncodeError), labels too
        "encoding=utf-16",
        "encoding_errors=nonesuch",
        "protocol=9",
        "client_name=a%20b",
    ],
)
def test_store_options_redis_would_refuse_at_the_first_call_are_refused_when_the_store_is_made(option: str) -> None:
    with pytest.raises(InvalidRequest):
        store_from_url(f"redis://127.0.0.1:1/0?{option}")
    store_from_url("redis://127.0.0.1:1/0?encoding=UTF8&protocol=3&client_name=worker-7").close()


def test_a_budget_set_again_after_redis_lost_its_data_lists_its_tenant_again(redis_url: str) -> None:
    """A Redis restarted without persistence (or a FLUSHALL) loses the set of tenants too; the
    process that had registered a tenant never did again, so ``budgets()``, ``events()`` and
    ``sweep()`` left it out — for every process — even after its budgets were set again."""
    authority = Authority(redis_url)
    authority.set_budget(Budget("tenant:acme", "usd", 2))
    prefix = redis_url.split("key_prefix=", 1)[1].split("&", 1)[0]
    raw = _raw(redis_url)
    for key in raw.scan_iter(match=f"{prefix}*"):  # everything of this ledger gone (its FLUSHALL)
        raw.delete(key)
    assert authority.budgets() == []
    authority.set_budget(Budget("tenant:acme", "usd", 2))
    assert [(b.scope, b.limit) for b in authority.budgets()] == [("tenant:acme", 2)]
    # (a budget on a tenant that has some is not a registration again: no round trip more)
    sadds = raw.info("commandstats").get("cmdstat_sadd", {}).get("calls", 0)
    authority.set_budget(Budget("tenant:acme/run:r1", "usd", 1))
    assert raw.info("commandstats").get("cmdstat_sadd", {}).get("calls", 0) == sadds
    raw.close()
    authority.close()


def test_scripts_reload_after_script_flush(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(redis_url, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    raw = _raw(redis_url)
    raw.script_flush()
    assert authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6).allowed
    raw.close()
    authority.close()


def test_retention_forgets_settled_reservations(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(redis_url + "&retention=100", clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6, idempotency_key="once")
    assert decision.reservation is not None
    authority.commit(decision.reservation)
    clock.advance(50)
    assert authority.reservation(decision.reservation).status == "committed"
    clock.advance(51)
    authority.sweep()
    with pytest.raises(Exception, match="no reservation"):
        authority.reservation(decision.reservation)
    again = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6, idempotency_key="once")
    assert again.reservation is not None and again.reservation.id != decision.reservation.id
    authority.close()


def test_one_due_index_tells_live_holds_from_settled_ones(redis_url: str, clock: FakeClock) -> None:
    """Held reservations are scored by their expiry (> 0), settled ones by minus their forget time, so
    one range finds what is due and the positive scores are the live holds. A settled one scored the
    0.1 way (+forget time) is still forgotten on time and never listed as held."""
    authority = Authority(redis_url + "&retention=100", clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    live = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6, ttl=500)
    done = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6)
    old = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6)
    assert live.reservation is not None and done.reservation is not None and old.reservation is not None
    authority.commit(done.reservation)
    authority.commit(old.reservation)
    raw = _raw(redis_url, decode=True)
    due_key = store._keys("tenant:acme")[2]
    scores = dict(raw.zrange(due_key, 0, -1, withscores=True))
    token = {r.id.split(".")[0]: r for r in (live.reservation, done.reservation, old.reservation)}
    assert {t: scores[t] > 0 for t in token} == {t: r is live.reservation for t, r in token.items()}
    old_token = old.reservation.id.split(".")[0]
    raw.zadd(due_key, {old_token: -scores[old_token]})  # as 0.1 scored it
    assert [r.id for r in authority.reservations("tenant:acme")] == [live.reservation.id]
    clock.advance(101)
    authority.sweep()
    for settled in (done.reservation, old.reservation):
        with pytest.raises(Exception, match="no reservation"):
            authority.reservation(settled)
    assert authority.reservation(live.reservation).status == "held"
    assert raw.zcard(due_key) == 1
    raw.close()
    authority.close()


def test_events_are_ordered_across_tenants(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(redis_url, clock=clock)
    for tenant in ("tenant:a", "tenant:b", "tenant:c"):
        authority.set_budget(Budget(tenant, "usd", 10))
        authority.reserve(Action("step", "s", {"usd": 1}), f"{tenant}/run:1")
    events = authority.events()
    assert [(e.kind, e.scope.split("/")[0]) for e in events] == [
        ("budget_set", "tenant:a"),
        ("hold", "tenant:a"),
        ("budget_set", "tenant:b"),
        ("hold", "tenant:b"),
        ("budget_set", "tenant:c"),
        ("hold", "tenant:c"),
    ]
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.seq for e in authority.events(after=seqs[2])] == seqs[3:]
    assert len(authority.events(limit=2)) == 2
    authority.close()


@pytest.mark.asyncio
async def test_async_face_is_native_and_per_loop(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(redis_url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    assert type(store).ahold is not RedisStore.__mro__[1].ahold  # overrides the to_thread default
    await authority.aset_budget(Budget("tenant:acme", "calls", 100))
    decisions = await asyncio.gather(
        *(authority.areserve(Action("tool_call", "t", {"calls": 1}), CHAIN6) for _ in range(50))
    )
    assert all(d.allowed for d in decisions)
    await asyncio.gather(*(authority.acommit(d.reservation) for d in decisions if d.reservation))
    balance = (await authority.abalance("tenant:acme"))["calls"]
    assert (balance.spent, balance.held) == (50, 0)
    await store.aclose()


def test_cluster_reserve_spans_one_slot(redis_cluster_url: str, clock: FakeClock) -> None:
    authority = Authority(redis_cluster_url, clock=clock)
    for tenant in ("tenant:a", "tenant:b", "tenant:c", "tenant:d"):  # spread over the three masters
        authority.set_budget(Budget(tenant, "usd", 3))
        for _ in range(3):
            assert authority.reserve(Action("step", "s", {"usd": 1}), f"{tenant}/app:x/run:1", ttl=5).allowed
        assert authority.reserve(Action("step", "s", {"usd": 1}), f"{tenant}/app:x/run:1").denied
    clock.advance(6)
    assert authority.sweep() == 12
    assert {b.scope: b.held for b in authority.budgets()} == dict.fromkeys(
        ("tenant:a", "tenant:b", "tenant:c", "tenant:d"), 0
    )
    authority.close()


def test_unix_socket_url(clock: FakeClock) -> None:
    require_redis()
    folder = tempfile.mkdtemp(prefix="clearance-sock-")
    path = os.path.join(folder, "redis.sock")
    server = RedisServer(extra=("--unixsocket", path, "--unixsocketperm", "700")).start()
    try:
        authority = Authority(f"unix://{path}?db=0&key_prefix=u:&max_clock_skew=0", clock=clock)
        authority.set_budget(Budget("tenant:acme", "usd", 10))
        assert authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6).allowed
        assert authority.balance("tenant:acme")["usd"].held == 1
        authority.close()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_unreachable_cluster_is_a_decision(clock: FakeClock) -> None:
    port = free_port()  # nothing listens there
    authority = Authority(f"redis+cluster://127.0.0.1:{port}?connect_timeout=0.2&socket_timeout=0.2", clock=clock)
    started = time.monotonic()
    decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6)
    assert decision.denied and decision.reasons[0].code == "store_unavailable"
    assert "_Unavailable" not in decision.reasons[0].message  # said once, not wrapped as a closed connection
    assert time.monotonic() - started < 2.0
    with pytest.raises(StoreUnavailable):
        authority.balance("tenant:acme")
    authority.close()


@pytest.mark.cluster
def test_a_cluster_url_names_several_seeds(redis_cluster_url: str, clock: FakeClock) -> None:
    """``redis+cluster://a:1,b:2``: a process starting while its first seed is down connects through
    another (one seed alone denied every call, the cluster healthy), sync and asyncio alike."""
    dead = f"127.0.0.1:{free_port()}"
    live = redis_cluster_url.split("://", 1)[1].split("?", 1)[0]
    options = redis_cluster_url.split("?", 1)[1]
    authority = Authority(f"redis+cluster://{dead},{live}?{options}", clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    assert authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6).allowed

    async def twin() -> bool:
        return (await authority.areserve(Action("step", "s", {"usd": 1}), CHAIN6)).allowed

    assert asyncio.run(twin())
    assert authority.balance("tenant:acme")["usd"].held == 2
    authority.close()
    alone = Authority(f"redis+cluster://{dead}?{options}&connect_timeout=0.2", clock=clock)
    assert alone.reserve(Action("step", "s", {"usd": 1}), CHAIN6).reasons[0].code == "store_unavailable"
    alone.close()
    for bad in (f"redis+cluster://{live},127.0.0.1:port", f"redis+cluster://{live},", "redis://127.0.0.1:1,127.0.0.1:2/0"):
        with pytest.raises(InvalidRequest):
            Authority(bad)


def test_counters_are_named_by_budget_id_and_old_layout_is_refused(redis_url: str, clock: FakeClock) -> None:
    authority, store = _budgeted_chain6(redis_url, clock)
    decision = authority.reserve(Action("step", "s", {"usd": 3}), CHAIN6)
    assert decision.reservation is not None
    raw = _raw(redis_url, decode=True)
    ledger_key, res_key = store._keys("tenant:acme")[:2]
    ledger = raw.hgetall(ledger_key)
    ids = [ledger["=" + "/".join(CHAIN6.split("/")[:level]) + "|usd|"] for level in range(1, 7)]
    assert sorted(int(i) for i in ids) == [1, 2, 3, 4, 5, 6] and ledger["#next"] == "6"
    steps = ledger[f"h{ids[0]}|"]
    assert int(steps) > 0 and all(ledger[f"h{i}|"] == steps for i in ids)
    assert not any(field.startswith(("s|", "h|")) for field in ledger)  # no counter names a scope path
    token = decision.reservation.id.split(".")[0]
    assert raw.hget(res_key, token).split("\t")[7] == " ".join(f"{i}| {steps}" for i in ids)
    record = store.reservation(decision.reservation.id, clock())  # read back with the budgets named again
    assert [h[:2] for h in record.holds] == [("/".join(CHAIN6.split("/")[:level]), "usd") for level in range(1, 7)]
    # removed and set again: the same id, the counters continue
    authority.remove_budget("tenant:acme", "usd")
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    assert raw.hget(ledger_key, "=tenant:acme|usd|") == ids[0] and raw.hget(ledger_key, "#next") == "6"
    assert authority.balance("tenant:acme")["usd"].held == Decimal(3)
    authority.commit(decision.reservation, {"usd": 2})
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.held, balance.spent) == (0, Decimal(2))
    # data of the layout before ids is refused, never read as "no budget"
    raw.hset(ledger_key, "@tenant:acme", "usd||100")
    with pytest.raises(StoreUnavailable, match="layout before budget ids"):
        store.accounts("tenant:acme", windows_at(clock()), clock(), False)
    raw.hset(ledger_key, "@tenant:acme", f"usd||100|{ids[0]}")
    raw.hset(res_key, token, raw.hget(res_key, token).replace(f"{ids[0]}| {steps}", f"tenant:acme|usd|| {steps}"))
    with pytest.raises(StoreUnavailable, match="holds named by scope path"):
        store.reservation(decision.reservation.id, clock())
    raw.close()
    authority.close()


@pytest.mark.asyncio
async def test_async_calls_cancelled_midway_leave_the_pool_clean(redis_url: str, clock: FakeClock) -> None:
    """Cancelled at every point of a call (sending, waiting for the reply, returning the connection),
    no connection goes back to the pool half-read and none is lost: later calls get their own replies.
    A reserve cancelled after its request went out may have held budget nobody will ever see: the
    next good call releases it, well before its TTL."""
    store = RedisStore.from_url(redis_url.replace("?", "?max_connections=4&", 1))
    authority = Authority(store, clock=clock)
    await authority.aset_budget(Budget("tenant:acme", "usd", 10**6))
    action = Action("step", "s", {"usd": 1})
    for steps in range(12):  # cancel after 0..11 loop iterations, 8 calls at once
        tasks = [asyncio.ensure_future(authority.areserve(action, "tenant:acme/run:r1")) for _ in range(8)]
        for _ in range(steps):
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Decision) and outcome.reservation is not None:
                await authority.acommit(outcome.reservation)  # finished before its cancel came
        for _ in range(3):
            decision = await authority.areserve(action, "tenant:acme/run:r1")
            assert decision.allowed and decision.reservation is not None
            settled = await authority.acommit(decision.reservation)
            assert settled.status == "committed"
    client, _, lender = await store._async_client()
    await asyncio.sleep(0.05)  # release tasks of cancelled calls finish
    # In use: only the connections kept for the next ledger call (at most half the pool), each
    # either disconnected (cut mid-call) or with nothing left to read; nobody left waiting for one.
    idle = lender._idle
    assert set(client.connection_pool._in_use_connections) == set(idle) and len(idle) <= 2
    assert not lender._waits and lender._taken == len(idle)
    for connection in idle:
        assert not connection.is_connected or not await connection.can_read()
    for _ in range(4):  # each good call releases up to 32 reserves left in doubt
        await authority.abalance("tenant:acme")
        decision = await authority.areserve(action, "tenant:acme/run:r1")
        assert decision.reservation is not None
        await authority.acommit(decision.reservation)
    assert not store._in_doubt
    assert (await authority.abalance("tenant:acme"))["usd"].held == 0  # clock never moved: no TTL helped
    await authority.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("server", ["redis_url", "redis_cluster_url"])
async def test_a_cancelled_async_call_is_cancelled(server: str, request: pytest.FixtureRequest) -> None:
    """redis-py writes a request inside ``asyncio.wait_for``, which on Python 3.11 drops a
    cancellation arriving as the write finishes: half the cancels of a reserve were lost — the task
    went on to its model call with an allowed decision, and one awaited in ``wait_for`` left a hold
    nobody got until its TTL. Every cancel now cancels, and what such a reserve held is released by
    the next good call."""
    authority = Authority(str(request.getfixturevalue(server)))
    await authority.aset_budget(Budget("tenant:acme", "usd", 100))
    action = Action("step", "s", {"usd": 1})
    warm = await authority.areserve(action, "tenant:acme/run:r1")  # connected, its policy read
    await authority.arelease(warm.reservation)  # type: ignore[arg-type]

    async def reserve(inside_wait_for: bool) -> Decision:
        call = authority.areserve(action, "tenant:acme/run:r1", ttl=600)
        return await (asyncio.wait_for(call, 30) if inside_wait_for else call)

    lost = []
    for steps in range(10):  # cancel after 0..9 loop iterations, alone and inside wait_for
        for inside_wait_for in (False, True):
            task = asyncio.ensure_future(reserve(inside_wait_for))
            for _ in range(steps):
                await asyncio.sleep(0)
            requested = task.cancel()
            try:
                decision = await task
            except asyncio.CancelledError:
                continue
            await authority.arelease(decision.reservation)  # type: ignore[arg-type]
            # (Inside wait_for, only the standard library loses one: Python 3.11's wait_for returns
            # the inner call's result when that call finished just as the cancel came — the task
            # had not run since. Otherwise it cancels the call and raises whatever the call did.)
            if requested and not inside_wait_for:
                lost.append((steps, inside_wait_for))
    assert lost == []
    for _ in range(3):  # good calls: they release what cancelled reserves may have held
        decision = await authority.areserve(action, "tenant:acme/run:r1")
        await authority.arelease(decision.reservation)  # type: ignore[arg-type]
    assert (await authority.abalance("tenant:acme"))["usd"].held == 0
    await authority.aclose()


def test_period_budgets_keep_their_latest_windows_only(redis_url: str, clock: FakeClock) -> None:
    """A per-minute budget would otherwise add two counters to the tenant's hash every minute for
    good. Past windows are pruned to the latest 8, but never a window something is still held in
    (that hold settles there later), and never the current one. (The FakeClock moves the windows;
    the server's clock, which must also say a window is old before it goes, is moved by ageing the
    first-write times the store keeps.)"""
    authority = Authority(redis_url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    tenant = "tenant:windows"
    authority.set_budget(Budget(tenant, "calls", 5, period="minute"))
    action = Action("step", "s", {"calls": 1})
    raw = _raw(redis_url, decode=True)
    ledger_key = store._keys(tenant)[0]
    budget_id = raw.hget(ledger_key, f"={tenant}|calls|minute")

    def windows_kept() -> list[str]:
        prefixes = (f"s{budget_id}|", f"h{budget_id}|")
        return sorted({f.split("|", 1)[1] for f in raw.hkeys(ledger_key) if f.startswith(prefixes)})

    def age_windows() -> None:  # as if the server's clock had moved on as far as the FakeClock
        listed = raw.hget(ledger_key, f"w{budget_id}") or ""
        raw.hset(ledger_key, f"w{budget_id}", " ".join(entry.split("@")[0] + "@0" for entry in listed.split()))

    long_hold = authority.reserve(action, f"{tenant}/run:long", ttl=3600)
    assert long_hold.reservation is not None
    first_window = windows_at(clock())[1][1]
    seen = [first_window]
    for minute in range(1, 13):
        clock.advance(60)
        age_windows()
        for _ in range(5):  # the whole minute's budget, each minute: every window is counted on its own
            decision = authority.reserve(action, f"{tenant}/run:r{minute}")
            assert decision.reservation is not None, decision.reasons
            authority.commit(decision.reservation)
        assert authority.reserve(action, f"{tenant}/run:r{minute}").denied
        seen.append(windows_at(clock())[1][1])
        kept = windows_kept()
        assert first_window in kept  # something is still held there
        assert seen[-1] in kept and len(kept) <= 9
    assert kept == sorted([first_window, *seen[-8:]])
    authority.commit(long_hold.reservation)  # settles in its own window, long since past
    assert raw.hget(ledger_key, f"h{budget_id}|{first_window}") == "0"
    clock.advance(60)
    age_windows()
    assert authority.reserve(action, f"{tenant}/run:last").allowed  # a new window: the old one goes now
    assert windows_kept() == sorted([*seen[-7:], windows_at(clock())[1][1]])
    assert authority.balance(tenant)["calls"].held == 1
    raw.close()
    authority.close()


def test_windows_age_out_by_the_calendar_on_the_server(redis_url: str) -> None:
    """A window is pruned once the 8 latest windows began before it by the server's clock. That
    took 8 periods from the window's first write (anywhere inside it), so a 9th window stayed until
    the next one opened, and a month was 31 days. The scripts' calendar is checked here against
    clearance.periods over many times, month, year and leap-day boundaries included."""
    import random
    from datetime import UTC, datetime
    from pathlib import Path

    from clearance.periods import WINDOWS_KEPT, window_back

    source = (Path(__file__).resolve().parents[2] / "core" / "stores" / "lua" / "common.lua").read_text()
    begin = source.index("  local function kept_since")
    body = source[begin : source.index("\n  end\n", begin) + 6]
    script = (
        f"local KEEP_WINDOWS = {WINDOWS_KEPT}\n"
        "local PERIOD_SECONDS = {minute = 60, hour = 3600, day = 86400, week = 604800}\n"
        f"{body}\nreturn string.format('%d', kept_since(tonumber(ARGV[1]), ARGV[2]))"
    )

    def start(window: str, period: str) -> int:
        if period == "week":
            year, week = window.split("-W")
            return int(datetime.fromisocalendar(int(year), int(week), 1).replace(tzinfo=UTC).timestamp())
        layout = {"minute": "%Y-%m-%dT%H:%M", "hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}[period]
        return int(datetime.strptime(window, layout).replace(tzinfo=UTC).timestamp())

    shuffle = random.Random(7)
    times = [int(shuffle.uniform(0, 4.2e9)) for _ in range(300)]
    times += [
        int(datetime(year, month, 1, tzinfo=UTC).timestamp()) + nudge
        for year in (2000, 2027, 2028, 2100)
        for month in range(1, 13)
        for nudge in (-1, 0, 1)
    ]
    raw = _raw(redis_url, decode=True)
    kept_since = raw.register_script(script)
    for now in times:
        for period in ("minute", "hour", "day", "week", "month"):
            expected = start(window_back(now, period, WINDOWS_KEPT - 1), period)
            assert int(kept_since(args=[now, period])) == expected, (now, period)
    raw.close()


def test_a_worker_whose_clock_runs_ahead_cannot_prune_the_current_window(redis_url: str) -> None:
    """Window ids come from each worker's clock. A worker 9.5 minutes ahead opens nine "future"
    windows within one real minute; the window the others are counting in now was first written
    moments ago by the server's clock, so it stays, and its spend still binds."""
    now = FakeClock(1_798_761_600.0 + 15)  # 15 s into a minute
    ahead = FakeClock(now() + 570)
    behind_authority, ahead_authority = Authority(redis_url, clock=now), Authority(redis_url, clock=ahead)
    tenant = "tenant:skew"
    behind_authority.set_budget(Budget(tenant, "calls", 10, period="minute"))
    spend = Action("step", "s", {"calls": 10})
    decision = behind_authority.reserve(spend, f"{tenant}/run:r")
    assert decision.reservation is not None
    behind_authority.commit(decision.reservation)
    for _ in range(9):  # nine new windows, all "later" than the current one
        ahead.advance(60)
        step = ahead_authority.reserve(Action("step", "s", {"calls": 1}), f"{tenant}/run:a")
        assert step.reservation is not None
        ahead_authority.commit(step.reservation)
    assert behind_authority.reserve(spend, f"{tenant}/run:r").denied  # the first 10 still count
    assert behind_authority.balance(tenant)["calls"].spent == 10
    behind_authority.close()
    ahead_authority.close()


def test_usual_commit_reads_only_the_holds_counters_and_falls_back_when_it_cannot(
    redis_url: str, clock: FakeClock
) -> None:
    """While no budget was created or removed since the hold ("#v" in the record's plan field), a
    one-unit commit reads its holds' counters and limits in one HMGET; without a version, or with a
    limit missing, it reads the chain's budgets as the general path does — same ledger either way."""
    authority, store = _budgeted_chain6(redis_url, clock)
    raw = _raw(redis_url, decode=True)
    ledger_key, res_key = store._keys("tenant:acme")[:2]
    levels = ["/".join(CHAIN6.split("/")[:level]) for level in range(1, 7)]

    def lifecycle(tamper: str) -> int:
        decision = authority.reserve(Action("step", "s", {"usd": 3}), CHAIN6)
        assert decision.reservation is not None
        token = decision.reservation.id.split(".")[0]
        fields = raw.hget(res_key, token).split("\t")
        version = raw.hget(ledger_key, "#v")
        assert fields[1] == f"0/{version}"
        assert store.reservation(decision.reservation.id, clock()).plan_index == 0  # the version stays inside
        if tamper == "no version":  # a record written before "#v" existed
            raw.hset(res_key, token, "\t".join([fields[0], "0", *fields[2:]]))
        elif tamper == "no limit":  # a budget set before "l<id>" was kept
            raw.hdel(ledger_key, "l" + raw.hget(ledger_key, f"={CHAIN6}|usd|"))
        before = _calls(raw, "hmget")
        assert authority.commit(decision.reservation, {"usd": 2}).flags == ()
        return _calls(raw, "hmget") - before

    assert lifecycle("") == 1
    assert lifecycle("no version") == 2
    assert lifecycle("no limit") == 3  # the fast path's read, then the general path's two
    for scope in levels:
        balance = authority.balance(scope)["usd"]
        assert (balance.spent, balance.held) == (6, 0)
    authority.set_budget(Budget(CHAIN6, "usd", 100))  # writes the limit again
    assert lifecycle("") == 1
    raw.close()
    authority.close()


def test_a_hold_of_several_units_commits_from_its_own_counters(redis_url: str, clock: FakeClock) -> None:
    """A model call holds usd and tokens: its record counts each unit's holds (6 usd budgets, 2 tokens
    ones, in the order of its amounts), so the usual commit charges each counter its own unit from
    one HMGET; a commit naming a unit it held nothing of, or after a budget change, reads the chain."""
    authority, store = _budgeted_chain6(redis_url, clock)
    for scope in ("tenant:acme", CHAIN6):
        authority.set_budget(Budget(scope, "tokens", 10_000))
    raw = _raw(redis_url, decode=True)
    ledger_key, res_key = store._keys("tenant:acme")[:2]

    def lifecycle(amounts: dict[str, int], actual: dict[str, int], record: str) -> int:
        decision = authority.reserve(Action("model_call", "m", amounts), CHAIN6)
        assert decision.reservation is not None
        token = decision.reservation.id.split(".")[0]
        assert raw.hget(res_key, token).split("\t")[1] == f"0/{raw.hget(ledger_key, '#v')}{record}"
        before = _calls(raw, "hmget")
        assert authority.commit(decision.reservation, actual).status == "committed"
        return _calls(raw, "hmget") - before

    assert lifecycle({"usd": 3, "tokens": 100}, {"usd": 2}, "/6,2") == 1
    assert lifecycle({"tokens": 100, "usd": 3}, {"usd": 1, "tokens": 0}, "/2,6") == 1
    assert lifecycle({"usd": 3, "tokens": 0}, {"usd": 1, "tokens": 5}, "/6,0") == 2  # tokens were not held
    tokens = authority.balance("tenant:acme")["tokens"]
    usd = authority.balance(CHAIN6)["usd"]
    assert (usd.spent, usd.held, tokens.spent, tokens.held) == (4, 0, 105, 0)
    raw.close()
    authority.close()


def test_a_worker_whose_clock_is_off_cannot_hold_or_reclaim(redis_url: str) -> None:
    """Expiry is judged by the workers' clocks, so a worker more than ``max_clock_skew`` off the server's
    clock is refused (fail closed) where it could hand a budget out twice: reserve, extend, reclaim.
    Its commits still go through: what it spent is recorded."""
    url = f"{redis_url}&max_clock_skew=10"
    right = Authority(url)
    right.set_budget(Budget("tenant:skew", "usd", 10))
    held = right.reserve(Action("step", "s", {"usd": 1}), "tenant:skew/run:1", ttl=60)
    assert held.allowed and held.reservation is not None
    for offset in (-120.0, 120.0):
        skewed = Authority(url, clock=lambda offset=offset: time.time() + offset)  # type: ignore[misc]
        decision = skewed.reserve(Action("step", "s", {"usd": 1}), "tenant:skew/run:2", ttl=60)
        assert decision.denied and decision.reasons[0].code == "clock_skew"
        with pytest.raises(ClockSkew, match="clock_skew"):
            skewed.extend(held.reservation, 60)
        with pytest.raises(ClockSkew):
            skewed.sweep()
        with pytest.raises(ClockSkew):  # a look-up may expire a hold: not by this clock
            skewed.reservation(held.reservation)
        skewed.close()
        # Failing open is for a store that cannot answer, not for a clock that cannot be trusted.
        lenient = Authority(url, clock=lambda offset=offset: time.time() + offset, fail_open=True)  # type: ignore[misc]
        decision = lenient.reserve(Action("step", "s", {"usd": 1}), "tenant:skew/run:2")
        assert decision.denied and decision.reasons[0].code == "clock_skew"
        store = lenient.store
        assert isinstance(store, RedisStore) and not store._in_doubt  # refused before writing: nothing in doubt
        lenient.close()
    assert right.balance("tenant:skew")["usd"].held == 1  # the worker ahead reclaimed nothing
    behind = Authority(url, clock=lambda: time.time() - 120)
    assert behind.commit(held.reservation, {"usd": 1}).status == "committed"
    assert right.balance("tenant:skew")["usd"].spent == 1
    # ... and its clock does not shorten the retention of what it settled (it runs from the server's)
    raw = _raw(redis_url, decode=True)
    store = right.store
    assert isinstance(store, RedisStore)
    forget_at = -float(raw.zscore(store._keys("tenant:skew")[2], held.reservation.id[:20]))  # type: ignore[arg-type]
    assert forget_at >= time.time() + DEFAULT_RETENTION - 60
    raw.close()
    with pytest.raises(InvalidRequest):
        RedisStore("redis://127.0.0.1:1/0", max_clock_skew=-1)
    behind.close()
    right.close()


def test_reclaim_returns_expired_holds_before_forgetting(redis_url: str, clock: FakeClock) -> None:
    """With more due than one batch, expired holds (budget someone may be waiting for) come back first."""
    authority = Authority(redis_url + "&retention=100&reclaim_batch=1", clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    for _ in range(3):
        settled = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6)
        assert settled.reservation is not None
        authority.commit(settled.reservation, {"usd": 0})
    stuck = authority.reserve(Action("step", "s", {"usd": 5}), CHAIN6, ttl=200)
    assert stuck.allowed
    clock.advance(201)  # three settled ones past retention, the hold past its TTL
    assert authority.reserve(Action("step", "s", {"usd": 6}), CHAIN6).allowed  # one batch: the hold
    authority.close()


def test_a_reused_key_past_retention_is_free_even_when_reclaim_has_not_got_to_it(
    redis_url: str, clock: FakeClock
) -> None:
    """Reclaim forgets at most a batch per call; a key past retention is free all the same."""
    authority = Authority(redis_url + "&retention=100&reclaim_batch=1", clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    first = [authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6, idempotency_key=f"k{i}") for i in range(3)]
    for decision in first:
        authority.commit(decision.reservation, {"usd": 1})  # type: ignore[arg-type]
    clock.advance(101)
    again = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN6, idempotency_key="k2")
    assert not again.replayed and again.reservation is not None
    assert again.reservation.id != first[2].reservation.id  # type: ignore[union-attr]
    assert authority.balance("tenant:acme")["usd"].held == 1
    authority.close()


def test_a_commit_returns_expired_holds_batch_after_batch_before_flagging_overage(
    redis_url: str, clock: FakeClock
) -> None:
    """Reclaim returns a batch per call; a commit that looks over goes on until it fits or none is left."""
    authority = Authority(redis_url + "&reclaim_batch=1", clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 20))
    for _ in range(2):
        assert authority.reserve(Action("step", "s", {"usd": 9}), CHAIN6, ttl=5).allowed
    live = authority.reserve(Action("step", "s", {"usd": 2}), CHAIN6, ttl=100)
    clock.advance(10)
    assert authority.commit(live.reservation, {"usd": 12}).flags == ("over_hold",)  # type: ignore[arg-type]
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (12, 0)
    authority.close()


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_more_expired_holds_than_one_call_reclaims_never_deny_or_show_as_held(
    kind: str, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    """Reclaim returns a batch per script call (one long script would stall every tenant); a
    reserve denied while more expired holds wait (a crashed fleet's, say), and a balance or a
    listing, reclaim them batch by batch and answer as the memory store does — never a false
    denial, never an expired hold shown as held."""
    url = request.getfixturevalue("redis_url" if kind == "single" else "redis_cluster_url")
    authority = Authority(url + "&reclaim_batch=5", clock=clock)
    reference = Authority("memory://", clock=clock)
    for ledger in (authority, reference):
        ledger.set_budget(Budget("tenant:crash", "calls", 23))
        for _ in range(23):
            assert ledger.reserve(Action("step", "s", {"calls": 1}), "tenant:crash/run:1", ttl=10).allowed
    clock.advance(11)
    assert [r.id for r in authority.reservations("tenant:crash", status="held")] == []
    assert authority.balance("tenant:crash")["calls"].held == 0
    for _ in range(23):  # expire them again, then ask for all of it at once
        assert authority.reserve(Action("step", "s", {"calls": 1}), "tenant:crash/run:1", ttl=10).allowed
    clock.advance(11)
    for ledger in (authority, reference):
        everything = ledger.reserve(Action("step", "s", {"calls": 23}), "tenant:crash/run:1")
        assert everything.allowed, everything.reasons
        assert ledger.balance("tenant:crash")["calls"].held == 23
    authority.close()


def test_a_backlog_of_expired_holds_never_sends_a_reserve_down_the_ladder(redis_url: str, clock: FakeClock) -> None:
    """The first plan rejected for an expired hold the batch did not reach: a later plan used to be
    held (capped, a false budget_exhausted) where the memory store holds the first."""
    authority = Authority(redis_url + "&reclaim_batch=3", clock=clock)
    authority.set_budget(Budget("tenant:ladder", "usd", 10))
    authority.reserve(Action("step", "big", {"usd": 7}), "tenant:ladder", ttl=10)  # expires first
    for i in range(3):
        authority.reserve(Action("step", f"s{i}", {"usd": 1}), "tenant:ladder", ttl=20)
    clock.advance(30)  # all four expired: more than one batch
    plans = [Plan({"usd": 5}), Plan({"usd": 1}, caps=Caps(max_output_tokens=10))]
    decision = authority.reserve(Action("step", "want", {"usd": 5}), "tenant:ladder", plans=plans)
    assert decision.outcome is Outcome.ALLOW and decision.plan_index == 0, decision.reasons
    assert authority.balance("tenant:ladder")["usd"].held == 5
    authority.close()


def test_a_listing_never_shows_what_is_past_retention(redis_url: str, clock: FakeClock) -> None:
    """More settled reservations past retention than one reclaim forgets: a listing showed the rest,
    which lookups already treat as forgotten."""
    authority = Authority(redis_url + "&retention=100&reclaim_batch=3", clock=clock)
    authority.set_budget(Budget("tenant:listing", "usd", 100))
    for _ in range(5):
        decision = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:listing")
        authority.commit(decision.reservation, {"usd": 1})  # type: ignore[arg-type]
    clock.advance(1000)
    assert authority.reservations("tenant:listing", status=None) == []
    assert authority.reservations("tenant:listing", status="committed") == []
    authority.close()


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_a_follower_never_skips_an_event_written_while_it_reads(
    kind: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Tenants' streams are read one after another: an event written into one already read, with a
    lower seq than one written into a stream read later, fell below the follower's next ``after``
    (``events tail --follow`` missed ~1% of events with ten busy tenants; on a cluster, whose nodes
    each have a clock, it still did)."""
    authority = Authority(request.getfixturevalue("redis_url" if kind == "single" else "redis_cluster_url"))
    store = authority.store
    assert isinstance(store, RedisStore)
    step = Action("step", "s", {"usd": 1})
    for tenant in ("tenant:fa", "tenant:fb"):
        authority.set_budget(Budget(tenant, "usd", 100))
        authority.commit(authority.reserve(step, tenant).reservation)  # type: ignore[arg-type]
    read = store._read_stream
    written: list[str] = []

    def read_then_write(root: str, *args: Any, **kwargs: Any) -> Any:
        page = read(root, *args, **kwargs)
        if root == "tenant:fa" and not written:  # once tenant:fa is read: it, then tenant:fb, are written
            for tenant in ("tenant:fa", "tenant:fb"):
                decision = authority.reserve(step, tenant)
                assert decision.reservation is not None
                written.append(decision.reservation.id)
        return page

    monkeypatch.setattr(store, "_read_stream", read_then_write)
    first = authority.events(limit=1000)
    monkeypatch.setattr(store, "_read_stream", read)
    second = authority.events(after=max(e.seq for e in first), limit=1000)
    seen = [e.seq for e in first + second]
    assert sorted(seen) == [e.seq for e in authority.events(limit=1000)]
    assert {e.reservation_id for e in second if e.kind == "hold"} >= set(written)
    authority.close()


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_events_across_many_tenants_read_in_pipelines_match_each_tenants_own(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A read across tenants used one round trip per tenant's stream (2,000 tenants: 0.26-0.5 s a
    follower's poll); it reads them in pipelines now, 500 tenants a trip, keeping only the best
    ``limit`` so far. Whatever the chunking, it must answer what each tenant's own stream says."""
    from clearance.stores import redis as redis_store

    authority = Authority(request.getfixturevalue("redis_url" if kind == "single" else "redis_cluster_url"))
    tenants = [f"tenant:many{i}" for i in range(60)]
    step = Action("step", "s", {"usd": 1})
    for round_ in range(3):
        for tenant in tenants[round_::2]:
            authority.set_budget(Budget(tenant, "usd", 100 + round_))
            if round_ == 1:
                authority.commit(authority.reserve(step, tenant).reservation)  # type: ignore[arg-type]
    every = sorted((e for t in tenants for e in authority.events(scope=t, limit=1000)), key=lambda e: e.seq)
    original = redis_store._STREAMS_PER_TRIP
    try:
        for per_trip in (7, 500):
            redis_store._STREAMS_PER_TRIP = per_trip
            for limit in (1, 5, 40, 1000):
                assert authority.events(limit=limit) == every[:limit]
                assert authority.events(limit=limit, newest=True) == every[-limit:]
                middle = every[len(every) // 2].seq
                assert authority.events(after=middle, limit=limit) == [e for e in every if e.seq > middle][:limit]
    finally:
        redis_store._STREAMS_PER_TRIP = original
    authority.close()


def test_a_page_of_events_never_splits_events_of_one_seq(redis_url: str) -> None:
    """On a cluster two nodes may stamp events of two tenants with the same microsecond: one seq. A
    page cut between them lost the second (a follower goes on after the last seq it got). Pages
    never split a seq (here both events are given one id by hand: one Redis never does so)."""
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    for tenant in ("tenant:sa", "tenant:sb"):
        authority.set_budget(Budget(tenant, "usd", 1))
    raw = _raw(redis_url, decode=True)
    streams = [store._keys(tenant)[3] for tenant in ("tenant:sa", "tenant:sb")]
    top = max(int(raw.xinfo_stream(key)["last-generated-id"].split("-")[0]) for key in streams)
    for key, tenant in zip(streams, ("tenant:sa", "tenant:sb"), strict=True):
        raw.xadd(key, {"at": "1", "k": "budget_set", "s": tenant, "a": "usd 1", "d": "twin"}, id=f"{top + 1}-0")
    before = [e for e in authority.events(limit=1000) if e.detail != "twin"]
    page = authority.events(after=before[-1].seq, limit=1)
    assert [e.scope for e in page] == ["tenant:sa", "tenant:sb"]  # one seq: both, though limit is 1
    assert authority.events(after=page[-1].seq, limit=1) == []
    newest = authority.events(limit=1, newest=True)
    assert {e.scope for e in newest} == {"tenant:sa", "tenant:sb"}
    raw.close()
    authority.close()


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_a_follower_never_skips_a_tenant_created_while_it_lists_the_tenants(
    kind: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The tenants are listed, then their streams read: a tenant created (and another's event
    written) in between must come in the next read, not fall below its ``after``."""
    authority = Authority(request.getfixturevalue("redis_url" if kind == "single" else "redis_cluster_url"))
    store = authority.store
    assert isinstance(store, RedisStore)
    authority.set_budget(Budget("tenant:ra", "usd", 100))
    roots = store._roots

    def roots_then_write() -> list[str]:
        listed = roots()
        authority.set_budget(Budget("tenant:rb", "usd", 100))  # a new tenant, not listed
        authority.set_budget(Budget("tenant:ra", "usd", 200))  # a later event in a listed one
        return listed

    monkeypatch.setattr(store, "_roots", roots_then_write)
    first = authority.events(limit=1000)
    monkeypatch.setattr(store, "_roots", roots)
    second = authority.events(after=max(e.seq for e in first), limit=1000)
    assert sorted(e.seq for e in first + second) == [e.seq for e in authority.events(limit=1000)]
    authority.close()


def test_a_retried_reserve_asked_again_after_a_backlog_keeps_its_retry_flag(
    redis_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reserve whose reply was lost is retried with the retry flag; if that answers 'backlog', the
    client drains and asks again — with the flag too: the first copy, delayed, may have landed in
    between (it held budget under the same id, the caller was denied and could not see it)."""
    authority = Authority(redis_url + "&reclaim_batch=3", clock=clock)
    authority.set_budget(Budget("tenant:flag", "usd", 10))
    for _ in range(10):
        authority.reserve(Action("step", "s", {"usd": 1}), "tenant:flag/run:1", ttl=10)
    clock.advance(11)
    store = authority.store
    assert isinstance(store, RedisStore)
    send = store._evalsha
    reserves: list[str] = []

    def lossy(client: Any, script: Any, root: str, args: list[str]) -> Any:
        if len(args) == 12:  # a reserve
            reserves.append(args[-1])
            if len(reserves) == 1:
                raise redis_py.ConnectionError("Connection reset by peer")  # the first copy: delayed
            if len(reserves) == 3:  # the re-ask after draining: the delayed first copy lands just before
                send(client, script, root, [*args[:-1], "0"])
        return send(client, script, root, args)

    monkeypatch.setattr(store, "_evalsha", lossy)
    decision = authority.reserve(Action("step", "s", {"usd": 6}), "tenant:flag/run:2", ttl=60)
    monkeypatch.setattr(store, "_evalsha", send)
    assert reserves == ["0", "1", "3"]
    assert decision.allowed and decision.reservation is not None  # the delayed copy's hold, replayed
    assert [r.id for r in authority.reservations("tenant:flag")] == [decision.reservation.id]
    assert authority.balance("tenant:flag")["usd"].held == 6
    authority.close()


@pytest.mark.asyncio
async def test_more_expired_holds_than_one_call_reclaims_async(redis_url: str, clock: FakeClock) -> None:
    """The same on the asyncio face: areserve and a balance reclaim the backlog first."""
    authority = Authority(redis_url + "&reclaim_batch=5", clock=clock)
    await authority.aset_budget(Budget("tenant:crash-a", "calls", 17))
    for _ in range(17):
        assert (await authority.areserve(Action("step", "s", {"calls": 1}), "tenant:crash-a/run:1", ttl=10)).allowed
    clock.advance(11)
    assert (await authority.abalance("tenant:crash-a"))["calls"].held == 0
    for _ in range(17):
        assert (await authority.areserve(Action("step", "s", {"calls": 1}), "tenant:crash-a/run:1", ttl=10)).allowed
    clock.advance(11)
    assert (await authority.areserve(Action("step", "s", {"calls": 17}), "tenant:crash-a/run:1")).allowed
    await authority.store.aclose()


def test_with_every_clock_trusted_retention_runs_from_the_workers_clock(redis_url: str) -> None:
    """max_clock_skew=0 trusts the workers' clocks (a FakeClock in tests): retention runs from the
    worker's clock alone, as on the other stores, even when it is behind the server's."""
    clock = FakeClock(time.time() - 30 * 86400)  # a month behind the Redis server
    authority = Authority(redis_url, clock=clock)  # (the fixture's URL has max_clock_skew=0)
    authority.set_budget(Budget("tenant:behind", "usd", 10))
    decision = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:behind/run:1", idempotency_key="job-1")
    assert decision.reservation is not None
    authority.commit(decision.reservation)
    clock.advance(DEFAULT_RETENTION + 3600)
    authority.sweep()
    with pytest.raises(ReservationNotFound):
        authority.commit(decision.reservation)
    again = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:behind/run:1", idempotency_key="job-1")
    assert again.allowed and not again.replayed
    authority.close()


def test_a_reserve_request_arriving_after_its_own_retry_holds_nothing_more(redis_url: str, clock: FakeClock) -> None:
    """A reserve's first copy can reach Redis after the client, its connection reset, retried on
    a new one (a proxy's buffer, or two connections read in one event-loop turn). Whichever copy
    comes second — before or after the commit — is a replay: one hold, never a second one
    stranded under the same id (it was: held 2, and 1 left after the commit for good)."""
    authority = Authority(redis_url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    authority.set_budget(Budget("tenant:late", "usd", 10))
    request = authority._request(Action("step", "s", {"usd": 1}), "tenant:late/run:1", None, 60.0, None)[0]
    first_copy = store._hold_args(request)
    retry = [*first_copy[:-1], "1"]
    assert store._run("reserve", "tenant:late", retry).startswith("held\n")
    assert store._run("reserve", "tenant:late", first_copy).startswith("replay_id\n")  # the late first copy
    assert authority.balance("tenant:late")["usd"].held == 1
    settled = authority.commit(f"{request.reservation_id[:20]}.tenant:late")
    assert settled.status == "committed"
    assert store._run("reserve", "tenant:late", first_copy).startswith("replay_id\n")  # after the commit too
    balance = authority.balance("tenant:late")["usd"]
    assert (balance.spent, balance.held) == (1, 0)
    assert [e.kind for e in authority.events(scope="tenant:late")].count("hold") == 1
    authority.close()


def test_a_worker_whose_clock_runs_ahead_forgets_nothing(redis_url: str) -> None:
    """Retention is judged by the worker's clock: one far ahead must not forget what the others still
    remember (a retry would then hold, and run the job, twice). Its commits go through all the same."""
    url = f"{redis_url}&max_clock_skew=10&retention=600"
    synced = Authority(url)
    synced.set_budget(Budget("tenant:ahead2", "usd", 10))
    first = synced.reserve(Action("step", "s", {"usd": 1}), "tenant:ahead2/run:1", idempotency_key="job-1")
    assert first.reservation is not None
    synced.commit(first.reservation)
    ahead = Authority(url, clock=lambda: time.time() + 3600)
    assert ahead.commit(first.reservation).replayed  # found, not forgotten
    ahead.close()
    assert synced.reservation(first.reservation).status == "committed"
    retry = synced.reserve(Action("step", "s", {"usd": 1}), "tenant:ahead2/run:1", idempotency_key="job-1")
    assert retry.replayed and synced.balance("tenant:ahead2")["usd"].spent == 1
    synced.close()


def test_audit_goes_on_after_a_stream_top_ahead_of_the_server_clock(redis_url: str, clock: FakeClock) -> None:
    """Audit ids come from the server clock; when the stream's last id is ahead of it (the clock
    stepped back, or a restored copy from a faster host), the event is written after the top instead
    of failing the hold or commit it records."""
    authority = Authority(redis_url, clock=clock)
    authority.set_budget(Budget("tenant:ahead", "usd", 10))
    raw = _raw(redis_url)
    (log_key,) = raw.keys("*{tenant:ahead}:log")
    future_us = (int(time.time()) + 3600) * 1_000_000
    event = {"at": "0", "k": "budget_set", "s": "tenant:ahead", "r": "", "a": "", "d": ""}
    raw.xadd(log_key, event, id=f"{future_us}-0")  # type: ignore[arg-type]
    decision = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:ahead/run:1")
    assert decision.allowed
    assert authority.commit(decision.reservation, {"usd": "0.5"}).status == "committed"  # type: ignore[arg-type]
    events = authority.events(scope="tenant:ahead", newest=True, limit=2)
    assert [e.kind for e in events] == ["hold", "commit"]
    assert all(e.seq > future_us * 1000 for e in events)
    assert authority.balance("tenant:ahead")["usd"].spent == Decimal("0.5")
    raw.close()
    authority.close()


def test_a_burst_of_audit_events_from_one_script_pages_without_gaps(redis_url: str, clock: FakeClock) -> None:
    """One script reads the server clock once; its events' ids must still page (seq = us * 1000 + n
    needs n < 1000), here 1,200 expiries and a hold written by one reserve."""
    authority = Authority(redis_url + "&reclaim_batch=5000", clock=clock)
    authority.set_budget(Budget("tenant:burst", "calls", 10_000))
    for i in range(1200):
        assert authority.reserve(Action("step", "s", {"calls": 1}), f"tenant:burst/run:{i}", ttl=5).allowed
    start = authority.events(scope="tenant:burst", newest=True, limit=1)[-1].seq
    clock.advance(10)
    assert authority.reserve(Action("step", "s", {"calls": 1}), "tenant:burst/run:x").allowed
    seen, after = [], start
    while page := authority.events(scope="tenant:burst", after=after, limit=100):
        seen += page
        after = page[-1].seq
    assert [e.kind for e in seen].count("expire") == 1200 and seen[-1].kind == "hold"
    assert len({e.seq for e in seen}) == len(seen) == 1201
    authority.close()


def test_a_forked_child_never_uses_the_parents_connections(redis_url: str, clock: FakeClock) -> None:
    """The store keeps its connections between calls; a forked child must open its own (a socket
    shared with the parent would interleave their replies)."""
    authority = Authority(redis_url, clock=clock)
    authority.set_budget(Budget("tenant:fork", "calls", 100))
    assert authority.reserve(Action("step", "s", {"calls": 1}), "tenant:fork/run:parent").allowed
    store = authority.store
    assert isinstance(store, RedisStore) and store._lender._idle  # a connection kept for the next call
    locks = (store._async_lock, store._in_doubt_lock, store._sync_lock)
    for lock in locks:  # as if other threads of the parent were inside them at the fork
        lock.acquire()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            assert not store._lender._idle  # the parent's sockets were dropped at the fork
            assert all(lock.acquire(blocking=False) for lock in (store._async_lock, store._in_doubt_lock))
            store._async_lock.release()
            store._in_doubt_lock.release()
            child = authority.reserve(Action("step", "s", {"calls": 1}), "tenant:fork/run:child")
            code = 0 if child.allowed else 1
        finally:
            os._exit(code)
    for lock in locks:
        lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert authority.reserve(Action("step", "s", {"calls": 1}), "tenant:fork/run:parent").allowed
    assert authority.balance("tenant:fork")["calls"].held == 3
    authority.close()


def test_kept_connections_leave_the_pool_room_for_its_other_commands(redis_url: str, clock: FakeClock) -> None:
    """Ledger calls keep at most half of max_connections between calls; the rest go back to the pool."""
    import threading

    store = RedisStore.from_url(redis_url.replace("?", "?max_connections=4&", 1))
    authority = Authority(store, clock=clock)
    authority.set_budget(Budget("tenant:pool", "calls", 10_000))

    def worker() -> None:
        for _ in range(50):
            decision = authority.reserve(Action("step", "s", {"calls": 1}), "tenant:pool/run:1")
            assert decision.reservation is not None
            authority.commit(decision.reservation)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store._lender._idle) <= 2
    pool = store._client.connection_pool
    held = [pool.get_connection() for _ in range(2)]  # the pool still has two for other commands
    for connection in held:
        pool.release(connection)
    assert authority.balance("tenant:pool")["calls"].spent == 200
    authority.close()


@pytest.mark.asyncio
async def test_async_kept_connections_leave_room_and_survive_the_server_closing_them(
    redis_url: str, clock: FakeClock
) -> None:
    """asyncio ledger calls keep at most half of max_connections between calls (the pool keeps room
    for its other commands), and a kept connection the server closed meanwhile is reconnected, not
    turned into a failed call."""
    store = RedisStore.from_url(redis_url.replace("?", "?max_connections=4&", 1))
    authority = Authority(store, clock=clock)
    await authority.aset_budget(Budget("tenant:apool", "calls", 10_000))
    action = Action("step", "s", {"calls": 1})

    async def worker() -> None:
        for _ in range(20):
            decision = await authority.areserve(action, "tenant:apool/run:1")
            assert decision.reservation is not None
            await authority.acommit(decision.reservation)

    await asyncio.gather(*(worker() for _ in range(8)))
    client, _, lender = await store._async_client()
    idle = lender._idle
    assert 1 <= len(idle) <= 2
    pool = client.connection_pool
    held = [await pool.get_connection() for _ in range(2)]  # the pool still has two for other commands
    for connection in held:
        await pool.release(connection)
    raw = redis_py.Redis.from_url(store.url, decode_responses=True)
    assert raw.client_kill_filter(_type="normal") >= len(idle)  # the server closes every other client
    await asyncio.sleep(0.05)
    # remove_budget is never retried after a lost connection: it succeeds only if the kept
    # connection was checked and reconnected before use.
    await authority.aset_budget(Budget("tenant:apool", "usd", 5))
    assert raw.client_kill_filter(_type="normal") >= 1
    raw.close()
    await asyncio.sleep(0.05)
    assert await store.aremove_budget("tenant:apool", "usd", "", clock())
    for _ in range(3):
        decision = await authority.areserve(action, "tenant:apool/run:1")
        assert decision.allowed and decision.reservation is not None, decision.reasons
        await authority.acommit(decision.reservation)
    assert (await authority.abalance("tenant:apool"))["calls"].spent == 163
    await authority.aclose()


def test_a_one_connection_pool_keeps_none_and_a_killed_kept_connection_is_reconnected(
    redis_url: str, clock: FakeClock
) -> None:
    """With max_connections=1 nothing is kept (the pool's only connection must stay free for its
    other commands: registering a tenant, events); a kept connection the server closed is
    reconnected before use (remove_budget is never retried, so it fails if it is not)."""
    single = Authority(RedisStore.from_url(redis_url.replace("?", "?max_connections=1&", 1)), clock=clock)
    single.set_budget(Budget("tenant:one", "calls", 10))
    single.set_budget(Budget("tenant:two", "calls", 10))  # a new tenant: SADD on the pool
    assert single.reserve(Action("step", "s", {"calls": 1}), "tenant:two/run:1").allowed
    assert len(single.events(limit=10)) >= 3
    single.close()
    authority = Authority(redis_url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    authority.set_budget(Budget("tenant:kill", "usd", 5))
    assert len(store._lender._idle) == 1
    raw = redis_py.Redis.from_url(store.url)
    assert raw.client_kill_filter(_type="normal") >= 1
    raw.close()
    time.sleep(0.05)
    assert store.remove_budget("tenant:kill", "usd", "", clock())
    authority.close()


@pytest.mark.asyncio
async def test_an_asyncio_one_connection_pool_keeps_none(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(RedisStore.from_url(redis_url.replace("?", "?max_connections=1&", 1)), clock=clock)
    await authority.aset_budget(Budget("tenant:aone", "calls", 10))
    await authority.aset_budget(Budget("tenant:atwo", "calls", 10))  # a new tenant: SADD on the pool
    decision = await authority.areserve(Action("step", "s", {"calls": 1}), "tenant:atwo/run:1")
    assert decision.allowed
    assert (await authority.abalance("tenant:atwo"))["calls"].held == 1
    await authority.aclose()


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_each_asyncio_run_does_not_leave_a_client_behind(kind: str, request: pytest.FixtureRequest) -> None:
    """A process calling ``asyncio.run(authority.areserve(...))`` per request makes a new event loop
    each time; the clients (and sockets) of ended loops must be closed, not kept until close()."""
    url = request.getfixturevalue("redis_url" if kind == "single" else "redis_cluster_url")
    authority = Authority(url)
    authority.set_budget(Budget("tenant:loops", "usd", 1000))
    action = Action("step", "s", {"usd": 1})
    store = authority.store
    assert isinstance(store, RedisStore)

    def lifecycle() -> None:
        decision = asyncio.run(authority.areserve(action, "tenant:loops/run:r"))
        assert decision.reservation is not None
        asyncio.run(authority.acommit(decision.reservation))

    lifecycle()
    descriptors = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        lifecycle()
    assert len(store._async) <= 1
    assert len(os.listdir("/proc/self/fd")) <= descriptors + 2
    assert authority.balance("tenant:loops")["usd"].spent == 31
    authority.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_cluster_scripts_load_on_the_tenants_node_only(redis_cluster_url: str, face: str) -> None:
    """With the scripts missing from every node's cache (a fresh deploy, a restarted or promoted
    node), a call loads its script on its tenant's node only: another master hung meanwhile must
    not fail it (redis-py's Script would load it on every primary first)."""
    import redis.cluster

    authority = Authority(redis_cluster_url.replace("?", "?socket_timeout=0.3&", 1))
    store = authority.store
    assert isinstance(store, RedisStore)
    tenant = f"tenant:ha-{face}"
    authority.set_budget(Budget(tenant, "calls", 10))
    raw = redis.cluster.RedisCluster.from_url(store.url.replace("redis+cluster://", "redis://"))
    owner = raw.get_node_from_key(store._keys(tenant)[0])
    startup = store.url.rsplit(":", 1)[1].split("/")[0].split("?")[0]  # slots are discovered through it
    others = [node for node in raw.get_primaries() if owner.name != node.name and str(node.port) != startup]
    for node in raw.get_primaries():
        raw.get_redis_connection(node).script_flush()
    # A running process: it has read the policy (its key may live on the master hung below; a process
    # that has not read it yet fails closed until it can: test_policy's first-read tests).
    authority.current_policy()
    hung = _pause((others[0].host, others[0].port), 3000, "ALL")
    try:
        action = Action("step", "s", {"calls": 1})
        if face == "sync":
            decision = authority.reserve(action, f"{tenant}/run:1")
        else:
            decision = asyncio.run(authority.areserve(action, f"{tenant}/run:1"))
        assert decision.allowed, decision.reasons
        assert decision.reservation is not None
        assert authority.commit(decision.reservation).status == "committed"
    finally:
        _unpause(hung)
        raw.close()
    assert authority.balance(tenant)["calls"].spent == 1
    authority.close()


def test_cluster_a_new_event_loop_connects_with_its_seed_node_hung(redis_cluster_url: str) -> None:
    """Each event loop gets its own cluster client (one per asyncio.run). Built from the URL's one
    seed, a new one could not connect while that node was hung or down — every tenant denied, the
    healthy ones too; it now starts from every node the store has discovered. (redis-py reads its
    command table from the owner of slot 0: with that node down a new client still cannot start.)"""
    import redis.cluster

    raw = redis.cluster.RedisCluster.from_url(redis_cluster_url.replace("redis+cluster://", "redis://"))
    slot0 = raw.nodes_manager.slots_cache[0][0].name
    seed = next(node for node in raw.get_primaries() if node.name != slot0)
    query = redis_cluster_url.split("?", 1)[1]
    url = f"redis+cluster://{seed.host}:{seed.port}?socket_timeout=0.3&{query}"
    authority = Authority(url, policy_refresh=3600)
    store = authority.store
    assert isinstance(store, RedisStore)
    tenant = next(
        f"tenant:seed{i}"
        for i in range(100)
        if raw.get_node_from_key(store._keys(f"tenant:seed{i}")[0]).name != seed.name
    )
    authority.set_budget(Budget(tenant, "calls", 10))
    action = Action("step", "s", {"calls": 1})
    assert asyncio.run(authority.areserve(action, f"{tenant}/run:1")).allowed  # a first loop discovers the nodes
    hung = _pause((seed.host, seed.port), 2500, "ALL")
    try:
        decision = asyncio.run(authority.areserve(action, f"{tenant}/run:1"))  # a new loop, a new client
        assert decision.allowed, decision.reasons
    finally:
        _unpause(hung)
        raw.close()
    assert authority.balance(tenant)["calls"].held == 2
    authority.close()


def test_cluster_in_doubt_holds_are_released_through_their_own_node(redis_cluster_url: str) -> None:
    """A reserve lost on a hung master leaves its id in doubt; calls to tenants on healthy masters
    must not try to release it (each try would wait out the timeout on the hung node), and the
    first good call to its own tenant does."""
    import redis.cluster

    authority = Authority(redis_cluster_url.replace("?", "?socket_timeout=0.3&", 1))
    store = authority.store
    assert isinstance(store, RedisStore)
    raw = redis.cluster.RedisCluster.from_url(store.url.replace("redis+cluster://", "redis://"))
    names = {f"tenant:d{i}": raw.get_node_from_key(store._keys(f"tenant:d{i}")[0]) for i in range(40)}
    lost = "tenant:d0"
    healthy = next(t for t, node in names.items() if node.name != names[lost].name)
    for tenant in (lost, healthy):
        authority.set_budget(Budget(tenant, "calls", 10))
    action = Action("step", "s", {"calls": 1})
    hung = _pause((names[lost].host, names[lost].port), 2000, "ALL")
    try:
        assert authority.reserve(action, f"{lost}/run:1").denied
        assert [root_of(rid) for rid in store._in_doubt] == [lost]
        for _ in range(3):
            decision = authority.reserve(action, f"{healthy}/run:1")
            assert decision.allowed and decision.reservation is not None
            authority.commit(decision.reservation)
        assert [root_of(rid) for rid in store._in_doubt] == [lost]  # not tried through the healthy node
    finally:
        _unpause(hung)
        raw.close()
    assert authority.reserve(action, f"{lost}/run:2").allowed
    assert not store._in_doubt
    assert authority.balance(lost)["calls"].held == 1  # the lost hold was released, not left to its TTL
    authority.close()


def test_cluster_sweep_goes_on_past_an_unreachable_tenant(redis_cluster_url: str, clock: FakeClock) -> None:
    """sweep() visits every tenant: one on a hung master does not keep the others' expired holds
    from coming back; the failure is raised afterwards, naming the tenant."""
    import redis.cluster

    authority = Authority(redis_cluster_url.replace("?", "?socket_timeout=0.3&", 1), clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    raw = redis.cluster.RedisCluster.from_url(store.url.replace("redis+cluster://", "redis://"))
    names = {f"tenant:s{i}": raw.get_node_from_key(store._keys(f"tenant:s{i}")[0]) for i in range(40)}
    listing = raw.get_node_from_key(store._roots_key).name  # the set of tenants must stay readable
    lost = next(t for t, node in names.items() if node.name != listing)
    healthy = [t for t, node in names.items() if node.name != names[lost].name][:3]
    for tenant in (lost, *healthy):
        authority.set_budget(Budget(tenant, "calls", 10))
        assert authority.reserve(Action("step", "s", {"calls": 1}), f"{tenant}/run:1", ttl=5).allowed
    clock.advance(10)
    hung = _pause((names[lost].host, names[lost].port), 2000, "ALL")
    try:
        with pytest.raises(StoreUnavailable, match=f"sweep returned 3 expired holds but could not reach 1 .*{lost}"):
            authority.sweep()
    finally:
        _unpause(hung)
        raw.close()
    assert all(authority.balance(t)["calls"].held == 0 for t in healthy)
    assert authority.sweep() == 1  # the lost tenant's, once its node answers again
    authority.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_evicting_redis_is_reported_once(face: str, caplog: pytest.LogCaptureFixture) -> None:
    """A Redis allowed to evict any key (allkeys-*) would drop budgets and holds under memory
    pressure, silently: the store warns on its first connection; noeviction says nothing."""
    require_redis()
    server = RedisServer(extra=("--maxmemory-policy", "allkeys-lru")).start()
    try:
        authority = Authority(server.url)
        action = Action("step", "s", {"usd": 1})
        for _ in range(2):
            if face == "sync":
                authority.set_budget(Budget("tenant:evict", "usd", 10))
                authority.reserve(action, "tenant:evict/run:1")
            else:
                asyncio.run(authority.aset_budget(Budget("tenant:evict", "usd", 10)))
        warnings = [r for r in caplog.records if "maxmemory-policy allkeys-lru" in r.getMessage()]
        assert len(warnings) == 1
        authority.close()
        caplog.clear()
        raw = redis_py.Redis(port=server.port)
        raw.config_set("maxmemory-policy", "noeviction")
        raw.close()
        quiet = Authority(server.url)
        quiet.set_budget(Budget("tenant:evict", "usd", 10))
        assert not [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        quiet.close()
    finally:
        server.stop()


def test_threads_each_running_asyncio_run_share_one_store(redis_url: str) -> None:
    """A threaded server calling asyncio.run(authority.areserve(...)) per request: ended loops are
    dropped by whichever thread gets there first, never an error out of a call."""
    import threading

    authority = Authority(redis_url)
    authority.set_budget(Budget("tenant:threads", "calls", 100_000))
    action = Action("step", "s", {"calls": 1})
    errors: list[BaseException] = []

    def worker() -> None:
        for _ in range(60):
            try:
                decision = asyncio.run(authority.areserve(action, "tenant:threads/run:1"))
                assert decision.allowed and decision.reservation is not None, decision.reasons
                asyncio.run(authority.acommit(decision.reservation))
            except BaseException as error:
                errors.append(error)

    import sys

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave far more often: races show up in a short test
    try:
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switching)
    assert not errors, errors[:3]
    assert authority.balance("tenant:threads")["calls"].spent == 360
    authority.close()


def test_cluster_sweep_skips_a_node_only_when_it_cannot_be_reached(redis_cluster_url: str, clock: FakeClock) -> None:
    """A tenant whose own data makes its script fail is not a dead node: the other tenants on that
    node are still swept."""
    import redis.cluster

    authority = Authority(redis_cluster_url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    raw = redis.cluster.RedisCluster.from_url(store.url.replace("redis+cluster://", "redis://"))
    names = {f"tenant:w{i}": raw.get_node_from_key(store._keys(f"tenant:w{i}")[0]).name for i in range(60)}
    broken = sorted(names)[0]
    same_node = [t for t in sorted(names) if names[t] == names[broken] and t != broken][:3]
    for tenant in (broken, *same_node):
        authority.set_budget(Budget(tenant, "calls", 10))
        assert authority.reserve(Action("step", "s", {"calls": 1}), f"{tenant}/run:1", ttl=5).allowed
    raw.delete(store._keys(broken)[2])
    raw.set(store._keys(broken)[2], "not a sorted set")  # its due index: the sweep script fails on it
    clock.advance(10)
    with pytest.raises(StoreUnavailable, match=f"could not reach 1 tenant.*{broken}"):
        authority.sweep()
    assert all(authority.balance(t)["calls"].held == 0 for t in same_node)
    raw.close()
    authority.close()


def test_cluster_reserves_go_on_with_the_node_of_the_tenant_set_down(redis_cluster_url: str) -> None:
    """A worker's first reserve for a tenant also records the tenant in the set sweep() reads; with
    the node holding that set hung, reserves for tenants on the other nodes must still be served
    (the registration is tried again later), not denied."""
    import redis.cluster

    url = redis_cluster_url.replace("?", "?socket_timeout=0.3&", 1)
    admin = Authority(url)
    store = admin.store
    assert isinstance(store, RedisStore)
    raw = redis.cluster.RedisCluster.from_url(store.url.replace("redis+cluster://", "redis://"))
    listing = raw.get_node_from_key(store._roots_key)
    tenant = next(
        f"tenant:r{i}" for i in range(60) if raw.get_node_from_key(store._keys(f"tenant:r{i}")[0]).name != listing.name
    )
    admin.set_budget(Budget(tenant, "calls", 10))
    worker = Authority(url)  # a worker that has not seen this tenant yet
    worker.reserve(Action("step", "s", {"calls": 1}), "tenant:warmup/run:1")  # its client knows the slots
    hung = _pause((listing.host, listing.port), 2000, "WRITE")
    try:
        first = worker.reserve(Action("step", "s", {"calls": 1}), f"{tenant}/run:1")
        assert first.allowed, first.reasons
        worker_store = worker.store
        assert isinstance(worker_store, RedisStore) and tenant not in worker_store._known_roots
        tried: list[object] = []
        real_call = worker_store._keyed
        worker_store._keyed = lambda key, command: tried.append(key) or real_call(key, command)  # type: ignore[method-assign]
        assert worker.reserve(Action("step", "s", {"calls": 1}), f"{tenant}/run:1").allowed
        assert not tried  # not waiting on the hung node again right away: retried a few seconds later
    finally:
        _unpause(hung)
        raw.close()
    assert admin.balance(tenant)["calls"].held == 2
    worker.close()
    admin.close()


def test_a_worker_whose_clock_is_ahead_does_not_forget_a_runs_budget_in_use(redis_url: str) -> None:
    """A run's budget its run is seen with again once idle past its time is forgotten on the spot
    (a new count) — but not by a worker whose clock is off: one 900 s ahead reset the count of a run
    another worker was using, and the run made 4 calls of its 2 (found in review)."""
    from clearance.policy_file import PolicyDocument

    url = f"{redis_url}&max_clock_skew=10&retention=800"
    right = Authority(url)
    right.apply_policy(PolicyDocument.parse({"tools": {"calls_per_run": 2}}))
    run = "tenant:skewrun/run:r1"
    for _ in range(2):
        decision = right.reserve(Action.tool_call("calc"), run)
        right.commit(decision.reservation)  # type: ignore[arg-type]
    assert right.reserve(Action.tool_call("calc"), run).denied
    ahead = Authority(url, clock=lambda: time.time() + 900)
    assert ahead.reserve(Action.tool_call("calc"), run).reasons[0].code == "clock_skew"
    ahead.close()
    assert right.balance(run)["tool_calls"].spent == 2
    assert right.reserve(Action.tool_call("calc"), run).denied
    right.close()


def test_the_tenants_a_process_registered_are_remembered_within_a_bound(redis_url: str) -> None:
    """A worker serving tenants without end kept every tenant it had registered, for good; past
    65,536 it forgets them (each is registered again, one SADD, on its next call)."""
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    store._known_roots.update(f"tenant:old{i}" for i in range(65536))
    authority.set_budget(Budget("tenant:fresh", "usd", 1))
    assert store._known_roots == {"tenant:fresh"}
    assert "tenant:fresh" in store._roots()
    authority.close()


def test_an_output_capped_retry_whose_reply_is_lost_is_answered_as_its_first_run(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record counts the capped plan's index in the ladder (2 here); the client's retry after a
    lost reply was answered with it as an index into its one-plan request: IndexError out of
    reserve(), and the hold that landed stayed held until its TTL (found in review)."""
    from clearance import Policy, PolicyDocument

    document = {"ladders": [{"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini"]}], "output_cap": {"floor": 64}}
    authority = Authority(redis_url, policy=Policy(PolicyDocument.parse(document)))
    authority.set_budget(Budget("tenant:capped", "usd", "0.001"))
    store = authority.store
    assert isinstance(store, RedisStore)
    send = store._evalsha
    reserves: list[str] = []

    def lossy(client: Any, script: Any, root: str, args: list[str]) -> Any:
        reply = send(client, script, root, args)
        if len(args) == 12:  # a reserve
            reserves.append(args[-1])
            if len(reserves) == 2:  # the output-capped retry ran on the server; its reply is lost
                raise redis_py.ConnectionError("Connection reset by peer")
        return reply

    monkeypatch.setattr(store, "_evalsha", lossy)
    decision = authority.reserve(Action.model_call("openai", "gpt-4.1", 1000, 1000), "tenant:capped/run:r1")
    assert reserves == ["0", "0", "1"]
    assert decision.reservation is not None and decision.plan_index == decision.reservation.plan_index == 2
    assert decision.caps is not None and decision.caps.model == "gpt-4.1-mini" and decision.caps.max_output_tokens
    assert [r.id for r in authority.reservations("tenant:capped")] == [decision.reservation.id]
    authority.close()


# A reclaim batch reaches the latest expiries first: with more expired holds than one batch, the
# ones not reached yet must not act as if still held. (Found by a differential hunt with
# reclaim_batch 1; the same happens at the default 1,000 with 1,001 expired holds.)
def test_a_key_of_a_hold_expired_a_retention_ago_is_free_whether_or_not_a_batch_reached_it(
    redis_url: str, clock: FakeClock
) -> None:
    authority = Authority(f"{redis_url}&reclaim_batch=1&retention=900&max_clock_skew=0", clock=clock)
    authority.set_budget(Budget("tenant:t", "usd", 100))
    action = Action("s", "s", {"usd": 1})
    authority.reserve(action, "tenant:t/run:a", ttl=60, idempotency_key="k")  # expires first
    authority.reserve(action, "tenant:t/run:a", ttl=600)  # ... and this later: a batch takes it first
    clock.advance(3600)  # both expired more than a retention ago: forgotten, the key free again
    decision = authority.reserve(action, "tenant:t/run:a", ttl=60, idempotency_key="k")
    assert decision.allowed and not decision.replayed  # (was: denied replay_settled, for good)
    assert authority.balance("tenant:t")["usd"].held == 1
    authority.close()


def test_headroom_never_counts_an_expired_hold_a_batch_did_not_reach(redis_url: str, clock: FakeClock) -> None:
    authority = Authority(f"{redis_url}&reclaim_batch=1&max_clock_skew=0", clock=clock)
    authority.set_budget(Budget("tenant:t", "usd", 100))
    for _ in range(3):
        authority.reserve(Action("s", "s", {"usd": 10}), "tenant:t/run:a", ttl=5)
    clock.advance(10)
    decision = authority.reserve(Action("s", "s", {"usd": 1}), "tenant:t/run:a", ttl=60)
    assert decision.allowed
    assert [h.held for h in decision.headroom] == [1]  # (was 21: two expired holds counted)


def test_a_per_run_budget_met_again_past_its_time_starts_anew_behind_a_backlog(
    redis_url: str, clock: FakeClock
) -> None:
    authority = Authority(
        f"{redis_url}&reclaim_batch=1&retention=900&max_clock_skew=0", clock=clock, policy_refresh=0
    )
    authority.apply_policy(PolicyDocument.loads("tools: {calls_per_run: 4}\n", "yaml"))
    authority.set_budget(Budget("tenant:t", "calls", 1000))
    spent = authority.reserve(Action.tool_call("calc"), "tenant:t/run:r", ttl=5)
    authority.commit(spent.reservation)  # type: ignore[arg-type]
    authority.reserve(Action.tool_call("calc"), "tenant:t/run:r", ttl=5)  # held, never settled
    authority.reserve(Action("s", "s", {"calls": 1}), "tenant:t/app:x", ttl=60)  # expires later
    clock.advance(30 * 86400)  # the run idle past its budget's time: seen again, a new count
    decision = authority.reserve(Action.tool_call("calc"), "tenant:t/run:r", ttl=5)
    tool_calls = [h for h in decision.headroom if h.unit == "tool_calls"]
    assert decision.allowed and [(h.spent, h.held) for h in tool_calls] == [(0, 1)]  # (was spent 1)
    authority.close()


@pytest.mark.parametrize("lost", [False, True])
def test_a_reserve_that_fits_is_held_though_more_holds_expire_while_it_drains(
    redis_url: str, lost: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood: after the drain another full batch has expired before the reserve asks again. A plan
    that fits is held all the same — also on our retry after a lost reply (found in review: it kept
    only its retry flag, answered 'backlog' again and was denied, with no reason)."""
    start = 1_000_000.0
    url = f"{redis_url}&reclaim_batch=2&max_clock_skew=0"
    clock = FakeClock(start)
    authority = Authority(url, clock=clock)
    authority.set_budget(Budget("tenant:a", "usd", 100))
    action = Action("step", "x", {"usd": 1})
    for _ in range(5):
        authority.reserve(action, "tenant:a", ttl=5)
    clock.advance(10)  # 5 expired holds: more than a batch of 2
    other = Authority(url, clock=FakeClock(start + 2))  # a worker whose holds expire meanwhile
    store = authority.store
    assert isinstance(store, RedisStore)
    drain, send = store._drain, store._evalsha
    flags: list[str] = []

    def draining(root: str, now: float, **options: Any) -> int:
        expired = drain(root, now, **options)
        for _ in range(3):  # another full batch expires before the reserve asks again
            other.reserve(action, "tenant:a", ttl=1)
        return expired

    def losing(client: Any, script: Any, root: str, args: list[str]) -> Any:
        reply = send(client, script, root, args)
        if len(args) == 12 and root == "tenant:a" and not flags:
            flags.append(args[-1])
            if lost:
                raise redis_py.ConnectionError("Connection reset by peer")  # ran; its reply lost
        elif len(args) == 12:
            flags.append(args[-1])
        return reply

    monkeypatch.setattr(store, "_drain", draining)
    monkeypatch.setattr(store, "_evalsha", losing)
    decision = authority.reserve(action, "tenant:a")
    assert decision.allowed, decision.reasons
    assert flags[-1] == ("3" if lost else "2")  # asked again after the drain, a retry if it was one
    other.close()
    authority.close()


def test_a_per_run_budget_met_again_during_a_flood_of_expiries_does_not_fail(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure_budget of a template past its time, while more holds expire than one batch and another
    batch expires during the drain: asked again after the drain it forgets the template after one
    batch, as before the drain protocol (found in review: a second 'backlog' was StoreUnavailable,
    failing closed a reserve under a per-run budget)."""
    start = 1_000_000.0
    url = f"{redis_url}&reclaim_batch=2&max_clock_skew=0&retention=900"
    clock = FakeClock(start)
    authority = Authority(url, clock=clock)
    store = authority.store
    assert isinstance(store, RedisStore)
    action = Action("step", "x", {"usd": 1})
    authority.set_budget(Budget("tenant:a", "usd", 100))
    for _ in range(4):  # settled: forgotten a retention on, just before the template below
        authority.commit(authority.reserve(action, "tenant:a").reservation)  # type: ignore[arg-type]
    for _ in range(5):
        authority.reserve(action, "tenant:a", ttl=5)
    clock.advance(1)
    assert store.ensure_budget("tenant:a/run:r", "tool_calls", "", 4, clock())
    clock.advance(1224)  # the template past its time (a retention and 2 x 112.5 s: see Store.ensure_budget);
    # 5 expired holds: more than a batch (a drain
    # reclaims them and stops: the settled reservations due before the template keep it from it)
    other = Authority(url, clock=FakeClock(start + 900))  # (before the template's time: its calls leave it)
    drain = store._drain

    def draining(root: str, now: float, **options: Any) -> int:
        expired = drain(root, now, **options)
        for _ in range(3):
            other.reserve(action, "tenant:a", ttl=50)
        return expired

    monkeypatch.setattr(store, "_drain", draining)
    assert store.ensure_budget("tenant:a/run:r", "tool_calls", "", 4, clock()) is True  # a new count
    other.close()
    authority.close()


def test_a_retried_set_budget_that_takes_over_a_template_writes_its_event(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request lost before it reached Redis, the retry finds the policy's template with the
    same limit: it is the operator's now, and says so in the audit trail (found by a hunt: the retry
    took it over silently, as if its first run had)."""
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    store.ensure_budget("tenant:t/run:r1", "usd", "", 5_000_000_000, authority.clock())
    send, lost = store._evalsha, [False]

    def losing(client: Any, script: Any, root: str, args: list[str]) -> Any:
        if len(args) == 9 and not lost[0]:  # the operator's set_budget
            lost[0] = True
            raise redis_py.ConnectionError("Connection reset by peer")  # before it reached Redis
        return send(client, script, root, args)

    monkeypatch.setattr(store, "_evalsha", losing)
    authority.set_budget(Budget("tenant:t/run:r1", "usd", "5"))
    assert lost[0]
    assert [e.kind for e in authority.events(scope="tenant:t", limit=10)] == ["budget_set", "budget_set"]
    authority.close()


@pytest.mark.asyncio
async def test_a_cancellation_dropped_before_a_lost_connection_is_not_lost_by_the_retry(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation redis-py dropped while the first attempt wrote, then the connection lost: the
    retry answers, and the call is cancelled all the same (found in review: the count was taken
    again for the retry, which then saw no new cancellation)."""
    authority = Authority(redis_url)
    await authority.aset_budget(Budget("tenant:acme", "usd", 100))
    store = authority.store
    assert isinstance(store, RedisStore)
    send, attempts = store._aevalsha, []

    async def dropping(client: Any, script: Any, root: str, args: list[str], lender: Any) -> Any:
        attempts.append(args[-1])
        if len(attempts) == 1:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # as wait_for does on 3.11 when the write is done
                await asyncio.sleep(0)
            raise redis_py.ConnectionError("Connection reset by peer")
        return await send(client, script, root, args, lender)

    monkeypatch.setattr(store, "_aevalsha", dropping)
    with pytest.raises(asyncio.CancelledError):
        await authority.areserve(Action("step", "s", {"usd": 1}), "tenant:acme/run:r1")
    assert attempts == ["0", "1"]
    monkeypatch.setattr(store, "_aevalsha", send)
    for _ in range(2):  # the retry's hold was in doubt: the next good calls release it
        await authority.abalance("tenant:acme")
    assert (await authority.abalance("tenant:acme"))["usd"].held == 0
    await authority.aclose()


@pytest.mark.asyncio
async def test_a_cancellation_delivered_in_a_call_keeps_its_message() -> None:
    """Kept across an operation, a dropped cancellation is raised at its end; one delivered as usual
    passes as it came (found in review: it was replaced, its message lost)."""
    from clearance.stores.redis import _cancellation_kept

    seen: list[tuple[object, ...]] = []

    async def call() -> None:
        try:
            with _cancellation_kept():
                await asyncio.sleep(5)
        except asyncio.CancelledError as cancelled:
            seen.append(cancelled.args)
            raise

    task = asyncio.ensure_future(call())
    await asyncio.sleep(0)
    task.cancel("deadline: the user aborted")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [("deadline: the user aborted",)]
