"""SQLite-only behaviour: forgetting settled reservations when processes keep them for different
retentions, a file that stays bounded (audit capacity, old period windows), and the schema
version check (with its in-place upgrades)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from interrupts import Interrupted, interrupt_at

from clearance import Action, Authority, Budget, InvalidRequest, ReservationNotFound, StoreUnavailable
from clearance.periods import WINDOWS_KEPT, windows_at
from clearance.stores.sqlite import MAINTAIN_EVERY, SCHEMA_VERSION, UPGRADABLE, SQLiteStore
from clearance.testing import FakeClock

CHAIN = "tenant:acme/run:r1"

# The settle trigger of schema version 4: its settle records carry no forget time.
_V4_TRIGGER = """CREATE TRIGGER log_settle AFTER UPDATE OF status ON log WHEN new.status <> old.status BEGIN
    INSERT INTO log(at, kind, scope, rid, amounts, detail)
    VALUES (new.settled_at,
            CASE new.status WHEN 'committed' THEN 'commit' WHEN 'released' THEN 'release' ELSE 'expire' END,
            new.scope, new.rid,
            CASE new.status WHEN 'committed' THEN new.committed ELSE new.amounts END,
            CASE new.status WHEN 'committed' THEN new.flags ELSE '' END);
END"""


def _lifecycle(authority: Authority) -> str:
    decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN, idempotency_key=None)
    assert decision.reservation is not None
    authority.commit(decision.reservation)
    return decision.reservation.id


def _known(store: SQLiteStore, reservation_id: str, now: float) -> bool:
    try:
        store.reservation(reservation_id, now)
    except ReservationNotFound:
        return False
    return True


def test_a_process_with_a_shorter_retention_forgets_the_others_reservations_when_they_are_due(
    tmp_path: Path,
) -> None:
    """Two processes share a ledger, one keeping settled reservations for 100 s, one for 1000 s.
    The short one's forget pass leaves the long one's reservations until they are due, and forgets
    them then (it used to walk past them for good: remembered forever)."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    short_store, long_store = SQLiteStore(path, retention=100), SQLiteStore(path, retention=1000)
    short, long = Authority(short_store, clock=clock), Authority(long_store, clock=clock)
    short.set_budget(Budget("tenant:acme", "usd", 10_000))
    early = _lifecycle(short)
    kept_long = _lifecycle(long)
    late = _lifecycle(short)
    clock.advance(150)
    short.sweep()
    assert not _known(short_store, early, clock())  # its own, settled before: forgotten on time
    assert _known(short_store, kept_long, clock())  # the other's: within its 1000 s
    # Due too: the walk waits behind the long one, but lookups judge each reservation by its own time.
    assert not _known(short_store, late, clock())
    clock.advance(1000)
    short.sweep()
    assert not _known(short_store, kept_long, clock())
    assert not _known(short_store, late, clock())
    raw = sqlite3.connect(path)  # and the walk has taken all three out of the indexes for good
    assert raw.execute("SELECT count(*) FROM log WHERE known IS NOT NULL").fetchone()[0] == 0
    raw.close()
    assert short.balance("tenant:acme")["usd"].spent == 3
    short.close()
    long.close()


def test_a_version_4_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 4 differs only in its settle trigger: the file is upgraded when opened. Its settle
    records carry no forget time; they are forgotten when their reservation is due, even when the
    process that settled them kept reservations longer than the one walking them now."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    authority = Authority(SQLiteStore(path, retention=1000), clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10_000))
    old = _lifecycle(authority)
    authority.close()
    # Make it the file version-4 code left: its trigger, its version, settle records without a forget time.
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("DROP TRIGGER log_settle")
    raw.execute("DROP INDEX accounts_window")
    raw.execute(_V4_TRIGGER)
    raw.execute("UPDATE log SET forget_at = NULL WHERE kind = 'commit'")
    raw.execute("PRAGMA user_version = 4")
    raw.close()
    store = SQLiteStore(path, retention=100)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "new.forget_at" in raw.execute("SELECT sql FROM sqlite_master WHERE name = 'log_settle'").fetchone()[0]
    assert raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'accounts_window'").fetchone() is not None
    raw.close()
    upgraded = Authority(store, clock=clock)
    new = _lifecycle(upgraded)
    clock.advance(150)
    upgraded.sweep()
    assert _known(store, old, clock())  # settled with 1000 s of retention: not due yet
    assert not _known(store, new, clock())  # due: the walk waits behind the old one, lookups do not
    clock.advance(1000)
    upgraded.sweep()
    assert not _known(store, old, clock()) and not _known(store, new, clock())
    assert upgraded.balance("tenant:acme")["usd"].spent == 2
    upgraded.close()


def _older_ledger(path: str, clock: FakeClock, version: int, *downgrade: str) -> None:
    """A ledger with one lifecycle in it, made to look like what schema ``version`` left."""
    authority = Authority(SQLiteStore(path), clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10_000))
    _lifecycle(authority)
    authority.close()
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in downgrade:
        raw.execute(statement)
    raw.execute(f"PRAGMA user_version = {version}")
    raw.close()


def test_a_version_5_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 5 lacks only the index the window pruning walks: it is added when the file is opened."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    _older_ledger(path, clock, 5, "DROP INDEX accounts_window")
    upgraded = Authority(SQLiteStore(path), clock=clock)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'accounts_window'").fetchone() is not None
    raw.close()
    _lifecycle(upgraded)
    assert upgraded.balance("tenant:acme")["usd"].spent == 2
    upgraded.close()


def test_a_version_6_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 6 lacks only the template budgets' columns and index: added when the file is opened,
    and its per-run budgets (templates made before) are an operator's: kept, as they were."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    _older_ledger(
        path,
        clock,
        6,
        "DROP INDEX budgets_until",
        "ALTER TABLE budgets DROP COLUMN until",
        "ALTER TABLE budgets DROP COLUMN held_seen",
    )
    store = SQLiteStore(path, retention=100)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'budgets_until'").fetchone() is not None
    raw.close()
    upgraded = Authority(store, clock=clock)
    _lifecycle(upgraded)
    assert store.ensure_budget("tenant:acme/run:r1", "tool_calls", "", 5, clock())
    clock.advance(126)  # (a retention, and twice the refresh interval: see Store.ensure_budget)
    upgraded.sweep()
    assert [b.scope for b in upgraded.budgets()] == ["tenant:acme"]
    assert upgraded.balance("tenant:acme")["usd"].spent == 2
    upgraded.close()


def _rows(path: str, sql: str) -> int:
    raw = sqlite3.connect(path)
    try:
        return int(raw.execute(sql).fetchone()[0])
    finally:
        raw.close()


def test_the_audit_trail_keeps_its_newest_records_and_every_remembered_reservation(tmp_path: Path) -> None:
    """Past ``audit_capacity`` the oldest audit records go (the file used to grow by every lifecycle
    for good), a batch per maintenance pass; a reservation's hold record stays while the
    reservation is remembered — however old — and goes when it is forgotten."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    store = SQLiteStore(path, retention=100, audit_capacity=50)
    authority = Authority(store, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10_000))
    kept = authority.reserve(Action("step", "s", {"usd": 5}), CHAIN, ttl=10_000).reservation
    assert kept is not None
    for _ in range(300):
        _lifecycle(authority)
    clock.advance(150)
    authority.sweep()
    assert _rows(path, "SELECT count(*) FROM log") <= 50 + 1  # the newest 50, and the one still held
    events = authority.events(limit=1000)
    assert len(events) <= 51 and events[-1].kind == "commit"
    assert _known(store, kept.id, clock())  # held, far below the line: still there
    authority.commit(kept)
    clock.advance(150)
    authority.sweep()
    assert _rows(path, f"SELECT count(*) FROM log WHERE rid = '{kept.id}' AND kind = 'hold'") == 0  # forgotten: gone
    assert _rows(path, "SELECT count(*) FROM log") <= 50
    assert authority.balance("tenant:acme")["usd"].spent == 305  # the counters never depended on it
    again = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN).reservation  # ids go on from the top
    assert again is not None and _known(store, again.id, clock())
    authority.close()


def test_records_after_the_last_settlement_are_pruned_too(tmp_path: Path) -> None:
    """The prune stopped where the forget walk's last settle record was: budget changes, extends
    and holds written after it stayed beyond the capacity for good (a ledger only ever configured
    — set_budget, apply — was never pruned at all)."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    store = SQLiteStore(path, retention=100, audit_capacity=10)
    authority = Authority(store, clock=clock)
    for limit in range(1, 51):
        authority.set_budget(Budget("tenant:acme", "usd", limit))
    authority.sweep()
    assert len(authority.events(limit=1000)) == 10  # nothing settled at all: capped all the same
    for _ in range(20):
        _lifecycle(authority)
    for limit in range(100, 130):
        authority.set_budget(Budget("tenant:acme", "usd", limit))
    held = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN, ttl=10_000).reservation
    assert held is not None
    clock.advance(150)
    authority.sweep()
    events = authority.events(limit=1000)
    assert len(events) == 10 and events[-1].kind == "hold"  # the newest 10: a budget change was the oldest
    assert authority.reservation(held).status == "held"
    authority.commit(held)
    assert authority.balance("tenant:acme")["usd"].limit == 129
    authority.close()


def test_old_period_windows_are_pruned_unless_something_is_held_in_them(tmp_path: Path) -> None:
    """A minute budget opens a window a minute: counters of windows that began more than 8 periods
    ago go in the maintenance pass (the file used to keep them all), except one with a hold in it;
    a late commit into a pruned window is still recorded, never dropped."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    authority = Authority(SQLiteStore(path), clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10_000, period="minute"))
    authority.set_budget(Budget("tenant:acme", "usd", 100_000))
    held = authority.reserve(Action("step", "s", {"usd": 7}), CHAIN, ttl=7200).reservation
    assert held is not None
    for _ in range(60):
        _lifecycle(authority)
        clock.advance(60)
    authority.sweep()
    minutes = _rows(path, "SELECT count(*) FROM accounts WHERE period = 'minute'")
    assert minutes <= 8 + 1 + 1  # the last 8 periods' (and the current), and the held one
    assert _rows(path, "SELECT count(*) FROM accounts WHERE period = 'minute' AND held > 0") == 1
    assert _rows(path, "SELECT spent FROM accounts WHERE period = ''") == 60 * 10**9  # nano-dollars: untouched
    clock.advance(7200)  # the hold expires; its window's counters go at the next pass
    authority.sweep()
    assert _rows(path, "SELECT count(*) FROM accounts WHERE period = 'minute' AND held > 0") == 0
    settlement = authority.commit(held, {"usd": 7})
    assert "late" in settlement.flags and settlement.charged["usd"] == 7
    assert _rows(path, "SELECT spent FROM accounts WHERE period = ''") == 67 * 10**9
    authority.close()


def test_a_month_budget_keeps_its_8_latest_months_as_memory_does(tmp_path: Path) -> None:
    """Pruning took a month for 31 days: from 1 March, 7 x 31 days back is 28 July, so July stayed
    as a 9th month and a late commit into it was flagged ``overage`` against its old spend — on
    memory, which keeps the 8 latest months, it was not."""
    from datetime import UTC, datetime

    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()

    clock = FakeClock(at("2027-07-15T12:00:00"))
    year = f"?retention={400 * 86400}"
    stores = {
        "memory": Authority(f"memory://{year}", clock=clock),
        "sqlite": Authority(f"sqlite:///{tmp_path / 'ledger.db'}{year}", clock=clock),
    }
    late = {}
    for name, authority in stores.items():
        authority.set_budget(Budget("tenant:x", "calls", 11, period="month"))
        late[name] = authority.reserve(Action("step", "h", {"calls": 6}), "tenant:x", ttl=60).reservation
        authority.commit(authority.reserve(Action("step", "c", {"calls": 5}), "tenant:x").reservation)  # type: ignore[arg-type]
    for month in ["2027-08", "2027-09", "2027-10", "2027-11", "2027-12", "2028-01", "2028-02", "2028-03"]:
        clock.set(at(f"{month}-01T00:00:00"))
        for authority in stores.values():
            authority.commit(authority.reserve(Action("step", "o", {"calls": 1}), "tenant:x").reservation)  # type: ignore[arg-type]
            authority.sweep()
    flags = {name: authority.commit(late[name], {"calls": 8}).flags for name, authority in stores.items()}  # type: ignore[arg-type]
    assert flags == {"memory": ("late", "over_hold"), "sqlite": ("late", "over_hold")}
    for authority in stores.values():
        authority.close()


def test_window_pruning_walks_its_index(tmp_path: Path) -> None:
    """The partial index serves the pruning only with its own condition repeated in the query:
    without it every 1000th reserve scanned every counter of the file under the write lock."""
    from clearance.stores.sqlite import _PRUNE_WINDOWS_SQL

    path = str(tmp_path / "ledger.db")
    SQLiteStore(path).close()
    raw = sqlite3.connect(path)
    plan = " ".join(row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {_PRUNE_WINDOWS_SQL}", ("minute", "x", 10)))
    raw.close()
    assert "USING INDEX accounts_window" in plan, plan


def test_a_busy_timeout_of_0_means_one_try_not_a_refusal(tmp_path: Path) -> None:
    """``busy_timeout=0``: never wait for the lock — every reserve on a free file used to be refused
    as if its timeout had already passed."""
    authority = Authority(SQLiteStore(str(tmp_path / "ledger.db"), busy_timeout=0))
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    assert all(authority.reserve(Action("step", "s", {"usd": 1}), CHAIN).allowed for _ in range(5))
    authority.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{}?audit_capacity=0",
        "sqlite:///{}?audit_capacity=1.5",
        "sqlite:///{}?audit_capacity=-3",
        "memory://?audit_capacity=x",
        "memory://?audit_capacity=\u00b2",
    ],
)
def test_a_bad_audit_capacity_is_invalid(tmp_path: Path, url: str) -> None:
    with pytest.raises(InvalidRequest, match="audit_capacity"):
        Authority.from_url(url.format(tmp_path / "ledger.db"))
    with pytest.raises(InvalidRequest, match="audit_capacity"):
        SQLiteStore(str(tmp_path / "other.db"), audit_capacity=0)


def test_audit_capacity_from_the_url(tmp_path: Path) -> None:
    authority = Authority.from_url(f"sqlite:///{tmp_path / 'ledger.db'}?audit_capacity=5&retention=100")
    assert isinstance(authority.store, SQLiteStore) and authority.store._audit_capacity == 5
    authority.close()


@pytest.mark.parametrize("version", [3, SCHEMA_VERSION + 1])
def test_a_ledger_of_another_schema_version_is_refused_untouched(tmp_path: Path, version: int) -> None:
    path = str(tmp_path / "ledger.db")
    SQLiteStore(path).close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute(f"PRAGMA user_version = {version}")
    raw.close()
    with pytest.raises(StoreUnavailable, match=f"schema version {version}"):
        SQLiteStore(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == version
    raw.close()


@pytest.mark.parametrize("version", [*UPGRADABLE, SCHEMA_VERSION])
def test_another_applications_database_with_a_ledgers_version_number_is_refused_untouched(
    tmp_path: Path, version: int
) -> None:
    """A version number alone could be anyone's: such a file used to be switched to WAL for good and
    then fail with "no such table"."""
    path = tmp_path / "theirs.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE t(x)")
    raw.execute("INSERT INTO t VALUES (1)")
    raw.execute(f"PRAGMA user_version = {version}")
    raw.close()
    before = path.read_bytes()
    with pytest.raises(StoreUnavailable, match="not a clearance ledger"):
        SQLiteStore(str(path))
    assert path.read_bytes() == before
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    raw.close()


def test_opening_a_ledger_another_process_is_writing_is_not_an_error(tmp_path: Path) -> None:
    """A store is built with a read when the file is already of this schema version, so a writer
    holding the lock cannot make the construction fail; the calls then answer as store trouble."""
    path = str(tmp_path / "ledger.db")
    Authority(SQLiteStore(path)).close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        authority = Authority(SQLiteStore(path, busy_timeout=0.2))
        decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN)
        assert decision.denied and decision.reasons[0].code == "store_unavailable"
        authority.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def _lock_for(path: str, seconds: float) -> threading.Thread:
    """Another writer holding the ledger's write lock for ``seconds`` (started before returning)."""
    locked = threading.Event()

    def hold_lock() -> None:
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(seconds)
        writer.execute("ROLLBACK")
        writer.close()

    thread = threading.Thread(target=hold_lock)
    thread.start()
    assert locked.wait(10)
    return thread


def test_a_hold_that_waited_for_the_lock_lives_its_ttl_from_when_it_is_made(tmp_path: Path) -> None:
    """The expiry used to be read before the wait for the write lock: a reserve that waited longer
    than its TTL came back ALLOW with a hold already expired, and the next reserve took the same
    budget (emails limit 1, spent 2)."""
    path = str(tmp_path / "ledger.db")
    authority = Authority(SQLiteStore(path, busy_timeout=10))
    authority.set_budget(Budget("tenant:acme", "emails", 1))
    email = Action("side_effect", "send", {"emails": 1})
    writer = _lock_for(path, 1.5)
    first = authority.reserve(email, CHAIN, ttl=1.0)  # waits ~1.5 s for the lock
    second = authority.reserve(email, CHAIN)
    writer.join()
    assert first.allowed and first.reservation is not None
    assert authority.reservation(first.reservation).status == "held"
    assert second.denied and second.reasons[0].code == "budget_exhausted"
    authority.close()


def test_a_hold_after_a_per_run_budget_waited_for_the_lock_lives_its_ttl(tmp_path: Path) -> None:
    """The wait may come before the hold: a run's first tool call creates its per-run budget
    (``calls_per_run``) and that write waited for the lock, with the expiry already computed."""
    from clearance import Policy
    from clearance.policy_file import PolicyDocument

    path = str(tmp_path / "ledger.db")
    policy = Policy(PolicyDocument.parse({"tools": {"calls_per_run": 10}}))
    authority = Authority(SQLiteStore(path, busy_timeout=10), policy=policy)
    authority.set_budget(Budget("tenant:acme", "usd", 1))
    writer = _lock_for(path, 1.5)
    first = authority.reserve(Action.tool_call("web_search", {"usd": "0.6"}), "tenant:acme/run:r1", ttl=1.0)
    second = authority.reserve(Action("step", "other", {"usd": "0.6"}), "tenant:acme/run:r2")
    writer.join()
    assert first.allowed and first.reservation is not None
    assert authority.reservation(first.reservation).status == "held"
    assert second.denied
    authority.close()


def test_a_keyed_retry_whose_reservation_is_forgotten_while_it_waits_is_a_decision(tmp_path: Path) -> None:
    """The hold judged retention when it was asked (a replay), the answer read the reservation after
    the wait for the lock (forgotten by then): ReservationNotFound escaped reserve. Now the hold
    judges it when it is made: the key is free again."""
    path = str(tmp_path / "ledger.db")
    authority = Authority(SQLiteStore(path, retention=1, busy_timeout=5))
    authority.set_budget(Budget("tenant:acme", "calls", 100))
    step = Action.tool_call("t", {"calls": 1})
    authority.commit(authority.reserve(step, CHAIN, idempotency_key="K").reservation)  # type: ignore[arg-type]
    time.sleep(0.5)
    writer = _lock_for(path, 0.9)
    decision = authority.reserve(step, CHAIN, idempotency_key="K")  # (asked within retention)
    writer.join()
    assert decision.allowed and not decision.replayed  # the key is free again
    authority.close()


def test_a_hold_that_expired_while_a_reserve_waited_for_the_lock_is_not_counted(tmp_path: Path) -> None:
    """What is due was judged at the time the reserve was asked: a hold that expired during its wait
    for the lock still counted, and the reserve was denied where a retry right after was allowed."""
    path = str(tmp_path / "ledger.db")
    authority = Authority(SQLiteStore(path, busy_timeout=5))
    authority.set_budget(Budget("tenant:acme", "calls", 1))
    step = Action.tool_call("t", {"calls": 1})
    assert authority.reserve(step, CHAIN, ttl=0.2).allowed
    writer = _lock_for(path, 1.0)
    decision = authority.reserve(step, CHAIN)  # asked while that hold lives; made after it expired
    writer.join()
    assert decision.allowed, decision.reasons
    authority.close()


def test_async_holds_queued_for_a_worker_thread_answer_within_the_busy_timeout(tmp_path: Path) -> None:
    """More async reserves than worker threads, the file locked for 3 s, busy_timeout 1 s: each is a
    decision within the timeout from its own call (its wait for a thread counts). They used to wait
    in line, a busy_timeout each, and the last came back ALLOW after the lock was freed, with holds
    already expired."""
    path = str(tmp_path / "ledger.db")
    authority = Authority(SQLiteStore(path, busy_timeout=1))
    authority.set_budget(Budget("tenant:acme", "emails", 100))

    async def burst() -> list[str]:
        decisions = await asyncio.gather(
            *(authority.areserve(Action("side_effect", "send", {"emails": 1}), CHAIN, ttl=5) for _ in range(40))
        )
        return [d.reasons[0].code if d.denied else "allow" for d in decisions]

    writer = _lock_for(path, 3.0)
    try:
        codes = asyncio.run(burst())
    finally:
        writer.join()
    assert codes == ["store_unavailable"] * 40
    assert authority.balance("tenant:acme")["emails"].held == 0
    authority.close()


def test_a_cancelled_areserve_releases_the_hold_its_thread_made(tmp_path: Path) -> None:
    """The async face runs a hold in a worker thread, which a cancelled task cannot stop: the hold
    lands and nobody will ever see its id (``asyncio.wait_for`` around an agent step, say), so it is
    released as it lands instead of keeping the budget until its TTL. With an idempotency key it is
    kept: a retry with the key gets it."""
    import asyncio
    import threading
    import time

    entered = threading.Event()

    class SlowHold(SQLiteStore):
        def hold(self, request):  # type: ignore[no-untyped-def]
            entered.set()
            time.sleep(0.3)  # the transaction is under way when the task is cancelled
            return super().hold(request)

    authority = Authority(SlowHold(str(tmp_path / "ledger.db")), default_ttl=600)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    action = Action("step", "s", {"usd": 4})

    async def cancelled(key: str | None) -> None:
        entered.clear()
        task = asyncio.ensure_future(authority.areserve(action, CHAIN, idempotency_key=key))
        await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    def held_once_settled(expected: int) -> int:
        deadline = time.monotonic() + 10  # the release runs when the hold lands, in a thread of its own
        held = -1
        while time.monotonic() < deadline:
            held = int(authority.balance("tenant:acme")["usd"].held)
            if held == expected:
                break
            time.sleep(0.02)
        return held

    asyncio.run(cancelled(None))
    assert held_once_settled(0) == 0
    asyncio.run(cancelled("step-1"))
    assert held_once_settled(4) == 4
    retried = authority.reserve(action, CHAIN, idempotency_key="step-1")
    assert retried.allowed and retried.replayed
    authority.close()


def test_a_child_forked_while_a_thread_is_in_a_transaction_can_write(tmp_path: Path) -> None:
    """SQLite keeps a file's lock state in process memory: a child forked while another thread of
    the parent was inside a transaction inherited "a lock is held" and could never write (every
    write waited out busy_timeout). fork() now waits for the transaction to end."""
    import os
    import threading

    path = tmp_path / "ledger.db"
    store = SQLiteStore(str(path), busy_timeout=2.0)
    authority = Authority(store)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    inside, done = threading.Event(), threading.Event()

    def in_a_transaction() -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE meta SET value = value WHERE key = 'budgets'")
            inside.set()
            done.wait(10)

        store._in_write(work)

    busy = threading.Thread(target=in_a_transaction)
    busy.start()
    assert inside.wait(10)
    threading.Timer(0.3, done.set).start()
    pid = os.fork()
    if pid == 0:  # the child: its reserve and commit must go through (exit code 0)
        code = 1
        try:
            decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN)
            if decision.reservation is not None and authority.commit(decision.reservation).status == "committed":
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    busy.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    assert authority.balance("tenant:acme")["usd"].spent == 1
    authority.close()


def test_a_write_waiting_on_one_ledger_file_holds_up_no_other_file_and_no_read(tmp_path: Path) -> None:
    """This process's writers take turns per file (fork() waits for the turn under way); a write
    transaction open on one file must not hold up writes to another file, nor reads (WAL)."""
    import threading

    busy_store = SQLiteStore(str(tmp_path / "a.db"), busy_timeout=0.2)
    other = Authority(SQLiteStore(str(tmp_path / "b.db"), busy_timeout=0.2))
    same = Authority(SQLiteStore(str(tmp_path / "a.db"), busy_timeout=0.2))
    same.set_budget(Budget("tenant:acme", "usd", 10))
    inside, done = threading.Event(), threading.Event()

    def in_a_transaction() -> None:
        def work(db: sqlite3.Connection) -> None:
            inside.set()
            done.wait(10)

        busy_store._in_write(work)

    holder = threading.Thread(target=in_a_transaction)
    holder.start()
    assert inside.wait(10)
    try:
        other.set_budget(Budget("tenant:acme", "usd", 10))  # another file: not held up
        assert other.reserve(Action("step", "s", {"usd": 1}), CHAIN).allowed
        assert same.balance("tenant:acme")["usd"].limit == 10  # a read of the busy file
        with pytest.raises(StoreUnavailable):  # a write to it waits its turn, then gives up
            same.set_budget(Budget("tenant:acme", "usd", 20))
    finally:
        done.set()
        holder.join(10)
    same.set_budget(Budget("tenant:acme", "usd", 20))
    assert same.balance("tenant:acme")["usd"].limit == 20


def test_looking_reservations_up_does_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    """`reservations ls` and a look-up by id are reads: a writer holding the lock (a long sweep,
    another process's transaction) must not make them wait out busy_timeout and fail. Only a
    reservation due to expire takes the lock, to expire it first."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    authority = Authority(SQLiteStore(path, busy_timeout=0.2), clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    held = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN, ttl=60)
    assert held.reservation is not None
    done = _lifecycle(authority)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert {r.id for r in authority.reservations(CHAIN, status=None)} == {held.reservation.id, done}
        assert authority.reservation(held.reservation.id).status == "held"
        assert authority.reservation(done).status == "committed"
        clock.advance(61)  # now the hold is due: expiring it needs the lock
        with pytest.raises(StoreUnavailable):
            authority.reservation(held.reservation.id)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert authority.reservation(held.reservation.id).status == "expired"
    assert [r.status for r in authority.reservations(CHAIN, status=None)] == ["expired", "committed"]
    authority.close()


def test_short_lived_authorities_keep_the_file_bounded(tmp_path: Path) -> None:
    """The maintenance pass is due by what the ledger wrote, not by what one store object did:
    with an Authority per 300 reserves (per request, recycled workers, CLI jobs) it never ran,
    and nothing was ever forgotten or pruned."""
    path = str(tmp_path / "ledger.db")
    url = f"sqlite:///{path}?retention=3600&audit_capacity=1000"
    clock = FakeClock()
    authority = Authority(url, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10**6, period="day"))
    sizes = []
    for _ in range(6):
        for _ in range(1500):
            if not clock() % 300:
                authority.close()
                authority = Authority(url, clock=clock)
            decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN)
            authority.commit(decision.reservation)  # type: ignore[arg-type]
            clock.advance(1)
        clock.advance(2 * 86400)  # everything above is past retention
        sizes.append((_rows(path, "SELECT count(*) FROM log"), _rows(path, "SELECT count(*) FROM accounts")))
    authority.close()
    assert max(log for log, _ in sizes[2:]) <= 1000 + MAINTAIN_EVERY + 3000  # capacity + a pass + a round
    assert max(accounts for _, accounts in sizes) <= WINDOWS_KEPT + 1


def test_sweep_keeps_up_with_a_busy_audit_trail(tmp_path: Path) -> None:
    """A pass prunes a batch; a lifecycle that writes many records (extends as heartbeats) outran
    one pass per sweep for good. sweep() repeats the pass until nothing is left over."""
    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    authority = Authority(f"sqlite:///{path}?retention=3600&audit_capacity=1000", clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10**6))
    for _ in range(3):
        for _ in range(700):
            decision = authority.reserve(Action("step", "s", {"usd": 1}), CHAIN)
            assert decision.reservation is not None
            for _ in range(40):
                authority.extend(decision.reservation, 60)
            authority.commit(decision.reservation)
        clock.advance(2 * 86400)
        authority.sweep()
        assert _rows(path, "SELECT count(*) FROM log") <= 1000
    authority.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_child_forked_while_a_thread_reads_the_ledger_works(tmp_path: Path) -> None:
    """fork() waited only for write transactions: a child forked while another thread was inside a
    read (a dashboard's balance(), the policy-version check of a reserve) inherited SQLite's file
    mutex held and hung on its first call, forever (seen in ~1 child in 12)."""
    import signal
    import threading

    authority = Authority(f"sqlite:///{tmp_path / 'ledger.db'}?busy_timeout=1")
    authority.set_budget(Budget("tenant:t", "calls", 10**9))
    stop = threading.Event()

    def dashboard() -> None:
        while not stop.is_set():
            authority.balance("tenant:t")

    readers = [threading.Thread(target=dashboard) for _ in range(2)]
    for reader in readers:
        reader.start()
    stuck = 0
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:  # the child: one lifecycle, then out (never back into pytest)
                try:
                    decision = authority.reserve(Action("step", "s", {"calls": 1}), "tenant:t/run:c")
                    authority.commit(decision.reservation)  # type: ignore[arg-type]
                finally:
                    os._exit(0)
            deadline = time.monotonic() + 10
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    stuck += 1
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert stuck == 0
    assert authority.balance("tenant:t")["calls"].spent == 40 - stuck
    authority.close()


def test_a_relative_ledger_path_is_one_file_after_a_chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread opens its own connection: a relative path was resolved again by each, so after an
    os.chdir() a new thread wrote into another file (an empty one, or another ledger)."""
    import threading

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    authority = Authority("sqlite:///ledger.db")
    authority.set_budget(Budget("tenant:t", "calls", 1))
    assert authority.reserve(Action("step", "s", {"calls": 1}), "tenant:t").allowed
    monkeypatch.chdir(tmp_path / "b")
    answers: list[bool] = []
    def reserve() -> None:
        answers.append(authority.reserve(Action("step", "s", {"calls": 1}), "tenant:t").allowed)

    worker = threading.Thread(target=reserve)
    worker.start()
    worker.join()
    assert answers == [False]  # the same ledger: its one call is taken
    assert not (tmp_path / "b" / "ledger.db").exists()
    authority.close()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX-only")
def test_a_fifo_as_the_ledger_path_is_refused_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(StoreUnavailable, match="not a regular file"):
        SQLiteStore(str(path))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_an_exception_in_the_middle_of_a_read_never_stops_later_forks(tmp_path: Path) -> None:
    """A read interrupted by an exception between two statements (Ctrl-C) could leave the count of
    reads under way raised: every later fork() then waited for good. Reads hold a lock now."""
    import signal

    from clearance.stores import sqlite as sqlite_store

    store = SQLiteStore(str(tmp_path / "ledger.db"))

    class Interrupt(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        code = getattr(frame, "f_code", None)
        if code is not None and code.co_filename.endswith("stores/sqlite.py"):
            raise Interrupt

    import threading

    previous = signal.signal(signal.SIGUSR1, interrupt)
    done = threading.Event()
    main = threading.get_ident()

    def pester() -> None:  # signals the main thread, as Ctrl-C would, again and again
        while not done.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.00005)

    pesterer = threading.Thread(target=pester)
    pesterer.start()
    interrupted = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                store.policy_version()
            except Interrupt:
                interrupted += 1
    finally:
        done.set()
        pesterer.join()
        signal.signal(signal.SIGUSR1, previous)
    assert interrupted > 100
    free: list[bool] = []

    def try_all() -> None:  # (from another thread: the locks are reentrant for their own)
        for lock in list(sqlite_store._readers._locks):
            got = lock.acquire(timeout=2)
            if got:
                lock.release()
            free.append(got)

    checker = threading.Thread(target=try_all)
    checker.start()
    checker.join()
    assert free and all(free)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    store.close()


def test_a_signal_handler_may_read_the_ledger_while_its_thread_reads(tmp_path: Path) -> None:
    """Each read holds its thread's lock: a handler reading in the middle of a read of its own
    thread waited for it for good (the lock is reentrant now)."""
    import signal
    import threading

    store = SQLiteStore(str(tmp_path / "ledger.db"))
    versions: list[int] = []
    inside = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if not inside.is_set():
            inside.set()
            try:
                versions.append(store.policy_version())
            finally:
                inside.clear()

    previous = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    done = threading.Event()

    def pester() -> None:
        while not done.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.0005)

    pesterer = threading.Thread(target=pester)
    pesterer.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            store.accounts(None, windows_at(time.time()), time.time(), True)
    finally:
        done.set()
        pesterer.join()
        signal.signal(signal.SIGUSR1, previous)
    assert versions
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_signal_handler_reading_while_a_fork_waits_for_its_thread_does_not_deadlock(tmp_path: Path) -> None:
    """A fork waits for this thread's read; a handler reading inside that read waited for the
    fork: each for the other (found in review). A nested read does not wait for a fork."""
    import signal
    import threading

    store = SQLiteStore(str(tmp_path / "ledger.db"))
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(store.policy_version()))
    forked = threading.Event()

    def forker() -> None:
        pid = os.fork()  # waits for the main thread's read below
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forked.set()

    try:
        with store._read() as db:
            db.execute("SELECT 1").fetchall()
            thread = threading.Thread(target=forker, daemon=True)
            thread.start()
            time.sleep(0.3)  # the fork holds the gate now, waiting for this read
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            time.sleep(0.1)  # (the handler runs here, inside the read)
        assert got == [0]
        assert forked.wait(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    store.close()


def test_a_second_store_on_an_open_ledger_keeps_the_process_s_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    too. A second store on a ledger this process had open read its header (open, close): the
    process's shared lock was gone, so another process closing its last connection took itself
    for the last user and deleted the WAL this one went on writing into — its holds seen by nobody
    else: 20 calls allowed against a limit of 10."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    worker = Authority(url)
    worker.set_budget(Budget("tenant:t", "calls", 10))
    Authority(url)  # an Authority per request, say
    other = (
        "import sys\nfrom clearance import Action, Authority\n"
        f"a = Authority({url!r})\n"
        "if sys.argv[1] == 'reserve':\n"
        "    print(sum(a.reserve(Action.tool_call('x'), 'tenant:t').allowed for _ in range(10)))\n"
    )
    subprocess.run([sys.executable, "-c", other, "look"], check=True, timeout=60)  # comes and goes
    assert os.path.exists(tmp_path / "ledger.db-wal")
    assert all(worker.reserve(Action.tool_call("x"), "tenant:t").allowed for _ in range(10))
    allowed = subprocess.run([sys.executable, "-c", other, "reserve"], check=True, capture_output=True, text=True)
    assert allowed.stdout.strip() == "0"
    worker.close()


def test_a_ledger_file_deleted_or_replaced_under_a_worker_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted ledger (a clean-up of /tmp, a mistaken rm): the worker's connections wrote on into
    the deleted file and a new thread's connection made a new empty ledger there — without budgets,
    so every later process allowed everything. Both now refuse: store trouble, a decision."""
    from clearance.stores import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "FILE_CHECK_EVERY", 0.0)
    path = tmp_path / "ledger.db"
    authority = Authority(f"sqlite:///{path}")
    authority.set_budget(Budget("tenant:t", "calls", 10))
    step = Action.tool_call("x")
    assert authority.reserve(step, "tenant:t").allowed
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        if (tmp_path / name).exists():
            os.remove(tmp_path / name)
    same_thread = authority.reserve(step, "tenant:t")
    assert same_thread.denied and same_thread.reasons[0].code == "store_unavailable"
    assert "deleted or replaced" in same_thread.reasons[0].message
    answers: list[object] = []
    thread = threading.Thread(target=lambda: answers.append(authority.reserve(step, "tenant:t")))
    thread.start()
    thread.join(30)
    assert answers and answers[0].denied  # type: ignore[attr-defined]
    assert not path.exists()  # no new, empty ledger made where it was
    with pytest.raises(StoreUnavailable):
        authority.commit(same_thread.reservation or "0" * 20 + ".tenant:t")
    authority.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="the -shm check reads /proc/self/maps (Linux)")
def test_a_shm_file_deleted_under_a_worker_fails_it_closed_and_no_budget_is_spent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rm ledger.db-shm`` under a running worker: the next process made a new one, and each wrote
    the WAL as its own index said — 19 of a 10-call budget granted, and holds lost from the file.
    The worker whose index is gone from its path now refuses (the new process works on)."""
    import subprocess
    import sys

    from clearance.stores import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "FILE_CHECK_EVERY", 0.0)
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    worker = Authority(url)
    worker.set_budget(Budget("tenant:t", "calls", 10))
    step = Action.tool_call("x")
    assert worker.reserve(step, "tenant:t").allowed
    os.remove(tmp_path / "ledger.db-shm")
    other = (
        "from clearance import Action, Authority\n"
        f"a = Authority({url!r})\n"
        "print(sum(a.reserve(Action.tool_call('x'), 'tenant:t').allowed for _ in range(20)))\n"
    )
    newcomer = subprocess.run([sys.executable, "-c", other], check=True, capture_output=True, text=True, timeout=60)
    # An Authority made now in this process (one per request, say) shares its stale index: refused too.
    for _ in range(3):
        with pytest.raises(StoreUnavailable, match="-shm"):
            Authority(url)
    answers = [worker.reserve(step, "tenant:t") for _ in range(20)]
    assert all(a.denied and a.reasons[0].code == "store_unavailable" for a in answers)
    assert "-shm" in answers[0].reasons[0].message
    assert 1 + int(newcomer.stdout) == 10  # the newcomer had the other nine, no more
    worker.close()  # (and its close lost none of the newcomer's holds: its index does not know them)
    look = f"from clearance import Authority\nprint(Authority({url!r}).balance('tenant:t')['calls'].held)\n"
    seen = subprocess.run([sys.executable, "-c", look], check=True, capture_output=True, text=True, timeout=60)
    assert seen.stdout.strip() == "10"  # a process started now sees every hold: nothing lost, nothing over


def test_a_short_file_is_refused_even_at_an_inode_number_this_process_had_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger's inode number, once it is deleted, goes to the next new file: the check that skips
    reading the header of a file open in this process must not let a short text file through
    (SQLite takes one for an empty database, and would make it a ledger). Shorter than any
    database, it is refused without being opened (a ledger cut short under this process too)."""
    from clearance.stores import sqlite as sqlite_store

    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    found = os.stat(notes)
    sqlite_store._opened_files.add((found.st_dev, found.st_ino))
    opened: list[object] = []
    monkeypatch.setattr(sqlite_store, "open", lambda *a, **k: opened.append(a), raising=False)
    with pytest.raises(StoreUnavailable, match="not a SQLite database"):
        SQLiteStore(str(notes))
    assert opened == []
    assert notes.read_text() == "x"


def test_a_store_is_made_whole_before_another_checks_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads making stores on one ledger: the second's header check (open, close) must not
    fall between the first's check and its first connection, or it drops the lock that connection
    just took (14 trials in 200 lost it). Header check and first connection are one step."""
    from clearance.stores import sqlite as sqlite_store

    seen: list[bool] = []
    connect = SQLiteStore._connect

    def watched(self: SQLiteStore) -> object:
        if self._file is None:
            seen.append(sqlite_store._opening.locked())
        return connect(self)

    monkeypatch.setattr(SQLiteStore, "_connect", watched)
    SQLiteStore(str(tmp_path / "ledger.db")).close()
    assert seen == [True]


def test_a_ledger_path_that_is_not_utf8_opens_from_every_thread(tmp_path: Path) -> None:
    """Later connections open the file by URI (never creating a new one): a path's bytes that are
    not UTF-8 must reach it as they are, not end in a bare UnicodeEncodeError."""
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    authority = Authority(f"sqlite:///{os.fsdecode(folder)}/ledger.db")
    authority.set_budget(Budget("tenant:t", "calls", 5))
    answers: list[bool] = []
    step = Action.tool_call("x")
    thread = threading.Thread(target=lambda: answers.append(authority.reserve(step, "tenant:t").allowed))
    thread.start()
    thread.join(30)
    assert answers == [True]
    authority.close()


def _other_process_writes(path: Path) -> bool:
    """Whether another connection can take the ledger's write lock at once."""
    other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


def test_an_interrupt_as_begin_returns_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A step timeout (SIGALRM raising) while a reserve waited for another process's write landed
    just after BEGIN IMMEDIATE returned: the write transaction stayed open for good — this thread's
    calls failed, and every other process failed closed after its busy timeout."""
    import signal

    path = tmp_path / "ledger.db"
    authority = Authority(f"sqlite:///{path}")
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    started = threading.Event()

    def other_writer() -> None:  # another worker's transaction, half a second long
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        started.set()
        time.sleep(0.5)
        db.execute("COMMIT")
        db.close()

    def on_alarm(signum: int, frame: object) -> None:
        raise Interrupted

    writer = threading.Thread(target=other_writer)
    writer.start()
    started.wait()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # runs once BEGIN is back, after the writer is done
        with pytest.raises(Interrupted):
            authority.reserve(Action("step", "x", {"usd": 1}), "tenant:acme/run:r1")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        writer.join()
    assert _other_process_writes(path)
    assert authority.reserve(Action("step", "x", {"usd": 1}), "tenant:acme/run:r2").allowed
    assert authority.balance("tenant:acme")["usd"].held == 1  # (the interrupted one held nothing)


@pytest.mark.parametrize("where", ["turn", "begin"])
def test_an_interrupt_right_after_a_step_gives_back_the_turn_and_the_transaction(tmp_path: Path, where: str) -> None:
    """The same at each step, made to happen: right after this file's turn was taken, it was kept
    (every other thread of the process then failed closed, and ``fork()`` hung)."""
    path = tmp_path / "ledger.db"
    authority = Authority(f"sqlite:///{path}")
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    store = authority.store
    assert isinstance(store, SQLiteStore)
    real_db, real_turns = store._local.db, store._turns

    class Turns:
        def acquire(self, *args: object, **kwargs: object) -> bool:
            real_turns.acquire(*args, **kwargs)  # type: ignore[arg-type]
            raise Interrupted

        def __getattr__(self, name: str) -> object:
            return getattr(real_turns, name)

    class Db:
        def execute(self, sql: str, *args: object) -> object:
            result = real_db.execute(sql, *args)
            if sql == "BEGIN IMMEDIATE":
                raise Interrupted
            return result

        def __getattr__(self, name: str) -> object:
            return getattr(real_db, name)

    if where == "turn":
        store._turns = Turns()  # type: ignore[assignment]
    else:
        store._local.db = Db()
    with pytest.raises(Interrupted):
        authority.reserve(Action("step", "x", {"usd": 1}), "tenant:acme/run:r1")
    store._turns, store._local.db = real_turns, real_db
    assert not real_db.in_transaction and not real_turns._is_owned()  # type: ignore[attr-defined]
    other = threading.Thread(target=lambda: authority.set_budget(Budget("tenant:beta", "usd", 1)))
    other.start()
    other.join(timeout=2)
    assert not other.is_alive() and _other_process_writes(path)
    assert authority.reserve(Action("step", "x", {"usd": 1}), "tenant:acme/run:r2").allowed


def test_a_signal_handler_writing_inside_a_write_is_refused_not_let_in(tmp_path: Path) -> None:
    """The turn lock tells its owner now (to give it back after an interrupt): a call made from a
    signal handler while its thread is inside a write on the same file must not take it again."""
    authority = Authority(f"sqlite:///{tmp_path / 'ledger.db'}")
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    store = authority.store
    assert isinstance(store, SQLiteStore)
    store._turns.acquire()  # as if this thread were inside a write
    try:
        with pytest.raises(StoreUnavailable, match="inside a write"):
            store.set_budget("tenant:acme", "usd", "", 5, 0.0)
    finally:
        store._turns.release()
    assert authority.balance("tenant:acme")["usd"].limit == 10


def test_a_write_interrupted_as_it_ends_gives_back_its_turn(tmp_path: Path) -> None:
    """Writes other than reserve and commit ran in a ``with`` block: an exception arriving as its
    context's ``__exit__`` began (a Python function: a signal handler's can arrive at its start)
    left the turn and the transaction held (found in review). Every point of a release and a budget
    change, in turn: the turn and the transaction are given back."""
    point = 0
    while True:
        point += 1
        authority = Authority(f"sqlite:///{tmp_path / f'ledger{point}.db'}")
        authority.set_budget(Budget("tenant:acme", "usd", 10))
        reservation = authority.reserve(Action("step", "x", {"usd": 1}), "tenant:acme/run:r1").reservation
        store = authority.store
        assert isinstance(store, SQLiteStore)

        def release_then_set() -> None:
            authority.release(reservation)  # type: ignore[arg-type]
            authority.set_budget(Budget("tenant:acme", "usd", 20))

        interrupted = interrupt_at(point, release_then_set)
        assert not store._turns._is_owned(), point  # type: ignore[attr-defined]
        assert not store._local.db.in_transaction, point
        assert _other_process_writes(tmp_path / f"ledger{point}.db"), point
        authority.close()
        if not interrupted:
            break
    assert point > 20


def test_a_signal_while_begin_waits_for_another_process_leaves_no_turn_held(tmp_path: Path) -> None:
    """Ctrl-C (or a step timeout) while BEGIN waited for another process's write lock: BEGIN fails
    busy, and the pending signal's exception arrives at the next call — the rollback in the error
    handling, before the turn went back: this thread's writes were refused for good, every other
    thread's timed out (found in review)."""
    import signal

    path = tmp_path / "ledger.db"
    store = SQLiteStore(str(path), busy_timeout=0.5)
    store.set_budget("tenant:acme", "usd", "", 100, 1.0)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    def on_alarm(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # arrives while BEGIN waits (in C): run after it fails
        with pytest.raises(Interrupted):
            store.set_budget("tenant:acme", "usd", "", 200, 2.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        other.execute("ROLLBACK")
        other.close()
    assert not store._turns._is_owned()  # type: ignore[attr-defined]
    store.set_budget("tenant:acme", "usd", "", 300, 3.0)
    elsewhere = threading.Thread(target=lambda: store.set_budget("tenant:acme", "usd", "", 400, 4.0))
    elsewhere.start()
    elsewhere.join(timeout=5)
    assert not elsewhere.is_alive()
