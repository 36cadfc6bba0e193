"""The SQLite store: one machine, many processes and threads, durable.

Every operation is one ``BEGIN IMMEDIATE`` transaction, so the ladder, the holds and the audit
record of a call commit together or not at all; a process killed mid-operation leaves no
half-applied reservation. The database runs in WAL mode with ``synchronous=NORMAL``: a committed
transaction survives the process being killed (it is in the WAL); only an OS crash or power loss
may lose the last few. Pass ``synchronous="FULL"`` to survive those too, at an fsync per call.

Each thread of each process gets its own connection (SQLite connections must not cross a fork).
A lock held longer than ``busy_timeout`` seconds becomes :class:`StoreUnavailable`, never a hang.

Layout, chosen for the hot path (a transaction costs roughly one WAL frame write per page it
changes, so the schema keeps the pages a reserve or a commit touches few and small):

* 1 KiB pages (set when the file is created): a WAL frame is a quarter of the default's.
* One append-only table, ``log``, is both the audit trail and the reservations: a reservation is
  its own ``hold`` record (``seq`` is the audit sequence), with its current state in extra columns;
  settling it updates that row and appends the ``commit``/``release``/``expire`` record (by an SQL
  trigger, in the same statement). A reserve and its commit usually touch the same last page.
  ``seq`` is a plain ``INTEGER PRIMARY KEY``; only the oldest rows are ever deleted, so it only grows.
* A reservation id starts with its hold record's ``seq`` (12 hex digits, then 8 random ones, then
  ``.<root>``), so finding it is a primary-key lookup with no index of its own to write: the store
  reads ``max(seq)`` in the reserve's first query (under the write lock, so nobody else can take
  the next one) and inserts the record at ``max + 1``. The whole id is compared too, so a guessed or
  foreign id is simply not found. Forgetting a reservation past retention clears ``known`` (and the
  idempotency index) and leaves its hold record in the audit trail. Forgetting walks the settle
  records in ``seq`` order from a watermark kept in ``meta``, so it needs no index either; each
  settle record carries its reservation's forget time (set by the settling process's retention),
  and the walk stops at the first one not yet due. The walk runs in the maintenance pass (see
  below); until it comes, lookups by id or idempotency key treat a reservation past its forget time
  as forgotten already (a reused key frees its row on the spot), so forgetting is never late.
* A reserve is one query (the chain's budgets and counters, plus whether any hold is due for
  reclaiming and the budgets version), one upsert of the holds and one insert. A commit reads the
  reservation, then, when no budget was set or removed since the hold (``meta.budgets`` counts
  changes), charges the hold's own budgets with one conditional upsert (rows that stay within
  their limit; the rest, flagged ``overage``, by a second one) instead of reading the budgets.
* Amounts and holds are short delimited strings, not JSON; windows are not stored when they are
  the calendar windows of the reservation's creation time (they are recomputed from it).
* Bounded: the maintenance pass (``sweep()``, and a reserve every ``MAINTAIN_EVERY`` log records,
  counted in the ledger) deletes audit records beyond the newest ``audit_capacity`` once the
  forget pass has read them (a watermark ``pruned`` in ``meta``; a reservation's hold record is
  kept while the reservation is remembered, and deleted when it is forgotten: so the records of
  the last ``retention`` are always kept) and the counters of period windows older than the
  ``WINDOWS_KEPT`` latest periods with nothing held in them
  (through the index ``accounts_window``, written only when a window's row is created), and
  template budgets (a policy's per-run ones) unused past their ``until`` with their counters
  (through ``budgets_until``). Without it the file grew by every lifecycle's records, every minute
  budget's windows and every run's budget, for good.
* ``wal_autocheckpoint`` is raised to 4096 pages (4 MiB of WAL): fewer checkpoints (each with an
  fsync). It changes when the WAL is copied back into the database file, not what is durable.

The schema version is kept in ``PRAGMA user_version``; versions 4 (the same but for the settle
trigger, the window index and template budgets), 5 (but for the window index and template budgets)
and 6 (but for ``budgets.until``, the time a template budget — ``ensure_budget``, a policy's
per-run budget — may be forgotten, and its index) are upgraded in place, a file with
another version (or an unversioned ledger from before) is refused rather than misread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from clearance.errors import InvalidRequest, ReservationClosed, ReservationNotFound, StoreUnavailable
from clearance.ledger import (
    CLOSED_WINDOW_SPENT,
    COMMITTED,
    EXPIRED,
    HELD,
    LATE_HOLD,
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
    merge_actual,
    new_account_state,
    plan_detail,
    reported_units,
)
from clearance.periods import WINDOWS_KEPT, Windows, window_back, windows_at
from clearance.stores.base import (
    DEFAULT_RETENTION,
    TEMPLATE_RECHECK,
    Store,
    audit_capacity_of,
    in_subtree,
    retention_of,
    root_of,
    template_refresh,
)

SCHEMA_VERSION = 7
UPGRADABLE = (4, 5, 6)  # schema versions upgraded in place (see SQLiteStore.__init__)

DEFAULT_AUDIT_CAPACITY = 1_000_000
"""Audit records a SQLite ledger keeps by default (the newest; see ``SQLiteStore``)."""


_PERIODS = ("minute", "hour", "day", "week", "month")
_PRUNE_BATCH = 20_000  # the most log rows one maintenance pass looks at (and window rows it deletes)

# SQLite keeps each database file's lock state in process memory, shared by every connection of the
# process. A child forked while a thread of this process is inside a write transaction inherits a
# copy that says the write lock is held, and can never write to that file (every write waited out
# busy_timeout: a new connection in the child does not help). So a write transaction holds its
# file's lock below, and fork() waits for all of them: a child starts with no transaction under way.
# (It also queues this process's threads for the file's write lock, which SQLite's busy handler
# would do by polling.) Reads take no lock: in WAL mode they never wait for a writer.
_file_locks: dict[str, threading.RLock] = {}
_file_locks_guard = threading.Lock()


def _is_ledger(db: sqlite3.Connection) -> bool:
    """Whether the file has a ledger's tables (a version number alone could be anyone's)."""
    found = db.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('budgets', 'accounts', 'log', 'meta')"
    ).fetchone()[0]
    return bool(found == 4)


_HEADER = b"SQLite format 3\x00"
_BUDGET_ROWS = "SELECT scope, unit, period, lim FROM budgets"
_HELD_ON_BUDGET = "SELECT 1 FROM accounts WHERE scope = ? AND unit = ? AND period = ? AND held <> 0 LIMIT 1"
_DROP_COUNTERS = "DELETE FROM accounts WHERE scope = ? AND unit = ? AND period = ?"
# A removed budget's counters are kept a retention, in two rows of meta (no schema change; a tab is
# in no scope, unit or period): "removal\t<when it is next looked at, fixed width>\t<scope>\t<unit>
# \t<period>" -> its deadline (removal + retention), which sort by that time: the maintenance pass
# reads the due ones alone; and "removed\t<scope>\t<unit>\t<period>" -> when it is next looked at
# (to find the first row). Held at its deadline, it is looked at again later; its deadline stays.
_REMOVAL = "removal\t"


def _removed_key(scope: str, unit: str, period: str) -> str:
    return f"removed\t{scope}\t{unit}\t{period}"


def _removal_key(due: float, scope: str, unit: str, period: str) -> str:
    return f"{_REMOVAL}{due:020.6f}\t{scope}\t{unit}\t{period}"


def _parked(db: sqlite3.Connection, scope: str, unit: str, period: str) -> tuple[float, float] | None:
    """A removed budget's (next look, deadline), or None."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_removed_key(scope, unit, period),)).fetchone()
    if row is None:
        return None
    deadline = db.execute("SELECT value FROM meta WHERE key = ?", (_removal_key(row[0], scope, unit, period),))
    found = deadline.fetchone()
    return float(row[0]), float(found[0] if found else row[0])


def _park(
    db: sqlite3.Connection, scope: str, unit: str, period: str, look: float | None, deadline: float | None = None
) -> None:
    """Note when a removed budget is next looked at and its deadline (default: that time), or, with
    ``look`` None, drop it."""
    before = _parked(db, scope, unit, period)
    if before is not None:
        db.execute(
            "DELETE FROM meta WHERE key IN (?, ?)",
            (_removed_key(scope, unit, period), _removal_key(before[0], scope, unit, period)),
        )
    if look is not None:
        db.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [(_removed_key(scope, unit, period), look), (_removal_key(look, scope, unit, period), deadline or look)],
        )


_SMALLEST_DATABASE = 100  # bytes: a database file holds at least its 100-byte header


# The database files (device, inode) this process has opened through SQLite. Closing any descriptor
# of a file drops every POSIX lock the process holds on it — SQLite's too, which it cannot tell: a
# header read (open, close) of a ledger this process had open dropped its connections' shared lock,
# and another process closing its last connection then took itself for the last user, checkpointed
# and deleted the WAL while this one went on writing into it (its holds seen by nobody else: twice
# the budget handed out). Such a file is never opened outside SQLite again. Stores are made one at
# a time (_opening), from the header check to their first connection: another thread's check must
# not read the file between them.
_opened_files: set[tuple[int, int]] = set()
_opening = threading.Lock()


def _check_header(path: str) -> None:
    """Refuse a file that is not a SQLite database before SQLite sees it: one shorter than a page
    (a byte of text, say) SQLite takes for an empty database, and would turn into a ledger. Not a
    file this process has open through SQLite (see _opened_files): it was checked then."""
    try:
        found = os.stat(path)
        if not stat.S_ISREG(found.st_mode):  # (a FIFO would block the open below for good)
            raise StoreUnavailable(f"cannot open SQLite ledger {path}: not a regular file")
        if found.st_size == 0:
            return  # a new ledger (or one being made): nothing to read
        if found.st_size < _SMALLEST_DATABASE:
            head = b""  # no database is that short: refused unread
        elif (found.st_dev, found.st_ino) not in _opened_files:
            with open(path, "rb") as file:
                head = file.read(len(_HEADER))
        else:  # open in this process (or a deleted ledger's inode number, reused: SQLite reads its header)
            head = _HEADER
    except FileNotFoundError:
        return  # a new ledger
    except OSError as error:
        raise StoreUnavailable(f"cannot open SQLite ledger {path}: {error}") from None
    if head != _HEADER or found.st_size < _SMALLEST_DATABASE:
        raise StoreUnavailable(f"{path} is not a SQLite database (not a clearance ledger): refused, left as it is")


_T = TypeVar("_T")


def _shm_replaced(path: str) -> bool:
    """Whether the ``-shm`` file this process's SQLite has mapped for the ledger at ``path`` (its
    WAL index, shared by every process through that file) is no longer the file at its path: deleted
    (a clean-up, ``rm ledger.db-*``), then made anew by the next process to open the ledger. Each
    then takes the WAL's locks and reads its end from its own index: both append frames at the
    same place, over each other's commits (a helper saw half the holds of two processes lost and 19
    USD granted of 10). Read from ``/proc/self/maps`` (Linux; elsewhere: ``False``) — the mapping's
    inode, or its ``(deleted)`` mark — never by opening the file: closing a descriptor of it would
    drop SQLite's locks on it."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return False
    shm = os.path.realpath(path) + "-shm"
    deleted = shm + " (deleted)"
    mapped = [fields for line in lines if len(fields := line.split(maxsplit=5)) == 6 and fields[5] in (shm, deleted)]
    if not mapped:
        return False  # not mapped (no connection open, or not in WAL mode)
    try:
        on_disk = str(os.stat(shm).st_ino)
    except OSError:
        return True  # mapped, and gone from its path
    return any(fields[5] == deleted or fields[4] != on_disk for fields in mapped)


_ANCHORS: dict[str, sqlite3.Connection] = {}  # see _keep_from_checkpointing


def _keep_from_checkpointing(path: str) -> None:
    """Keep this process's connections to a ledger whose ``-shm`` was replaced from checkpointing
    on close. The last connection of the file to close copies the WAL into it *as its own index
    says* and deletes the WAL: this process's index no longer knows what the others wrote since,
    so its last close lost their commits (the holds of a process started after the deletion, all
    gone). A connection that has read holds a shared lock on the file, and no close checkpoints
    while another holds one: one such connection is kept open for the rest of the process, its
    reference leaked so that not even the interpreter's shutdown closes it (the kernel drops its
    lock at exit, and the next process to close last checkpoints with a whole index)."""
    if path in _ANCHORS:
        return
    try:
        with _readers.sharing():  # (as every connect: a fork meanwhile waits, see _Readers)
            anchor = sqlite3.connect(
                f"file:{urllib.parse.quote(os.fsencode(path))}?mode=rw", uri=True, check_same_thread=False
            )
            anchor.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error:
        return  # (the file gone too: nothing this process could checkpoint into)
    import ctypes  # (only here: a leaked reference is what this is for)

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(anchor))
    _ANCHORS[path] = anchor


def _lock_of(path: str) -> threading.RLock:
    """The file's turn lock (see ``SQLiteStore._begin``). Reentrant only so that a thread can tell
    whether it holds it (an exception arriving right after it was taken must give it back; a call
    from a signal handler inside a write on the file is refused); never taken twice."""
    key = os.path.realpath(path)
    with _file_locks_guard:
        lock = _file_locks.get(key)
        if lock is None:
            lock = _file_locks[key] = threading.RLock()
        return lock


class _Readers:
    """Threads inside SQLite outside a write transaction — reading, opening or closing a connection
    — do it holding a lock of their own; ``fork()`` takes the gate (no thread starts another read)
    and then every thread's lock, so it waits for the reads under way. SQLite's own mutexes (a
    file's shared-memory and inode locks) are process memory too: a child forked while a thread held
    one inherits it held, and its first call on that file blocks forever (seen with a thread reading
    balances while a pre-forking server forked its workers).

    Locks, not a count: an exception delivered between two statements (Ctrl-C in a read) could leave
    a count raised, and every later fork waiting for good; a ``with`` on a lock always releases it."""

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._local = threading.local()
        # (a thread's goes with it; reentrant: a signal handler may read while its thread reads)
        self._locks: weakref.WeakSet[threading.RLock] = weakref.WeakSet()
        self._held: list[threading.RLock] = []

    def _mine(self) -> threading.RLock:
        lock: threading.RLock | None = getattr(self._local, "lock", None)
        if lock is None:
            lock = self._local.lock = threading.RLock()
            with self._gate:
                self._locks.add(lock)
        return lock

    @contextmanager
    def sharing(self) -> Iterator[None]:
        mine = self._mine()
        if not mine._is_owned():  # type: ignore[attr-defined]  # (a nested read — a signal handler's —
            with self._gate:  # must not wait for a fork that waits for this thread's outer read)
                pass  # (held by a fork under way: wait for it)
        with mine:
            yield

    def before_fork(self) -> None:
        self._gate.acquire()
        self._held = list(self._locks)
        for lock in self._held:
            lock.acquire()

    def after_fork(self) -> None:
        for lock in self._held:
            lock.release()
        self._held = []
        self._gate.release()


_readers = _Readers()


def _before_fork() -> None:
    _opening.acquire()  # (a store being made takes a reader's lock after it: the same order here)
    _file_locks_guard.acquire()
    for lock in _file_locks.values():  # (a thread holds at most one, and takes none while it does)
        lock.acquire()
    _readers.before_fork()  # (a reader takes no turn lock, nor a turn holder this: no order to keep)


def _after_fork() -> None:
    _readers.after_fork()
    for lock in _file_locks.values():
        lock.release()
    _file_locks_guard.release()
    _opening.release()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
PAGE_SIZE = 1024
FILE_CHECK_EVERY = 1.0  # seconds between checks that the ledger file is still the one opened (a stat)
WAL_AUTOCHECKPOINT = 4096  # pages
# A WAL grown past its checkpoints (a long reader held them back: hundreds of MB) is truncated to
# this at the next one, rather than keeping its high-water mark on disk while the ledger is in use.
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024

# Settling a reservation (its row's status changes) appends the settle record, which carries the
# reservation's forget time: the forget pass walks settle records and must not pass one whose
# reservation is not yet due (another process may keep reservations longer; schema version 5).
_SETTLE_TRIGGER = """CREATE TRIGGER log_settle AFTER UPDATE OF status ON log WHEN new.status <> old.status BEGIN
    INSERT INTO log(at, kind, scope, rid, amounts, detail, forget_at)
    VALUES (new.settled_at,
            CASE new.status WHEN 'committed' THEN 'commit' WHEN 'released' THEN 'release' ELSE 'expire' END,
            new.scope, new.rid,
            CASE new.status WHEN 'committed' THEN new.committed ELSE new.amounts END,
            CASE new.status WHEN 'committed' THEN new.flags ELSE '' END,
            new.forget_at);
END"""

# Counters of period windows by window, for the pruning pass (an entry is written only when a
# window's row is created or deleted: counters change, their window never does).
_WINDOW_INDEX = "CREATE INDEX IF NOT EXISTS accounts_window ON accounts(period, win) WHERE period <> ''"

# Template budgets (ensure_budget) by the time they may be forgotten, for the maintenance pass; a
# budget an operator set has none (schema version 7).
_TEMPLATE_INDEX = "CREATE INDEX IF NOT EXISTS budgets_until ON budgets(until) WHERE until IS NOT NULL"
_TEMPLATE_BATCH = 1000  # the most template budgets one maintenance pass forgets

# Statements are separated by ";;" (the trigger, above, is created after them).
_SCHEMA = f"""
CREATE TABLE budgets(
    scope TEXT NOT NULL, unit TEXT NOT NULL, period TEXT NOT NULL, lim INTEGER NOT NULL, until REAL, held_seen INTEGER,
    PRIMARY KEY (scope, unit, period)) WITHOUT ROWID;;
{_TEMPLATE_INDEX};;
CREATE TABLE accounts(
    scope TEXT NOT NULL, unit TEXT NOT NULL, period TEXT NOT NULL, win TEXT NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0, stamp INTEGER,
    PRIMARY KEY (scope, unit, period, win)) WITHOUT ROWID;;
CREATE TABLE log(
    seq INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL, rid TEXT,
    amounts TEXT NOT NULL, detail TEXT NOT NULL,
    known INTEGER, root TEXT, status TEXT, plan INTEGER, holds TEXT, windows TEXT, expires_at REAL,
    settled_at REAL, forget_at REAL, committed TEXT, flags TEXT, idem TEXT, label TEXT, budgets INTEGER);;
CREATE INDEX log_expiry ON log(expires_at) WHERE status = 'held';;
CREATE UNIQUE INDEX log_idem ON log(root, idem) WHERE idem IS NOT NULL;;
{_WINDOW_INDEX};;
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;;
INSERT INTO meta(key, value) VALUES ('budgets', 0)
"""

# A budget's counters in the window of its period (?1..?5) on the chain (?8...). A period window
# without counters that is older than the oldest one the maintenance pass keeps ("closed\t<period>"
# in meta: its counts may have been dropped — a clock stepped back past the kept windows) reads as
# spent ?7 (CLOSED_WINDOW_SPENT for a hold: nothing fits there, as on the memory store; 0 for a
# commit, which is recorded in it all the same, and for a replay's report).
_WINDOW_OF = (
    "CASE b.period WHEN '' THEN '' WHEN 'minute' THEN ?1 WHEN 'hour' THEN ?2 WHEN 'day' THEN ?3 "
    "WHEN 'week' THEN ?4 ELSE ?5 END"
)
_STATES_SQL = f"""
SELECT b.scope, b.unit, b.period, b.lim,
       CASE WHEN a.spent IS NOT NULL THEN a.spent WHEN ?7 = 0 OR b.period = '' THEN 0
            WHEN {_WINDOW_OF} < (SELECT value FROM meta WHERE key = 'closed' || char(9) || b.period) THEN ?7
            ELSE 0 END,
       COALESCE(a.held, 0)
FROM budgets AS b LEFT JOIN accounts AS a
  ON a.scope = b.scope AND a.unit = b.unit AND a.period = b.period AND a.win = {_WINDOW_OF}
WHERE b.scope IN ({{places}})
"""
_STATES_BY_DEPTH = [_STATES_SQL.format(places=", ".join(f"?{8 + i}" for i in range(n))) for n in range(17)]
# The same, plus a last row (scope NULL) with the budgets version, whether some held reservation
# is due (?6 = now; unused above) and the last seq (the new hold record takes the next): one round trip.
_STATES_DUE_BY_DEPTH = [
    sql + "UNION ALL SELECT NULL, (SELECT value FROM meta WHERE key = 'budgets'), "
    "EXISTS (SELECT 1 FROM log WHERE status = 'held' AND expires_at <= ?6), (SELECT max(seq) FROM log), "
    "(SELECT value FROM meta WHERE key = 'maintained'), NULL"
    for sql in _STATES_BY_DEPTH
]
_LAST_SEQ = "SELECT max(seq) FROM log"
_LAST_AND_MAINTAINED = "SELECT (SELECT max(seq) FROM log), (SELECT value FROM meta WHERE key = 'maintained')"
MAINTAIN_EVERY = 2000
"""Log records (holds, settles, extends, budget changes) written, by any process, between two
maintenance passes: the pass runs in the reserve that finds this many since the last one. Counted
in the ledger, not per process or store object: workers that never live long (an Authority per
request, recycled workers, CLI jobs) keep the file bounded as well as one long-lived process."""
_DUE_SQL = "SELECT 1 FROM log WHERE status = 'held' AND expires_at <= ? LIMIT 1"
_CHUNK = 64  # the most rows of one multi-row statement (see _upsert)
_OVER_SQL = (
    "SELECT 1 FROM accounts AS a JOIN budgets AS b USING (scope, unit, period) "
    "WHERE a.scope = ? AND a.unit = ? AND a.period = ? AND a.win = ? AND a.spent + a.held > b.lim"
)


def _upserts(columns: str, update: str) -> list[str]:
    """The multi-row upsert of ``accounts`` rows for 0..64 rows (index = row count)."""
    row = "(" + ", ".join("?" * len(columns.split(", "))) + ")"
    return [
        f"INSERT INTO accounts({columns}) VALUES {', '.join([row] * n)} ON CONFLICT DO UPDATE SET {update} "
        for n in range(_CHUNK + 1)
    ]


_HOLD_BY_COUNT = _upserts("scope, unit, period, win, held", "held = held + excluded.held")
_MOVE_BY_COUNT = _upserts(
    "scope, unit, period, win, spent, held", "spent = spent + excluded.spent, held = held + excluded.held"
)
# A commit's moves in two steps without reading the counters first (RETURNING costs more): the
# first applies every row that stays within its limit (or charges nothing) and stamps it with the
# reservation's seq; if it changed fewer rows than given, the second applies the rest (the
# budgets that went past their limit: the commit is flagged ``overage``).
_MOVE_STAMPED_VALUES = _upserts(
    "scope, unit, period, win, spent, held, stamp",
    "spent = spent + excluded.spent, held = held + excluded.held, stamp = excluded.stamp",
)
_MOVE_WITHIN_BY_COUNT = [
    sql + "WHERE excluded.spent = 0 OR spent + held + excluded.spent + excluded.held <= (SELECT lim FROM budgets "
    "AS b WHERE b.scope = excluded.scope AND b.unit = excluded.unit AND b.period = excluded.period)"
    for sql in _MOVE_STAMPED_VALUES
]
_MOVE_REST_BY_COUNT = [sql + "WHERE stamp IS NOT excluded.stamp" for sql in _MOVE_STAMPED_VALUES]


def _upsert(db: sqlite3.Connection, statements: list[str], flat: list[Any], width: int) -> int:
    """Run a multi-row statement over ``flat`` (``width`` values a row), at most 64 rows at a time
    (a hold can touch thousands of counters: 16 levels x 64 units x 6 periods); rows changed."""
    rows = len(flat) // width
    if rows <= _CHUNK:
        return db.execute(statements[rows], flat).rowcount
    changed = 0
    step = _CHUNK * width
    for start in range(0, len(flat), step):
        part = flat[start : start + step]
        changed += db.execute(statements[len(part) // width], part).rowcount
    return changed


# ("period <> ''" repeated: without it SQLite cannot use the partial index, and scans every counter.)
_PRUNE_WINDOWS_SQL = (
    "DELETE FROM accounts WHERE (scope, unit, period, win) IN (SELECT scope, unit, period, win "
    "FROM accounts WHERE period <> '' AND period = ? AND win < ? AND held = 0 LIMIT ?)"
)
_BUDGETS_CHANGED = "UPDATE meta SET value = value + 1 WHERE key = 'budgets'"
# The oldest window of a period the pruning pass keeps: those before it are closed (see _STATES_SQL).
_CLOSE_WINDOWS = (
    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT DO UPDATE SET value = max(value, excluded.value)"
)
_UNHOLD_SQL = "UPDATE accounts SET held = held - ? WHERE scope = ? AND unit = ? AND period = ? AND win = ?"
_INSERT_SQL = (
    "INSERT INTO log(seq, at, kind, scope, rid, amounts, detail, known, root, status, plan, holds, windows, "
    "expires_at, idem, label, budgets) VALUES (?, ?, 'hold', ?, ?, ?, ?, 1, ?, 'held', ?, ?, ?, ?, ?, ?, ?)"
)
# Settling updates the reservation's row; the trigger appends the audit record.
_SETTLE_SQL = "UPDATE log SET status = ?, settled_at = ?, forget_at = ? WHERE seq = ?"
_COMMIT_SQL = (
    "UPDATE log SET status = 'committed', committed = ?, flags = ?, settled_at = ?, forget_at = ? WHERE seq = ?"
)
_EVENT_SQL = "INSERT INTO log(at, kind, scope, rid, amounts, detail) VALUES (?, ?, ?, ?, ?, ?)"
_RES_COLUMNS = (
    "rid, scope, root, status, plan, amounts, holds, windows, at, expires_at, settled_at, "
    "committed, flags, idem, label, seq"
)
_FIND = "WHERE seq = ? AND rid = ? AND known IS NOT NULL"
# Lookups by id (third parameter: now) also skip what is past retention but not yet forgotten (the
# forget pass runs in the maintenance pass): forgetting is lazy, like expiry.
_FIND_KEPT = _FIND + " AND (forget_at IS NULL OR forget_at > ?)"
_LIVE = "kind = 'hold' AND known IS NOT NULL AND (forget_at IS NULL OR forget_at > ?)"
_FORGET_ONE = "UPDATE log SET known = NULL, idem = NULL, holds = NULL, windows = NULL WHERE seq = ?"
_PERIOD_ORDER = ("minute", "hour", "day", "week", "month")


def _key(reservation_id: object) -> int:
    """The ``seq`` of a reservation's hold record: the first 12 hex digits of its id (-1: not ours)."""
    if isinstance(reservation_id, str) and len(reservation_id) > 21 and reservation_id[20] == ".":
        try:
            return int(reservation_id[:12], 16)
        except ValueError:
            pass
    return -1


def _reservation_id(seq: int, request_id: str, root: str) -> str:
    """``<seq, 12 hex><8 random hex>.<root>``: the shape of every store's ids (the random digits are
    the Authority's, so an id is as unguessable as elsewhere and never repeats a forgotten one)."""
    token = request_id[12:20]
    if len(token) != 8:
        token = os.urandom(4).hex()
    return f"{seq:012x}{token}.{root}"


# --- encodings: units and scopes never contain ",", ";" or "=" --------------------------------------
_amounts_cache: dict[str, Amounts] = {}


def _dump(amounts: Amounts) -> str:
    return ",".join([f"{unit}={steps}" for unit, steps in amounts])


def _amounts(text: str | None) -> Amounts:
    if not text:
        return ()
    cached = _amounts_cache.get(text)
    if cached is None:
        cached = tuple((unit, int(steps)) for unit, _, steps in (item.partition("=") for item in text.split(",")))
        if len(_amounts_cache) > 1024:
            _amounts_cache.clear()
        _amounts_cache[text] = cached
    return cached


_windows_cache: dict[str, Windows] = {}


def _windows(text: str, created_at: float) -> Windows:
    """Stored windows: ``""`` means the calendar windows of the creation time."""
    if not text:
        return windows_at(created_at)
    cached = _windows_cache.get(text)
    if cached is None:
        cached = tuple((period, window) for period, window in json.loads(text))
        if len(_windows_cache) > 256:
            _windows_cache.clear()
        _windows_cache[text] = cached
    return cached


_chains: dict[str, tuple[str, ...]] = {}


def _chain(scope: str) -> tuple[str, ...]:
    """The scope paths from the root down to ``scope`` (stored scopes are already canonical)."""
    chain = _chains.get(scope)
    if chain is None:
        parts = scope.split("/")
        chain = tuple("/".join(parts[: i + 1]) for i in range(len(parts)))
        if len(_chains) > 4096:
            _chains.clear()
        _chains[scope] = chain
    return chain


_levels_cache: dict[tuple[str, ...], dict[str, int]] = {}


def _levels(chain: tuple[str, ...]) -> dict[str, int]:
    """Each scope of ``chain`` -> its level (stored holds name a level, not a scope path)."""
    levels = _levels_cache.get(chain)
    if levels is None:
        levels = {scope: index for index, scope in enumerate(chain)}
        if len(_levels_cache) > 4096:
            _levels_cache.clear()
        _levels_cache[chain] = levels
    return levels


_holds_cache: dict[tuple[str, str, Windows], tuple[tuple[str, str, str, str, int], ...]] = {}


def _holds(text: str, scope: str, windows: Windows) -> tuple[tuple[str, str, str, str, int], ...]:
    """Stored holds are ``level,unit,period,steps`` (level: index in the scope's chain). Cached:
    the reservations of one agent at one price hold the same text all minute long."""
    if not text:
        return ()
    key = (text, scope, windows)
    cached = _holds_cache.get(key)
    if cached is None:
        cached = _parse_holds(text, scope, windows)
        if len(_holds_cache) > 1024:
            _holds_cache.clear()
        _holds_cache[key] = cached
    return cached


def _parse_holds(text: str, scope: str, windows: Windows) -> tuple[tuple[str, str, str, str, int], ...]:
    chain = _chain(scope)
    by_period = dict(windows)
    result = []
    for item in text.split(";"):
        level, unit, period, steps = item.split(",")
        result.append((chain[int(level)], unit, period, by_period[period], int(steps)))
    return tuple(result)


def _record(row: Any) -> ReservationRecord:
    windows = _windows(row[7], row[8])
    return ReservationRecord(
        id=row[0],
        scope=row[1],
        root=row[2],
        status=row[3],
        plan_index=row[4],
        amounts=_amounts(row[5]),
        holds=_holds(row[6], row[1], windows),
        windows=windows,
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
        audit_capacity: int = DEFAULT_AUDIT_CAPACITY,
    ) -> None:
        self._audit_capacity = audit_capacity_of(audit_capacity)
        if not isinstance(path, str) or path in ("", ":memory:") or path.startswith("file:"):
            # Each thread's connection would open a database of its own: budgets set in one thread,
            # gone in the next (use memory:// for a ledger in this process).
            raise InvalidRequest(f"a SQLite ledger is a file: got {path!r} (for one in memory, use memory://)")
        # Resolved once: each thread opens its own connection, and a relative path opened after an
        # os.chdir() would be another file (an empty one, or another ledger with other budgets).
        path = os.path.abspath(path)
        self.path = path
        self.url = f"sqlite:///{path}"
        self._retention = retention_of(retention)
        timeout_ok = isinstance(busy_timeout, (int, float)) and not isinstance(busy_timeout, bool)
        if not timeout_ok or not 0 <= busy_timeout <= 3600:
            raise InvalidRequest(f"busy_timeout must be in [0, 3600] seconds (0: one try), got {busy_timeout!r}")
        self._busy_timeout = float(busy_timeout)
        if not isinstance(synchronous, str) or synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise InvalidRequest(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._file: tuple[int, int] | None = None  # (device, inode) of the file, once opened
        self._file_checked = 0.0  # monotonic time it was last seen at its path (see _same_file)
        self._window_cache: tuple[Windows, list[str]] = ((), [])  # one tuple: threads share it
        self._turns = _lock_of(path)  # this file's write transactions in this process, in turn
        with _opening:  # the header check, then the first connection, one store at a time (see _opened_files)
            _check_header(path)
            self._connection()
        with self._read() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION and _is_ledger(db):
                return  # the usual case: a read, so a writer holding the lock cannot fail the construction
        def _create(db: sqlite3.Connection) -> None:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version in (*UPGRADABLE, SCHEMA_VERSION) and not _is_ledger(db):
                version = -1  # another application's database that happens to carry such a number
            if version == 0:
                if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    version = 1  # tables from before the schema was versioned
                else:
                    for statement in _SCHEMA.split(";;\n"):
                        db.execute(statement)
                    db.execute(_SETTLE_TRIGGER)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
            elif version in UPGRADABLE:
                # Version 6 lacks only the template budgets' column and index; version 5 also the
                # index the window pruning walks; version 4 also has the old settle trigger (its
                # settle records carry no forget time; the forget pass reads those the old way): all
                # upgraded in place.
                if version == 4:
                    db.execute("DROP TRIGGER log_settle")
                    db.execute(_SETTLE_TRIGGER)
                db.execute(_WINDOW_INDEX)
                columns = {row[1] for row in db.execute("PRAGMA table_info(budgets)")}
                if "until" not in columns:
                    db.execute("ALTER TABLE budgets ADD COLUMN until REAL")
                if "held_seen" not in columns:
                    db.execute("ALTER TABLE budgets ADD COLUMN held_seen INTEGER")
                db.execute(_TEMPLATE_INDEX)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                found = (
                    "tables but no clearance schema version (a ledger from before versioning, or not a "
                    "clearance ledger)"
                    if version == 1
                    else "a schema version but not a ledger's tables (not a clearance ledger)"
                    if version == -1
                    else f"schema version {version}"
                )
                raise StoreUnavailable(
                    f"SQLite ledger {path} has {found}; this clearance reads schema version {SCHEMA_VERSION} "
                    "only. Start a new ledger file (there is no migration)."
                )
        self._in_write(_create)

    # --- connections and transactions -----------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        local = self._local
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is not None and local.pid == os.getpid():
            return db
        with _readers.sharing():
            db = self._connect()
        local.db = db
        local.pid = os.getpid()
        return db

    def _same_file(self) -> None:
        """Refuse a ledger file deleted or replaced since this store opened it (by a clean-up of
        /tmp, a mistaken rm, a restore): writing on into the old one, or making a new empty ledger
        for a new connection (a ledger without budgets, allowing everything), would split the
        ledger between processes. Fail closed instead."""
        try:
            found = os.stat(self.path)
            current: tuple[int, int] | None = (found.st_dev, found.st_ino)
        except OSError:
            current = None
        if current != self._file:
            raise StoreUnavailable(
                f"SQLite ledger {self.path} was deleted or replaced since this process opened it: refused "
                "(restart the process to use the file there now)"
            )
        self._same_index()
        self._file_checked = time.monotonic()

    def _same_index(self) -> None:
        """Refuse a ledger whose ``-shm`` (the WAL index every process shares through it) this
        process holds is no longer the file at its path (see ``_shm_replaced``): each process would
        write the WAL as its own index says, over the others' commits. So is every store made
        afterwards in this process on the file (an Authority per request): it shares that index."""
        if self.path in _ANCHORS or _shm_replaced(self.path):
            _keep_from_checkpointing(self.path)
            raise StoreUnavailable(
                f"SQLite ledger {self.path}: its -shm file was deleted or replaced while this process used it: "
                "refused (restart the process)"
            )

    def _connect(self) -> sqlite3.Connection:
        first = self._file is None
        if not first:
            self._same_file()  # (and never create a new file where it was: mode=rw below)
        try:
            db = sqlite3.connect(
                self.path if first else f"file:{urllib.parse.quote(os.fsencode(self.path))}?mode=rw",
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
                uri=not first,
            )
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            # A ledger is in WAL mode from its creation. A new (empty) file becomes one; a database
            # with tables but no ledger version (another application's) is left as it is — WAL would
            # stay in it for good — and __init__ refuses it.
            if mode != "wal" and (
                (db.execute("PRAGMA user_version").fetchone()[0] in (*UPGRADABLE, SCHEMA_VERSION) and _is_ledger(db))
                or db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None
            ):
                db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only takes effect on a new file
                db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
            db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")  # (see WAL_AUTOCHECKPOINT)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open SQLite ledger {self.path}: {error}") from error
        if first:
            try:
                self._same_index()
            except StoreUnavailable:
                db.close()
                raise
            try:
                found = os.stat(self.path)
            except OSError as error:
                db.close()
                raise StoreUnavailable(f"cannot open SQLite ledger {self.path}: {error}") from error
            self._file = (found.st_dev, found.st_ino)
            _opened_files.add(self._file)
            self._file_checked = time.monotonic()
        return db

    def _begin(self, issued: float = 0.0) -> sqlite3.Connection:
        """A connection in a write transaction, holding this file's turn (``self._turns``: the caller
        releases it when the transaction ends, in a ``finally``). Waiting for the turn and for the
        file's write lock share one ``busy_timeout``, counted from ``issued`` when given (a hold's
        request: on the async face its wait for a worker thread counts too)."""
        db = self._connection()
        turns = self._turns
        if turns._is_owned():  # type: ignore[attr-defined]
            raise StoreUnavailable(
                f"SQLite ledger {self.path}: called while this thread is inside a write on it (from a signal "
                "handler?): refused"
            )
        if db.in_transaction:  # left open by a call interrupted in its error handling: roll it back
            self._rollback(db)
        if time.monotonic() - self._file_checked >= FILE_CHECK_EVERY:
            self._same_file()
        started = issued
        waited = False  # (then BEGIN waits for other processes only as long as is left)
        if issued:
            elapsed = time.monotonic() - issued
            if elapsed > max(self._busy_timeout, LATE_HOLD):  # (busy_timeout 0: one try, never a wait)
                raise StoreUnavailable(f"SQLite ledger {self.path} is busy: no transaction within the busy timeout")
            waited = elapsed > LATE_HOLD
        try:
            if not turns.acquire(blocking=False):
                started = started or time.monotonic()
                if not turns.acquire(timeout=max(0.0, self._busy_timeout - (time.monotonic() - started))):
                    raise StoreUnavailable(f"SQLite ledger {self.path} is busy: no transaction within the busy timeout")
                waited = True
            if waited:  # SQLite waits for other processes only as long as is left (only the waiter pays)
                left = self._busy_timeout - (time.monotonic() - started)
                db.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
                try:
                    db.execute("BEGIN IMMEDIATE")
                finally:
                    db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            else:
                db.execute("BEGIN IMMEDIATE")
        except BaseException as error:
            # An exception can arrive between any two steps (a signal handler's: a step timeout,
            # Ctrl-C). Right after BEGIN returned it left the write transaction open, shutting every
            # process out of the ledger; right after the turn was taken, every thread of this one.
            # The turn goes back first, with no call before it: Ctrl-C pressed while BEGIN waited
            # for another process arrives at the next call (the rollback's), after a busy error.
            try:  # noqa: SIM105 - not contextlib.suppress: its __enter__ would be a call before the release
                turns.release()
            except RuntimeError:  # (not taken by this call: none is held on entry, see above)
                pass
            self._rollback(db)
            if isinstance(error, sqlite3.Error):
                raise StoreUnavailable(f"SQLite ledger {self.path} is busy or unreadable: {error}") from error
            raise
        return db

    def _failed(self, db: sqlite3.Connection, error: sqlite3.Error) -> StoreUnavailable:
        self._rollback(db)
        return StoreUnavailable(f"SQLite ledger {self.path} failed: {error}")

    def _in_write(self, work: Callable[[sqlite3.Connection], _T], issued: float = 0.0) -> _T:
        """``work(db)`` in a write transaction, committed when it returns, rolled back if it raises
        (``ReservationNotFound`` commits: only lazy reclaims are in it). A function, not a ``with``
        block: an exception (a signal handler's) can arrive as a context's ``__exit__`` begins — a
        Python function — and then leaves the turn and the transaction held; here the turn goes
        back first thing in ``finally``, with no call before it. ``issued``: see :meth:`_begin`."""
        db = self._begin(issued)
        try:
            result = work(db)
            db.execute("COMMIT")
            return result
        except ReservationNotFound:
            self._keep_reclaim(db)
            raise
        except sqlite3.Error as error:
            raise self._failed(db, error) from error
        except BaseException:
            self._rollback(db)
            raise
        finally:
            self._turns.release()
            if db.in_transaction:  # (an exception in the error handling skipped the rollback)
                self._rollback(db)

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads outside a write transaction (``fork()`` waits for them: see
        ``_Readers``). Callers consume their rows inside the block."""
        db = self._connection()
        with _readers.sharing():
            try:
                yield db
            except sqlite3.Error as error:
                raise StoreUnavailable(f"SQLite ledger {self.path} failed: {error}") from error

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None  # (first: interrupted after the close, the next call opens another)
            with _readers.sharing():
                db.close()

    # --- ledger steps (inside a write transaction) ---------------------------------------------
    @staticmethod
    def _log(
        db: sqlite3.Connection, now: float, kind: str, scope: str, rid: str | None, amounts: Amounts, detail: str = ""
    ) -> None:
        db.execute(_EVENT_SQL, (now, kind, scope, rid, _dump(amounts), detail))

    def _reclaim_due(self, db: sqlite3.Connection, now: float) -> None:
        """:meth:`_reclaim`, when some hold is due (one indexed look otherwise)."""
        if db.execute(_DUE_SQL, (now,)).fetchone() is not None:
            self._reclaim(db, now)

    def _reclaim(self, db: sqlite3.Connection, now: float) -> int:
        rows = db.execute(
            "SELECT seq, scope, holds, windows, at, expires_at FROM log WHERE status = 'held' AND expires_at <= ?",
            (now,),
        ).fetchall()
        for seq, scope, holds, windows, created_at, expires_at in rows:
            db.executemany(
                _UNHOLD_SQL,
                [(h[4], h[0], h[1], h[2], h[3]) for h in _holds(holds, scope, _windows(windows, created_at))],
            )
            # (the trigger records it; its retention runs from its expiry, as on every store)
            db.execute(_SETTLE_SQL, (EXPIRED, now, expires_at + self._retention, seq))
        return len(rows)

    def _maintain(self, db: sqlite3.Connection, now: float) -> tuple[int, bool]:
        """The maintenance pass (``sweep()``, and a reserve once ``MAINTAIN_EVERY`` log records were
        written since the last pass, by any process): reclaim expired holds, forget what is past
        retention, and keep the file bounded. Returns the holds expired, and whether a step stopped
        at its batch size (more is left for another pass)."""
        expired = self._reclaim(db, now)
        marks = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('forgotten', 'pruned')").fetchall())
        forgotten, more = self._forget(db, now, marks.get("forgotten") or 0, marks.get("pruned") or 0)
        more = self._prune_log(db, forgotten, marks.get("pruned") or 0) or more
        more = self._prune_windows(db, now) or more
        more = self._forget_templates(db, now) or more
        more = self._forget_removed(db, now) or more
        db.execute(
            "INSERT INTO meta(key, value) VALUES ('maintained', (SELECT max(seq) FROM log)) "
            "ON CONFLICT DO UPDATE SET value = excluded.value"
        )
        return expired, more

    def _forget_templates(self, db: sqlite3.Connection, now: float) -> bool:
        """Forget template budgets past their ``until`` (see ``Store.ensure_budget``) with nothing
        held on them: the budget and its counters. One with something held is in use: looked at
        again after ``TEMPLATE_RECHECK``, and once nothing is held any more, kept a retention more."""
        due = db.execute(
            "SELECT scope, unit, period, held_seen FROM budgets WHERE until IS NOT NULL AND until <= ? LIMIT ?",
            (now, _TEMPLATE_BATCH),
        ).fetchall()
        removed = 0
        for scope, unit, period, held_seen in due:
            removed += self._forget_template(db, scope, unit, period, bool(held_seen), now)
        if removed:
            db.execute(_BUDGETS_CHANGED)
        return len(due) >= _TEMPLATE_BATCH

    def _forget_template(
        self, db: sqlite3.Connection, scope: str, unit: str, period: str, held_seen: bool, now: float
    ) -> bool:
        """One template budget past its ``until``: forgotten (True; the caller bumps the budgets
        version), or, in use, looked at again later."""
        key = (scope, unit, period)
        held = db.execute(_HELD_ON_BUDGET, key).fetchone()
        if held or held_seen:
            db.execute(
                "UPDATE budgets SET until = ?, held_seen = ? WHERE scope = ? AND unit = ? AND period = ?",
                (now + (TEMPLATE_RECHECK if held else self._retention), 1 if held else None, *key),
            )
            return False
        db.execute("DELETE FROM budgets WHERE scope = ? AND unit = ? AND period = ?", key)
        db.execute(_DROP_COUNTERS, key)
        self._log(db, now, "budget_remove", scope, None, ((unit, 0),), f"period={period or 'lifetime'} idle")
        return True

    def _prune_log(self, db: sqlite3.Connection, forgotten: int, pruned: int) -> bool:
        """Delete audit records older than the newest ``audit_capacity``, a batch at a time, up to
        where the forget pass has walked (the settle records after it are still to be read). Hold
        records of reservations still remembered stay: ``_forget`` deletes them when it forgets
        them (their ``seq`` is at or below the ``pruned`` watermark then)."""
        top = db.execute(_LAST_SEQ).fetchone()[0] or 0
        end = min(top - self._audit_capacity, forgotten, pruned + _PRUNE_BATCH)
        if end <= pruned:
            return False
        db.execute("DELETE FROM log WHERE seq > ? AND seq <= ? AND known IS NULL", (pruned, end))
        db.execute(
            "INSERT INTO meta(key, value) VALUES ('pruned', ?) ON CONFLICT DO UPDATE SET value = excluded.value",
            (end,),
        )
        return end < min(top - self._audit_capacity, forgotten)  # stopped at the batch size

    @staticmethod
    def _prune_windows(db: sqlite3.Connection, now: float) -> bool:
        """Delete the counters of period windows older than the ``WINDOWS_KEPT`` latest periods at
        ``now`` that hold nothing (window ids sort in time order). The windows before the oldest
        kept are *closed* from then on (see ``_STATES_SQL``): after a clock that ran ahead is set
        back, the window it is in again had its counts pruned, and reading it as empty handed its
        budget out twice. A late commit into one is recorded in its reservation and the audit
        trail, not in counters opened again."""
        more = False
        for period in _PERIODS:
            oldest_kept = window_back(now, period, WINDOWS_KEPT - 1)
            more = db.execute(_PRUNE_WINDOWS_SQL, (period, oldest_kept, _PRUNE_BATCH)).rowcount >= _PRUNE_BATCH or more
            db.execute(_CLOSE_WINDOWS, (f"closed\t{period}", oldest_kept))
        return more

    def _forget(self, db: sqlite3.Connection, now: float, start: int, pruned: int) -> tuple[int, bool]:
        """Take reservations settled more than ``retention`` ago out of the lookup indexes, walking
        the settle records from where the last pass stopped (``start``); a hold record at or below
        the ``pruned`` watermark goes altogether. Returns where this pass stopped, and whether it
        stopped at its batch size."""
        last = start
        settled: list[tuple[int, str, float]] = []
        cursor = db.execute(
            "SELECT seq, at, rid, forget_at FROM log WHERE seq > ? AND kind IN ('commit', 'release', 'expire') "
            "ORDER BY seq",
            (start,),
        )
        # Stops at the first reservation not yet due (the next pass goes on from there): its own
        # forget time, which the process that settled it set from its retention.
        stopped = False
        for seq, at, rid, recorded in cursor:
            due = recorded
            if due is None:  # a settle record from before schema version 5: ask its reservation
                hold = db.execute("SELECT forget_at FROM log WHERE seq = ? AND rid = ?", (_key(rid), rid)).fetchone()
                due = hold[0] if hold is not None and hold[0] is not None else at + self._retention
            if due > now or len(settled) >= 10_000:
                stopped = True
                break
            settled.append((_key(rid), rid, now))
            last = seq
        cursor.close()
        if not stopped:
            # Every settle record read: the walk is past the records after the last one too (budget
            # changes, extends, holds), or the audit trail would be pruned only up to the last
            # settlement — a ledger written to by set_budget/apply alone never pruned at all.
            # (seq only grows: a settle record written later comes after the top.)
            last = max(last, db.execute(_LAST_SEQ).fetchone()[0] or 0)
        if settled:
            # Out of the lookup and idempotency indexes; the hold record stays in the audit trail.
            db.executemany(
                "UPDATE log SET known = NULL, idem = NULL, holds = NULL, windows = NULL "
                f"{_FIND} AND status <> 'held' AND forget_at <= ?",
                settled,
            )
            below = [(seq,) for seq, _, _ in settled if seq <= pruned]
            if below:  # the audit trail is past them already: the record goes too
                db.executemany("DELETE FROM log WHERE seq = ? AND known IS NULL", below)
        if last != start:
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('forgotten', ?) ON CONFLICT DO UPDATE SET value = excluded.value",
                (last,),
            )
        return last, len(settled) >= 10_000

    def _window_params(self, windows: Windows) -> list[str]:
        """The states query's window parameters (cached: the Authority passes the same tuple all
        minute long)."""
        cached_windows, params = self._window_cache
        if windows is not cached_windows:
            by_period = dict(windows)
            params = [by_period[p] for p in _PERIOD_ORDER]
            self._window_cache = (windows, params)
        return params

    @staticmethod
    def _states(
        db: sqlite3.Connection,
        chain: tuple[str, ...],
        units: Any,
        params: list[Any],
        windows: Windows,
        closed: int = CLOSED_WINDOW_SPENT,
    ) -> list[AccountState]:
        """The chain's budgets of ``units`` in ``windows``; a closed window reads as ``closed``
        spent (see ``_STATES_SQL``: 0 for a replay's report)."""
        by_period = dict(windows)
        return [
            AccountState(scope, unit, period, by_period[period], limit, spent, held)
            for scope, unit, period, limit, spent, held in db.execute(
                _STATES_BY_DEPTH[len(chain)], [*params, None, closed, *chain]
            )
            if unit in units
        ]

    # --- reservations --------------------------------------------------------------------------
    def hold(self, request: HoldRequest) -> HoldResult:
        plans = request.plans
        if len(plans) == 1 and not request.probes:
            units: Any = dict(plans[0].amounts)
        else:
            units = reported_units((u for plan in plans for u, _ in plan.amounts), request.probes)
        now = request.now
        chain = request.chain
        windows = request.windows
        params = self._window_params(windows)

        def _hold(db: sqlite3.Connection) -> HoldResult:
            nonlocal now
            request.restamp()  # (it may have waited for the lock: its TTL runs from now)
            expires_at = request.expires_at
            now = request.now
            if request.idempotency_key is not None:
                self._reclaim_due(db, now)
                row = db.execute(
                    "SELECT rid, plan, expires_at, windows, amounts, at, forget_at, seq FROM log "
                    "WHERE root = ? AND idem = ?",
                    (chain[0], request.idempotency_key),
                ).fetchone()
                if row is not None and row[6] is not None and row[6] <= now:
                    db.execute(_FORGET_ONE, (row[7],))  # past retention: the key is free again
                    row = None
                if row is not None:
                    original = _windows(row[3], row[5])
                    held_units = reported_units((unit for unit, _ in _amounts(row[4])), request.probes)
                    original_params = [dict(original)[p] for p in _PERIOD_ORDER]
                    states = self._states(db, chain, held_units, original_params, original, closed=0)
                    return HoldResult(row[0], row[1], row[2], tuple(states), (), replayed=True)
                last, maintained = db.execute(_LAST_AND_MAINTAINED).fetchone()
                if (last or 0) - (maintained or 0) >= MAINTAIN_EVERY:
                    self._maintain(db, now)
                    last = db.execute(_LAST_SEQ).fetchone()[0]
                states = self._states(db, chain, units, params, windows)
                version = None  # unknown here: the commit will read the budgets
            else:
                by_period = None
                states = []
                due = False
                maintained = None
                for scope, unit, period, limit, spent, held in db.execute(
                    _STATES_DUE_BY_DEPTH[len(chain)], [*params, now, CLOSED_WINDOW_SPENT, *chain]
                ):
                    if scope is None:
                        version, due, last, maintained = unit, period, limit, spent
                    elif unit in units:
                        if by_period is None:
                            by_period = dict(windows)
                        states.append(
                            new_account_state(
                                AccountState, (scope, unit, period, by_period[period], limit, spent, held)
                            )
                        )
                maintain = (last or 0) - (maintained or 0) >= MAINTAIN_EVERY
                if due or maintain:
                    if maintain:  # (it reclaims too; it may change the budgets: read again)
                        self._maintain(db, now)
                        version = db.execute("SELECT value FROM meta WHERE key = 'budgets'").fetchone()[0]
                    else:
                        self._reclaim(db, now)
                    states = self._states(db, chain, units, params, windows)
                    last = db.execute(_LAST_SEQ).fetchone()[0]
            choice = choose_plan(plans, chain, states)
            index = choice.plan_index
            if index < 0:
                return HoldResult(None, -1, 0.0, tuple(states), tuple(choice.rejections))
            after = list(states)
            added: dict[int, int] = {}
            for position, steps in choice.holds:
                added[position] = added.get(position, 0) + steps
                a = after[position]
                after[position] = new_account_state(AccountState, (a[0], a[1], a[2], a[3], a[4], a[5], a[6] + steps))
            holds = []
            if added:
                flat: list[Any] = []
                level = _levels(chain)
                for position, steps in added.items():
                    a = states[position]
                    flat.extend((a[0], a[1], a[2], a[3], steps))
                    holds.append(f"{level[a[0]]},{a[1]},{a[2]},{steps}")
                _upsert(db, _HOLD_BY_COUNT, flat, 5)
            seq = (last or 0) + 1
            rid = _reservation_id(seq, request.reservation_id, chain[0])
            recorded = index + request.first_index  # (in the decision's ladder)
            db.execute(
                _INSERT_SQL,
                (
                    seq,
                    now,
                    chain[-1],
                    rid,
                    _dump(plans[index].amounts),
                    plan_detail(recorded),
                    chain[0],
                    recorded,
                    ";".join(holds),
                    "" if windows == windows_at(now) else json.dumps(windows, separators=(",", ":")),
                    expires_at,
                    request.idempotency_key,
                    request.label,
                    version,
                ),
            )
            return HoldResult(rid, index, expires_at, tuple(after), tuple(choice.rejections))

        return self._in_write(_hold, request.issued)

    def _load(self, db: sqlite3.Connection, reservation_id: str, now: float) -> ReservationRecord:
        row = db.execute(
            f"SELECT {_RES_COLUMNS} FROM log {_FIND_KEPT}", (_key(reservation_id), reservation_id, now)
        ).fetchone()
        if row is None:
            root_of(reservation_id)
            raise ReservationNotFound(reservation_id)
        return _record(row)

    def _expire_if_due(self, db: sqlite3.Connection, record: ReservationRecord, now: float) -> str:
        if record.status == HELD and record.expires_at <= now:
            self._reclaim(db, now)
            self._known(record.id, record.expires_at, now)
            return EXPIRED
        return record.status

    def _known(self, reservation_id: str, expires_at: float, now: float) -> None:
        """``ReservationNotFound`` for a hold just expired a retention after its expiry (nothing
        reclaimed it meanwhile): forgotten, as if reclaimed on time. The reclaim is kept: a
        ``ReservationNotFound`` commits the transaction it is raised in (see ``_in_write``)."""
        if expires_at + self._retention <= now:
            raise ReservationNotFound(reservation_id)

    @staticmethod
    def _keep_reclaim(db: sqlite3.Connection) -> None:
        """End a transaction that raises ``ReservationNotFound``: only lazy reclaims are in it, which
        stand (the next call would make them anyway)."""
        try:
            db.execute("COMMIT")
        except sqlite3.Error:
            SQLiteStore._rollback(db)

    @staticmethod
    def _move_reading_budgets(
        db: sqlite3.Connection,
        scope: str,
        windows: Windows,
        unholds: tuple[tuple[str, str, str, str, int], ...],
        charges: dict[str, int],
    ) -> tuple[list[tuple[str, str, str, str]], bool]:
        """A commit whose budgets may differ from its hold's: return the hold, then charge every
        budget on the chain now (read first, to find the ones it takes past their limit: returned),
        and whether it alone exceeds the limit of a closed window's budget (not charged there)."""
        moves: dict[tuple[str, str, str, str], list[int]] = {}  # key -> [spent, held] changes
        over: list[tuple[str, str, str, str]] = []
        over_closed = False
        for s, u, p, w, steps in unholds:
            moves[(s, u, p, w)] = [0, -steps]
        if charges:
            chain = _chain(scope)
            by_period = dict(windows)
            params: list[Any] = [by_period[p] for p in _PERIOD_ORDER]
            params.append(None)
            params.append(CLOSED_WINDOW_SPENT)
            params.extend(chain)
            for s, u, p, limit, spent, held in db.execute(_STATES_BY_DEPTH[len(chain)], params).fetchall():
                steps = charges.get(u, 0)
                if steps and spent == CLOSED_WINDOW_SPENT:
                    # A closed window (see _STATES_SQL): the commit is recorded (reservation, audit)
                    # but its counters are not opened again — counted from zero, the window would
                    # read as nearly empty, its budget spent twice — as on the memory store.
                    over_closed = over_closed or steps > limit
                    continue
                if steps:
                    key = (s, u, p, by_period[p])
                    move = moves.get(key)
                    if move is None:
                        move = moves[key] = [steps, 0]
                    else:
                        move[0] += steps
                    if spent + held + move[0] + move[1] > limit:
                        over.append(key)
        if moves:
            flat: list[Any] = []
            for key, (spent_change, held_change) in moves.items():
                flat.extend(key)
                flat.append(spent_change)
                flat.append(held_change)
            _upsert(db, _MOVE_BY_COUNT, flat, 6)
        return over, over_closed

    def _over_once_expired_are_back(
        self, db: sqlite3.Connection, now: float, charged: Sequence[tuple[Any, ...]]
    ) -> bool:
        """Whether a commit that took some of the ``charged`` counters past their limit still does
        once the expired holds are back: expired holds return on any call touching their budgets,
        and one still counted would flag an overage that is none (the memory store reclaims before
        it charges). Only called when the commit looks over, so the usual commit never pays for it."""
        if db.execute(_DUE_SQL, (now,)).fetchone() is None:
            return True
        self._reclaim(db, now)
        return any(db.execute(_OVER_SQL, key).fetchone() is not None for key in dict.fromkeys(charged))

    def commit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        def _commit(db: sqlite3.Connection) -> SettleResult:
            nonlocal actual
            row = db.execute(
                "SELECT seq, status, expires_at, scope, amounts, holds, windows, at, committed, flags, "
                f"budgets = (SELECT value FROM meta WHERE key = 'budgets') FROM log {_FIND_KEPT}",
                (_key(reservation_id), reservation_id, now),
            ).fetchone()
            if row is None:
                root_of(reservation_id)
                raise ReservationNotFound(reservation_id)
            seq, prior, expires_at, scope, amounts_text, holds_text, windows_text, created_at, committed, flags_text = (
                row[:10]
            )
            if prior == HELD and expires_at <= now:
                self._reclaim(db, now)
                self._known(reservation_id, expires_at, now)
                prior = EXPIRED
            if prior == COMMITTED:
                flags_done = tuple(flags_text.split(",")) if flags_text else ()
                return SettleResult(reservation_id, COMMITTED, _amounts(committed), flags_done, replayed=True)
            amounts = _amounts(amounts_text)
            actual = amounts if actual is None else merge_actual(amounts, actual)
            flags = commit_flags(prior, amounts, actual) if prior != HELD or actual != amounts else []
            windows = _windows(windows_text, created_at)
            holds = _holds(holds_text, scope, windows)
            charges = {unit: steps for unit, steps in actual if steps}
            held_steps = dict(amounts)
            unhold = prior == HELD
            if charges and unhold and row[10] and all(held_steps.get(unit, 0) > 0 for unit in charges):
                # No budget changed since the hold and every charged unit was held (so the hold
                # covered every budget of that unit): the hold's counters are the ones to charge,
                # one row each (a hold names each counter once), and no budget needs reading. Only
                # while it holds: its windows' rows exist then (a window something is held in is
                # never pruned); a late commit may meet a pruned window, whose row the upsert would
                # insert without the limit check (its overage unflagged): the general way.
                flat: list[Any] = []
                for s, u, p, w, steps in holds:
                    spent = charges.get(u, 0)
                    if spent or unhold:
                        flat.extend((s, u, p, w, spent, -steps if unhold else 0, seq))
                if flat and _upsert(db, _MOVE_WITHIN_BY_COUNT, flat, 7) != len(flat) // 7:
                    _upsert(db, _MOVE_REST_BY_COUNT, flat, 7)  # the rows not stamped by the first
                    charged = [tuple(flat[i : i + 4]) for i in range(0, len(flat), 7) if flat[i + 4]]
                    if self._over_once_expired_are_back(db, now, charged):
                        flags.append(OVER_LIMIT)
            elif charges or unhold:
                over, over_closed = self._move_reading_budgets(db, scope, windows, holds if unhold else (), charges)
                if over_closed or (over and self._over_once_expired_are_back(db, now, over)):
                    flags.append(OVER_LIMIT)
            db.execute(_COMMIT_SQL, (_dump(actual), ",".join(flags), now, now + self._retention, seq))
            return SettleResult(reservation_id, COMMITTED, actual, tuple(flags))

        return self._in_write(_commit)

    def release(self, reservation_id: str, now: float) -> SettleResult:
        def _release(db: sqlite3.Connection) -> SettleResult:
            record = self._load(db, reservation_id, now)
            status = self._expire_if_due(db, record, now)
            if status != HELD:
                return SettleResult(record.id, status, (), record.flags, replayed=True)
            db.executemany(_UNHOLD_SQL, [(h[4], h[0], h[1], h[2], h[3]) for h in record.holds])
            db.execute(_SETTLE_SQL, (RELEASED, now, now + self._retention, self._seq(db, record.id)))
            return SettleResult(record.id, RELEASED)
        return self._in_write(_release)

    @staticmethod
    def _seq(db: sqlite3.Connection, reservation_id: str) -> int:
        row = db.execute(f"SELECT seq FROM log {_FIND}", (_key(reservation_id), reservation_id)).fetchone()
        return int(row[0])

    def extend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        def _extend(db: sqlite3.Connection) -> ReservationRecord | ReservationClosed:
            record = self._load(db, reservation_id, now)
            status = self._expire_if_due(db, record, now)
            if status == HELD and expires_at <= record.expires_at:
                return record  # it lives that long already: an extend never shortens a hold
            if status == HELD:
                db.execute("UPDATE log SET expires_at = ? WHERE seq = ?", (expires_at, self._seq(db, record.id)))
                self._log(db, now, "extend", record.scope, record.id, (), f"expires_at={expires_at:.3f}")
                return self._load(db, reservation_id, now)
            # Closed: raised after the transaction commits, so an expiry this call found is kept (and
            # its retention runs from its expiry, as on every store), not rolled back with the error.
            return ReservationClosed(record.id, status)
        found = self._in_write(_extend)
        if isinstance(found, ReservationClosed):
            raise found
        return found

    def reservation(self, reservation_id: str, now: float) -> ReservationRecord:
        # A read (no write lock: a look-up must not queue behind, or stall, the writers) unless the
        # reservation is due to expire: then it expires first, like on any other call touching it.
        with self._read() as db:
            record = self._load(db, reservation_id, now)
        if record.status != HELD or record.expires_at > now:
            return record
        def _expire(db: sqlite3.Connection) -> ReservationRecord:
            record = self._load(db, reservation_id, now)
            if self._expire_if_due(db, record, now) != record.status:
                record = self._load(db, reservation_id, now)
            return record
        return self._in_write(_expire)

    def reservations(self, scope: str | None, status: str | None, limit: int, now: float) -> list[ReservationRecord]:
        # Reads, after a write only when some hold is due to expire (as accounts() does).
        with self._read() as db:
            due = db.execute(_DUE_SQL, (now,)).fetchone() is not None
        if due:
            self._in_write(lambda db: self._reclaim(db, now))
        with self._read() as db:
            sql = f"SELECT {_RES_COLUMNS} FROM log WHERE {_LIVE}"
            params: list[Any] = [now]
            if status is not None:
                sql += " AND status = ?"
                params.append(status)
            if scope is not None:
                sql += " AND (scope = ? OR substr(scope, 1, ?) = ?)"
                params.extend([scope, len(scope) + 1, scope + "/"])
            sql += " ORDER BY at DESC, seq LIMIT ?"
            params.append(limit)
            return [_record(row) for row in db.execute(sql, params)]

    # --- budgets -------------------------------------------------------------------------------
    def set_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        def _set(db: sqlite3.Connection) -> None:
            self._unpark(db, scope, unit, period, now)
            db.execute(  # (an operator's budget from now on, even if a template made it)
                "INSERT INTO budgets(scope, unit, period, lim) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET lim = excluded.lim, until = NULL, held_seen = NULL",
                (scope, unit, period, limit),
            )
            db.execute(_BUDGETS_CHANGED)
            self._log(db, now, "budget_set", scope, None, ((unit, limit),), f"period={period or 'lifetime'}")
        self._in_write(_set)

    def remove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        def _remove(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM budgets WHERE scope = ? AND unit = ? AND period = ?", (scope, unit, period)
            )
            if cursor.rowcount == 0:
                return False
            _park(db, scope, unit, period, now + self._retention)  # (set again by then, it continues them)
            db.execute(_BUDGETS_CHANGED)
            self._log(db, now, "budget_remove", scope, None, ((unit, 0),), f"period={period or 'lifetime'}")
            return True
        return self._in_write(_remove)

    def _unpark(self, db: sqlite3.Connection, scope: str, unit: str, period: str, now: float) -> None:
        """A budget about to be set: if it was removed, its kept counters go on — or, removed a
        retention ago with nothing held on them (holds due to expire expired first, as the
        maintenance pass would), are forgotten first (a new count), whichever comes first."""
        parked = _parked(db, scope, unit, period)
        if parked is None:
            return
        _park(db, scope, unit, period, None)
        if parked[1] <= now:  # (its deadline: whenever it was last looked at)
            self._reclaim_due(db, now)
            if not db.execute(_HELD_ON_BUDGET, (scope, unit, period)).fetchone():
                db.execute(_DROP_COUNTERS, (scope, unit, period))

    def _forget_removed(self, db: sqlite3.Connection, now: float) -> bool:
        """Forget the counters of budgets removed a retention ago with nothing held on them (one
        with something held is looked at again after ``TEMPLATE_RECHECK``)."""
        due = db.execute(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ? LIMIT ?",
            (_REMOVAL, f"{_REMOVAL}{now:020.6f}\x7f", _TEMPLATE_BATCH),
        ).fetchall()
        for key, deadline in due:
            _, _, scope, unit, period = key.split("\t")
            if db.execute(_HELD_ON_BUDGET, (scope, unit, period)).fetchone():
                _park(db, scope, unit, period, now + TEMPLATE_RECHECK, deadline)
                continue
            _park(db, scope, unit, period, None)
            db.execute(_DROP_COUNTERS, (scope, unit, period))
        return len(due) >= _TEMPLATE_BATCH

    def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        def _ensure(db: sqlite3.Connection) -> bool:
            found = db.execute(
                "SELECT until, held_seen FROM budgets WHERE scope = ? AND unit = ? AND period = ?",
                (scope, unit, period),
            ).fetchone()
            # Idle past its time, and its run seen again before the maintenance pass forgot it: as
            # if the pass had (a new count), whichever comes first.
            overdue = found is not None and found[0] is not None and found[0] <= now
            if overdue:
                self._reclaim_due(db, now)  # (holds due to expire first, as the maintenance pass would)
            if overdue and self._forget_template(db, scope, unit, period, bool(found[1]), now):
                db.execute(_BUDGETS_CHANGED)
            if found is None:
                self._unpark(db, scope, unit, period, now)
            refresh = template_refresh(self._retention)
            until = now + self._retention + 2 * refresh
            cursor = db.execute(
                "INSERT INTO budgets(scope, unit, period, lim, until) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (scope, unit, period, limit, until),
            )
            if cursor.rowcount == 0:  # an operator's budget, or a template: kept longer once half is left
                db.execute(
                    "UPDATE budgets SET until = ?, held_seen = NULL WHERE scope = ? AND unit = ? AND period = ? "
                    "AND until < ?",
                    (until, scope, unit, period, now + self._retention + refresh),
                )
                return False
            db.execute(_BUDGETS_CHANGED)
            self._log(db, now, "budget_set", scope, None, ((unit, limit),), f"period={period or 'lifetime'}")
            return True
        return self._in_write(_ensure)

    # --- policy documents (rows of ``meta``: no schema change) -----------------------------------
    def put_policy(self, document: str, now: float) -> int:
        def _put(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()
            version = (int(row[0]) if row else 0) + 1
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT DO UPDATE SET value = excluded.value",
                [("policy_version", version), ("policy", document)],
            )
            self._log(db, now, "policy_set", "", None, (), f"version={version}")
            return version
        return self._in_write(_put)

    def policy(self) -> tuple[int, str | None]:
        with self._read() as db:
            rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('policy_version', 'policy')"))
        return int(rows.get("policy_version", 0)), rows.get("policy")

    def policy_version(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'policy_version'").fetchone()
        return int(row[0]) if row else 0

    def accounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        due = False
        with self._read() as db:
            due = db.execute(_DUE_SQL, (now,)).fetchone() is not None
        if due:
            self._in_write(lambda db: self._reclaim(db, now))
        by_period = dict(windows)
        with self._read() as db:
            if scope is None:
                rows = db.execute(f"{_BUDGET_ROWS} ORDER BY scope, unit, period").fetchall()
            elif subtree:  # the scope and the paths under it: one range of the key ('0' follows '/')
                rows = db.execute(
                    f"{_BUDGET_ROWS} WHERE scope = ? OR (scope >= ? AND scope < ?) ORDER BY scope, unit, period",
                    (scope, scope + "/", scope + "0"),
                ).fetchall()
            else:
                rows = db.execute(
                    f"{_BUDGET_ROWS} WHERE scope = ? ORDER BY unit, period", (scope,)
                ).fetchall()
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
        """Maintenance passes until one finishes within its batch sizes (each in a transaction of
        its own, so a long backlog never holds the write lock all at once)."""
        expired = 0
        for _ in range(10_000):
            found, more = self._in_write(lambda db: self._maintain(db, now))
            expired += found
            if not more:
                break
        return expired

    def events(self, after: int, limit: int, scope: str | None, newest: bool = False) -> list[AuditEvent]:
        with self._read() as db:
            sql = "SELECT seq, at, kind, scope, rid, amounts, detail FROM log WHERE seq > ?"
            params: list[Any] = [after]
            if scope is not None:
                sql += " AND (scope = ? OR substr(scope, 1, ?) = ?)"
                params.extend([scope, len(scope) + 1, scope + "/"])
            sql += " ORDER BY seq DESC LIMIT ?" if newest else " ORDER BY seq LIMIT ?"
            params.append(limit)
            events = [
                AuditEvent(seq, at, kind, sc, rid, _amounts(amounts), detail)
                for seq, at, kind, sc, rid, amounts, detail in db.execute(sql, params)
            ]
            return events[::-1] if newest else events
