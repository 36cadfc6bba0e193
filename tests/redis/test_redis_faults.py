"""Faults against real redis-server processes: crash and AOF restart, a reply lost on the wire, a
worker SIGKILLed while holding, and Redis down or hung (a decision within the timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator

import pytest
import redis as redis_py
from redis_servers import RedisClusterServers, RedisServer, free_port, require_redis

from clearance import Action, Authority, Budget, Mode, Outcome, StoreUnavailable
from clearance.periods import windows_at
from clearance.stores.redis import RedisStore, _AsyncCluster
from clearance.testing import FakeClock

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SCOPE = "tenant:f/workspace:w/app:a/workflow:x/agent:g/run:r1"
FAST = "socket_timeout=0.3&connect_timeout=0.3&max_clock_skew=0"  # FakeClock time: clock check off


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A redis-server of this test alone (it will be killed, paused, restarted)."""
    require_redis()
    server = RedisServer(appendonly=True, extra=("--appendfsync", "always")).start()
    yield server
    server.stop()


def _settle_in_doubt(authority: Authority) -> None:
    store = authority.store
    assert isinstance(store, RedisStore)
    for _ in range(100):
        authority.balance("tenant:f")
        if not store._in_doubt:
            return
    raise AssertionError(f"in-doubt holds never released: {store._in_doubt}")


def test_kill_and_restart_with_aof_loses_no_commit_and_strands_no_hold(own_server: RedisServer) -> None:
    authority = Authority(f"{own_server.url}?{FAST}")
    authority.set_budget(Budget("tenant:f", "calls", 10**9))
    authority.set_budget(Budget("tenant:f/workspace:w/app:a", "tokens", 10**12))
    stop = threading.Event()
    committed: list[int] = []
    outages: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        calls = tokens = unavailable = 0
        try:
            while not stop.is_set():
                decision = authority.reserve(Action("step", "s", {"calls": 1, "tokens": 10}), SCOPE, ttl=300)
                if not decision.allowed:
                    assert decision.reasons[0].code == "store_unavailable"
                    unavailable += 1
                    time.sleep(0.01)
                    continue
                assert decision.reservation is not None
                deadline = time.monotonic() + 20
                while True:  # money spent is spent: retry the commit until the ledger has it
                    try:
                        authority.commit(decision.reservation, {"tokens": 7})
                        break
                    except StoreUnavailable:
                        unavailable += 1
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                calls += 1
                tokens += 7
        except BaseException as error:  # surfaced by the main thread
            errors.append(error)
        committed.append(calls)
        outages.append(unavailable)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    own_server.kill()  # SIGKILL mid-run: no shutdown, no final save
    time.sleep(0.3)
    own_server.start()  # same port, same directory: the AOF is replayed
    time.sleep(0.6)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sum(outages) > 0  # the workers did see the outage
    _settle_in_doubt(authority)
    calls = authority.balance("tenant:f")["calls"]
    tokens = authority.balance("tenant:f/workspace:w/app:a")["tokens"]
    assert sum(committed) > 0
    assert (calls.spent, calls.held) == (sum(committed), 0)
    assert (tokens.spent, tokens.held) == (7 * sum(committed), 0)
    assert authority.reservations(status="held") == []
    authority.close()


class CuttingProxy:
    """A TCP proxy in front of redis-server that can drop the next reply and cut the connection:
    the command ran on the server, the client never hears back."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.cut_next = False
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if replies and data:
                with self._lock:
                    cut, self.cut_next = self.cut_next, False
                    self.cuts += cut
                if cut:
                    data = b""
            if not data:
                for sock in (source, target):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return
            try:
                target.sendall(data)
            except OSError:
                return

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(redis_server.port)
    yield cutting
    cutting.close()


def test_lost_replies_never_hold_or_charge_twice(proxy: CuttingProxy) -> None:
    clock = FakeClock()
    authority = Authority(f"{proxy.url}?key_prefix=cut{os.getpid()}:&{FAST}", clock=clock)
    authority.set_budget(Budget("tenant:f", "calls", 100))
    warm = authority.reserve(Action("step", "s", {"calls": 1}), SCOPE)  # scripts loaded on this connection
    assert warm.reservation is not None
    authority.release(warm.reservation)

    proxy.cut_next = True
    decision = authority.reserve(Action("step", "s", {"calls": 3}), SCOPE)
    assert proxy.cuts == 1
    assert decision.outcome is Outcome.ALLOW and not decision.replayed
    assert decision.reservation is not None
    assert authority.balance("tenant:f")["calls"].held == 3
    assert len(authority.reservations(status="held")) == 1

    proxy.cut_next = True
    settlement = authority.commit(decision.reservation, {"calls": 2})
    assert proxy.cuts == 2
    assert settlement.status == "committed" and settlement.charged == {"calls": 2}
    assert not settlement.replayed  # the retry found its own commit: for the caller, the first answer
    assert authority.commit(decision.reservation, {"calls": 2}).replayed  # a repeat is a replay
    balance = authority.balance("tenant:f")["calls"]
    assert (balance.spent, balance.held) == (2, 0)

    proxy.cut_next = True
    keyed = authority.reserve(Action("step", "s", {"calls": 5}), SCOPE, idempotency_key="k1")
    assert proxy.cuts == 3 and keyed.allowed
    again = authority.reserve(Action("step", "s", {"calls": 5}), SCOPE, idempotency_key="k1")
    assert again.replayed and again.reservation is not None and keyed.reservation is not None
    assert again.reservation.id == keyed.reservation.id
    assert authority.balance("tenant:f")["calls"].held == 5

    async def lost_async_replies() -> None:
        proxy.cut_next = True
        late = await authority.areserve(Action("step", "s", {"calls": 7}), SCOPE)
        assert late.reservation is not None
        proxy.cut_next = True
        await authority.arelease(late.reservation)
        assert authority.store is not None
        await authority.store.aclose()

    asyncio.run(lost_async_replies())
    assert proxy.cuts == 5
    balance = authority.balance("tenant:f")["calls"]
    assert (balance.spent, balance.held) == (2, 5)
    assert len(authority.reservations(status=None)) == 4
    authority.close()


WORKER = """
import sys, time
from clearance import Action, Authority
authority = Authority(sys.argv[1])
decision = authority.reserve(Action("step", "s", {"calls": 4}), sys.argv[2], ttl=1.0)
print(decision.reservation.id, decision.reservation.expires_at, flush=True)
time.sleep(600)
"""


def test_sigkilled_worker_hold_returns_after_ttl(redis_url: str) -> None:
    authority = Authority(redis_url)
    authority.set_budget(Budget("tenant:f", "calls", 10))
    child = subprocess.Popen([sys.executable, "-c", WORKER, redis_url, SCOPE], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        rid, expires_at = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert authority.balance("tenant:f")["calls"].held == 4
    assert authority.reservation(rid).status == "held"
    time.sleep(max(0.0, float(expires_at) - time.time()) + 0.05)
    # Nothing else runs: no daemon, no sweep. Reading the balance reclaims the expired hold.
    balance = authority.balance("tenant:f")["calls"]
    assert (balance.held, balance.remaining) == (0, 10)
    assert authority.reservation(rid).status == "expired"
    assert [e.kind for e in authority.events(scope="tenant:f")][-1] == "expire"
    authority.close()


def test_redis_down_or_hung_is_a_decision_within_the_timeout(own_server: RedisServer) -> None:
    closed = Authority(f"{own_server.url}?{FAST}")
    opened = Authority(f"{own_server.url}?{FAST}", fail_open=True, emergency_limits={"calls": 2})
    closed.set_budget(Budget("tenant:f", "calls", 10))
    held = closed.reserve(Action("step", "s", {"calls": 1}), SCOPE)
    assert held.reservation is not None
    action = Action("step", "s", {"calls": 1})

    def timed(call: object) -> tuple[object, float]:
        started = time.monotonic()
        result = call() if callable(call) else asyncio.run(call)  # type: ignore[arg-type]
        return result, time.monotonic() - started

    own_server.pause()  # hung: connections are accepted, nothing answers
    try:
        decision, elapsed = timed(lambda: closed.reserve(action, SCOPE))
        assert decision.outcome is Outcome.DENY and decision.mode is Mode.FAIL_CLOSED  # type: ignore[attr-defined]
        assert decision.reasons[0].code == "store_unavailable"  # type: ignore[attr-defined]
        assert "TimeoutError" in decision.reasons[0].message  # type: ignore[attr-defined]
        assert elapsed < 0.3 + 0.4
        # and again: no second wait (reconnecting a kept connection, or re-reading the policy version)
        decision, elapsed = timed(lambda: closed.reserve(action, SCOPE))
        assert decision.outcome is Outcome.DENY and elapsed < 0.3 + 0.25  # type: ignore[attr-defined]
        decision, elapsed = timed(closed.areserve(action, SCOPE))
        assert decision.outcome is Outcome.DENY and elapsed < 0.3 + 0.4  # type: ignore[attr-defined]
        decision, elapsed = timed(lambda: opened.reserve(action, SCOPE))
        assert decision.outcome is Outcome.ALLOW and decision.mode is Mode.FAIL_OPEN  # type: ignore[attr-defined]
        assert elapsed < 0.3 + 0.4
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            closed.commit(held.reservation)
        assert time.monotonic() - started < 0.3 + 0.4
    finally:
        own_server.resume()
    # The hung server then ran the reserves that timed out; their holds are in doubt and are released.
    for authority in (closed, opened):
        _settle_in_doubt(authority)
    balance = closed.balance("tenant:f")["calls"]
    assert (balance.held, balance.spent) == (1, 0)  # only the reservation someone holds
    closed.commit(held.reservation)

    own_server.kill()  # down: connections are refused
    decision, elapsed = timed(lambda: closed.reserve(action, SCOPE))
    assert decision.outcome is Outcome.DENY and elapsed < 0.3  # type: ignore[attr-defined]
    allowed, _ = timed(lambda: opened.reserve(action, SCOPE))
    assert allowed.mode is Mode.FAIL_OPEN  # type: ignore[attr-defined]
    capped, _ = timed(lambda: opened.reserve(action, SCOPE))
    assert capped.outcome is Outcome.DENY and capped.reasons[0].code == "emergency_cap"  # type: ignore[attr-defined]

    own_server.start()  # back, with the AOF: the commit made before the crash is there
    assert closed.reserve(action, SCOPE).allowed
    assert closed.balance("tenant:f")["calls"].spent == 1
    closed.close()
    opened.close()


def test_a_keyed_reserve_whose_reply_was_lost_is_answered_by_its_retry(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    authority.set_budget(Budget("tenant:lost", "calls", 10))
    action = Action("step", "s", {"calls": 1})
    real = RedisStore._evalsha
    lose = {"next": True}

    def evalsha(self: RedisStore, client: object, script: object, root: str, args: list[str]) -> object:
        reply = real(self, client, script, root, args)  # the script ran on the server ...
        if lose["next"] and script is self._sync_client()[1]["reserve"]:
            lose["next"] = False
            raise redis_py.TimeoutError("reply lost")  # ... and its reply never came
        return reply

    monkeypatch.setattr(RedisStore, "_evalsha", evalsha)
    lost = authority.reserve(action, "tenant:lost/run:r1", idempotency_key="step-1")
    assert lost.outcome is Outcome.DENY and lost.reasons[0].code == "store_unavailable"
    retry = authority.reserve(action, "tenant:lost/run:r1", idempotency_key="step-1")
    assert retry.allowed and retry.reservation is not None, retry.reasons
    assert authority.balance("tenant:lost")["calls"].held == 1  # the hold that landed, not released behind it
    authority.commit(retry.reservation)
    calls = authority.balance("tenant:lost")["calls"]
    assert (calls.spent, calls.held) == (1, 0)
    authority.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_lost_reply_to_set_budget_or_extend_records_one_event(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, face: str
) -> None:
    """The retry after a lost reply finds its change already made: nothing is written twice, not
    even an audit event (the trail shows what happened, once)."""
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    scope = f"tenant:once-{face}"
    lose = {"budget": False, "extend": False}
    names = {"budget": "set_budget", "extend": "extend"}

    def lost(kind: str) -> bool:
        if lose[kind]:
            lose[kind] = False
            return True
        return False

    real, areal = RedisStore._evalsha, RedisStore._aevalsha

    def evalsha(self: RedisStore, client: object, script: object, root: str, args: list[str]) -> object:
        reply = real(self, client, script, root, args)  # the script ran on the server ...
        for kind, name in names.items():
            if script is self._sync_client()[1][name] and lost(kind):
                raise redis_py.ConnectionError("reset before the reply")  # ... and its reply never came
        return reply

    async def aevalsha(
        self: RedisStore, client: object, script: object, root: str, args: list[str], idle: object
    ) -> object:
        reply = await areal(self, client, script, root, args, idle)
        for kind, name in names.items():
            if script is (await self._async_client())[1][name] and lost(kind):
                raise redis_py.ConnectionError("reset before the reply")
        return reply

    monkeypatch.setattr(RedisStore, "_evalsha", evalsha)
    monkeypatch.setattr(RedisStore, "_aevalsha", aevalsha)
    action = Action("step", "s", {"calls": 1})

    async def run_async() -> None:
        lose["budget"] = True
        await authority.aset_budget(Budget(scope, "calls", 10))
        decision = await authority.areserve(action, f"{scope}/run:r1")
        assert decision.reservation is not None
        lose["extend"] = True
        await authority.aextend(decision.reservation, 120)
        await authority.aclose()

    if face == "async":
        asyncio.run(run_async())
    else:
        lose["budget"] = True
        authority.set_budget(Budget(scope, "calls", 10))
        decision = authority.reserve(action, f"{scope}/run:r1")
        assert decision.reservation is not None
        lose["extend"] = True
        authority.extend(decision.reservation, 120)
    assert not lose["budget"] and not lose["extend"]  # both replies were really lost
    kinds = [event.kind for event in authority.events(scope=scope, limit=1000)]
    assert kinds.count("budget_set") == 1 and kinds.count("extend") == 1, kinds
    assert authority.balance(scope)["calls"].limit == 10
    authority.close()


def test_in_doubt_ids_survive_a_failed_or_cancelled_release(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    doubted = {f"{i:020x}.tenant:doubt" for i in range(3)}
    store._in_doubt.update(doubted)

    def unreachable(*args: object) -> object:
        raise redis_py.ConnectionError("gone again")

    monkeypatch.setattr(store, "_evalsha", unreachable)
    store._settle_in_doubt("tenant:doubt", "1.0")
    assert store._in_doubt == doubted  # all kept for the next call, not just the one that failed

    async def cancelled(*args: object) -> object:
        raise asyncio.CancelledError

    monkeypatch.setattr(store, "_aevalsha", cancelled)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(store._asettle_in_doubt(None, {"release": None}, deque(), "tenant:doubt", "1.0"))
    assert store._in_doubt == doubted
    monkeypatch.undo()
    store._settle_in_doubt("tenant:doubt", "1.0")  # reachable again: unknown ids are released as not found
    assert not store._in_doubt
    authority.close()


def test_a_lost_reply_does_not_repeat_a_remove_or_a_policy(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore.from_url(redis_url)
    store.set_budget("tenant:once", "calls", "", 10, 1.0)
    real = RedisStore._evalsha
    lose = {"next": True}

    def evalsha(self: RedisStore, client: object, script: object, root: str, args: list[str]) -> object:
        reply = real(self, client, script, root, args)  # the script ran on the server ...
        if lose["next"]:
            lose["next"] = False
            raise redis_py.ConnectionError("connection reset")  # ... and the connection died before the reply
        return reply

    monkeypatch.setattr(RedisStore, "_evalsha", evalsha)
    with pytest.raises(StoreUnavailable):  # not a wrong "there was no such budget"
        store.remove_budget("tenant:once", "calls", "", 2.0)
    assert store.accounts("tenant:once", windows_at(2.0), 2.0, False) == []
    lose["next"] = True
    with pytest.raises(StoreUnavailable):
        store.put_policy("{}", 3.0)
    assert store.policy_version() == 1  # stored once, not as two versions
    lose["next"] = True
    store.set_budget("tenant:once", "calls", "", 5, 4.0)  # a call that converges is retried: no error
    assert [a.limit for a in store.accounts("tenant:once", windows_at(4.0), 4.0, False)] == [5]
    store.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_cluster_connections_closed_under_a_call_are_store_trouble(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch, face: str
) -> None:
    """When a master fails, redis-py's cluster client re-initialises and closes the connections of
    every node, under the calls of other tasks too — on healthy nodes — which then die with an
    AttributeError (their writer gone), not a ConnectionError. Found killing a master under 120
    asyncio tasks: tenants on healthy masters got bare AttributeErrors and their landed holds
    stranded. Such a failure is a lost connection: retried with the retry flag (never a second
    hold), and a decision or StoreUnavailable when it persists."""
    import redis.asyncio.cluster
    import redis.cluster

    cls = redis.asyncio.cluster.RedisCluster if face == "async" else redis.cluster.RedisCluster
    real = cls.evalsha
    mode = {"now": "after"}

    def broken() -> AttributeError:
        return AttributeError("'NoneType' object has no attribute 'writelines'")

    if face == "async":

        async def evalsha(self: object, *args: object) -> object:
            if mode["now"] == "always":
                raise broken()
            reply = await real(self, *args)  # type: ignore[misc]
            if mode["now"] == "after":
                mode["now"] = "off"
                raise broken()  # it landed; its reply is lost
            return reply
    else:

        def evalsha(self: object, *args: object) -> object:  # type: ignore[misc]
            if mode["now"] == "always":
                raise broken()
            reply = real(self, *args)  # type: ignore[arg-type]
            if mode["now"] == "after":
                mode["now"] = "off"
                raise broken()
            return reply

    authority = Authority(redis_cluster_url)
    scope = "tenant:broken/run:r1"
    authority.set_budget(Budget("tenant:broken", "calls", 10))
    monkeypatch.setattr(cls, "evalsha", evalsha)
    action = Action("tool_call", "x", {"calls": 1})

    def call(method: str, *args: object) -> object:
        if face == "async":
            return asyncio.run(getattr(authority, "a" + method)(*args))
        return getattr(authority, method)(*args)

    decision = call("reserve", action, scope)  # landed, reply lost: the retry answers it
    assert decision.allowed and decision.reservation is not None  # type: ignore[attr-defined]
    assert authority.balance("tenant:broken")["calls"].held == 1  # one hold, not two
    mode["now"] = "always"
    denied = call("reserve", action, scope)
    assert denied.denied and denied.reasons[0].code == "store_unavailable"  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        call("commit", decision.reservation)  # type: ignore[attr-defined]
    mode["now"] = "off"
    call("commit", decision.reservation)  # type: ignore[attr-defined]
    balance = authority.balance("tenant:broken")["calls"]
    assert (balance.spent, balance.held) == (1, 0)
    authority.close()


def test_cluster_calls_wait_their_turn_while_a_slot_migrates(redis_cluster: RedisClusterServers) -> None:
    """Calls take turns per node, on the node that owns the tenant's slot; while the slot migrates
    (keys moved, the slot still MIGRATING) redis-py follows the ASK to the target node's pool within
    the call, past the target's own turns: that pool, full, refused instead of waiting
    (MaxConnectionsError: a third of the reserves of tenants on either node denied store_unavailable,
    releases raised). They wait now, as a turn would."""
    prefix = f"ask{time.monotonic_ns()}:"
    options = f"key_prefix={prefix}&max_clock_skew=0&max_connections=3&connect_timeout=2"
    authority = Authority(f"{redis_cluster.url}?{options}")
    admin = {node.port: redis_py.Redis(port=node.port, decode_responses=True) for node in redis_cluster.nodes}

    def owner(tenant: str) -> tuple[int, int]:
        slot = int(next(iter(admin.values())).cluster("keyslot", f"{{{tenant}}}"))
        for port, client in admin.items():
            for first, last, *_ in client.cluster("slots"):
                if first <= slot <= last and _[0][1] == port:
                    return slot, port
        raise AssertionError(slot)

    tenants = [f"tenant:ask{i}" for i in range(40)]
    for tenant in tenants:
        authority.set_budget(Budget(tenant, "usd", 1000))
    moving = tenants[0]
    slot, source = owner(moving)
    beside = next(t for t in tenants[1:] if owner(t)[1] != source)
    target = owner(beside)[1]
    step = Action("step", "s", {"usd": "0.001"})
    authority.release(authority.reserve(step, moving).reservation)  # type: ignore[arg-type]  # all 4 keys exist
    refused: list[str] = []
    stop = threading.Event()

    def worker(tenant: str) -> None:
        while not stop.is_set():
            decision = authority.reserve(step, tenant)
            if decision.reservation is None:
                refused.append(f"{tenant}: {decision.reasons[0].message}")
                continue
            try:
                authority.release(decision.reservation)
            except StoreUnavailable as error:
                refused.append(f"{tenant} release: {error}")

    ids = {port: client.cluster("myid") for port, client in admin.items()}
    threads = [threading.Thread(target=worker, args=(t,)) for t in [moving] * 4 + [beside] * 4]
    admin[target].cluster("setslot", slot, "importing", ids[source])
    admin[source].cluster("setslot", slot, "migrating", ids[target])
    try:
        for key in admin[source].cluster("getkeysinslot", slot, 100):
            admin[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", key)
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # the ASK window: every call on the moving tenant is redirected
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for client in admin.values():
            client.cluster("setslot", slot, "node", ids[target])
    assert refused == []
    for tenant in (moving, beside):
        assert authority.balance(tenant)["usd"].held == 0
    authority.close()
    for client in admin.values():
        client.close()


def test_cluster_events_across_tenants_take_turns_beside_busy_ledger_calls(redis_cluster_url: str) -> None:
    """Every call on a cluster takes a turn on its node, so that a burst of threads never goes past a
    node's pool (which refuses instead of waiting). A read of events across tenants asked every
    primary its TIME, and read the streams, outside the turns: beside busy ledger calls it failed
    (MaxConnectionsError: 143,245 failed reads in 3 s with max_connections=1)."""
    authority = Authority(redis_cluster_url + "&max_connections=1")
    tenants = [f"tenant:turn{i}" for i in range(12)]
    for tenant in tenants:
        authority.set_budget(Budget(tenant, "usd", 10**6))
    step = Action("step", "s", {"usd": "0.001"})
    stop = threading.Event()
    failures: list[str] = []
    read = [0]

    def worker(tenant: str) -> None:
        while not stop.is_set():
            decision = authority.reserve(step, tenant)
            if decision.reservation is not None:
                authority.release(decision.reservation)

    def reader() -> None:
        after = 0
        while not stop.is_set():
            try:
                for event in authority.events(after=after, limit=100):
                    after = event.seq
                read[0] += 1
            except StoreUnavailable as error:
                failures.append(str(error))

    threads = [threading.Thread(target=worker, args=(t,)) for t in tenants[:6]]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    authority.close()
    assert failures == [] and read[0] > 0



def test_a_keyed_guard_whose_reply_was_lost_runs_its_step_on_retry(redis_url: str) -> None:
    """The first reserve landed but its reply was lost (the guard failed closed; no block ran on the
    hold): the retry with the same key runs the step on that hold. (Found in review: a guard retry
    meeting its key's held reservation was denied replay_in_progress — and once the hold expired,
    replay_settled for good: the step could never run under its key.)"""
    authority = Authority(redis_url)
    authority.set_budget(Budget("tenant:lost", "calls", 10))
    store = authority.store
    assert isinstance(store, RedisStore)
    send, lose = store._evalsha, [True]

    def losing(client: object, script: object, root: str, args: list[str]) -> object:
        reply = send(client, script, root, args)
        if lose[0] and len(args) == 12:  # a reserve: it ran, its reply is lost
            lose[0] = False
            raise redis_py.TimeoutError("reply lost")
        return reply

    store._evalsha = losing  # type: ignore[method-assign]
    action = Action("step", "s", {"calls": 1})
    ran = []
    for _ in range(2):
        try:
            with authority.guard(action, "tenant:lost/run:r1", idempotency_key="step-1") as grant:
                ran.append(grant.reservation)
                grant.settle({"calls": 1})
        except Exception as error:  # (the first attempt fails closed)
            ran.append(type(error).__name__)
    assert ran[0] == "Denied" and len(ran) == 2 and ran[1] is not None
    balance = authority.balance("tenant:lost")["calls"]
    assert (balance.spent, balance.held) == (1, 0)  # one step, on the hold that landed
    authority.close()


@pytest.fixture
def replicated_cluster() -> Iterator[RedisClusterServers]:
    """A cluster of this test alone: 3 masters, a replica each (its nodes will fail over)."""
    require_redis()
    cluster = RedisClusterServers(replicas=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_asyncio_calls_ride_out_a_cluster_failover(replicated_cluster: RedisClusterServers) -> None:
    """One ``CLUSTER FAILOVER`` under tens of asyncio tasks: redis-py's asyncio client answered the
    MOVEDs by closing every connection of every node each fifth time (calls on healthy nodes died,
    each death refreshed again) and closed idle connections another task was taking: a process
    kept failing a call in five, on every tenant, until it restarted. Now calls on other nodes
    never notice, the moved tenants' calls follow the new primary, and the ledger is exact."""
    prefix = f"fo{time.monotonic_ns()}:"
    # (Timeouts of 2 s: on a loaded machine a healthy node's reply can take longer than the default
    # 0.5 s. The failure this catches is connections closed under calls, not slow replies.)
    options = f"key_prefix={prefix}&max_clock_skew=0&socket_timeout=2&connect_timeout=2"
    authority = Authority(f"{replicated_cluster.url}?{options}")
    tenants = [f"tenant:t{i}" for i in range(12)]
    for tenant in tenants:
        authority.set_budget(Budget(tenant, "calls", 10**9))
    admin = {node.port: redis_py.Redis(port=node.port, decode_responses=True) for node in replicated_cluster.nodes}

    def primary_of(tenant: str) -> int:
        slot = int(admin[replicated_cluster.nodes[0].port].cluster("keyslot", f"{prefix}{{{tenant}}}:l"))
        for node in admin.values():
            for start, end, primary, *_ in node.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        raise AssertionError(slot)

    victim = primary_of(tenants[0])
    replica = next(
        port for port, node in admin.items() if node.info("replication").get("master_port") == victim
    )
    deadline = time.monotonic() + 20
    while admin[replica].info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)
    moved = {t for t in tenants if primary_of(t) == victim}
    failures: list[tuple[float, str, str]] = []
    committed: dict[str, int] = dict.fromkeys(tenants, 0)

    async def run() -> None:
        start = time.monotonic()

        async def worker(k: int) -> None:
            step = 0
            while time.monotonic() - start < 6:
                tenant = tenants[(k + step) % len(tenants)]
                step += 1
                decision = await authority.areserve(Action("tool_call", "x", {"calls": 1}), f"{tenant}/run:r{k}")
                if decision.reservation is None:
                    failures.append((time.monotonic() - start, tenant, decision.reasons[0].message))
                    continue
                try:
                    await authority.acommit(decision.reservation)
                    committed[tenant] += 1
                except StoreUnavailable as error:
                    failures.append((time.monotonic() - start, tenant, f"commit: {error}"))
                await asyncio.sleep(0.005)

        async def failover() -> None:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(admin[replica].execute_command, "CLUSTER FAILOVER")

        await asyncio.gather(failover(), *(worker(k) for k in range(48)))
        await authority.aclose()

    asyncio.run(run())
    assert primary_of(tenants[0]) == replica  # it did fail over
    healthy = [f for f in failures if f[1] not in moved]
    assert healthy == [], healthy[:5]
    assert [f for f in failures if f[0] > 3.5] == [], failures[:5]  # settled within 2 s, moved tenants too
    for tenant in tenants:  # every commit counted once, nothing held
        balance = authority.balance(tenant)["calls"]
        assert committed[tenant] > 0
        assert (balance.spent, balance.held) == (committed[tenant], 0), tenant
    authority.close()


def _move_slot(slot: int, to_id: str, to_port: int, nodes: list[RedisServer]) -> None:
    """Migrate ``slot`` (its keys, then its ownership on every node) to the node ``to_id``."""
    admin = {n.port: redis_py.Redis(port=n.port, decode_responses=True) for n in nodes}
    source_port = next(
        port for port, node in admin.items() for start, end, primary, *_ in node.execute_command("CLUSTER SLOTS")
        if start <= slot <= end and int(primary[1]) == port
    )  # fmt: skip
    source = admin[source_port]
    if source_port == to_port:
        return
    admin[to_port].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.execute_command("CLUSTER MYID"))
    source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", to_id)
    while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 10000, "KEYS", *keys)
    for node in admin.values():
        with contextlib.suppress(redis_py.ResponseError):  # (a master emptied of its last slot turns replica)
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", to_id)


def test_asyncio_clients_drop_the_nodes_that_left_the_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Following each MOVED slot by slot, the asyncio client never looked at the whole topology
    again: a master added, given a tenant's slot, emptied and removed kept its connections in every
    process for good (a helper's hunt: 16 sockets per removed node per event loop). After MOVED
    replies it refreshes the topology (here at once: REFRESH_EVERY 0), dropping the node."""
    require_redis()
    monkeypatch.setattr(_AsyncCluster, "REFRESH_EVERY", 0.0)
    cluster = RedisClusterServers()
    extra = RedisServer(extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "2000", "--cluster-port", str(free_port())))  # fmt: skip
    try:
        cluster.start()
        extra.start()
        authority = Authority(f"{cluster.url}?key_prefix=left{time.monotonic_ns()}:&max_clock_skew=0")
        authority.set_budget(Budget("tenant:moving", "usd", 10**6))
        first = cluster.nodes[0]
        seed = redis_py.Redis(port=first.port, decode_responses=True)
        slot = int(seed.cluster("keyslot", f"{authority.store.key_prefix}{{tenant:moving}}:l"))  # type: ignore[attr-defined]
        nodes = [*cluster.nodes, extra]

        async def calls(count: int) -> set[str]:
            for _ in range(count):
                decision = await authority.areserve(Action("step", "s", {"usd": 1}), "tenant:moving/run:r1")
                assert decision.reservation is not None, decision.reasons
                await authority.acommit(decision.reservation)
            client = authority.store._async[asyncio.get_running_loop()][0]  # type: ignore[attr-defined]
            return set(client.nodes_manager.nodes_cache)

        async def run() -> None:
            shards = seed.execute_command("CLUSTER SLOTS")
            owner_port = next(int(primary[1]) for start, end, primary, *_ in shards if start <= slot <= end)
            await calls(3)
            bus = extra.extra[extra.extra.index("--cluster-port") + 1]  # (not port + 10000: see RedisClusterServers)
            seed.execute_command("CLUSTER MEET", "127.0.0.1", extra.port, bus)
            deadline = time.monotonic() + 20
            extra_admin = redis_py.Redis(port=extra.port, decode_responses=True)
            extra_id = extra_admin.execute_command("CLUSTER MYID")
            while (
                len(extra_admin.execute_command("CLUSTER NODES")) < 4
                or extra_admin.cluster("info")["cluster_state"] != "ok"
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            _move_slot(slot, extra_id, extra.port, nodes)
            assert f"127.0.0.1:{extra.port}" in await calls(3)  # followed the MOVED to the new node
            owner_id = redis_py.Redis(port=owner_port, decode_responses=True).execute_command("CLUSTER MYID")
            _move_slot(slot, owner_id, owner_port, nodes)
            for node in cluster.nodes:
                redis_py.Redis(port=node.port).execute_command("CLUSTER FORGET", extra_id)
            await calls(2)  # a MOVED back: the refresh comes with the next call
            known = await calls(2)
            assert f"127.0.0.1:{extra.port}" not in known, known

        asyncio.run(run())
        assert authority.balance("tenant:moving")["usd"].spent == 10
        authority.close()
    finally:
        extra.stop()
        cluster.stop()


def test_a_lost_reply_to_a_wiped_tenants_first_budget_still_registers_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Redis lost a tenant's keys, the budget that gives it its first id registers it again
    (listings, sweep); with that reply lost, the retry answered as for any budget already set and
    the tenant stayed unregistered."""
    authority = Authority(redis_url)
    store = authority.store
    assert isinstance(store, RedisStore)
    authority.set_budget(Budget("tenant:wiped", "usd", 2))
    prefix = redis_url.split("key_prefix=", 1)[1].split("&", 1)[0]
    raw = redis_py.Redis.from_url(redis_url.split("?", maxsplit=1)[0])
    for key in raw.scan_iter(match=f"{prefix}*"):
        raw.delete(key)
    real = RedisStore._evalsha
    lose = [True]

    def evalsha(self: RedisStore, client: object, script: object, root: str, args: list[str]) -> object:
        reply = real(self, client, script, root, args)
        if script is self._sync_client()[1]["set_budget"] and lose[0]:
            lose[0] = False
            raise redis_py.ConnectionError("reset before the reply")
        return reply

    monkeypatch.setattr(RedisStore, "_evalsha", evalsha)
    authority.set_budget(Budget("tenant:wiped", "usd", 2))
    assert not lose[0]  # (the reply was lost, the retry answered)
    assert [b.scope for b in authority.budgets()] == ["tenant:wiped"]
    raw.close()
    authority.close()
