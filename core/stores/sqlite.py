"""The SQLite store: one machine, many processes and threads, durable.

Every operation is one ``BEGIN IMMEDIATE`` transaction, so the ladder, the holds and the audit
record of a call commit together or not at all; a process killed mid-operation leaves no
half-applied reservation. The database runs in WAL mode with ``synchronous=NORMAL``: a committed
transaction survives the process being killed (it is in the WAL); only an OS crash or power loss
may lose the last few. Pass ``synchronous="FULL"`` to survive those too, at an fsync per call.

Each thread of each process gets its own connection (SQLite connections must not cross a fork).
A lock held longer than ``busy_timeout`` seconds becomes :class:`StoreUnavailable`, never a hang.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from clearance.errors import ReservationClosed, ReservationNotFound, StoreUnavailable
from clearance.ledger import (
    COMMITTED,
    EXPIRED,
    HELD,
    OVER_LIMIT,
    RELEASED,
    AccountState,
    Amounts,
    AuditEvent,
    HoldRequest,
    HoldResult,
    ReservationRecord,
    SettleResult,
    choose_plan,
    commit_flags,
    with_holds,
)
from clearance.periods import Windows
from clearance.scope import parse_scope
from clearance.stores.base import DEFAULT_RETENTION, Store, in_subtree, root_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets(
    scope TEXT NOT NULL, unit TEXT NOT NULL, period TEXT NOT NULL, lim INTEGER NOT NULL,
    PRIMARY KEY (scope, unit, period)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts(
    scope TEXT NOT NULL, unit TEXT NOT NULL, period TEXT NOT NULL, win TEXT NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, unit, period, win)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations(
    id TEXT PRIMARY KEY, root TEXT NOT NULL, scope TEXT NOT NULL, status TEXT NOT NULL,
    plan INTEGER NOT NULL, amounts TEXT NOT NULL, holds TEXT NOT NULL, windows TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, settled_at REAL, forget_at REAL,
    committed TEXT, flags TEXT NOT NULL DEFAULT '', idem TEXT, label TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations(expires_at) WHERE status = 'held';
CREATE INDEX IF NOT EXISTS reservations_forget ON reservations(forget_at) WHERE forget_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS reservations_idem ON reservations(root, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS reservations_scope ON reservations(scope);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL,
    rid TEXT, amounts TEXT NOT NULL, detail TEXT NOT NULL);
"""

_STATES_SQL = """
SELECT b.scope, b.unit, b.period, b.lim, COALESCE(a.spent, 0), COALESCE(a.held, 0)
FROM budgets AS b LEFT JOIN accounts AS a
  ON a.scope = b.scope AND a.unit = b.unit AND a.period = b.period
 AND a.win = CASE b.period WHEN '' THEN '' WHEN 'minute' THEN ?1 WHEN 'hour' THEN ?2 WHEN 'day' THEN ?3
                           WHEN 'week' THEN ?4 ELSE ?5 END
WHERE b.scope IN ({places})
"""
_STATES_BY_DEPTH = [_STATES_SQL.format(places=", ".join(f"?{6 + i}" for i in range(n))) for n in range(17)]

_HOLD_SQL = (
    "INSERT INTO accounts(scope, unit, period, win, spent, held) VALUES (?, ?, ?, ?, 0, ?) "
    "ON CONFLICT DO UPDATE SET held = held + excluded.held"
)
_UNHOLD_SQL = "UPDATE accounts SET held = held - ? WHERE scope = ? AND unit = ? AND period = ? AND win = ?"
_CHARGE_SQL = (
    "INSERT INTO accounts(scope, unit, period, win, spent, held) VALUES (?, ?, ?, ?, ?, 0) "
    "ON CONFLICT DO UPDATE SET spent = spent + excluded.spent RETURNING spent + held"
)
_EVENT_SQL = "INSERT INTO events(at, kind, scope, rid, amounts, detail) VALUES (?, ?, ?, ?, ?, ?)"
_RES_COLUMNS = (
    "id, scope, root, status, plan, amounts, holds, windows, created_at, expires_at, settled_at, "
    "committed, flags, idem, label"
)
_PERIOD_ORDER = ("minute", "hour", "day", "week", "month")


def _dump(amounts: Amounts) -> str:
    return json.dumps(amounts, separators=(",", ":"))


def _amounts(text: str | None) -> Amounts:
    return tuple((unit, steps) for unit, steps in json.loads(text)) if text else ()


def _record(row: Any) -> ReservationRecord:
    return ReservationRecord(
        id=row[0],
        scope=row[1],
        root=row[2],
        status=row[3],
        plan_index=row[4],
        amounts=_amounts(row[5]),
        holds=tuple(tuple(h) for h in json.loads(row[6])),
        windows=tuple(tuple(w) for w in json.loads(row[7])),
        created_at=row[8],
        expires_at=row[9],
        settled_at=row[10],
        committed=_amounts(row[11]) if row[11] is not None else None,
        flags=tuple(row[12].split(",")) if row[12] else (),
        idempotency_key=row[13],
        label=row[14],
    )


class SQLiteStore(Store):
    """``sqlite:///path.db`` — the ledger in one SQLite file, shared by every process on the machine."""

    scheme: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        retention: float = DEFAULT_RETENTION,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
    ) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._retention = retention
        self._busy_timeout = busy_timeout
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._holds_since_forget = 0
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    # --- connections and transactions -----------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        local = self._local
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is not None and local.pid == os.getpid():
            return db
        try:
            db = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
            )
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open SQLite ledger {self.path}: {error}") from error
        local.db = db
        local.pid = os.getpid()
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise StoreUnavailable(f"SQLite ledger {self.path} is busy or unreadable: {error}") from error
        try:
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback(db)
            raise StoreUnavailable(f"SQLite ledger {self.path} failed: {error}") from error
        except BaseException:
            self._rollback(db)
            raise

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        try:
            yield db
        except sqlite3.Error as error:
            raise StoreUnavailable(f"SQLite ledger {self.path} failed: {error}") from error

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- ledger steps (inside a write transaction) ---------------------------------------------
    @staticmethod
    def _log(
        db: sqlite3.Connection, now: float, kind: str, scope: str, rid: str | None, amounts: Amounts, detail: str = ""
    ) -> None:
        db.execute(_EVENT_SQL, (now, kind, scope, rid, _dump(amounts), detail))

    def _reclaim(self, db: sqlite3.Connection, now: float) -> int:
        rows = db.execute(
            "SELECT id, scope, holds, amounts FROM reservations WHERE status = 'held' AND expires_at <= ?", (now,)
        ).fetchall()
        for rid, scope, holds, amounts in rows:
            db.executemany(_UNHOLD_SQL, [(h[4], h[0], h[1], h[2], h[3]) for h in json.loads(holds)])
            db.execute(
                "UPDATE reservations SET status = 'expired', settled_at = ?, forget_at = ? WHERE id = ?",
                (now, now + self._retention, rid),
            )
            self._log(db, now, "expire", scope, rid, _amounts(amounts))
        return len(rows)

    def _forget(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM reservations WHERE forget_at <= ?", (now,))

    @staticmethod
    def _states(
        db: sqlite3.Connection, chain: tuple[str, ...], units: set[str], windows: Windows
    ) -> list[AccountState]:
        by_period = dict(windows)
        params = [by_period[p] for p in _PERIOD_ORDER]
        params.extend(chain)
        states = []
        for scope, unit, period, limit, spent, held in db.execute(_STATES_BY_DEPTH[len(chain)], params):
            if unit in units:
                states.append(AccountState(scope, unit, period, by_period[period], limit, spent, held))
        return states

    # --- reservations --------------------------------------------------------------------------
    def hold(self, request: HoldRequest) -> HoldResult:
        units = {unit for plan in request.plans for unit, _ in plan.amounts}
        now = request.now
        with self._write() as db:
            self._reclaim(db, now)
            self._holds_since_forget += 1
            if self._holds_since_forget >= 1000:
                self._holds_since_forget = 0
                self._forget(db, now)
            if request.idempotency_key is not None:
                row = db.execute(
                    "SELECT id, plan, expires_at, windows, amounts FROM reservations WHERE root = ? AND idem = ?",
                    (request.chain[0], request.idempotency_key),
                ).fetchone()
                if row is not None:
                    windows = tuple(tuple(w) for w in json.loads(row[3]))
                    held_units = {unit for unit, _ in _amounts(row[4])}
                    states = self._states(db, request.chain, held_units, windows)
                    return HoldResult(row[0], row[1], row[2], tuple(states), (), replayed=True)
            states = self._states(db, request.chain, units, request.windows)
            choice = choose_plan(request.plans, request.chain, states)
            if choice.plan_index < 0:
                return HoldResult(None, -1, 0.0, tuple(states), tuple(choice.rejections))
            added: dict[tuple[str, str, str, str], int] = {}
            for position, steps in choice.holds:
                account = states[position]
                added[(account.scope, account.unit, account.period, account.window)] = steps
            db.executemany(_HOLD_SQL, [(*key, steps) for key, steps in added.items()])
            plan = request.plans[choice.plan_index]
            rid = request.reservation_id
            scope = request.chain[-1]
            db.execute(
                "INSERT INTO reservations(id, root, scope, status, plan, amounts, holds, windows, created_at, "
                "expires_at, idem, label) VALUES (?, ?, ?, 'held', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rid,
                    request.chain[0],
                    scope,
                    choice.plan_index,
                    _dump(plan.amounts),
                    json.dumps([(*key, steps) for key, steps in added.items()], separators=(",", ":")),
                    json.dumps(request.windows, separators=(",", ":")),
                    now,
                    request.expires_at,
                    request.idempotency_key,
                    request.label,
                ),
            )
            self._log(db, now, "hold", scope, rid, plan.amounts, f"plan={choice.plan_index}")
        after = with_holds(states, choice.holds)
        return HoldResult(rid, choice.plan_index, request.expires_at, after, tuple(choice.rejections))

    def _load(self, db: sqlite3.Connection, reservation_id: str) -> ReservationRecord:
        row = db.execute(f"SELECT {_RES_COLUMNS} FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
        if row is None:
            root_of(reservation_id)
            raise ReservationNotFound(reservation_id)
        return _record(row)

    def _expire_if_due(self, db: sqlite3.Connection, record: ReservationRecord, now: float) -> str:
        if record.status == HELD and record.expires_at <= now:
            self._reclaim(db, now)
            return EXPIRED
        return record.status

    def commit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        with self._write() as db:
            record = self._load(db, reservation_id)
            prior = self._expire_if_due(db, record, now)
            if prior == COMMITTED:
                return SettleResult(record.id, COMMITTED, record.committed or (), record.flags, replayed=True)
            if actual is None:
                actual = record.amounts
            if prior == HELD:
                db.executemany(_UNHOLD_SQL, [(h[4], h[0], h[1], h[2], h[3]) for h in record.holds])
            flags = commit_flags(prior, record.amounts, actual)
            charged_units = {unit: steps for unit, steps in actual if steps}
            if charged_units:
                chain = parse_scope(record.scope).chain
                windows = dict(record.windows)
                budgets = db.execute(
                    f"SELECT scope, unit, period, lim FROM budgets WHERE scope IN ({', '.join('?' * len(chain))})",
                    chain,
                ).fetchall()
                over = False
                for scope, unit, period, limit in budgets:
                    steps = charged_units.get(unit)
                    if steps:
                        (total,) = db.execute(_CHARGE_SQL, (scope, unit, period, windows[period], steps)).fetchone()
                        over = over or total > limit
                if over:
                    flags.append(OVER_LIMIT)
            db.execute(
                "UPDATE reservations SET status = 'committed', committed = ?, flags = ?, settled_at = ?, "
                "forget_at = ? WHERE id = ?",
                (_dump(actual), ",".join(flags), now, now + self._retention, record.id),
            )
            self._log(db, now, "commit", record.scope, record.id, actual, ",".join(flags))
        return SettleResult(record.id, COMMITTED, actual, tuple(flags))

    def release(self, reservation_id: str, now: float) -> SettleResult:
        with self._write() as db:
            record = self._load(db, reservation_id)
            status = self._expire_if_due(db, record, now)
            if status != HELD:
                return SettleResult(record.id, status, (), record.flags, replayed=True)
            db.executemany(_UNHOLD_SQL, [(h[4], h[0], h[1], h[2], h[3]) for h in record.holds])
            db.execute(
                "UPDATE reservations SET status = 'released', settled_at = ?, forget_at = ? WHERE id = ?",
                (now, now + self._retention, record.id),
            )
            self._log(db, now, "release", record.scope, record.id, record.amounts)
        return SettleResult(record.id, RELEASED)

    def extend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        with self._write() as db:
            record = self._load(db, reservation_id)
            status = self._expire_if_due(db, record, now)
            if status != HELD:
                raise ReservationClosed(record.id, status)
            db.execute("UPDATE reservations SET expires_at = ? WHERE id = ?", (expires_at, record.id))
            self._log(db, now, "extend", record.scope, record.id, (), f"expires_at={expires_at:.3f}")
            return self._load(db, reservation_id)

    def reservation(self, reservation_id: str, now: float) -> ReservationRecord:
        with self._write() as db:
            record = self._load(db, reservation_id)
            if self._expire_if_due(db, record, now) != record.status:
                record = self._load(db, reservation_id)
            return record

    def reservations(self, scope: str | None, status: str | None, limit: int, now: float) -> list[ReservationRecord]:
        with self._write() as db:
            self._reclaim(db, now)
            sql = f"SELECT {_RES_COLUMNS} FROM reservations"
            clauses: list[str] = []
            params: list[Any] = []
            if status is not None:
                clauses.append("status = ?")
                params.append(status)
            if scope is not None:
                clauses.append("(scope = ? OR substr(scope, 1, ?) = ?)")
                params.extend([scope, len(scope) + 1, scope + "/"])
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += " ORDER BY created_at DESC LIMIT ?"
            params.append(limit)
            return [_record(row) for row in db.execute(sql, params)]

    # --- budgets -------------------------------------------------------------------------------
    def set_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO budgets(scope, unit, period, lim) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET lim = excluded.lim",
                (scope, unit, period, limit),
            )
            self._log(db, now, "budget_set", scope, None, ((unit, limit),), f"period={period or 'lifetime'}")

    def remove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM budgets WHERE scope = ? AND unit = ? AND period = ?", (scope, unit, period)
            )
            if cursor.rowcount == 0:
                return False
            self._log(db, now, "budget_remove", scope, None, ((unit, 0),), f"period={period or 'lifetime'}")
            return True

    def accounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        due = False
        with self._read() as db:
            due = (
                db.execute(
                    "SELECT 1 FROM reservations WHERE status = 'held' AND expires_at <= ? LIMIT 1", (now,)
                ).fetchone()
                is not None
            )
        if due:
            with self._write() as db:
                self._reclaim(db, now)
        by_period = dict(windows)
        with self._read() as db:
            rows = (
                db.execute("SELECT scope, unit, period, lim FROM budgets ORDER BY scope, unit, period").fetchall()
                if scope is None or subtree
                else db.execute(
                    "SELECT scope, unit, period, lim FROM budgets WHERE scope = ? ORDER BY unit, period", (scope,)
                ).fetchall()
            )
            states: list[AccountState] = []
            for path, unit, period, limit in rows:
                if subtree and not in_subtree(path, scope):
                    continue
                window = by_period[period]
                counters = db.execute(
                    "SELECT spent, held FROM accounts WHERE scope = ? AND unit = ? AND period = ? AND win = ?",
                    (path, unit, period, window),
                ).fetchone()
                spent, held = counters if counters else (0, 0)
                states.append(AccountState(path, unit, period, window, limit, spent, held))
            return states

    # --- maintenance ---------------------------------------------------------------------------
    def sweep(self, now: float) -> int:
        with self._write() as db:
            expired = self._reclaim(db, now)
            self._forget(db, now)
            return expired

    def events(self, after: int, limit: int, scope: str | None) -> list[AuditEvent]:
        with self._read() as db:
            sql = "SELECT seq, at, kind, scope, rid, amounts, detail FROM events WHERE seq > ?"
            params: list[Any] = [after]
            if scope is not None:
                sql += " AND (scope = ? OR substr(scope, 1, ?) = ?)"
                params.extend([scope, len(scope) + 1, scope + "/"])
            sql += " ORDER BY seq LIMIT ?"
            params.append(limit)
            return [
                AuditEvent(seq, at, kind, sc, rid, _amounts(amounts), detail)
                for seq, at, kind, sc, rid, amounts, detail in db.execute(sql, params)
            ]
