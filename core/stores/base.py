"""The store contract: the ledger behind an Authority.

Stores speak integers (smallest steps) and the records of :mod:`clearance.ledger`; every operation
is atomic on its own (one lock section in memory, one transaction on SQLite, one Lua script on
Redis). Every store passes the same contract suite (``tests/contract``).

Time comes from the caller (``now``), so a test can drive expiry with a fake clock and all workers
of one deployment agree on windows as far as their clocks agree.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from abc import ABC, abstractmethod
from typing import ClassVar

from clearance.errors import InvalidRequest
from clearance.ledger import (
    AccountState,
    Amounts,
    AuditEvent,
    HoldRequest,
    HoldResult,
    ReservationRecord,
    SettleResult,
)
from clearance.periods import Windows
from clearance.scope import parse_scope

_log = logging.getLogger("clearance")

DEFAULT_RETENTION = 48 * 3600.0
"""How long a settled or expired reservation is remembered (so a late commit is recorded once)."""

TEMPLATE_RECHECK = 60.0
"""Seconds until a template budget due to be forgotten, but with something still held on it, is
looked at again (see ``Store.ensure_budget``)."""


def template_refresh(retention: float) -> float:
    """How often, at most, the Authority ensures a template budget it keeps using again — an hour,
    an eighth of the retention if less — and so the margin a store keeps it by beyond a retention
    (see ``Store.ensure_budget``). It was kept only half a retention past the last refresh: a run
    paused a day got its per-run tool calls back though the docs promise a retention."""
    return min(3600.0, retention / 8)


_ID = re.compile(r"[0-9a-f]{20}\.(.*)", re.DOTALL)  # (one match: it is on every commit's path)


MAX_AUDIT_CAPACITY = 10**12
"""The most audit records a store may be asked to keep (Redis's ``XADD MAXLEN`` and SQLite take
64-bit integers: 2^63 was taken, then every write was applied and reported failed on Redis)."""

MAX_RETENTION = 10 * 366 * 86400.0
"""The longest ``retention``: ten years (a NaN was taken, and Redis's commit then wrote the
settlement and failed at the due index, the spend counted nowhere)."""


def audit_capacity_of(value: object) -> int:
    """A store's ``audit_capacity`` (how many audit records it keeps), checked: a whole number in
    [1, ``MAX_AUDIT_CAPACITY``]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AUDIT_CAPACITY:
        raise InvalidRequest(f"audit_capacity must be a whole number in [1, {MAX_AUDIT_CAPACITY:,}], got {value!r}")
    return value


def retention_of(value: object) -> float:
    """A store's ``retention`` (seconds a settled reservation is remembered), checked: a number in
    (0, ``MAX_RETENTION``] — never NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_RETENTION:
        raise InvalidRequest(f"retention must be a number of seconds in (0, {MAX_RETENTION:.0f}], got {value!r}")
    return float(value)


def root_of(reservation_id: str) -> str:
    """The root scope encoded in a reservation id (``<hex>.<root>``), validating its shape."""
    if not isinstance(reservation_id, str):
        raise InvalidRequest(f"a reservation id must be a string, got {type(reservation_id).__name__}")
    match = _ID.fullmatch(reservation_id)
    root = match.group(1) if match else ""
    if ":" not in root:
        raise InvalidRequest(f"malformed reservation id {reservation_id[:80]!r}")
    scope = parse_scope(root)
    if len(scope.chain) != 1:
        raise InvalidRequest(f"malformed reservation id {reservation_id[:80]!r}")
    return root


class _Handoff:
    """One hold run in a worker thread for an awaiting task, and what becomes of it if the task is
    cancelled first: whichever of the two comes second (the hold landing, the task giving up)
    releases it, so the release never waits on the event loop (it may be closing)."""

    __slots__ = ("_abandoned", "_landed", "_lock", "_request", "_store")

    def __init__(self, store: Store, request: HoldRequest) -> None:
        self._store, self._request = store, request
        self._lock = threading.Lock()
        self._abandoned = False
        self._landed: HoldResult | None = None

    def hold(self) -> HoldResult:
        result = self._store.hold(self._request)
        with self._lock:
            self._landed = result
            abandoned = self._abandoned
        if abandoned:
            self._release(result)
        return result

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            landed = self._landed
        if landed is not None and landed.reservation_id is not None:  # landed, unheard: not on the event loop
            threading.Thread(target=self._release, args=(landed,), name="clearance-release", daemon=True).start()

    def _release(self, result: HoldResult) -> None:
        """(Requests without an idempotency key only: see Store.ahold.)"""
        if result.reservation_id is None:
            return  # denied: nothing held
        try:
            self._store.release(result.reservation_id, self._request.now)
        except Exception:  # the store in trouble: the hold returns at its TTL all the same
            _log.warning("clearance: could not release the hold of a cancelled reserve", exc_info=True)


class Store(ABC):
    """Base class of ledger backends. Subclasses implement the sync face; the async face runs it
    in a worker thread unless a backend has a native one (Redis)."""

    scheme: ClassVar[str] = ""
    url: str = ""
    _retention: float = DEFAULT_RETENTION

    @property
    def retention(self) -> float:
        """Seconds a settled reservation is remembered (and a template budget kept unused)."""
        return self._retention

    # --- reservations -------------------------------------------------------------------------
    @abstractmethod
    def hold(self, request: HoldRequest) -> HoldResult:
        """Atomically hold the first plan that fits every budget on the chain, or none."""

    @abstractmethod
    def commit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        """Settle ``actual`` and free the rest of the hold. A unit the reservation held but
        ``actual`` does not name is settled at its held amount (``None``: every unit as held), so a
        commit that reports only ``usd`` still counts the ``calls`` and rate units it held."""

    @abstractmethod
    def release(self, reservation_id: str, now: float) -> SettleResult:
        """Free the whole hold; idempotent."""

    @abstractmethod
    def extend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        """Push a held reservation's expiry to ``expires_at`` (one already later is left as it is:
        an extend never shortens a hold)."""

    @abstractmethod
    def reservation(self, reservation_id: str, now: float) -> ReservationRecord:
        """One reservation, whatever its status (``ReservationNotFound`` if unknown)."""

    @abstractmethod
    def reservations(self, scope: str | None, status: str | None, limit: int, now: float) -> list[ReservationRecord]:
        """Reservations at or under ``scope`` (all when ``None``), newest first."""

    # --- budgets ------------------------------------------------------------------------------
    @abstractmethod
    def set_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        """Create or change a budget's limit (counters are kept)."""

    @abstractmethod
    def remove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        """Remove a budget; its level no longer constrains that unit. False if there was none."""

    @abstractmethod
    def accounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        """Budgets at ``scope`` (or under it with ``subtree``; every budget when ``None``), each with
        its current window's counters, expired holds reclaimed first."""

    # --- maintenance --------------------------------------------------------------------------
    @abstractmethod
    def sweep(self, now: float) -> int:
        """Return every expired hold to its budgets and forget reservations past retention.
        Returns how many holds expired."""

    @abstractmethod
    def events(self, after: int, limit: int, scope: str | None, newest: bool = False) -> list[AuditEvent]:
        """Audit records with ``seq > after``, oldest first: the first ``limit`` of them, or with
        ``newest`` the last ``limit`` (read from the end, not by walking the whole trail)."""

    # --- budget templates and policy documents ---------------------------------------------
    def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        """Create the budget only if that (scope, unit, period) has none; True if it was created.
        Policies use it for per-run budgets (templates), so an operator's own change is never undone.

        A budget made here is a *template* budget: a run's, and a run has no end the ledger could
        see, so without more the ledger would keep every run's budget and counters for good. It is
        kept until ``now + retention + 2 * template_refresh(retention)``, pushed that far again by
        a later call once less than ``retention + template_refresh(retention)`` is left (the
        Authority calls again at least every ``template_refresh`` while it keeps using the budget:
        so it is kept at least a whole retention past its last use), and then forgotten — budget,
        counters, everything — by the store's maintenance once that time has passed with nothing
        held on it (a hold still there puts it off by ``TEMPLATE_RECHECK``).
        ``set_budget`` on a template budget makes it an operator's, kept like any other."""
        raise NotImplementedError(f"{type(self).__name__} does not support budget templates yet")

    def put_policy(self, document: str, now: float) -> int:
        """Store a policy document (JSON) as the next version; returns that version."""
        raise NotImplementedError(f"{type(self).__name__} does not store policies yet")

    def policy(self) -> tuple[int, str | None]:
        """The current policy version and document (``(0, None)`` when none was ever applied)."""
        raise NotImplementedError(f"{type(self).__name__} does not store policies yet")

    def policy_version(self) -> int:
        """The current policy version alone: cheap, checked by workers to pick up new policies."""
        return self.policy()[0]

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    # --- async face (worker thread by default) ----------------------------------------------
    async def ahold(self, request: HoldRequest) -> HoldResult:
        """The hold in a worker thread. A task cancelled meanwhile (``asyncio.wait_for`` around an
        agent step, say) cannot stop the thread: the hold lands and nobody will ever see its id, so
        it is released as soon as it lands instead of waiting out its TTL — unless the request has
        an idempotency key (a retry with it gets that reservation) or found an earlier one."""
        if request.idempotency_key is not None:  # a retry with the key gets the hold: nothing to release
            return await asyncio.to_thread(self.hold, request)
        handoff = _Handoff(self, request)
        try:
            return await asyncio.to_thread(handoff.hold)
        except asyncio.CancelledError:
            handoff.abandon()
            raise

    async def acommit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        return await asyncio.to_thread(self.commit, reservation_id, actual, now)

    async def arelease(self, reservation_id: str, now: float) -> SettleResult:
        return await asyncio.to_thread(self.release, reservation_id, now)

    async def aextend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        return await asyncio.to_thread(self.extend, reservation_id, expires_at, now)

    async def aset_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        await asyncio.to_thread(self.set_budget, scope, unit, period, limit, now)

    async def aremove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        return await asyncio.to_thread(self.remove_budget, scope, unit, period, now)

    async def aaccounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        return await asyncio.to_thread(self.accounts, scope, windows, now, subtree)

    async def areservation(self, reservation_id: str, now: float) -> ReservationRecord:
        return await asyncio.to_thread(self.reservation, reservation_id, now)

    async def asweep(self, now: float) -> int:
        return await asyncio.to_thread(self.sweep, now)

    async def areservations(
        self, scope: str | None, status: str | None, limit: int, now: float
    ) -> list[ReservationRecord]:
        return await asyncio.to_thread(self.reservations, scope, status, limit, now)

    async def aevents(self, after: int, limit: int, scope: str | None, newest: bool = False) -> list[AuditEvent]:
        return await asyncio.to_thread(self.events, after, limit, scope, newest)

    async def aput_policy(self, document: str, now: float) -> int:
        return await asyncio.to_thread(self.put_policy, document, now)

    async def aensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        return await asyncio.to_thread(self.ensure_budget, scope, unit, period, limit, now)

    async def apolicy(self) -> tuple[int, str | None]:
        return await asyncio.to_thread(self.policy)

    async def apolicy_version(self) -> int:
        return await asyncio.to_thread(self.policy_version)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


def in_subtree(path: str, scope: str | None) -> bool:
    """True when ``path`` is ``scope`` or below it (every path when ``scope`` is None)."""
    return scope is None or path == scope or path.startswith(scope + "/")
