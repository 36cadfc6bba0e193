"""The Redis store: many workers on many machines, one Lua script per ledger operation.

``redis://host:port/db``, ``rediss://…`` (TLS), ``unix:///path/redis.sock`` and
``redis+cluster://host:port`` (any node of a Redis Cluster as the seed). Options go in the query
string: ``key_prefix`` (default ``clearance:``), ``socket_timeout`` and ``connect_timeout`` (seconds,
default 0.5 each), ``max_connections`` (pool size, default 64), ``retention`` (seconds a settled
reservation is remembered, default 48 h), ``audit_capacity`` (events kept per tenant, default
100,000), ``reclaim_batch`` (expired holds returned per script call, default 1,000),
``max_clock_skew`` (seconds a worker's clock may be off the server's before its reserves, extends,
look-ups and reclaims are refused with ``ClockSkew``, default 10; 0 trusts every clock). Any other query
parameter is passed on to redis-py (``ssl_ca_certs``, ``ssl_cert_reqs``, ``username``, …).

Every operation — reserve (idempotency, the ladder over chain x units x plans, lazy reclaim),
commit, release, extend, set/remove budget, balance — is one ``EVALSHA`` of a script in
``clearance/stores/lua/``: one round trip, atomic on the server. On one Redis the command is written
straight to a pooled redis-py connection with its head (sha, keys) encoded once per tenant, and the
hot scripts answer with one ``\n``-joined string; a ``NOSCRIPT`` reply loads the script and retries.
All keys of one tenant share the hash tag ``{<root scope>}`` and are passed in ``KEYS``, so a whole
reservation lands on one cluster slot::

    <prefix>{<root>}:l   hash    "@<scope>" -> "unit|period|limit|id ..." (that level's budgets, in
                                 order, each with its per-tenant id), "s<id>|<window>" -> spent,
                                 "h<id>|<window>" -> held, "#next" -> the last id given out,
                                 "=<scope>|<unit>|<period>" -> id (kept a retention after the budget
                                 is removed: set again by then, it continues its counters),
                                 "#<id>" -> "<scope>|<unit>|<period>",
                                 "w<id>" -> a period budget's windows with counters (its 8 latest are kept)
    <prefix>{<root>}:r   hash    "<token>" -> reservation record (13 tab-separated fields, the label
                                 last; its holds are "<id>|<window> steps …"),
                                 "!<idempotency key>" -> "<token>"
    <prefix>{<root>}:d   zset    every remembered reservation by when it is next due: expires_at while
                                 held (the expiry index; the positive scores are the live holds), then
                                 minus the end of its retention (negative: one range finds all that is due)
    <prefix>{<root>}:log stream  audit events, capped (XADD MAXLEN ~)
    <prefix>roots        set     every tenant root, for sweep() and listings across tenants
    <prefix>{~}:l / :log         policy documents and their audit trail (no tenant)

Reservation ids are ``<20 hex>.<root>``; the token (hex part) names the reservation inside its tenant.

Counters are named by the budget's short id rather than its scope path, so building, reading and
writing them costs the same at any depth. This layout replaced one that named counters
``s|<scope>|<unit>|<period>|<window>`` and kept JSON records; there is no migration (unreleased):
a script that meets data of the old layout (a budget without an id, a record whose holds name scope
paths, a JSON record) fails with an error reply — StoreUnavailable — instead of reading it as "no
budget" or "no hold".

Trouble is a decision: connection errors, refusals (OOM, READONLY, ACL, cluster down) and timeouts
all become :class:`~clearance.errors.StoreUnavailable` within the configured timeouts (redis-py's own
retries are disabled), which the Authority turns into DENY or a bounded fail-open. A connection lost
after a request was written is retried once with the same reservation id: the reserve script answers
an id it has already seen as a replay, and commit/release are idempotent by reservation state, so a
lost reply never holds or charges twice. ``remove_budget`` and ``put_policy`` are not run again (a
second run would answer or store something else): they raise StoreUnavailable. A reserve whose
outcome stays unknown (timeout, Redis gone) was answered DENY; its id is kept "in doubt" and
released on the next successful call, so its hold (if the write did land) does not wait for its TTL
— unless it carried an idempotency key: then the caller's retry with that key answers with the
reservation (or the TTL returns it).

Audit sequence numbers come from the stream ids, which the scripts set to ``<server µs>-<n>``:
``seq = µs * 1000 + n``. Scripts run one at a time on a server, so on a single Redis the sequence is
one total order across every tenant's stream and ``events(after=…)`` never skips an event. On a
cluster each tenant lives on one node and is exact per tenant (``scope=``); across tenants the
order is by the nodes' clocks, so a reader tailing *all* tenants should re-read a little behind its
last ``seq`` (clock skew between nodes) or tail tenant by tenant.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import heapq
import inspect
import logging
import os
import re
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import cache, lru_cache, partial
from importlib import resources
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from clearance.errors import ClockSkew, InvalidRequest, ReservationClosed, ReservationNotFound, StoreUnavailable
from clearance.ledger import (
    AccountState,
    Amounts,
    AuditEvent,
    HoldRequest,
    HoldResult,
    PlanSpec,
    Rejection,
    ReservationRecord,
    SettleResult,
)
from clearance.periods import Windows
from clearance.scope import parse_scope
from clearance.stores import redact_url
from clearance.stores.base import DEFAULT_RETENTION, Store, audit_capacity_of, in_subtree, retention_of, root_of
from clearance.stores.lending import AsyncLender, Lender, Loan, NoConnection

logger = logging.getLogger("clearance.redis")

_SCRIPTS = (
    "reserve",
    "commit",
    "release",
    "extend",
    "get",
    "list",
    "set_budget",
    "remove_budget",
    "accounts",
    "sweep",
    "policy",
)
_KEY_COUNT = 4  # a tenant's KEYS: ledger, reservations, due index, audit stream
_GLOBAL_ROOT = "~"  # hash tag of the keys that belong to no tenant (policy documents); no scope can be "~"
_PERIOD_ORDER = {"": 0, "day": 1, "hour": 2, "minute": 3, "month": 4, "week": 5}
_SEQ_SPLIT = 1000
_MAX_IN_DOUBT = 10_000
_T = TypeVar("_T")
_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
# Scripts a lost reply must not run again: a second remove_budget answers "no such budget" for the
# one it removed, a second put_policy stores the document as yet another version. Their callers get
# StoreUnavailable and may look before trying again. (Every other script converges when repeated:
# reserve recognises its own id, commit/release answer from the reservation's state.)
_NOT_REPEATABLE = frozenset({"remove_budget", "policy"})
# Scripts whose last argument says "this is the client's retry after a lost reply": a retried
# reserve answers the id it already stored; a retried set_budget or extend that finds its own change
# already made does not write a second audit event for it; a retried commit that finds its own amounts
# committed answers as its first run would have (not replayed).
_RETRY_FLAGGED = frozenset({"reserve", "set_budget", "extend", "commit"})
# Scripts asked again once a backlog of expired holds was drained say so in the same last argument
# (see _drained): the flag is a number, 1 for our retry plus 2 for the ask after a drain.
_DRAIN_FLAGGED = frozenset({"reserve", "set_budget"})
_RETRIED, _DRAINED = 1, 2


def _flagged(args: list[str], bit: int) -> list[str]:
    """``args`` with ``bit`` set in their last argument, the flag (whatever it said before is kept:
    a retry asked again after a drain is both)."""
    return [*args[:-1], str(int(args[-1]) | bit)]


@cache
def script_source(name: str) -> str:
    """The full text of one ledger script: the shared prelude followed by the operation."""
    folder = resources.files("clearance.stores") / "lua"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


class _Unavailable(StoreUnavailable):
    """StoreUnavailable that remembers whether the request may have reached the server."""

    maybe_sent: bool = True


class _ClockSkew(ClockSkew):
    """ClockSkew, remembering whether an earlier attempt of the same call may have landed."""

    maybe_sent: bool = False


def _maybe_sent(error: BaseException) -> bool:
    """False when the request certainly never left: the connection could not be opened, or no
    connection came in time (from the lender, or from redis-py's pool)."""
    return not (_no_connection(error) or (isinstance(error, redis.ConnectionError) and "connecting to" in str(error)))


def _no_connection(error: BaseException) -> bool:
    """No connection came in time, from the lender or from redis-py's pool (a cluster node's refuses
    when full): nothing was sent, and waiting again would outlast the timeout."""
    return isinstance(error, NoConnection | redis.exceptions.MaxConnectionsError) or (
        isinstance(error, redis.ConnectionError) and str(error) == "No connection available."
    )


# A cluster call refused by a full node pool waits this long, then twice as long each time (at most
# the maximum), until connect_timeout: see RedisStore._in_turn.
_POOL_PAUSE, _POOL_PAUSE_MAX = 0.001, 0.02


def _backlog(reply: Any) -> bool:
    """A script's "more expired holds wait than one call reclaims: reclaim them, then ask again"
    (a reserve's denial says it in its kind; accounts and list answer it alone)."""
    return reply == ["backlog"] or (isinstance(reply, str) and reply.startswith("backlog"))


def _drained(name: str, args: list[str]) -> list[str]:
    """The arguments to ask again with once the backlog was reclaimed: a reserve or set_budget says
    so in its flag, so that new expiries meanwhile (a flood) do not make it answer 'backlog' again —
    a plan that fits is held, a budget met again past its time is forgotten after one batch."""
    if name in _DRAIN_FLAGGED:
        args[:] = _flagged(args, _DRAINED)
    return args


def _caught_up(reply: Any, root: str) -> Any:
    """A reply after the backlog was reclaimed. A reserve's second 'backlog' is a denial all the
    same (it carries the states); a read with still more expired (a new batch meanwhile) gives up."""
    if reply in ("backlog", ["backlog"]):
        raise StoreUnavailable(f"could not catch up with the expired holds of {root}: try again")
    return reply


def _cluster_broke(error: Exception) -> redis.ConnectionError:
    """A cluster call that failed inside redis-py with something other than a Redis error. After a
    node fails, redis-py's cluster client re-initialises and closes the connections of every node,
    calls of other threads or tasks still on them included — on healthy nodes too: those die with
    an ``AttributeError`` (a writer gone) rather than a ``ConnectionError``. It is one all the same:
    the request may or may not have been sent, so it is retried (with the retry flag) or in doubt,
    and the caller gets a decision, never a bare stack trace."""
    return redis.ConnectionError(f"the cluster client closed this call's connection: {type(error).__name__}: {error}")


class _SafeClusterNode(redis.asyncio.cluster.ClusterNode):
    """An asyncio cluster node whose idle connections are never closed under another task's call.

    After a connection error (and for a node a topology refresh drops) redis-py's asyncio cluster
    client closes the node's idle connections, awaiting each close from a task of its own: meanwhile
    other tasks take them from the idle queue and have them closed mid-command (``'NoneType' object
    has no attribute 'writelines'``, or a read ending in "Connection closed by server" — a
    connection error again, which closes more). Here they leave the idle queue first, so nobody can
    take one, and are closed without waiting for the close to finish (nothing suspends)."""

    __slots__ = ()

    async def disconnect_free_connections(self) -> None:
        free = self._free
        idle = list(free)
        free.clear()
        try:
            for connection in idle:
                await connection.disconnect(nowait=True)
        finally:
            free.extend(idle)  # closed: each reconnects on its next use


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """redis-py's asyncio cluster client, its nodes made :class:`_SafeClusterNode` (the same
    slots: only the class changes) whenever it learns of new ones.

    Built to follow each ``MOVED`` by patching that slot (see ``_make_client``), it would never
    look at the whole topology again after a slot moved: nodes that left the cluster kept their
    sockets for good (a helper's hunt: 16 per removed node per event loop, each scale-in). So
    after ``MOVED`` replies it refreshes the whole topology on its next command, at most every
    ``REFRESH_EVERY`` seconds: a refresh drops the nodes that left and closes their connections."""

    REFRESH_EVERY = 5.0
    _moves_seen = 0
    _refresh_after = 0.0

    def note_moves(self) -> None:
        """Called after each call: after ``MOVED`` replies, make safe the nodes they brought in and
        schedule a refresh."""
        if self.reinitialize_counter != self._moves_seen:
            self._safe_nodes()  # (a MOVED to a node the client did not know creates it)
            now = time.monotonic()
            if now >= self._refresh_after:
                self._moves_seen = self.reinitialize_counter
                self._refresh_after = now + self.REFRESH_EVERY
                self._initialize = True

    def _safe_nodes(self) -> None:
        manager = self.nodes_manager
        for node in (*manager.nodes_cache.values(), *manager.startup_nodes.values()):
            if type(node) is redis.asyncio.cluster.ClusterNode:
                node.__class__ = _SafeClusterNode

    async def initialize(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().initialize(*args, **kwargs)
        finally:
            self._safe_nodes()


def _unavailable(error: BaseException, earlier: BaseException | None = None) -> StoreUnavailable:
    if isinstance(error, redis.ResponseError) and "clearance: clock_skew" in str(error):
        skew = _ClockSkew(str(error).split("clearance: ", 1)[1].split(" script:", 1)[0])
        skew.__cause__ = error
        # The script refused before writing anything; only a first attempt whose reply was lost may
        # have landed.
        skew.maybe_sent = earlier is not None and _maybe_sent(earlier)
        return skew
    failure = _Unavailable(f"Redis: {type(error).__name__}: {error}")
    failure.__cause__ = error
    failure.maybe_sent = _maybe_sent(error) or (earlier is not None and _maybe_sent(earlier))
    return failure


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


class _Permits:
    """What a cluster's ledger calls borrow from their lender: turns, not connections (the cluster
    client picks the node's connection itself)."""

    def get_connection(self) -> object:
        return self

    def release(self, permit: object) -> None:
        pass


class _AsyncPermits:
    async def get_connection(self) -> object:
        return self

    async def release(self, permit: object) -> None:
        pass


_PERMITS, _ASYNC_PERMITS = _Permits(), _AsyncPermits()


def _forget_parent_connections() -> None:
    """In a forked child: the kept connections are the parent's sockets (redis-py's pools reset
    themselves the same way), and the store's locks may be held by threads that do not exist here."""
    for store in list(_STORES):
        store._lender = store._new_lender()
        # A lock another thread of the parent held at the fork stays held in the child, forever.
        store._sync_lock = threading.Lock()
        store._async_lock = threading.Lock()
        store._in_doubt_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_forget_parent_connections)


def _drop_async(client: Any, loop_alive: bool) -> None:
    """Close an asyncio client from synchronous code, where nothing can be awaited: the usual end of
    ``asyncio.run(...)`` followed by ``close()``, or ``close()`` called inside a coroutine. With the
    loop alive (running in this thread) the transports are closed the normal way; with the loop gone
    the sockets are closed directly. Either way the connections are marked closed (else each warns
    when collected)."""
    connections: list[Any] = []
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        connections += [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
    manager = getattr(client, "nodes_manager", None)
    if manager is not None:
        for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]:
            connections += list(getattr(node, "_connections", ()))
    for connection in connections:
        writer = getattr(connection, "_writer", None)
        transport: Any = getattr(writer, "transport", None)
        # A TLS connection's transport (asyncio's SSL protocol) sits on the socket's own transport:
        # the socket is that one's, and both must read as closed (or each warns when collected).
        tls = getattr(transport, "_ssl_protocol", None)
        raw: Any = getattr(tls, "_transport", None) if tls is not None else transport
        sock = getattr(raw, "_sock", None)
        if loop_alive and transport is not None:
            transport.close()
        elif transport is not None:
            if tls is not None:
                transport._closed = True
            if sock is not None:
                raw._closing = True
                raw._sock = None
                sock.close()
        connection._reader = None
        connection._writer = None
    if manager is not None:
        client._initialize = True  # what aclose() leaves behind


def _seed(text: str, url: str) -> tuple[str, int]:
    """One more seed of a cluster URL, ``host`` or ``host:port`` (6379 by default)."""
    try:
        probe = urlsplit(f"//{text}")
        host, port = probe.hostname, probe.port or 6379
    except ValueError:
        host = None
    if not host:
        raise InvalidRequest(f"bad Redis URL {redact_url(url)!r}: {text!r} is not a seed host:port")
    return host, port


def _check_url(url: str, options: dict[str, Any], cluster: bool) -> None:
    """Refuse a URL or option redis-py would refuse (or silently misread) only at the first call: a
    misspelled option (``socket_timout``) would make every call fail with a bare TypeError, and a
    database that is not a number (``/ledger2``) silently means database 0 — another ledger."""
    try:
        kwargs: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as error:
        raise InvalidRequest(f"bad Redis URL {redact_url(url)!r}: {error}") from None
    parts = urlsplit(url)
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise InvalidRequest(f"bad Redis URL {redact_url(url)!r}: the database must be a number, got {database!r}")
    kwargs.update(options)
    _check_passed(kwargs, url)
    kwargs.update(decode_responses=True, protocol=2, socket_timeout=1.0, socket_connect_timeout=1.0)
    connection_class = kwargs.pop("connection_class", redis.connection.Connection)
    if cluster:  # (redis-py's cluster client hands "timeout" and "ssl" to its connections: refused)
        for name in _CLUSTER_OPTIONS:
            kwargs.pop(name, None)
    else:
        kwargs.pop("timeout", None)  # the blocking pool's wait, not the connection's
    try:
        connection_class(**kwargs)  # builds the object only: nothing is connected
        if cluster:  # the asyncio cluster client takes fewer options than the sync one (no **kwargs)
            with warnings.catch_warnings():  # its deprecation notices belong to the real client's build
                warnings.simplefilter("ignore")
                redis.asyncio.cluster.RedisCluster.from_url(url, **options)
    except (TypeError, ValueError, redis.exceptions.RedisClusterException) as error:
        shown = redact_url(url).replace("redis://", "redis+cluster://", 1) if cluster else redact_url(url)
        raise InvalidRequest(f"bad Redis store option in {shown!r}: {error}") from None


def _check_passed(options: dict[str, Any], url: str) -> None:
    """Options handed to redis-py that it takes when the store is made and refuses only on the first
    call — every call then: ``encoding=rot13`` raised a bare ``LookupError`` from every reserve."""
    shown = redact_url(url)
    encoding = options.get("encoding")
    if encoding is not None:
        try:
            utf8 = codecs.lookup(encoding).name == "utf-8"
        except (LookupError, TypeError):
            utf8 = False
        if not utf8:  # (the scripts and the ledger's text are UTF-8: a label read back otherwise differs)
            raise InvalidRequest(f"bad Redis store option in {shown!r}: encoding must be utf-8, got {encoding!r}")
    errors = options.get("encoding_errors")
    if errors is not None:
        try:
            codecs.lookup_error(errors)
        except (LookupError, TypeError):
            raise InvalidRequest(f"bad Redis store option in {shown!r}: encoding_errors {errors!r}") from None
    protocol = options.get("protocol")
    if protocol is not None and str(protocol) not in ("2", "3"):
        raise InvalidRequest(f"bad Redis store option in {shown!r}: protocol must be 2 or 3, got {protocol!r}")
    name = options.get("client_name")
    if name is not None and not re.fullmatch(r"[!-~]+", str(name)):
        raise InvalidRequest(
            f"bad Redis store option in {shown!r}: client_name {name!r} (Redis takes printable ASCII, no spaces)"
        )


_CLUSTER_OPTIONS = frozenset(inspect.signature(redis.cluster.RedisCluster.__init__).parameters) - {"kwargs", "self"}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _arelease(pool: Any, connection: Any) -> None:
    """Return a connection to an asyncio pool, even when the caller is cancelled meanwhile.

    ``pool.release`` only suspends when the pool's lock is contended; a cancellation there would
    leave the connection counted in use for good. Then the release is finished in a task of its own
    (cheaper than shielding every release: ``asyncio.shield`` costs a task per call)."""
    try:
        await pool.release(connection)
    except asyncio.CancelledError:
        if connection in getattr(pool, "_in_use_connections", ()):
            task = asyncio.ensure_future(pool.release(connection))
            _RELEASING.add(task)
            task.add_done_callback(_RELEASING.discard)
        raise


_RELEASING: set[asyncio.Future[Any]] = set()  # strong references to release tasks while they run


@contextlib.contextmanager
def _cancellation_kept() -> Iterator[None]:
    """Raise the ``CancelledError`` redis-py dropped inside the block.

    redis-py writes a request inside ``asyncio.wait_for``, which on Python 3.11 returns normally when
    the write finished as the caller was cancelled: the cancellation is lost. In a hunt half the
    cancellations of a reserve (``task.cancel()``, an ``asyncio.timeout`` expiring) were: the task
    went on to its model call, and a reserve wrapped in ``wait_for`` left a hold nobody got, held
    until its TTL. Raised once the block is done (a reply read whole: the connection stays usable;
    a reserve's hold is in doubt, released by the next good call), whether it answered or failed —
    around a whole operation, its retry after a lost connection included."""
    task = asyncio.current_task()
    count = task.cancelling() if task is not None else 0
    try:
        yield
    except asyncio.CancelledError:
        raise  # delivered: as it came (its message kept)
    except BaseException as error:
        if task is not None and task.cancelling() > count:
            raise asyncio.CancelledError from error  # (the failure it met too, as its cause)
        raise
    if task is not None and task.cancelling() > count:
        raise asyncio.CancelledError


def _bulk(value: str) -> bytes:
    """One RESP bulk string."""
    data = value.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _amounts(text: str | None) -> Amounts:
    if not text:
        return ()
    words = text.split()
    return tuple((words[i], int(words[i + 1])) for i in range(0, len(words), 2))


def _amounts_text(amounts: Amounts) -> str:
    return " ".join(f"{unit} {steps}" for unit, steps in amounts)


def _exact_overage(rejections: tuple[Rejection, ...], accounts: tuple[AccountState, ...]) -> tuple[Rejection, ...]:
    """An overage's ``remaining`` worked out again from the exact counters: the script subtracts in
    Lua doubles, and a spent counter may be past 2^53 after overage (only then is it inexact)."""
    exact = {(a.scope, a.unit, a.period): a.remaining for a in accounts}
    return tuple(
        dataclasses.replace(r, remaining=exact.get((r.scope, r.unit, r.period), r.remaining))
        if r.code == "budget_overage"
        else r
        for r in rejections
    )


@lru_cache(maxsize=64)
def _windows_text(windows: Windows) -> str:
    return ";".join(f"{period}={window}" for period, window in windows)


def _windows(text: str) -> Windows:
    pairs = []
    for item in text.split(";"):
        period, _, window = item.partition("=")
        pairs.append((period, window))
    return tuple(pairs)


def _float(value: float) -> str:
    return repr(float(value))


class _HoldArgs(list[str]):
    """A reserve's arguments, stamped again as they are sent: a wait for a pooled connection (or
    for a node's turn, or before a retry) moves the hold's clock and expiry by that wait, so the
    hold lives its TTL from when it is made (see ``HoldRequest.issued``) — fixed before the wait, a
    TTL shorter than it made a hold born expired, its budget handed out again at once."""

    __slots__ = ("request",)

    def __init__(self, request: HoldRequest, args: list[str]) -> None:
        super().__init__(args)
        self.request = request

    def stamp(self) -> None:
        request = self.request
        expires_at = request.expires_at
        request.restamp()
        if request.expires_at != expires_at:
            self[0] = _float(request.now)
            self[3] = _float(request.expires_at)


def _states_of(text: str) -> list[AccountState]:
    """Parse the scripts' packed accounts: '|'-joined, 7 fields per budget."""
    if not text:
        return []
    f = text.split("|")
    return [
        AccountState(f[i], f[i + 1], f[i + 2], f[i + 3], int(f[i + 4]), int(f[i + 5]), int(f[i + 6]))
        for i in range(0, len(f), 7)
    ]


def _plan_text(plan: PlanSpec) -> str:
    """A plan as reserve.lua reads it: "unit steps unit steps|ppm ppm ..." (cached: callers reuse
    their ladders, and a 3-plan request spent ~2 µs building these anew)."""
    key = (plan.amounts, plan.headroom_ppm)
    text = _PLAN_TEXTS.get(key)
    if text is None:
        amounts = " ".join(f"{unit} {steps}" for unit, steps in plan.amounts)
        ppm = plan.headroom_ppm
        text = f"{amounts}|{' '.join(map(str, ppm)) if any(ppm) else ''}"
        if len(_PLAN_TEXTS) < 4096:
            _PLAN_TEXTS[key] = text
    return text


_PLAN_TEXTS: dict[tuple[Amounts, tuple[int, ...]], str] = {}


def _seq(stream_id: str) -> int:
    ms, _, n = stream_id.partition("-")
    return int(ms) * _SEQ_SPLIT + int(n)


def _stream_id(seq: int) -> str:
    return f"{seq // _SEQ_SPLIT}-{seq % _SEQ_SPLIT}"


def _remember(tenants: set[str], root: str) -> None:
    """Add a tenant to a per-process set of them, bounded for workers serving tenants without end:
    past 65,536 it starts afresh (a tenant forgotten costs its first call's work again: a
    registration's SADD, a permission check)."""
    if len(tenants) >= 65536:
        tenants.clear()
    tenants.add(root)


_STREAMS_PER_TRIP = 500  # tenants' audit streams read in one pipeline (see RedisStore._read_streams)


def _events_of(root: str, entries: list[tuple[str, dict[str, str]]]) -> list[AuditEvent]:
    """A tenant's stream entries as AuditEvents (``root`` names its reservations)."""
    events = []
    for stream_id, fields in entries:
        token = fields.get("r", "")
        events.append(
            AuditEvent(
                seq=_seq(stream_id),
                at=float(fields["at"]),
                kind=fields["k"],
                scope=fields["s"],
                reservation_id=f"{token}.{root}" if token and root != _GLOBAL_ROOT else None,
                steps=_amounts(fields.get("a")),
                detail=fields.get("d", ""),
            )
        )
    return events


class RedisStore(Store):
    """``redis://`` — the ledger in Redis (or Redis Cluster), shared by every worker that can reach it::

        store = RedisStore.from_url("redis://localhost:6379/0?key_prefix=ledger:&socket_timeout=0.25")
        authority = Authority(store)
    """

    scheme: ClassVar[str] = "redis"

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        cluster: bool = False,
        key_prefix: str = "clearance:",
        retention: float = DEFAULT_RETENTION,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: int = 64,
        audit_capacity: int = 100_000,
        reclaim_batch: int = 1000,
        max_clock_skew: float = 10.0,
        seeds: Sequence[tuple[str, int]] = (),
        **redis_options: Any,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise InvalidRequest("key_prefix must not contain '{' or '}' (they choose the cluster slot)")
        for name, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
            if not 0 < value <= 3600:
                raise InvalidRequest(f"{name} must be in (0, 3600] seconds, got {value}")
        retention = retention_of(retention)
        audit_capacity = audit_capacity_of(audit_capacity)
        limits = (("max_connections", max_connections, 10_000), ("reclaim_batch", reclaim_batch, 100_000))
        for name, value, most in limits:
            # (redis-py's blocking pool fills a queue with a slot per connection when it is built:
            # 10**13 hung the first call; a batch beyond what one script call should take stalls Redis)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise InvalidRequest(f"{name} must be a whole number in [1, {most:,}], got {value!r}")
        if not 0 <= max_clock_skew <= 86400:
            raise InvalidRequest(f"max_clock_skew must be in [0, 86400] seconds (0: off), got {max_clock_skew}")
        _check_url(url, redis_options, cluster)  # bad input now, not at the first call
        self._url = url
        self.url = redact_url(url)  # (for messages and logs: no password)
        self.cluster = cluster
        self.key_prefix = key_prefix
        self._retention = float(retention)
        self._cap = str(int(audit_capacity))
        self._batch = int(reclaim_batch)
        self._config = f"{_float(retention)} {self._cap} {self._batch} {_float(max_clock_skew)}"
        # A process's first call on a tenant checks the user's permissions first (see common.lua);
        # tenants whose call has since succeeded skip it.
        self._config_first = self._config + " 1"
        self._permitted: set[str] = set()
        self._timeouts = (float(socket_timeout), float(connect_timeout))
        self._max_connections = int(max_connections)
        self._options = dict(redis_options)
        self._options.setdefault("decode_responses", True)
        self._options.setdefault("protocol", 2)  # RESP2: every Redis and proxy speaks it, and it parses a bit faster
        self._roots_key = f"{key_prefix}roots"
        self._known_roots: set[str] = set()
        self._register_after = 0.0  # monotonic time before which a reserve does not retry registering
        self._key_cache: dict[str, list[str]] = {}
        self._head_cache: dict[tuple[str, str], bytes] = {}
        self._in_doubt: set[str] = set()
        self._in_doubt_lock = threading.Lock()
        # Connections of the sync pool lent to ledger calls (see _evalsha); a forked child drops them.
        self._lender = self._new_lender()  # (on a cluster, its lenders of turns per node: see _in_turn)
        _STORES.add(self)
        self._sync: tuple[Any, dict[str, Any]] | None = None  # built on first use: a cluster client connects
        if seeds and not cluster:
            raise InvalidRequest("seeds are cluster nodes: only a redis+cluster:// store takes more than one")
        # Cluster nodes discovered (see _remember_nodes); until the first discovery, the other seeds
        # the URL named, tried when its first one does not answer.
        self._nodes_seen: dict[tuple[str, int], None] = dict.fromkeys((str(h), int(p)) for h, p in seeds)
        self._sync_lock = threading.Lock()
        self._eviction_checked = False
        # Per event loop: its asyncio client, scripts, the cluster's discovery and its lender.
        self._async_lock = threading.Lock()  # threads each running their own loop share the mapping
        self._async: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, dict[str, Any], asyncio.Future[Any] | None, AsyncLender]
        ] = weakref.WeakKeyDictionary()

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Build a store from ``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://`` URLs."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        cluster = scheme.endswith("+cluster")
        ours: dict[str, Any] = {}
        passed: list[tuple[str, str]] = []
        floats = ("retention", "socket_timeout", "connect_timeout", "max_clock_skew")
        ints = ("max_connections", "audit_capacity", "reclaim_batch")
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            try:
                if key in floats:
                    ours[key] = float(value)
                elif key in ints:
                    ours[key] = int(value)
                elif key == "key_prefix":
                    ours[key] = value
                else:
                    passed.append((key, value))
            except ValueError:
                raise InvalidRequest(f"bad Redis store option {key}={value!r}") from None
        query = urlencode(passed)
        netloc, seeds = parts.netloc, []
        if cluster and "," in netloc:  # several seeds, "host:port,host:port": the first one is the URL's
            user, at, hosts = netloc.rpartition("@")
            first, *others = hosts.split(",")
            netloc = f"{user}{at}{first}"
            seeds = [_seed(other, url) for other in others]
        base = f"{scheme.removesuffix('+cluster')}://{netloc}{parts.path}" + (f"?{query}" if query else "")
        return cls(base, cluster=cluster, seeds=seeds, **ours)

    # --- clients ---------------------------------------------------------------------------------
    def _make_client(self, *, asynchronous: bool) -> Any:
        socket_timeout, connect_timeout = self._timeouts
        options: dict[str, Any] = {
            **self._options,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            # One retry, ours, with the same reservation id; redis-py's backoff loop could outlast the timeout.
            "retry": Retry(NoBackoff(), 0),
        }
        if self.cluster:
            options["max_connections"] = self._max_connections
            module: Any = redis.asyncio.cluster if asynchronous else redis.cluster
            known = list(self._nodes_seen)
            if known:  # besides the URL's seed, which may be the node that is down
                options["startup_nodes"] = [module.ClusterNode(host, port) for host, port in known]
            if asynchronous:
                # A MOVED (a failover: the slot's new primary) patches that slot's entry. Not every
                # fifth one closing every connection of every node to force a refresh (redis-py's
                # default, reinitialize_steps=5): with tens of tasks on the moved slots, calls on
                # healthy nodes died under it, each error refreshed again, and it never settled.
                client = _AsyncCluster.from_url(self._url, **options, reinitialize_steps=0)
                client._safe_nodes()  # type: ignore[attr-defined]  # (from_url builds the class it is called on)
                return client
            return module.RedisCluster.from_url(self._url, **options)
        pool_options = {**options, "max_connections": self._max_connections, "timeout": connect_timeout}
        if asynchronous:
            return redis.asyncio.Redis.from_pool(
                redis.asyncio.BlockingConnectionPool.from_url(self._url, **pool_options)
            )
        return redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(self._url, **pool_options))

    def _remember_nodes(self, client: Any) -> None:
        """Keep the nodes a cluster client has just discovered. A client built later (for a new event
        loop — one per ``asyncio.run`` — or after a fork) starts from them too: started from the
        URL's one seed, it could not connect while that node was down, even for healthy tenants."""
        try:
            nodes = list(client.nodes_manager.nodes_cache.values())
        except Exception:  # (not a cluster client, or one that discovered nothing)
            return
        if nodes:  # the latest discovery only: an address the cluster gave up may serve another one now
            self._nodes_seen = {(str(node.host), int(node.port)): None for node in nodes}

    def _built(self, asynchronous: bool) -> tuple[Any, dict[str, Any]]:
        try:
            client = self._make_client(asynchronous=asynchronous)
        except _ERRORS as error:
            raise _unavailable(error) from error
        return client, {name: client.register_script(script_source(name)) for name in _SCRIPTS}

    def _new_lender(self, *, asynchronous: bool = False) -> Any:
        """A lender of ledger-call connections (see clearance.stores.lending): they may take all but one
        of the pool's connections (that one is left to the store's other commands; a one-connection
        pool is used directly), keep half of them between calls, and wait for one as long as the
        pool would (``connect_timeout``)."""
        limit, keep, wait = self._max_connections - 1, self._max_connections // 2, self._timeouts[1]
        if self.cluster:  # turns on one node, not connections (see _evalsha): none to keep, one at least
            limit, keep = max(1, limit), 0
        return AsyncLender(limit, keep, wait) if asynchronous else Lender(limit, keep, wait)

    def _node_lender(self, client: Any, key: str, lenders: dict[str, Any], *, asynchronous: bool) -> Any:
        """The lender of turns for the cluster node that serves ``key``'s slot: one per node, as the
        cluster client keeps a pool per node, so calls stuck on a hung node never hold the turns of
        tenants on healthy ones. (A slot no node is known for shares one lender: the call fails
        its own way.)"""
        try:
            name = client.nodes_manager.get_node_from_slot(client.keyslot(key)).name
        except Exception:
            name = "?"
        return self._lender_of_node(name, lenders, asynchronous=asynchronous)

    def _lender_of_node(self, name: str, lenders: dict[str, Any], *, asynchronous: bool) -> Any:
        lender = lenders.get(name)
        if lender is None:
            lender = lenders.setdefault(name, self._new_lender(asynchronous=asynchronous))
        return lender

    def _in_turn(self, client: Any, key: str, command: Callable[[], _T]) -> _T:
        """``command()``; on a cluster in a turn on the node serving ``key``. The cluster client's
        per-node pools refuse a call beyond max_connections at once (MaxConnectionsError) instead
        of waiting: calls take turns first, fewer at once than a node's pool holds."""
        if not self.cluster:
            return command()
        return self._in_node_turn(self._node_lender(client, key, self._lender.by_node, asynchronous=False), command)

    def _in_node_turn(self, lender: Any, command: Callable[[], _T]) -> _T:
        """``command()`` in a turn of a cluster node's ``lender`` (see _in_turn)."""
        loan = Loan()
        try:
            lender.borrow(_PERMITS, loan)
            pause, deadline = _POOL_PAUSE, time.monotonic() + self._timeouts[1]
            while True:
                try:
                    return command()
                except redis.exceptions.MaxConnectionsError:
                    # Turns are taken on the node that owns the slot, but redis-py follows an ASK
                    # (a slot being migrated) to another node's pool within the call: that pool,
                    # full, refuses instead of waiting. Nothing was sent: wait, as a turn would.
                    if time.monotonic() + pause > deadline:
                        raise
                    time.sleep(pause)
                    pause = min(2 * pause, _POOL_PAUSE_MAX)
        finally:
            try:
                lender.give_back(_PERMITS, loan)
            except BaseException:  # an interrupt during the give-back: this one does what is left
                lender.give_back(_PERMITS, loan)
                raise

    async def _ain_turn(self, client: Any, lender: AsyncLender, key: str, command: Callable[[], Awaitable[_T]]) -> _T:
        """:meth:`_in_turn` for asyncio, with this loop's ``lender``."""
        if not self.cluster:
            return await command()
        node_lender = self._node_lender(client, key, lender.by_node, asynchronous=True)
        permit, _ = await node_lender.borrow(_ASYNC_PERMITS)
        try:
            pause, deadline = _POOL_PAUSE, time.monotonic() + self._timeouts[1]
            while True:
                try:
                    return await command()
                except redis.exceptions.MaxConnectionsError:  # followed to a full pool: see _in_turn
                    if time.monotonic() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, _POOL_PAUSE_MAX)
        finally:
            node_lender.give_back(permit)  # (permits need no release: nothing suspends here)
            if type(client) is _AsyncCluster:
                client.note_moves()

    def _sync_client(self) -> tuple[Any, dict[str, Any]]:
        found = self._sync
        if found is None:
            with self._sync_lock:
                if self._sync is None:
                    self._sync = self._built(asynchronous=False)
                    if self.cluster:
                        self._remember_nodes(self._sync[0])
                found = self._sync
        return found

    def _memory_info(self, client: Any) -> Any:
        """``INFO memory`` (every primary's, on a cluster): the reply, or its awaitable for asyncio."""
        return client.info("memory", target_nodes=client.PRIMARIES) if self.cluster else client.info("memory")

    def _check_eviction(self, client: Any) -> None:
        """Once per store, after its first good call (so a hung server never costs a second
        timeout): see :meth:`_warn_if_evicting`. A check, not a dependency: without INFO, no warning."""
        self._eviction_checked = True
        with contextlib.suppress(Exception):
            self._warn_if_evicting(self._memory_info(client))

    async def _acheck_eviction(self, client: Any) -> None:
        self._eviction_checked = True
        with contextlib.suppress(Exception):
            self._warn_if_evicting(await self._memory_info(client))

    def _warn_if_evicting(self, info: Any) -> None:
        """Warn once when Redis may evict the ledger's keys (an ``allkeys-*`` policy): under memory
        pressure it would drop budgets and holds silently, and the next reserve would be allowed
        against a budget that no longer exists. ``noeviction`` (or ``volatile-*``: the ledger sets
        no TTLs) makes a full Redis refuse writes instead, which clearance turns into decisions."""
        infos = info.values() if "maxmemory_policy" not in info else [info]  # a cluster answers per node
        policies = {str(node.get("maxmemory_policy", "")) for node in infos if isinstance(node, dict)}
        evicting = sorted(p for p in policies if p.startswith("allkeys-"))
        if evicting:
            logger.warning(
                "Redis at %s has maxmemory-policy %s: under memory pressure it may evict clearance's budgets and "
                "holds; set maxmemory-policy noeviction (see docs/redis.md)",
                self.url,
                ", ".join(evicting),
            )

    @property
    def _client(self) -> Any:
        return self._sync_client()[0]

    async def _async_client(self) -> tuple[Any, dict[str, Any], AsyncLender]:
        """The asyncio client of the running loop (redis.asyncio connections belong to one loop), its
        scripts, and the lender of its ledger calls' connections (see :meth:`_aevalsha`).

        A cluster client is initialised (slots discovered) once, before any task uses it: redis-py
        replaces its startup node objects during the first discovery, and tasks already talking to
        them then lose their connection mid-command."""
        loop = asyncio.get_running_loop()
        found = self._async.get(loop)
        if found is None:
            with self._async_lock:
                self._drop_closed_loops()
                found = self._async.get(loop)
                if found is None:
                    client, scripts = self._built(asynchronous=True)
                    ready = asyncio.ensure_future(client.initialize()) if self.cluster else None
                    found = (client, scripts, ready, self._new_lender(asynchronous=True))
                    self._async[loop] = found
        ready = found[2]
        if ready is not None:
            waited = not ready.done()
            if waited:
                with contextlib.suppress(Exception):  # read below, from the future itself
                    await asyncio.shield(ready)
            problem = RuntimeError("cancelled") if ready.cancelled() else ready.exception()
            if waited and problem is None:  # (once a client, not on every call)
                self._remember_nodes(found[0])
            if problem is not None:
                with self._async_lock:
                    if self._async.get(loop) is found:
                        del self._async[loop]  # the next call tries again
                raise _unavailable(problem) from problem
        return found[0], found[1], found[3]

    def _drop_closed_loops(self) -> None:
        """Close the clients of event loops that have ended (each ``asyncio.run`` makes a new loop).
        Their connections keep the loop itself alive, so the weak mapping would never let go of
        them: a process calling ``asyncio.run(authority.areserve(...))`` per request would keep a
        socket per call until it ran out of file descriptors. Called with ``_async_lock`` held."""
        for loop in list(self._async):
            if loop.is_closed():
                entry = self._async.pop(loop, None)
                if entry is None:
                    continue
                try:
                    _drop_async(entry[0], loop_alive=False)
                except Exception:  # pragma: no cover - best effort: the loop is gone either way
                    logger.debug("could not close the Redis client of an ended event loop", exc_info=True)

    def close(self) -> None:
        with self._async_lock:
            entries = list(self._async.items())
            self._async.clear()
        for loop, (client, _, _, _) in entries:
            # asyncio clients of loops that are idle (not running, not closed) can still be closed here
            try:
                if loop.is_closed():
                    _drop_async(client, loop_alive=False)
                elif not loop.is_running():
                    loop.run_until_complete(client.aclose())
                elif _running_loop() is loop:
                    _drop_async(client, loop_alive=True)
                else:  # running in another thread
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=self._timeouts[0])
            except Exception:  # pragma: no cover - best effort on shutdown
                logger.debug("could not close an asyncio Redis client", exc_info=True)
        found, self._sync = self._sync, None
        self._lender = self._new_lender()  # the pool's close below disconnects them all
        if found is None:
            return
        client = found[0]
        try:
            if self.cluster:
                # redis-py keeps a client per startup node besides the discovered ones; close both
                manager = client.nodes_manager
                nodes = [*manager.nodes_cache.values(), *manager.startup_nodes.values()]
                client.close()
                for node in nodes:
                    if node.redis_connection is not None:
                        node.redis_connection.connection_pool.disconnect()
            else:
                client.close()  # from_pool: closing the client disconnects its pool
        except _ERRORS:  # pragma: no cover - closing a dead connection
            pass

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            with self._async_lock:
                found = self._async.pop(loop, None)
            if found is not None:
                await found[0].aclose()
        except _ERRORS:  # pragma: no cover
            pass
        self.close()

    # --- keys ------------------------------------------------------------------------------------
    def _keys(self, root: str) -> list[str]:
        """The tenant's KEYS, all tagged ``{<root>}`` so they share one cluster slot."""
        keys = self._key_cache.get(root)
        if keys is None:
            tag = f"{self.key_prefix}{{{root}}}:"
            keys = [tag + suffix for suffix in ("l", "r", "d", "log")]
            if len(self._key_cache) < 65536:
                self._key_cache[root] = keys
        return keys

    def _head(self, now: float) -> list[str]:
        return [_float(now), self._config]

    # --- running scripts -------------------------------------------------------------------------
    def _command_head(self, script: Any, root: str) -> bytes:
        """``EVALSHA <sha> 4 <keys>`` already in RESP, per script and tenant: only the arguments are
        encoded per call (redis-py would encode all of it, every call)."""
        cache_key = (script.sha, root)
        head = self._head_cache.get(cache_key)
        if head is None:
            keys = self._keys(root)
            head = b"".join(_bulk(part) for part in ("EVALSHA", script.sha, str(len(keys)), *keys))
            if len(self._head_cache) < 65536:
                self._head_cache[cache_key] = head
        return head

    def _evalsha(self, client: Any, script: Any, root: str, args: list[str]) -> Any:
        """One EVALSHA. On one Redis it is written straight to a pooled connection (redis-py's command
        layer costs more than the script for short scripts); a NOSCRIPT reply loads the script and
        runs it again, as redis-py's Script does. The cluster client routes by key slot itself."""
        if self.cluster:
            # Not redis-py's Script: on NOSCRIPT it loads the script on every primary, so one master
            # down would fail the calls of tenants on the healthy ones. EVAL runs (and caches) the
            # script on the tenant's own node only. In a turn on that node (see _in_turn).
            keys = self._keys(root)

            def run() -> Any:
                if type(args) is _HoldArgs:
                    args.stamp()
                try:
                    try:
                        return client.evalsha(script.sha, len(keys), *keys, *args)
                    except redis.exceptions.NoScriptError:
                        return client.eval(script.script, len(keys), *keys, *args)
                except _ERRORS:
                    raise
                except Exception as error:
                    raise _cluster_broke(error) from error

            return self._in_turn(client, keys[0], run)
        # A connection lent by the store (kept between calls, handed from caller to caller in turn:
        # see clearance.stores.lending); the pool still makes them, so max_connections holds. The
        # check below is the pool's own: a socket with something to read (the server closed it, or a
        # reply was left behind) is reconnected before use.
        pool = client.connection_pool
        lender = self._lender
        loan = Loan()  # (what the lender lent this call, wherever an interrupt may arrive: see Loan)
        try:
            used = lender.borrow(pool, loan)
            connection = loan.held
            if type(args) is _HoldArgs:
                args.stamp()
            body = b"".join(map(_bulk, args))
            count = b"*%d\r\n" % (3 + _KEY_COUNT + len(args))  # EVALSHA, sha, numkeys, the keys, the arguments
            if used and connection._sock is not None:  # (can_read() would reconnect a closed one, waiting)
                try:
                    stale = connection.can_read()
                except (redis.ConnectionError, redis.TimeoutError, OSError):  # the server closed it
                    stale = True
                if stale:
                    connection.disconnect()  # the send below connects afresh
            try:
                connection.send_packed_command([count + self._command_head(script, root) + body])
                return connection.read_response()
            except redis.exceptions.NoScriptError:
                connection.send_command("SCRIPT", "LOAD", script.script)  # this connection: the pool may be spent
                script.sha = connection.read_response()
                connection.send_packed_command([count + self._command_head(script, root) + body])
                return connection.read_response()
        except redis.ResponseError:
            raise  # the whole reply was read: the connection is fine
        except BaseException:
            if loan.connection is not None:
                loan.connection.disconnect()  # a request or reply may be half-way: never hand this socket out again
            raise
        finally:
            try:
                lender.give_back(pool, loan)
            except BaseException:  # an interrupt during the give-back: this one does what is left
                lender.give_back(pool, loan)
                raise

    def _retry_args(self, name: str, args: list[str], started: float, error: redis.ConnectionError) -> list[str]:
        """The connection died, possibly after the server ran the script: the arguments to run it again
        with, once — or StoreUnavailable when a second run could not answer within the timeout or would
        change something (see ``_NOT_REPEATABLE``). A retried reserve, set_budget or extend says so in
        its last argument (see ``_RETRY_FLAGGED``)."""
        if name in _NOT_REPEATABLE or time.monotonic() - started > self._timeouts[0]:
            raise _unavailable(error) from error
        return _flagged(args, _RETRIED) if name in _RETRY_FLAGGED else args

    def _run(self, name: str, root: str, args: list[str]) -> Any:
        """One script, one round trip; one retry after a lost connection; every failure is StoreUnavailable."""
        client, scripts = self._sync_client()
        script = scripts[name]
        started = time.monotonic()
        first = root not in self._permitted
        if first:
            args[1] = self._config_first
        try:
            reply = self._evalsha(client, script, root, args)
        except redis.ConnectionError as error:
            if _no_connection(error):
                raise _unavailable(error) from error
            # In place: a caller asking again (after draining a backlog) repeats the retry — the
            # first copy may still land — so it must carry the retry flag too.
            args[:] = self._retry_args(name, args, started, error)
            try:
                reply = self._evalsha(client, script, root, args)
            except _ERRORS as again:
                raise _unavailable(again, error) from again
        except _ERRORS as error:
            raise _unavailable(error) from error
        if first:
            _remember(self._permitted, root)  # (its scripts ran with the permission check: later calls skip it)
        if self._in_doubt:
            self._settle_in_doubt(root, args[0])
        if not self._eviction_checked:
            self._check_eviction(client)
        return reply

    async def _aevalsha(self, client: Any, script: Any, root: str, args: list[str], lender: AsyncLender) -> Any:
        """:meth:`_evalsha` for asyncio: the same hand-packed command, on a connection lent by this
        loop's ``lender`` (kept between calls, handed from task to task in turn), checked the way the
        pool checks one before handing it out.

        Cancellation safe: a call cancelled (or failed) between writing the request and reading the
        whole reply disconnects the connection before it is given back (redis-py's own reads do
        too; this does not rely on it; a disconnected connection reconnects on its next use). Giving
        one back to the lender does not suspend, so a cancellation cannot lose it; one returned to
        the pool under a contended lock is finished by :func:`_arelease`."""
        if self.cluster:  # see _evalsha: EVAL on the tenant's node, never a load on every primary; a turn first
            keys = self._keys(root)

            async def run() -> Any:
                if type(args) is _HoldArgs:
                    args.stamp()
                try:
                    try:
                        return await client.evalsha(script.sha, len(keys), *keys, *args)
                    except redis.exceptions.NoScriptError:
                        return await client.eval(script.script, len(keys), *keys, *args)
                except _ERRORS:
                    raise
                except Exception as error:
                    raise _cluster_broke(error) from error

            return await self._ain_turn(client, lender, keys[0], run)
        pool = client.connection_pool
        connection, _ = await lender.borrow(pool)
        clean = False
        try:
            if type(args) is _HoldArgs:
                args.stamp()
            body = b"".join(map(_bulk, args))
            count = b"*%d\r\n" % (3 + _KEY_COUNT + len(args))
            # Something to read on a kept connection (a reply left behind, or the server closed it):
            # reconnect it (the check is the pool's, and costs no system call).
            if connection.is_connected:
                try:
                    stale = await connection.can_read()
                except (redis.ConnectionError, redis.TimeoutError, OSError):  # the server closed it
                    stale = True
                if stale:
                    await connection.disconnect(nowait=True)  # the send below connects afresh
            try:
                await connection.send_packed_command([count + self._command_head(script, root) + body])
                reply = await connection.read_response()
            except redis.exceptions.NoScriptError:
                await connection.send_command("SCRIPT", "LOAD", script.script)
                script.sha = await connection.read_response()
                await connection.send_packed_command([count + self._command_head(script, root) + body])
                reply = await connection.read_response()
            clean = True
            return reply
        except redis.ResponseError:
            clean = True  # the whole reply was read: the connection is fine
            raise
        finally:
            try:
                if not clean:  # a request or reply may be half-way: never use this socket again
                    await connection.disconnect(nowait=True)  # closes without waiting: no suspension
            finally:
                spare = lender.give_back(connection)
                if spare is not None:
                    await _arelease(pool, spare)

    async def _arun(self, name: str, root: str, args: list[str]) -> Any:
        with _cancellation_kept():
            return await self._arun_kept(name, root, args)

    async def _arun_kept(self, name: str, root: str, args: list[str]) -> Any:
        """:meth:`_arun`'s work: one script, one retry after a lost connection."""
        client, scripts, lender = await self._async_client()
        script = scripts[name]
        started = time.monotonic()
        first = root not in self._permitted
        if first:
            args[1] = self._config_first
        try:
            reply = await self._aevalsha(client, script, root, args, lender)
        except redis.ConnectionError as error:
            if _no_connection(error):
                raise _unavailable(error) from error
            # In place: a caller asking again (after draining a backlog) repeats the retry — the
            # first copy may still land — so it must carry the retry flag too.
            args[:] = self._retry_args(name, args, started, error)
            try:
                reply = await self._aevalsha(client, script, root, args, lender)
            except _ERRORS as again:
                raise _unavailable(again, error) from again
        except _ERRORS as error:
            raise _unavailable(error) from error
        if first:
            _remember(self._permitted, root)
        if self._in_doubt:
            await self._asettle_in_doubt(client, scripts, lender, root, args[0])
        if not self._eviction_checked:
            await self._acheck_eviction(client)
        return reply

    @contextlib.contextmanager
    def _trouble(self) -> Iterator[None]:
        """Plain commands' failures as StoreUnavailable (a cluster client's own breakage included)."""
        try:
            yield
        except StoreUnavailable:
            raise  # (said already: building the client failed)
        except _ERRORS as error:
            raise _unavailable(error) from error
        except Exception as error:
            if not self.cluster:
                raise
            raise _unavailable(_cluster_broke(error)) from error

    def _keyed(self, key: str, command: Callable[[Any], _T]) -> _T:
        """``command(client)``, one plain command on ``key`` (not a ledger script): on a cluster in a
        turn on the node serving ``key``, as every call there must take one (see _in_turn: a policy
        read or a listing beside busy ledger calls was refused MaxConnectionsError); every failure
        is StoreUnavailable."""
        with self._trouble():
            client = self._client
            return self._in_turn(client, key, lambda: command(client))

    async def _akeyed(self, key: str, command: Callable[[Any], Awaitable[_T]]) -> _T:
        """:meth:`_keyed` for asyncio."""
        client, _, lender = await self._async_client()
        with _cancellation_kept(), self._trouble():
            return await self._ain_turn(client, lender, key, lambda: command(client))

    # --- in-doubt holds --------------------------------------------------------------------------
    def _doubt(self, request: HoldRequest, error: BaseException) -> None:
        """Keep the id of a reserve that may have landed, to release it on the next good call: its
        reply was lost, or the asyncio task was cancelled while the request was on its way (nobody
        will ever see that reservation). Not with an idempotency key: the caller will retry with that
        key and must get the reservation back, not a released one (if it never retries, the TTL
        returns the hold)."""
        if not getattr(error, "maybe_sent", True) or request.idempotency_key is not None:
            return
        reservation_id = request.reservation_id
        with self._in_doubt_lock:
            if len(self._in_doubt) < _MAX_IN_DOUBT:
                self._in_doubt.add(reservation_id)

    def _take_in_doubt(self, root: str) -> list[str]:
        """Up to 32 in-doubt ids to release now. On a cluster only those of ``root``, whose node just
        answered: another tenant's node may be the one that is down, and trying it after every good
        call would add a timeout to each of them."""
        with self._in_doubt_lock:
            if self.cluster:  # ids are "<20 characters>.<root>": a slice, not a parse, per id
                taken = [rid for rid in self._in_doubt if rid[21:] == root][:32]
            else:
                taken = list(self._in_doubt)[:32]
            self._in_doubt.difference_update(taken)
            return taken

    def _settle_in_doubt(self, root: str, now: str) -> None:
        """Release holds whose reserve reply never came (the caller was denied): the store answers again."""
        taken = self._take_in_doubt(root)
        for done, rid in enumerate(taken):
            try:
                client, scripts = self._sync_client()
                root = root_of(rid)
                self._evalsha(client, scripts["release"], root, [now, *self._head(0.0)[1:], rid[:20]])
            except _ERRORS:
                with self._in_doubt_lock:
                    self._in_doubt.update(taken[done:])  # this one and the rest: the next call tries again
                return

    async def _asettle_in_doubt(
        self, client: Any, scripts: dict[str, Any], lender: AsyncLender, root: str, now: str
    ) -> None:
        taken = self._take_in_doubt(root)
        for done, rid in enumerate(taken):
            try:
                args = [now, *self._head(0.0)[1:], rid[:20]]
                await self._aevalsha(client, scripts["release"], root_of(rid), args, lender)
            except BaseException as error:  # unreachable, or the task was cancelled: keep the rest for later
                with self._in_doubt_lock:
                    self._in_doubt.update(taken[done:])
                if isinstance(error, _ERRORS):
                    return
                raise

    # --- roots registry --------------------------------------------------------------------------
    # The set of tenants (one key, on one node of a cluster) is read by sweep() and the listings.
    # Budgets are registered there before they are written; a reserve registers its tenant too, but
    # only as far as it can on a cluster: with that one node down, the tenants on the other nodes
    # must still be served. A failed registration is tried again on a later reserve, a few seconds on.
    _REGISTER_RETRY = 5.0

    def _register_now(self, root: str, required: bool) -> bool:
        """Whether to try registering ``root`` now (not after a recent failure, unless required)."""
        return root not in self._known_roots and (required or time.monotonic() >= self._register_after)

    def _skip_registration(self, required: bool) -> bool:
        """After a failed registration: go on without it (a reserve on a cluster, tried again a few
        seconds later), or not (a budget; or one Redis, where the call itself would fail the same way)."""
        if required or not self.cluster:
            return False
        self._register_after = time.monotonic() + self._REGISTER_RETRY
        return True

    def _register(self, root: str, required: bool = True) -> None:
        if self._register_now(root, required):
            try:
                self._keyed(self._roots_key, lambda client: client.sadd(self._roots_key, root))
            except StoreUnavailable:
                if self._skip_registration(required):
                    return
                raise
            _remember(self._known_roots, root)

    async def _aregister(self, root: str, required: bool = True) -> None:
        if self._register_now(root, required):
            try:
                await self._akeyed(self._roots_key, lambda client: client.sadd(self._roots_key, root))
            except StoreUnavailable:
                if self._skip_registration(required):
                    return
                raise
            _remember(self._known_roots, root)

    def _roots(self) -> list[str]:
        return sorted(self._keyed(self._roots_key, lambda client: client.smembers(self._roots_key)))

    # --- reservations ----------------------------------------------------------------------------
    def _hold_args(self, request: HoldRequest) -> list[str]:
        """Few, packed arguments: every argument costs an encode on the client and an object on the server."""
        return _HoldArgs(request, [
            _float(request.now),
            self._config,
            request.reservation_id[:20],
            _float(request.expires_at),
            request.idempotency_key or "",
            request.label,
            _windows_text(request.windows),
            " ".join(request.chain),
            ";".join(map(_plan_text, request.plans)),
            " ".join(request.probes),
            str(request.first_index),
            "0",  # the flag: +1 on our retry after a lost reply (only then may the id exist), +2 after a drain
        ])

    @staticmethod
    def _hold_result(request: HoldRequest, reply: str) -> HoldResult:
        kind, token, plan, expires_at, accounts_text, rejections_text = reply.split("\n")
        accounts = tuple(_states_of(accounts_text))
        rejections: tuple[Rejection, ...] = ()
        if rejections_text:
            f = rejections_text.split("|")
            rejections = tuple(
                Rejection(
                    int(f[i]), f[i + 1], f[i + 2], f[i + 3], f[i + 4], int(f[i + 5]), int(f[i + 6]), int(f[i + 7])
                )
                for i in range(0, len(f), 8)
            )
            if "budget_overage" in rejections_text:
                rejections = _exact_overage(rejections, accounts)
        if kind in ("denied", "backlog"):
            return HoldResult(None, -1, 0.0, accounts, rejections)
        rid = f"{token}.{request.chain[0]}"
        # 'replay_id' is this very call seen again after a lost reply: for the caller it is the first answer.
        return HoldResult(rid, int(plan), float(expires_at), accounts, rejections, replayed=kind == "replay_key")

    def hold(self, request: HoldRequest) -> HoldResult:
        root = request.chain[0]
        self._register(root, required=False)
        try:
            reply = self._run_drained("reserve", root, self._hold_args(request), request.now)
        except StoreUnavailable as error:
            self._doubt(request, error)
            raise
        return self._hold_result(request, reply)

    async def ahold(self, request: HoldRequest) -> HoldResult:
        root = request.chain[0]
        await self._aregister(root, required=False)
        try:
            reply = await self._arun_drained("reserve", root, self._hold_args(request), request.now)
        except (StoreUnavailable, asyncio.CancelledError) as error:
            self._doubt(request, error)
            raise
        return self._hold_result(request, reply)

    @staticmethod
    def _settled(reservation_id: str, reply: str) -> SettleResult:
        if reply == "notfound":
            raise ReservationNotFound(reservation_id)
        status, charged, flags, replayed = reply.split("\n")
        flagged = tuple(flags.split(",")) if flags else ()
        return SettleResult(reservation_id, status, _amounts(charged), flagged, replayed=replayed == "1")

    def _commit_args(self, reservation_id: str, actual: Amounts | None, now: float) -> list[str]:
        return [*self._head(now), reservation_id[:20], "-" if actual is None else _amounts_text(actual), "0"]

    def commit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        root = root_of(reservation_id)
        return self._settled(reservation_id, self._run("commit", root, self._commit_args(reservation_id, actual, now)))

    async def acommit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        root = root_of(reservation_id)
        args = self._commit_args(reservation_id, actual, now)
        return self._settled(reservation_id, await self._arun("commit", root, args))

    def release(self, reservation_id: str, now: float) -> SettleResult:
        root = root_of(reservation_id)
        return self._settled(reservation_id, self._run("release", root, [*self._head(now), reservation_id[:20]]))

    async def arelease(self, reservation_id: str, now: float) -> SettleResult:
        root = root_of(reservation_id)
        reply = await self._arun("release", root, [*self._head(now), reservation_id[:20]])
        return self._settled(reservation_id, reply)

    @staticmethod
    def _record(reservation_id: str, root: str, raw: str) -> ReservationRecord:
        """Parse the scripts' tab-separated record (see ``encode`` in common.lua); the label comes last."""
        status, plan, created, expires, settled, scope, amounts, holds_text, windows, committed, flags, key, label = (
            raw.split("\t", 12)
        )
        words = holds_text.split()
        holds = []
        for i in range(0, len(words), 2):
            hold_scope, unit, period, window = words[i].split("|")
            holds.append((hold_scope, unit, period, window, int(words[i + 1])))
        return ReservationRecord(
            id=reservation_id,
            scope=scope,
            root=root,
            status=status,
            plan_index=int(plan),
            amounts=_amounts(amounts),
            holds=tuple(holds),
            windows=_windows(windows),
            created_at=float(created),
            expires_at=float(expires),
            settled_at=float(settled) if settled else None,
            committed=_amounts(committed) if status == "committed" else None,
            flags=tuple(flags.split(",")) if flags else (),
            idempotency_key=key or None,
            label=label,
        )

    def _extended(self, reservation_id: str, root: str, reply: str) -> ReservationRecord:
        kind, _, rest = reply.partition("\n")
        if kind == "notfound":
            raise ReservationNotFound(reservation_id)
        if kind == "closed":
            raise ReservationClosed(reservation_id, rest)
        return self._record(reservation_id, root, rest)

    def _extend_args(self, reservation_id: str, expires_at: float, now: float) -> list[str]:
        return [*self._head(now), reservation_id[:20], _float(expires_at), f"expires_at={expires_at:.3f}", "0"]

    def extend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        root = root_of(reservation_id)
        reply = self._run("extend", root, self._extend_args(reservation_id, expires_at, now))
        return self._extended(reservation_id, root, reply)

    async def aextend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        root = root_of(reservation_id)
        reply = await self._arun("extend", root, self._extend_args(reservation_id, expires_at, now))
        return self._extended(reservation_id, root, reply)

    def reservation(self, reservation_id: str, now: float) -> ReservationRecord:
        root = root_of(reservation_id)
        reply = self._run("get", root, [*self._head(now), reservation_id[:20]])
        return self._extended(reservation_id, root, reply)

    async def areservation(self, reservation_id: str, now: float) -> ReservationRecord:
        root = root_of(reservation_id)
        reply = await self._arun("get", root, [*self._head(now), reservation_id[:20]])
        return self._extended(reservation_id, root, reply)

    def reservations(self, scope: str | None, status: str | None, limit: int, now: float) -> list[ReservationRecord]:
        roots = [parse_scope(scope).root] if scope is not None else self._roots()
        found: list[ReservationRecord] = []
        for root in roots:
            args = [*self._head(now), scope or "", status or "", str(limit)]
            reply = self._run_drained("list", root, args, now)
            found.extend(self._record(f"{reply[i]}.{root}", root, reply[i + 1]) for i in range(0, len(reply), 2))
        return heapq.nsmallest(limit, found, key=lambda r: (-r.created_at, r.id))

    # --- budgets ---------------------------------------------------------------------------------
    def _budget_args(
        self, scope: str, unit: str, period: str, limit: int, now: float, only_new: bool = False
    ) -> list[str]:
        detail = f"period={period or 'lifetime'}"
        return [*self._head(now), scope, unit, period, str(limit), detail, "1" if only_new else "0", "0"]

    def _write_budget(self, scope: str, args: list[str], now: float) -> Any:
        """Run set_budget for ``scope``'s tenant, registered first; registered again when the
        script answers 2 — the tenant's first budget id: a new tenant, or one whose keys Redis lost
        (a restart without persistence, a FLUSHALL), which this process registered before."""
        root = parse_scope(scope).root
        self._register(root)
        reply = self._run_drained("set_budget", root, args, now)
        if reply == 2:
            self._known_roots.discard(root)
            self._register(root, required=False)
        return reply

    async def _awrite_budget(self, scope: str, args: list[str], now: float) -> Any:
        root = parse_scope(scope).root
        await self._aregister(root)
        reply = await self._arun_drained("set_budget", root, args, now)
        if reply == 2:  # (see _write_budget)
            self._known_roots.discard(root)
            await self._aregister(root, required=False)
        return reply

    def set_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        self._write_budget(scope, self._budget_args(scope, unit, period, limit, now), now)

    async def aset_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        await self._awrite_budget(scope, self._budget_args(scope, unit, period, limit, now), now)

    def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        args = self._budget_args(scope, unit, period, limit, now, only_new=True)
        return bool(self._write_budget(scope, args, now))

    async def aensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        args = self._budget_args(scope, unit, period, limit, now, only_new=True)
        return bool(await self._awrite_budget(scope, args, now))

    # --- policy documents (global keys, tag "{~}") ------------------------------------------------
    def put_policy(self, document: str, now: float) -> int:
        return int(self._run("policy", _GLOBAL_ROOT, [*self._head(now), document]))

    def policy(self) -> tuple[int, str | None]:
        key = self._keys(_GLOBAL_ROOT)[0]
        version, document = self._keyed(key, lambda client: client.hmget(key, ["version", "document"]))
        return (int(version), document) if version else (0, None)

    def policy_version(self) -> int:
        key = self._keys(_GLOBAL_ROOT)[0]
        version = self._keyed(key, lambda client: client.hget(key, "version"))
        return int(version) if version else 0

    async def apolicy(self) -> tuple[int, str | None]:
        key = self._keys(_GLOBAL_ROOT)[0]
        version, document = await self._akeyed(key, lambda client: client.hmget(key, ["version", "document"]))
        return (int(version), document) if version else (0, None)

    async def apolicy_version(self) -> int:
        key = self._keys(_GLOBAL_ROOT)[0]
        version = await self._akeyed(key, lambda client: client.hget(key, "version"))
        return int(version) if version else 0

    def _remove_args(self, scope: str, unit: str, period: str, now: float) -> list[str]:
        return [*self._head(now), scope, unit, period, f"period={period or 'lifetime'}"]

    def remove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        root = parse_scope(scope).root
        return bool(self._run("remove_budget", root, self._remove_args(scope, unit, period, now)))

    async def aremove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        root = parse_scope(scope).root
        return bool(await self._arun("remove_budget", root, self._remove_args(scope, unit, period, now)))

    @staticmethod
    def _states(reply: str) -> list[AccountState]:
        states = _states_of(reply)
        states.sort(key=lambda s: (s.scope, s.unit, _PERIOD_ORDER.get(s.period, 9)))
        return states

    def accounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        text = _windows_text(windows)
        if scope is None:
            states: list[AccountState] = []
            for root in self._roots():
                states += self._states(self._run_drained("accounts", root, [*self._head(now), "", "1", text], now))
            return self._states_sorted(states)
        root = parse_scope(scope).root
        args = [*self._head(now), scope, "1" if subtree else "0", text]
        return self._states(self._run_drained("accounts", root, args, now))

    async def aaccounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        if scope is None:
            return await asyncio.to_thread(self.accounts, scope, windows, now, subtree)
        root = parse_scope(scope).root
        args = [*self._head(now), scope, "1" if subtree else "0", _windows_text(windows)]
        return self._states(await self._arun_drained("accounts", root, args, now))

    @staticmethod
    def _states_sorted(states: list[AccountState]) -> list[AccountState]:
        states.sort(key=lambda s: (s.scope, s.unit, _PERIOD_ORDER.get(s.period, 9)))
        return states

    # --- maintenance -----------------------------------------------------------------------------
    def sweep(self, now: float) -> int:
        """Every tenant in turn. A tenant that cannot be reached (its cluster node is down) does not
        stop the others: they are swept, then the failure is raised, naming how far it got."""
        expired = 0
        failed: list[str] = []
        first: StoreUnavailable | None = None
        dead_nodes: set[str] = set()  # on a cluster: a node that failed is not tried again per tenant
        for root in self._roots():
            node = self._node_of(root) if self.cluster else None
            if node is not None and node in dead_nodes:
                failed.append(root)
                continue
            try:
                expired += self._drain(root, now)
            except ClockSkew:
                raise  # this worker's clock, not a tenant's node: every other tenant would refuse it too
            except StoreUnavailable as error:
                failed.append(root)
                first = first or error
                if node is not None and isinstance(error.__cause__, redis.ConnectionError | redis.TimeoutError):
                    dead_nodes.add(node)  # the node, not this tenant's data: its other tenants would wait too
        if first is not None:
            shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            raise StoreUnavailable(
                f"sweep returned {expired} expired holds but could not reach {len(failed)} tenant(s): {shown} ({first})"
            ) from first
        return expired

    def _drain(self, root: str, now: float, *, expired_only: bool = False) -> int:
        """Reclaim a tenant's expired holds (and forget what is past retention) a batch per script
        call until none is left: each call stays short, so other tenants' calls go on in between.
        ``expired_only``: stop once the expired holds are done (expired holds come first; forgetting
        is lazy, a lookup never needs it). Returns how many holds expired."""
        expired = 0
        while True:
            count, due, forgotten = self._run("sweep", root, self._head(now))
            expired += int(count)
            if int(count) < self._batch and (expired_only or (int(due) < self._batch and int(forgotten) < self._batch)):
                return expired

    async def _adrain(self, root: str, now: float) -> int:
        """:meth:`_drain` for asyncio, the expired holds only."""
        expired = 0
        while True:
            count, _, _ = await self._arun("sweep", root, self._head(now))
            expired += int(count)
            if int(count) < self._batch:
                return expired

    def _run_drained(self, name: str, root: str, args: list[str], now: float) -> Any:
        """A script (reserve, accounts, list, set_budget) that answers 'backlog' when more expired holds wait
        than one call reclaims and they could matter (a reserve's denial, a balance, a listing):
        they are reclaimed (see :meth:`_drain`), then it is asked once more."""
        reply = self._run(name, root, args)
        if _backlog(reply):
            self._drain(root, now, expired_only=True)
            reply = _caught_up(self._run(name, root, _drained(name, args)), root)
        return reply

    async def _arun_drained(self, name: str, root: str, args: list[str], now: float) -> Any:
        """:meth:`_run_drained` for asyncio."""
        reply = await self._arun(name, root, args)
        if _backlog(reply):
            await self._adrain(root, now)
            reply = _caught_up(await self._arun(name, root, _drained(name, args)), root)
        return reply

    def _node_of(self, root: str) -> str | None:
        """The cluster node that holds a tenant's slot, as redis-py's slot table says (None: unknown)."""
        try:
            return str(self._client.get_node_from_key(self._keys(root)[0]).name)
        except Exception:  # no slot table yet, or a node without a known owner: just try the tenant
            return None

    async def asweep(self, now: float) -> int:
        return await asyncio.to_thread(self.sweep, now)

    def _read_stream(
        self, root: str, after: int, count: int, before: int | None = None, below: int = 0
    ) -> list[AuditEvent]:
        """Events after ``after``, oldest first; with ``before``, the newest ones below it, newest first;
        none at or past ``below`` (0: no bound)."""
        key = self._keys(root)[3]  # the audit stream
        start = "-" if after <= 0 else "(" + _stream_id(after)
        if before is None:
            end = "+" if below <= 0 else "(" + _stream_id(below)
            entries = self._keyed(key, lambda client: client.xrange(key, min=start, max=end, count=count))
        else:
            before = before if below <= 0 or 0 < before < below else below
            end = "+" if before <= 0 else "(" + _stream_id(before)
            entries = self._keyed(key, lambda client: client.xrevrange(key, max=end, min=start, count=count))
        return _events_of(root, entries)

    def _read_streams(self, roots: list[str], after: int, limit: int, newest: bool, below: int) -> list[AuditEvent]:
        """Every tenant's first (``newest``: last) ``limit`` events after ``after`` and below ``below``,
        read in pipelines of _STREAMS_PER_TRIP tenants: one round trip (per node, on a cluster) for
        each, not one per tenant (2,000 tenants cost a follower's poll 0.26 s one by one)."""
        found: list[AuditEvent] = []
        groups: dict[str | None, list[str]] = {}  # on a cluster by node: each pipeline in a turn on its node
        for root in roots:
            groups.setdefault(self._node_of(root) if self.cluster else None, []).append(root)
        chunks = [
            (node, group[first : first + _STREAMS_PER_TRIP])
            for node, group in groups.items()
            for first in range(0, len(group), _STREAMS_PER_TRIP)
        ]
        for node, chunk in chunks:
            start = "-" if after <= 0 else "(" + _stream_id(after)
            end = "+" if below <= 0 else "(" + _stream_id(below)
            with self._trouble():
                client = self._client
                pipe = client.pipeline(transaction=False)
                for root in chunk:
                    key = self._keys(root)[3]
                    if newest:
                        pipe.xrevrange(key, max=end, min=start, count=limit)
                    else:
                        pipe.xrange(key, min=start, max=end, count=limit)
                if self.cluster:
                    lender = self._lender_of_node(node or "?", self._lender.by_node, asynchronous=False)
                    replies = self._in_node_turn(lender, pipe.execute)
                else:
                    replies = pipe.execute()
            for root, entries in zip(chunk, replies, strict=True):
                found.extend(_events_of(root, entries))
            # Only the ``limit`` best so far are kept, and later tenants are read only past them. Never
            # split events of one seq (on a cluster two nodes may stamp one in the same microsecond):
            # a caller going on after the last seq would skip the one cut off. (A page then holds a
            # few more than ``limit``.)
            found.sort(key=lambda e: e.seq)
            if len(found) >= limit:
                if newest:
                    cut = len(found) - limit
                    while cut > 0 and found[cut - 1].seq == found[cut].seq:
                        cut -= 1
                    found = found[cut:]
                    after = max(after, found[0].seq - 1)
                else:
                    cut = limit
                    while cut < len(found) and found[cut].seq == found[cut - 1].seq:
                        cut += 1
                    found = found[:cut]
                    below = found[-1].seq + 1 if below <= 0 else min(below, found[-1].seq + 1)
        return found

    def _reading_began(self) -> int:
        """A seq below which every event that will ever be written already is: scripts run one at a
        time on a node and take their event ids from its clock (never below it), so one with an id
        below a node's TIME was written before that TIME. A cluster's nodes have clocks of their own:
        the least of its primaries' (an event of a node whose clock runs ahead waits for the others)."""
        if not self.cluster:
            seconds, micros = self._keyed(self._roots_key, lambda client: client.time())
            return (int(seconds) * 1_000_000 + int(micros)) * _SEQ_SPLIT
        least = None
        with self._trouble():
            client = self._client
            for node in client.get_primaries():  # each in a turn on its node, as every call takes one
                lender = self._lender_of_node(node.name, self._lender.by_node, asynchronous=False)
                seconds, micros = self._in_node_turn(lender, partial(client.time, target_nodes=node))
                seq = (int(seconds) * 1_000_000 + int(micros)) * _SEQ_SPLIT
                least = seq if least is None else min(least, seq)
        if least is None:
            raise StoreUnavailable("Redis Cluster: no primary known")
        return least

    def events(self, after: int, limit: int, scope: str | None, newest: bool = False) -> list[AuditEvent]:
        # Streams are read one after another: an event written meanwhile into one read already, with
        # a lower seq than one read later, would fall below the caller's next ``after`` (a follower
        # skipped it). So only events written before the reading began (the tenants listed after
        # it): see _reading_began. (After a server's clock steps back, new events wait until it
        # catches up.)
        if scope is None:  # every tenant's stream, whole (nothing to filter): pipelined
            below = self._reading_began()
            return self._read_streams([*self._roots(), _GLOBAL_ROOT], after, limit, newest, below)
        below = 0
        roots = [parse_scope(scope).root]
        found = []
        for root in roots:  # each tenant's stream, from its start or (newest) from its end, then merged
            cursor = after
            before = 0
            kept: list[AuditEvent] = []
            while len(kept) < limit:
                if newest:
                    page = self._read_stream(root, after, max(limit, 100), before=before, below=below)
                else:
                    page = self._read_stream(root, cursor, max(limit, 100), below=below)
                if not page:
                    break
                kept.extend(e for e in page if in_subtree(e.scope, scope))
                before = cursor = page[-1].seq
            found.extend(kept[:limit])
        found.sort(key=lambda e: e.seq)
        return found[-limit:] if newest else found[:limit]
