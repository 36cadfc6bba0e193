"""The in-memory store: one process, many threads and asyncio tasks.

Every operation is one section under one lock, so the ladder, the holds and the audit record of
a call are a single atomic step. Nothing survives the process; use it for tests, single-process
services and as the reference behaviour of the contract suite.

Layout, chosen for the hot path: each budget is an object holding its counters per window
(``[spent, held]`` lists); a reservation keeps direct references to the counter lists it holds, so
settling it touches no dictionary at all.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

from clearance.errors import ReservationClosed, ReservationNotFound
from clearance.ledger import (
    CLOSED_WINDOW_SPENT,
    COMMITTED,
    EXPIRED,
    HELD,
    OVER_HOLD,
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
from clearance.periods import WINDOWS_KEPT, Windows
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


def _states_after(after: list[tuple[str, str, str, str, int, int, int]]) -> tuple[AccountState, ...]:
    """The AccountStates of a fitting pass's snapshot (built only when a caller reads the headroom)."""
    return tuple([new_account_state(AccountState, fields) for fields in after])


class _Budget:
    __slots__ = ("counters", "held_seen", "limit", "period", "pruned", "scope", "unit", "until")

    def __init__(self, scope: str, unit: str, period: str, limit: int) -> None:
        self.scope = scope
        self.unit = unit
        self.period = period
        self.limit = limit
        self.until: float | None = None  # a template's (ensure_budget): forgotten once idle past this
        self.held_seen = False  # a template found with a hold when its time came (see _forget_template)
        self.counters: dict[str, list[int]] = {}  # window -> [spent, held]
        self.pruned = ""  # the newest window pruned so far ("": none)

    def holding(self) -> bool:
        """Whether something is held on it, in any window."""
        return any(held for _, held in self.counters.values())

    def window(self, window: str, *, charging: bool = False) -> list[int]:
        """The counters [spent, held] of ``window``. ``charging``: for a commit, not a hold."""
        counters = self.counters.get(window)
        if counters is None:
            pruned = self.pruned
            if (pruned and window <= pruned) or (len(self.counters) >= WINDOWS_KEPT and window < min(self.counters)):
                # A window pruned already, or older than every window kept (a clock stepped back
                # more than 8 periods): its counts may be gone with it. A hold there finds it closed
                # rather than empty: nothing fits, denied as overage. A late commit there is
                # recorded (reservation, audit) against counters of its own that are not kept —
                # opening the window again would push out a newer one, or count from zero.
                return [0, 0] if charging else [CLOSED_WINDOW_SPENT, 0]
            if len(self.counters) >= WINDOWS_KEPT:
                # A period budget opens a window per minute/hour/...: without pruning a long-lived
                # process keeps them all. The oldest windows with nothing held in them go (window
                # names sort in time order) until 8 are left — only windows older than the one
                # opening, so never the current one, even when late commits re-open old windows. A
                # window something is held in stays until that settles, as on SQLite and Redis: a
                # commit that looks its window up (the general path, after a budget change) must
                # find the counters it is compared with, or its overage goes unflagged.
                free = sorted(name for name, (_, held) in self.counters.items() if held == 0 and name < window)
                for name in free[: len(self.counters) - WINDOWS_KEPT + 1]:
                    del self.counters[name]
                    self.pruned = max(self.pruned, name)
            counters = self.counters[window] = [0, 0]
        return counters


class _Reservation:
    """A reservation; ``holds`` point straight at the counters they hold.

    What never changes lives in one flat tuple of strings and numbers, which the garbage collector
    stops tracking; settling drops the holds. A store keeps settled reservations for the retention
    window, so this keeps them from slowing every collection down."""

    __slots__ = (
        "budgets",
        "committed",
        "expires_at",
        "fixed",
        "flags",
        "holds",
        "id",
        "plan_index",
        "settled_at",
        "status",
    )

    def __init__(
        self, request: HoldRequest, plan_index: int, holds: list[tuple[_Budget, str, list[int], int]], budgets: int
    ) -> None:
        self.id = request.reservation_id
        self.budgets = budgets  # the store's budget version at hold time
        # (chain, amounts, windows, created_at, idempotency key, label)
        self.fixed = (
            request.chain,
            request.plans[plan_index].amounts,
            request.windows,
            request.now,
            request.idempotency_key,
            request.label,
        )
        self.status = HELD
        self.plan_index = plan_index + request.first_index  # (in the decision's ladder)
        self.holds: Sequence[tuple[_Budget, str, list[int], int]] = holds
        self.expires_at = request.expires_at
        self.settled_at: float | None = None
        self.committed: Amounts | None = None
        self.flags: tuple[str, ...] = ()

    @property
    def chain(self) -> tuple[str, ...]:
        return self.fixed[0]

    @property
    def amounts(self) -> Amounts:
        return self.fixed[1]

    @property
    def windows(self) -> Windows:
        return self.fixed[2]

    @property
    def created_at(self) -> float:
        return self.fixed[3]

    @property
    def idem(self) -> str | None:
        return self.fixed[4]

    @property
    def scope(self) -> str:
        return self.fixed[0][-1]

    @property
    def root(self) -> str:
        return self.fixed[0][0]

    def packed_as(self, status: str, settled_at: float, committed: Amounts | None, flags: tuple[str, ...]) -> _Packed:
        """:meth:`pack` as it will be once settled so (nothing changes here: see ``MemoryStore._settle``)."""
        return (
            self.id, self.fixed, status, self.plan_index, self.expires_at, settled_at, committed, flags, self.budgets
        )

    def pack(self) -> _Packed:
        """A settled reservation as a flat tuple of strings, numbers and tuples of them, which the
        garbage collector stops tracking: the store keeps settled reservations for the whole retention
        window, and objects it had to walk on every collection would slow every call down."""
        return (
            self.id,
            self.fixed,
            self.status,
            self.plan_index,
            self.expires_at,
            self.settled_at,
            self.committed,
            self.flags,
            self.budgets,
        )

    @classmethod
    def unpack(cls, packed: _Packed) -> _Reservation:
        res = cls.__new__(cls)
        (
            res.id,
            res.fixed,
            res.status,
            res.plan_index,
            res.expires_at,
            res.settled_at,
            res.committed,
            res.flags,
            res.budgets,
        ) = packed
        res.holds = ()
        return res

    def record(self) -> ReservationRecord:
        return ReservationRecord(
            id=self.id,
            scope=self.scope,
            root=self.root,
            status=self.status,
            plan_index=self.plan_index,
            amounts=self.amounts,
            holds=tuple((b.scope, b.unit, b.period, window, steps) for b, window, _, steps in self.holds if steps),
            windows=self.windows,
            created_at=self.created_at,
            expires_at=self.expires_at,
            settled_at=self.settled_at,
            committed=self.committed,
            flags=self.flags,
            idempotency_key=self.idem,
            label=self.fixed[5],
        )


_Packed = tuple[str, tuple[Any, ...], str, int, float, "float | None", "Amounts | None", tuple[str, ...], int]


def _remembered_from(packed: _Packed) -> float:
    """When a settled reservation's retention starts: its expiry if it expired (reclaiming is lazy,
    and when it happens differs by store: the expiry is the same everywhere), else its settle."""
    return packed[4] if packed[2] == EXPIRED else packed[5] or 0.0


def _give_back(holds: list[tuple[_Budget, str, list[int], int]]) -> None:
    """Lower the counters ``holds`` raised, emptying it as it goes (an interrupt midway leaves in it
    exactly what is still to give back: see MemoryStore._end_hold)."""
    while holds:
        entry = holds[-1]
        entry[2][1] -= entry[3]
        holds.pop()


class MemoryStore(Store):
    """``memory://`` — the ledger in this process's memory."""

    scheme: ClassVar[str] = "memory"

    def __init__(self, *, retention: float = DEFAULT_RETENTION, audit_capacity: int = 100_000) -> None:
        audit_capacity = audit_capacity_of(audit_capacity)
        retention = retention_of(retention)
        self.url = "memory://"
        self._lock = threading.Lock()
        self._levels: dict[str, dict[tuple[str, str], _Budget]] = {}  # scope -> (unit, period) -> budget
        # tenant -> its scopes in _levels: a listing under a scope looks at its tenant's alone (looking
        # at every tenant's, under the store's lock, stalled every call once budgets ran to 100,000s).
        self._tenant_scopes: dict[str, set[str]] = {}
        self._parked: dict[tuple[str, str, str], _Budget] = {}  # removed budgets, kept for their counters
        self._budget_version = 0  # bumped whenever a budget is created or removed
        self._templates: list[tuple[float, str, str, str]] = []  # heap of (until, scope, unit, period)
        self._reservations: dict[str, _Reservation | _Packed] = {}  # settled ones packed (see pack())
        self._idempotency: dict[tuple[str, str], str] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, id) for held reservations
        self._held = 0  # how many reservations are held (the heap also has settled ones until compacted)
        # Settled ones to forget, oldest first: forget_at time, id, time, id, ... in one deque (floats
        # and strings are not tracked by the garbage collector; a tuple per reservation would be; two
        # deques got out of step for good after one interrupt between their appends, and nothing was
        # forgotten again). The retention is the same for all, so settling order is forgetting order;
        # a settle stamped a little earlier than the one before it (threads), or an expiry reclaimed
        # late (its retention runs from the expiry), is dropped that little later — looked up, it is
        # forgotten on time.
        self._forgetting: deque[float | str] = deque()
        self._retention = retention
        # Raw tuples (seq, at, kind, scope, id, amounts, detail); AuditEvents are built when read.
        self._audit: deque[tuple[int, float, str, str, str | None, Amounts, str]] = deque(maxlen=audit_capacity)
        self._seq = 0
        self._policy: tuple[int, str | None] = (0, None)
        self._window_map: tuple[Windows, dict[str, str]] = ((), {})  # (windows, the same as a dict)
        # chain -> (windows, its budgets root first with their counters), see _refs_of
        self._chain_budgets_cache: dict[tuple[str, ...], tuple[Windows, list[tuple[_Budget, str, list[int]]]]] = {}
        self._cache_version = 0

    # --- helpers (call with the lock held) -----------------------------------------------------
    def _log(self, at: float, kind: str, scope: str, rid: str | None, amounts: Amounts, detail: str = "") -> None:
        self._seq += 1
        self._audit.append((self._seq, at, kind, scope, rid, amounts, detail))

    def _kept(self, reservation_id: str, now: float) -> _Reservation | None:
        """The reservation, or ``None`` if unknown or settled more than retention ago: forgotten on
        the spot then (its idempotency key freed), whether or not _reclaim's queue has reached it —
        lazy, like expiry (settles out of order, or a clock stepped back, put it behind another)."""
        res = self._reservations.get(reservation_id)
        if isinstance(res, tuple):
            if _remembered_from(res) + self._retention > now:
                return _Reservation.unpack(res)
            self._forget(reservation_id, res[1])
            return None
        return res

    def _forget(self, reservation_id: str, fixed: tuple[Any, ...]) -> None:
        """Forget a settled reservation: its record, and its idempotency key if still its own."""
        del self._reservations[reservation_id]
        if fixed[4] is not None and self._idempotency.get((fixed[0][0], fixed[4])) == reservation_id:
            del self._idempotency[(fixed[0][0], fixed[4])]

    def _get(self, reservation_id: str, now: float) -> _Reservation:
        res = self._kept(reservation_id, now)
        if res is None:
            root_of(reservation_id)  # a malformed id is InvalidRequest; a well-formed unknown one is not found
            raise ReservationNotFound(reservation_id)
        return res

    def _known(self, res: _Reservation) -> None:
        """``ReservationNotFound`` for a hold the reclaim just before expired a retention after its
        expiry (no call came meanwhile): forgotten, as if it had been reclaimed on time."""
        if res.id not in self._reservations:
            raise ReservationNotFound(res.id)

    def _map(self, windows: Windows) -> dict[str, str]:
        cached = self._window_map
        if cached[0] is windows:  # the Authority passes the same tuple all minute long
            return cached[1]
        # One assignment: an interrupt (see below) between two left the next minute's windows
        # beside the last minute's map, and a whole minute counted in the windows before.
        self._window_map = (windows, by_period := dict(windows))
        return by_period

    # Interrupts. An exception can arrive between any two steps of a call — a signal handler's (a
    # step timeout, Ctrl-C) — wherever the interpreter checks for one: at a call, a loop's turn.
    # Counters moved for a reservation whose status did not change yet were charged again by a
    # retry (held going negative: budget handed out twice), or stranded for good. So each change
    # moves its counters counting how far it got, then settles the reservation and records it in
    # steps with no call or loop between them; an exception before that puts the counters back.

    def _end_hold(self, res: _Reservation, status: str, now: float, kind: str) -> None:
        """Return a held reservation's holds and settle it (released, expired): all or nothing."""
        holds = res.holds
        done = 0
        try:
            for _, _, counters, steps in holds:
                counters[1] -= steps
                done += 1
            self._settle(res, status, now, kind, res.fixed[1])
        except BaseException:
            if res.status == HELD:  # (not settled: put back what was returned)
                for _, _, counters, steps in holds[:done]:
                    counters[1] += steps
            raise

    def _settle(
        self,
        res: _Reservation,
        status: str,
        now: float,
        kind: str,
        amounts: Amounts,
        committed: Amounts | None = None,
        flags: tuple[str, ...] | None = None,
    ) -> None:
        """Settle ``res`` and append its audit record, its counters already moved (see above)."""
        if flags is None:
            flags = res.flags
        packed = res.packed_as(status, now, committed if committed is not None else res.committed, flags)
        forget_at = _remembered_from(packed) + self._retention
        rid = res.id
        detail = ",".join(flags) if kind == "commit" else ""
        if forget_at > now:  # (queued first: an entry whose reservation an interrupt left unsettled is skipped)
            self._forgetting.extend((forget_at, rid))  # (one call: both or neither)
        # From here to the audit record: no call, no loop — settled and recorded, or not at all.
        if res.status == HELD:
            self._held -= 1
        res.status = status
        res.settled_at = now
        res.committed = packed[6]
        res.flags = packed[7]
        res.holds = ()  # settled: nothing held any more, and no references kept alive
        if forget_at <= now:  # expired a retention ago, and reclaimed only now: forgotten at once
            del self._reservations[rid]
        else:
            self._reservations[rid] = packed
        self._seq += 1
        self._audit.append((self._seq, now, kind, res.fixed[0][-1], rid, amounts, detail))
        if forget_at <= now:
            fixed = res.fixed
            if fixed[4] is not None and self._idempotency.get((fixed[0][0], fixed[4])) == rid:
                del self._idempotency[(fixed[0][0], fixed[4])]

    def _reclaim(self, now: float) -> int:
        expired = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            rid = heap[0][1]
            res = self._reservations.get(rid)
            if type(res) is _Reservation and res.status == HELD and res.expires_at <= now:
                self._end_hold(res, EXPIRED, now, "expire")  # (an interrupt there keeps the entry)
                expired += 1
            heapq.heappop(heap)  # (settled, or extended — a newer entry exists — or expired now)
        forgetting = self._forgetting
        known = self._reservations
        while forgetting and forgetting[0] <= now:  # type: ignore[operator]
            gone_id: str = forgetting[1]  # type: ignore[assignment]
            del forgetting[0]  # (no call between the two: the pair goes whole)
            del forgetting[0]
            gone = known.get(gone_id)
            # Only if remembered that long: settled twice (expired, then committed late), its
            # earlier entry comes first, and retention runs from the last settle.
            if isinstance(gone, tuple) and _remembered_from(gone) + self._retention <= now:
                self._forget(gone_id, gone[1])
        templates = self._templates
        while templates and templates[0][0] <= now:
            self._forget_template(heapq.heappop(templates), now)
        return expired

    def _forget_template(self, entry: tuple[float, str, str, str], now: float) -> None:
        """Remove a template budget idle past its ``until`` (see ``ensure_budget``), counters and
        all. One with something still held on it is in use: looked at again every
        ``TEMPLATE_RECHECK``, and once nothing is held any more, kept a whole retention more."""
        _, scope, unit, period = entry
        level = self._levels.get(scope)
        budget = level.get((unit, period)) if level else None
        parked = budget is None
        if parked:  # removed: its counters are kept a retention (see remove_budget), then go
            budget = self._parked.get((scope, unit, period))
        if budget is None or budget.until is None:
            return  # set by an operator since
        if budget.until > now:  # refreshed since this entry was queued (a refresh queues none): again, for then
            heapq.heappush(self._templates, (budget.until, scope, unit, period))
            return
        held = budget.holding()
        if held and parked:
            # A removed one goes once nothing is held on it: looked at again then, its deadline
            # kept (set again meanwhile, it is judged by that deadline, whoever looked before).
            heapq.heappush(self._templates, (now + TEMPLATE_RECHECK, scope, unit, period))
            return
        if held or (budget.held_seen and not parked):
            budget.held_seen = held
            budget.until = now + (TEMPLATE_RECHECK if held else self._retention)
            heapq.heappush(self._templates, (budget.until, scope, unit, period))
            return
        if parked:
            del self._parked[(scope, unit, period)]
            return
        assert level is not None
        del level[(unit, period)]
        if not level:
            self._drop_level(scope)
        self._budget_version += 1
        self._log(now, "budget_remove", scope, None, ((unit, 0),), f"period={period or 'lifetime'} idle")

    def _drop_level(self, scope: str) -> None:
        del self._levels[scope]
        root = scope.split("/", 1)[0]
        scopes = self._tenant_scopes[root]
        scopes.discard(scope)
        if not scopes:
            del self._tenant_scopes[root]

    def _refs_of(self, chain: tuple[str, ...], windows: Windows) -> list[tuple[_Budget, str, list[int]]]:
        """Every budget on ``chain`` (root first) with its counters in ``windows``. Cached per chain:
        a reserve at depth 6 would otherwise look up six levels and six windows. Any budget created
        or removed empties the cache; a new ``windows`` tuple (the next minute) rebuilds the entry."""
        if self._cache_version != self._budget_version:
            self._chain_budgets_cache.clear()
            self._cache_version = self._budget_version
        cached = self._chain_budgets_cache.get(chain)
        if cached is not None and cached[0] is windows:
            return cached[1]
        by_period = self._map(windows)
        levels = self._levels
        refs = []
        for scope in chain:
            level = levels.get(scope)
            if level is not None:
                for budget in level.values():
                    window = by_period[budget.period]
                    refs.append((budget, window, budget.window(window)))
        if len(self._chain_budgets_cache) >= 4096:
            self._chain_budgets_cache.clear()
        self._chain_budgets_cache[chain] = (windows, refs)
        return refs

    def _chain_budgets(
        self, chain: tuple[str, ...], units: object, windows: Windows
    ) -> tuple[list[AccountState], list[tuple[_Budget, str, list[int]]]]:
        """The chain's budgets of ``units`` as AccountStates, with the references to hold them by."""
        states: list[AccountState] = []
        refs: list[tuple[_Budget, str, list[int]]] = []
        for ref in self._refs_of(chain, windows):
            budget, window, counters = ref
            if budget.unit in units:  # type: ignore[operator]
                states.append(
                    new_account_state(
                        AccountState,
                        (budget.scope, budget.unit, budget.period, window, budget.limit, counters[0], counters[1]),
                    )
                )
                refs.append(ref)
        return states, refs

    def _peek_states(self, chain: tuple[str, ...], units: object, windows: Windows) -> list[AccountState]:
        """The chain's budgets of ``units`` in ``windows``, read only: a replayed reserve reports the
        windows of its original hold, which may be gone by now (a budget keeps its 8 latest): such a
        window reads as empty, as on Redis, and is not opened again (that would push out a newer one)."""
        by_period = self._map(windows)
        states: list[AccountState] = []
        for scope in chain:
            level = self._levels.get(scope)
            if level is not None:
                for budget in level.values():
                    if budget.unit in units:  # type: ignore[operator]
                        window = by_period[budget.period]
                        spent, held = budget.counters.get(window, (0, 0))
                        states.append(
                            AccountState(budget.scope, budget.unit, budget.period, window, budget.limit, spent, held)
                        )
        return states

    # --- reservations --------------------------------------------------------------------------
    def hold(self, request: HoldRequest) -> HoldResult:
        plans = request.plans
        # The usual reserve: its first plan fits and demands no headroom. One pass holds it, whatever
        # later rungs the ladder has (they are only reported: see _hold_fitting).
        simple = not any(plans[0].headroom_ppm)
        if simple and len(plans) == 1 and not request.probes:
            units: object = dict(plans[0].amounts)
        else:
            units = reported_units((u for plan in plans for u, _ in plan.amounts), request.probes)
        with self._lock:
            now = request.now
            if (
                (self._expiry and self._expiry[0][0] <= now)
                or (self._forgetting and self._forgetting[0] <= now)  # type: ignore[operator]
                or (self._templates and self._templates[0][0] <= now)
            ):
                self._reclaim(now)
            if request.idempotency_key is not None:
                existing = self._idempotency.get((request.chain[0], request.idempotency_key))
                kept = None if existing is None else self._kept(existing, now)
                if kept is not None:
                    units = reported_units(dict(kept.amounts), request.probes)  # (probes: the caller's tool caps)
                    states = self._peek_states(request.chain, units, kept.windows)
                    return HoldResult(kept.id, kept.plan_index, kept.expires_at, tuple(states), (), replayed=True)
            if simple:
                need = units if isinstance(units, dict) else dict(plans[0].amounts)
                fitted = self._hold_fitting(request, need, units)
                if fitted is not None:
                    return fitted
            states, refs = self._chain_budgets(request.chain, units, request.windows)
            choice = choose_plan(plans, request.chain, states)
            index = choice.plan_index
            if index < 0:
                return HoldResult(None, -1, 0.0, tuple(states), tuple(choice.rejections))
            # Every budget of the chosen plan's units is kept (amount 0 included): while no budget is
            # created or removed, commit charges exactly these counters without looking anything up.
            chosen = dict(plans[index].amounts)
            holds: list[tuple[_Budget, str, list[int], int]] = []
            after = []
            try:
                for state, (budget, window, counters) in zip(states, refs, strict=True):
                    steps = chosen.get(budget.unit)
                    if steps is None:  # a probe, or a unit only another plan named
                        after.append(state)
                        continue
                    counters[1] += steps
                    holds.append((budget, window, counters, steps))
                    after.append(new_account_state(AccountState, (*state[:6], counters[1])))
                self._keep(request, index, holds)
            except BaseException:
                self._unkept(request, holds)
                raise
        return HoldResult(request.reservation_id, index, request.expires_at, tuple(after), tuple(choice.rejections))

    def _hold_fitting(self, request: HoldRequest, need: dict[str, int], units: object) -> HoldResult | None:
        """The first plan, no thresholds: check and hold it in a single pass over the chain (undone
        if a later level does not fit). ``None`` when something does not fit — the general path then
        works out the rejections and the later plans. ``units``: every unit of the ladder, whose
        budgets are reported as the general path reports them (``need`` itself for one plan)."""
        holds: list[tuple[_Budget, str, list[int], int]] = []
        after: list[tuple[str, str, str, str, int, int, int]] = []  # plain values: no store objects kept
        try:
            for budget, window, counters in self._refs_of(request.chain, request.windows):
                steps = need.get(budget.unit)
                if steps is None:
                    if budget.unit in units:  # type: ignore[operator]  # a unit only a later plan names
                        spent, held = counters
                        after.append((budget.scope, budget.unit, budget.period, window, budget.limit, spent, held))
                    continue
                spent, held = counters
                limit = budget.limit
                if limit - spent - held < steps:  # also any overage, even for 0
                    _give_back(holds)  # undo this pass (the lock is held: nobody saw it)
                    return None
                counters[1] = held = held + steps
                holds.append((budget, window, counters, steps))
                after.append((budget.scope, budget.unit, budget.period, window, limit, spent, held))
            self._keep(request, 0, holds)
        except BaseException:
            self._unkept(request, holds)
            raise
        return HoldResult(request.reservation_id, 0, request.expires_at, partial(_states_after, after), ())

    def _keep(self, request: HoldRequest, index: int, holds: list[tuple[_Budget, str, list[int], int]]) -> None:
        """Record a hold whose counters are raised: the reservation, its key, its audit record."""
        rid = request.reservation_id
        res = _Reservation(request, index, holds, self._budget_version)
        detail = plan_detail(index + request.first_index)
        idem = request.idempotency_key
        root = request.chain[0]
        amounts = request.plans[index].amounts
        heap = self._expiry
        heapq.heappush(heap, (request.expires_at, rid))  # (an entry without its reservation is skipped)
        # From here to the audit record: no call, no loop — kept and recorded, or not at all (see
        # _end_hold: _unkept then puts the counters back).
        self._reservations[rid] = res
        if idem is not None:
            self._idempotency[(root, idem)] = rid
        self._held += 1
        self._seq += 1
        self._audit.append((self._seq, request.now, "hold", request.chain[-1], rid, amounts, detail))
        if len(heap) > 4 * self._held + 1024:
            # Settled reservations leave their entry behind until its time comes; drop them now, so
            # the heap stays the size of what is held (amortised: this runs once per ~3x growth).
            known = self._reservations
            heap[:] = [
                entry
                for entry in heap
                if isinstance(r := known.get(entry[1]), _Reservation) and r.status == HELD and r.expires_at == entry[0]
            ]
            heapq.heapify(heap)

    def _unkept(self, request: HoldRequest, holds: list[tuple[_Budget, str, list[int], int]]) -> None:
        """A hold interrupted before it was kept (see _end_hold): its raised counters go back."""
        if request.reservation_id not in self._reservations:
            _give_back(holds)

    def commit(self, reservation_id: str, actual: Amounts | None, now: float) -> SettleResult:
        with self._lock:
            res = self._reservations.get(reservation_id)
            if type(res) is not _Reservation:  # settled (packed) or unknown: the general lookup
                res = self._get(reservation_id, now)
            if self._expiry and self._expiry[0][0] <= now:
                self._reclaim(now)
                self._known(res)
            if res.status == COMMITTED:
                return SettleResult(res.id, COMMITTED, res.committed or (), res.flags, replayed=True)
            prior = res.status
            amounts = res.fixed[1]
            if actual is None:
                actual = amounts
            over = False
            holds = res.holds
            done = 0  # holds returned so far (an interrupt puts them back: see _end_hold)
            one_pass = False  # whether the held counters are charged themselves, one pass over them
            steps_each = 0  # (the usual commit: what every hold is charged)
            charges: dict[str, int] | None = None  # (else: what a hold of each unit is charged)
            charged: list[tuple[list[int], int]] = []  # the general way: counters charged, by how much
            try:
                if (
                    prior == HELD
                    and len(actual) == 1
                    and len(amounts) == 1
                    and actual[0][0] == amounts[0][0]
                    and res.budgets == self._budget_version
                ):
                    # The usual commit: the one unit held, re-priced, on the budgets of hold time
                    # (every hold is of that unit). Same result as the general path, in one pass.
                    steps_each = actual[0][1]
                    flags = [OVER_HOLD] if steps_each > amounts[0][1] else []
                    one_pass = True
                else:
                    actual = merge_actual(amounts, actual)
                    flags = commit_flags(prior, amounts, actual) if prior != HELD or actual != amounts else []
                    charges = {unit: steps for unit, steps in actual if steps}
                    # The same budgets as at hold time, every charged unit held: no lookups either.
                    one_pass = (
                        prior == HELD and res.budgets == self._budget_version and charges.keys() <= dict(amounts).keys()
                    )
                if one_pass:
                    for budget, _, counters, held in holds:
                        steps = steps_each if charges is None else charges.get(budget.unit, 0)  # (before they move)
                        counters[1] -= held
                        if steps:
                            counters[0] += steps
                            if counters[0] + counters[1] > budget.limit:
                                over = True
                        done += 1
                elif charges or prior == HELD:
                    if prior == HELD:
                        for _, _, counters, held in holds:
                            counters[1] -= held
                            done += 1
                    windows = dict(res.windows)
                    for scope in res.chain:
                        level = self._levels.get(scope)
                        if level is None:
                            continue
                        for budget in level.values():
                            steps = charges.get(budget.unit, 0)  # type: ignore[union-attr]
                            if steps:
                                counters = budget.window(windows[budget.period], charging=True)
                                counters[0] += steps
                                charged.append((counters, steps))
                                if counters[0] + counters[1] > budget.limit:
                                    over = True
                return self._committed(res, actual, flags, over, now)
            except BaseException:
                if res.status == prior:  # not committed: put the counters back as they were
                    for budget, _, counters, held in holds[:done]:
                        counters[1] += held
                        if one_pass:
                            counters[0] -= steps_each if charges is None else charges.get(budget.unit, 0)
                    for counters, steps in charged:
                        counters[0] -= steps
                raise

    def _committed(self, res: _Reservation, actual: Amounts, flags: list[str], over: bool, now: float) -> SettleResult:
        """Record a commit whose counters are already moved: the reservation, its audit record."""
        if over:
            flags.append(OVER_LIMIT)
        settled_flags = tuple(flags)
        self._settle(res, COMMITTED, now, "commit", actual, actual, settled_flags)
        return SettleResult(res.id, COMMITTED, actual, settled_flags)

    def release(self, reservation_id: str, now: float) -> SettleResult:
        with self._lock:
            res = self._get(reservation_id, now)
            self._reclaim(now)
            self._known(res)
            if res.status != HELD:
                return SettleResult(res.id, res.status, (), res.flags, replayed=True)
            self._end_hold(res, RELEASED, now, "release")
            return SettleResult(res.id, RELEASED)

    def extend(self, reservation_id: str, expires_at: float, now: float) -> ReservationRecord:
        with self._lock:
            res = self._get(reservation_id, now)
            self._reclaim(now)
            self._known(res)
            if res.status != HELD:
                raise ReservationClosed(res.id, res.status)
            if expires_at <= res.expires_at:
                return res.record()  # it lives that long already: an extend never shortens a hold
            detail = f"expires_at={expires_at:.3f}"
            heapq.heappush(self._expiry, (expires_at, res.id))  # (an entry left by an interrupt: skipped)
            res.expires_at = expires_at  # (then no call until the audit record: see _settle)
            self._seq += 1
            self._audit.append((self._seq, now, "extend", res.fixed[0][-1], res.id, (), detail))
            return res.record()

    def reservation(self, reservation_id: str, now: float) -> ReservationRecord:
        with self._lock:
            res = self._get(reservation_id, now)
            self._reclaim(now)
            self._known(res)
            return res.record()

    def reservations(self, scope: str | None, status: str | None, limit: int, now: float) -> list[ReservationRecord]:
        with self._lock:
            self._reclaim(now)
            retention = self._retention  # (one settled out of order may still await its turn)
            every = (
                _Reservation.unpack(r) if isinstance(r, tuple) else r
                for r in self._reservations.values()
                if not isinstance(r, tuple) or _remembered_from(r) + retention > now
            )
            found = [r for r in every if (status is None or r.status == status) and in_subtree(r.scope, scope)]
            found.sort(key=lambda r: r.created_at, reverse=True)
            return [r.record() for r in found[:limit]]

    # --- budgets -------------------------------------------------------------------------------
    def set_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        with self._lock:
            self._set_budget_locked(scope, unit, period, limit, now)

    def _set_budget_locked(self, scope: str, unit: str, period: str, limit: int, now: float) -> None:
        parked = self._parked.get((scope, unit, period))
        if parked is not None and parked.until is not None and parked.until <= now:
            self._reclaim(now)  # (holds due to expire first, as a sweep would: it may forget it)
        level = self._levels.get(scope)
        if level is None:
            level = self._levels[scope] = {}
            self._tenant_scopes.setdefault(scope.split("/", 1)[0], set()).add(scope)
        budget = level.get((unit, period))
        if budget is None:
            budget = self._parked.pop((scope, unit, period), None)
            if budget is None or (budget.until is not None and budget.until <= now and not budget.holding()):
                budget = _Budget(scope, unit, period, limit)  # (removed a retention ago: forgotten, a new count)
            budget.limit = limit
            budget.held_seen = False
            level[(unit, period)] = budget
            self._budget_version += 1
        else:
            budget.limit = limit
        budget.until = None  # an operator's budget from now on, even if a template made it
        self._log(now, "budget_set", scope, None, ((unit, limit),), f"period={period or 'lifetime'}")

    def remove_budget(self, scope: str, unit: str, period: str, now: float) -> bool:
        with self._lock:
            level = self._levels.get(scope)
            if not level or (unit, period) not in level:
                return False
            # Parked, not dropped: held reservations still point at its counters, and a budget set
            # again within a retention continues from them (the same as the SQLite and Redis
            # stores); then, once nothing is held on it, they are forgotten (see _forget_template).
            budget = self._parked[(scope, unit, period)] = level.pop((unit, period))
            budget.until, budget.held_seen = now + self._retention, False
            heapq.heappush(self._templates, (budget.until, scope, unit, period))
            self._budget_version += 1
            if not level:
                self._drop_level(scope)
            self._log(now, "budget_remove", scope, None, ((unit, 0),), f"period={period or 'lifetime'}")
            return True

    def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        with self._lock:  # one section: an operator's set_budget cannot land between look and create
            level = self._levels.get(scope)
            budget = level.get((unit, period)) if level else None
            if budget is not None and budget.until is not None and budget.until <= now:
                # Idle past its time, and its run seen again before the maintenance forgot it: as
                # if it had (a new count), whichever call comes first (see _forget_template) — its
                # holds due to expire expired first, as a sweep would.
                self._reclaim(now)
                self._forget_template((budget.until, scope, unit, period), now)
                level = self._levels.get(scope)
                budget = level.get((unit, period)) if level else None
            created = budget is None
            refresh = template_refresh(self._retention)
            if budget is None:
                self._set_budget_locked(scope, unit, period, limit, now)
                budget = self._levels[scope][(unit, period)]
            elif budget.until is None or budget.until >= now + self._retention + refresh:
                return False  # an operator's, or a template refreshed not long ago
            budget.until = now + self._retention + 2 * refresh
            budget.held_seen = False
            if created:  # (a refreshed one keeps its entry, which finds the later time and queues it again)
                heapq.heappush(self._templates, (budget.until, scope, unit, period))
            return created

    def put_policy(self, document: str, now: float) -> int:
        with self._lock:
            version = self._policy[0] + 1
            self._policy = (version, document)
            self._log(now, "policy_set", "", None, (), f"version={version}")
            return version

    def policy(self) -> tuple[int, str | None]:
        return self._policy

    def accounts(self, scope: str | None, windows: Windows, now: float, subtree: bool) -> list[AccountState]:
        with self._lock:
            self._reclaim(now)
            window_of = dict(windows)
            states: list[AccountState] = []
            if scope is None:
                paths = sorted(self._levels)
            elif subtree:
                paths = sorted(p for p in self._tenant_scopes.get(scope.split("/", 1)[0], ()) if in_subtree(p, scope))
            else:
                paths = [scope] if scope in self._levels else []
            for path in paths:
                level = self._levels[path]
                for (unit, period), budget in sorted(level.items()):
                    window = window_of[period]
                    spent, held = budget.counters.get(window, (0, 0))
                    states.append(AccountState(path, unit, period, window, budget.limit, spent, held))
            return states

    # --- maintenance ---------------------------------------------------------------------------
    def sweep(self, now: float) -> int:
        with self._lock:
            return self._reclaim(now)

    def events(self, after: int, limit: int, scope: str | None, newest: bool = False) -> list[AuditEvent]:
        with self._lock:
            found: list[AuditEvent] = []
            for raw in reversed(self._audit) if newest else self._audit:
                if raw[0] > after and in_subtree(raw[3], scope):
                    found.append(AuditEvent(*raw))
                    if len(found) >= limit:
                        break
            return found[::-1] if newest else found

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

    async def areservations(
        self, scope: str | None, status: str | None, limit: int, now: float
    ) -> list[ReservationRecord]:
        return self.reservations(scope, status, limit, now)

    async def aevents(self, after: int, limit: int, scope: str | None, newest: bool = False) -> list[AuditEvent]:
        return self.events(after, limit, scope, newest)

    async def aensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
        return self.ensure_budget(scope, unit, period, limit, now)

    async def aput_policy(self, document: str, now: float) -> int:
        return self.put_policy(document, now)

    async def apolicy(self) -> tuple[int, str | None]:
        return self.policy()

    async def apolicy_version(self) -> int:
        return self.policy_version()

    async def aclose(self) -> None:
        self.close()
