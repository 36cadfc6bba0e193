"""The in-memory store: one process, many threads and asyncio tasks.

Every operation is one section under one lock, so the ladder, the holds and the audit record of
a call are a single atomic step. Nothing survives the process; use it for tests, single-process
services and as the reference behaviour of the contract suite.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from typing import ClassVar

from clearance.errors import ReservationClosed, ReservationNotFound
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
)
from clearance.periods import Windows
from clearance.stores.base import DEFAULT_RETENTION, Store, in_subtree, root_of

_AccountKey = tuple[str, str, str, str]  # scope, unit, period, window


class _Reservation:
    """Mutable twin of :class:`ReservationRecord` (cheaper to update under the lock)."""

    __slots__ = (
        "amounts",
        "chain",
        "committed",
        "created_at",
        "expires_at",
        "flags",
        "holds",
        "id",
        "idem",
        "label",
        "plan_index",
        "root",
        "scope",
        "settled_at",
        "status",
        "windows",
    )

    def __init__(
        self, request: HoldRequest, plan_index: int, holds: tuple[tuple[str, str, str, str, int], ...]
    ) -> None:
        self.id = request.reservation_id
        self.chain = request.chain
        self.scope = request.chain[-1]
        self.root = request.chain[0]
        self.status = HELD
        self.plan_index = plan_index
        self.amounts = request.plans[plan_index].amounts
        self.holds = holds
        self.windows = request.windows
        self.created_at = request.now
        self.expires_at = request.expires_at
        self.settled_at: float | None = None
        self.committed: Amounts | None = None
        self.flags: tuple[str, ...] = ()
        self.idem = request.idempotency_key
        self.label = request.label

    def record(self) -> ReservationRecord:
        return ReservationRecord(
            id=self.id,
            scope=self.scope,
            root=self.root,
            status=self.status,
            plan_index=self.plan_index,
            amounts=self.amounts,
            holds=self.holds,
            windows=self.windows,
            created_at=self.created_at,
            expires_at=self.expires_at,
            settled_at=self.settled_at,
            committed=self.committed,
            flags=self.flags,
            idempotency_key=self.idem,
            label=self.label,
        )


class MemoryStore(Store):
    """``memory://`` — the ledger in this process's memory."""

    scheme: ClassVar[str] = "memory"

    def __init__(self, *, retention: float = DEFAULT_RETENTION, audit_capacity: int = 100_000) -> None:
        self.url = "memory://"
        self._lock = threading.Lock()
        self._budgets: dict[str, dict[tuple[str, str], int]] = {}  # scope -> (unit, period) -> limit
        self._counters: dict[_AccountKey, list[int]] = {}  # -> [spent, held]
        self._reservations: dict[str, _Reservation] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, id) for held reservations
        self._forget: list[tuple[float, str]] = []  # heap of (forget_at, id) for settled ones
        self._retention = retention
        self._audit: deque[AuditEvent] = deque(maxlen=audit_capacity)
        self._seq = 0

    # --- helpers (call with the lock held) -----------------------------------------------------
    def _log(
        self, now: float, kind: str, scope: str, rid: str | None = None, amounts: Amounts = (), detail: str = ""
    ) -> None:
        self._seq += 1
        self._audit.append(AuditEvent(self._seq, now, kind, scope, rid, amounts, detail))

    def _get(self, reservation_id: str) -> _Reservation:
        res = self._reservations.get(reservation_id)
        if res is None:
            root_of(reservation_id)  # a malformed id is InvalidRequest, a well-formed unknown one is not found
            raise ReservationNotFound(reservation_id)
        return res

    def _unhold(self, res: _Reservation) -> None:
        for scope, unit, period, window, steps in res.holds:
            self._counters[(scope, unit, period, window)][1] -= steps

    def _settle(self, res: _Reservation, status: str, now: float) -> None:
        res.status = status
        res.settled_at = now
        heapq.heappush(self._forget, (now + self._retention, res.id))

    def _reclaim(self, now: float) -> int:
        expired = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, rid = heapq.heappop(heap)
            res = self._reservations.get(rid)
            if res is None or res.status != HELD or res.expires_at > now:
                continue  # settled, or extended (a newer heap entry exists)
            self._unhold(res)
            self._settle(res, EXPIRED, now)
            self._log(now, "expire", res.scope, rid, res.amounts)
            expired += 1
        forget = self._forget
        while forget and forget[0][0] <= now:
            _, rid = heapq.heappop(forget)
            res = self._reservations.pop(rid, None)
            if res is not None and res.idem is not None:
                self._idempotency.pop((res.root, res.idem), None)
        return expired

    def _states(self, chain: tuple[str, ...], units: set[str], windows: dict[str, str]) -> list[AccountState]:
        states: list[AccountState] = []
        for scope in chain:
            budgets = self._budgets.get(scope)
            if not budgets:
                continue
            for (unit, period), limit in budgets.items():
                if unit in units:
                    window = windows[period]
                    counters = self._counters.get((scope, unit, period, window))
                    spent, held = (counters[0], counters[1]) if counters else (0, 0)
                    states.append(AccountState(scope, unit, period, window, limit, spent, held))
        return states

    # --- reservations --------------------------------------------------------------------------
    def hold(self, request: HoldRequest) -> HoldResult:
        with self._lock:
            self._reclaim(request.now)
            if request.idempotency_key is not None:
                existing = self._idempotency.get((request.chain[0], request.idempotency_key))
                if existing is not None:
                    return self._replay(self._reservations[existing], request)
            units = {unit for plan in request.plans for unit, _ in plan.amounts}
            states = self._states(request.chain, units, dict(request.windows))
            choice = choose_plan(request.plans, request.chain, states)
            if choice.plan_index < 0:
                return HoldResult(None, -1, 0.0, tuple(states), tuple(choice.rejections))
            added: dict[_AccountKey, int] = {}
            for account, steps in choice.holds:
                key = (account.scope, account.unit, account.period, account.window)
                counters = self._counters.get(key)
                if counters is None:
                    counters = self._counters[key] = [0, 0]
                counters[1] += steps
                added[key] = steps
            res = _Reservation(request, choice.plan_index, tuple((*key, steps) for key, steps in added.items()))
            rid = res.id
            self._reservations[rid] = res
            heapq.heappush(self._expiry, (res.expires_at, rid))
            if res.idem is not None:
                self._idempotency[(res.root, res.idem)] = rid
            self._log(request.now, "hold", res.scope, rid, res.amounts, f"plan={choice.plan_index}")
            after = tuple(
                AccountState(
                    s.scope,
                    s.unit,
                    s.period,
                    s.window,
                    s.limit,
                    s.spent,
                    s.held + added.get((s.scope, s.unit, s.period, s.window), 0),
                )
                for s in states
            )
            return HoldResult(rid, choice.plan_index, res.expires_at, after, tuple(choice.rejections))

    def _replay(self, res: _Reservation, request: HoldRequest) -> HoldResult:
        units = {unit for unit, _ in res.amounts}
        states = self._states(request.chain, units, dict(res.windows))
        return HoldResult(res.id, res.plan_index, res.expires_at, tuple(states), (), replayed=True)

    def commit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        with self._lock:
            res = self._get(reservation_id)
            self._reclaim(now)
            if res.status == COMMITTED:
                return SettleResult(res.id, COMMITTED, res.committed or (), res.flags, replayed=True)
            prior = res.status
            if actual is None:
                actual = res.amounts
            if prior == HELD:
                self._unhold(res)
            flags = commit_flags(prior, res.amounts, actual)
            windows = dict(res.windows)
            over = False
            for unit, steps in actual:
                if not steps:
                    continue
                for scope in res.chain:
                    for (b_unit, period), limit in self._budgets.get(scope, {}).items():
                        if b_unit != unit:
                            continue
                        key = (scope, unit, period, windows[period])
                        counters = self._counters.get(key)
                        if counters is None:
                            counters = self._counters[key] = [0, 0]
                        counters[0] += steps
                        if counters[0] + counters[1] > limit:
                            over = True
            if over:
                flags.append(OVER_LIMIT)
            res.committed = actual
            res.flags = tuple(flags)
            self._settle(res, COMMITTED, now)
            self._log(now, "commit", res.scope, res.id, actual, ",".join(flags))
            return SettleResult(res.id, COMMITTED, actual, res.flags)

    def release(self, reservation_id: str, now: float) -> SettleResult:
        with self._lock:
            res = self._get(reservation_id)
            self._reclaim(now)
            if res.status != HELD:
                return SettleResult(res.id, res.status, (), res.flags, replayed=True)
            self._unhold(res)
            self._settle(res, RELEASED, now)
            self._log(now, "release", res.scope, res.id, res.amounts)
            return SettleResult(res.id, RELEASED)

    def extend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        with self._lock:
            res = self._get(reservation_id)
            self._reclaim(now)
            if res.status != HELD:
                raise ReservationClosed(res.id, res.status)
            res.expires_at = expires_at
            heapq.heappush(self._expiry, (expires_at, res.id))
            self._log(now, "extend", res.scope, res.id, (), f"expires_at={expires_at:.3f}")
            return res.record()

    def reservation(self, reservation_id: str, now: float) -> ReservationRecord:
        with self._lock:
            res = self._get(reservation_id)
            self._reclaim(now)
            return res.record()

    def reservations(self, scope: str | None, status: str | None, limit: int, now: float) -> list[ReservationRecord]:
        with self._lock:
            self._reclaim(now)
            found = [
                r
                for r in self._reservations.values()
                if (status is None or r.status == status) and in_subtree(r.scope, scope)
            ]
            found.sort(key=lambda r: r.created_at, reverse=True)
            return [r.record() for r in found[:limit]]

    # --- budgets -------------------------------------------------------------------------------
    def set_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        with self._lock:
            self._budgets.setdefault(scope, {})[(unit, period)] = limit
            self._log(now, "budget_set", scope, None, ((unit, limit),), f"period={period or 'lifetime'}")

    def remove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        with self._lock:
            budgets = self._budgets.get(scope)
            if not budgets or (unit, period) not in budgets:
                return False
            del budgets[(unit, period)]
            if not budgets:
                del self._budgets[scope]
            self._log(now, "budget_remove", scope, None, ((unit, 0),), f"period={period or 'lifetime'}")
            return True

    def accounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        with self._lock:
            self._reclaim(now)
            window_of = dict(windows)
            states: list[AccountState] = []
            for path, budgets in sorted(self._budgets.items()):
                if not (path == scope if not subtree else in_subtree(path, scope)):
                    continue
                for (unit, period), limit in sorted(budgets.items()):
                    window = window_of[period]
                    spent, held = self._counters.get((path, unit, period, window), (0, 0))
                    states.append(AccountState(path, unit, period, window, limit, spent, held))
            return states

    # --- maintenance ---------------------------------------------------------------------------
    def sweep(self, now: float) -> int:
        with self._lock:
            return self._reclaim(now)

    def events(self, after: int, limit: int, scope: str | None) -> list[AuditEvent]:
        with self._lock:
            found: list[AuditEvent] = []
            for event in self._audit:
                if event.seq > after and in_subtree(event.scope, scope):
                    found.append(event)
                    if len(found) >= limit:
                        break
            return found

    # In-process and non-blocking: the async face calls straight through (no thread hop).
    async def ahold(self, request: HoldRequest) -> HoldResult:
        return self.hold(request)

    async def acommit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        return self.commit(reservation_id, actual, now)

    async def arelease(self, reservation_id: str, now: float) -> SettleResult:
        return self.release(reservation_id, now)

    async def aextend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        return self.extend(reservation_id, expires_at, now)

    async def aset_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        self.set_budget(scope, unit, period, limit, now)

    async def aremove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        return self.remove_budget(scope, unit, period, now)

    async def aaccounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        return self.accounts(scope, windows, now, subtree)

    async def areservation(self, reservation_id: str, now: float) -> ReservationRecord:
        return self.reservation(reservation_id, now)

    async def asweep(self, now: float) -> int:
        return self.sweep(now)

    async def aclose(self) -> None:
        self.close()
