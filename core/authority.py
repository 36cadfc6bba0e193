"""The Authority: the one object an application talks to.

It turns an :class:`Action` at a scope into plans (the caller's, or the action as requested),
asks the store to hold the first plan that fits — atomically, across every level of the scope
and every worker — and answers with a :class:`Decision`. It also settles reservations, reports
balances, and turns store trouble into a decision (fail closed by default).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from decimal import Decimal
from typing import Any, TypeVar

from clearance.action import Action
from clearance.budget import Budget
from clearance.decision import Balance, Decision, Mode, Outcome, Reason, Reservation, Settlement, balance_of
from clearance.emergency import emergency_cap_for
from clearance.errors import (
    ClockSkew,
    InvalidRequest,
    ReservationNotFound,
    StoreUnavailable,
)
from clearance.grant import AmountsLike, Grant, ReservationRef, guarded_decision, guarded_for, settled, settled_by_block
from clearance.ids import random_id
from clearance.ledger import (
    AccountState,
    Amounts,
    AuditEvent,
    HoldRequest,
    HoldResult,
    PlanSpec,
    Rejection,
    ReservationRecord,
    accounts_of,
    binds_before,
    window_closed,
)
from clearance.periods import Period, period_key, windows_at
from clearance.plan import Caps, Plan, _zeros, check_plans
from clearance.policy import OutputRetry, Policy, PolicyRule, Proposal
from clearance.policy_file import PolicyDocument
from clearance.scope import Scope, parse_scope
from clearance.stores import Store, store_from_url
from clearance.stores.base import template_refresh
from clearance.units import EXACT, MAX_AMOUNT, from_steps, to_step_map, to_steps

logger = logging.getLogger("clearance")

_T = TypeVar("_T")
_Op = tuple[str, tuple[Any, ...]]
"""A store operation a flow asks its driver to run: (method name, arguments)."""
_FIRST_POLICY = "first policy"  # a flow's op for the first policy read (not a store method)

Clock = Callable[[], float]

MAX_TTL = 7 * 24 * 3600.0
_LOCAL_PREFIX = "local-"


def _check_ttl(ttl: object) -> float:
    # compare before any float conversion: math.isfinite(10**400) raises OverflowError
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise InvalidRequest(f"ttl must be a number of seconds in (0, {MAX_TTL:.0f}], got {ttl!r}")
    return float(ttl)


def _check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= 200 or not key.isprintable():
        raise InvalidRequest("idempotency_key must be 1-200 printable characters")
    return key


def _reservation_id(reservation: object) -> str:
    if isinstance(reservation, Reservation):
        return reservation.id
    if isinstance(reservation, str):
        return reservation
    raise InvalidRequest(f"expected a Reservation or its id, got {type(reservation).__name__}")


def _listing(scope: str | Scope | None, status: object, limit: object) -> str | None:
    """The checked arguments of a reservations listing: the scope path (``None``: all)."""
    path = None if scope is None else parse_scope(scope).path
    if status is not None and status not in ("held", "committed", "released", "expired"):
        raise InvalidRequest(f"unknown reservation status {status!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 1_000_000:
        raise InvalidRequest("limit must be an int in 1..1000000")
    return path


_MAX_SEQ = 2**63 - 1  # audit sequence numbers are 64-bit integers in every store


def _events_query(after: object, limit: object, scope: str | Scope | None) -> str | None:
    """The checked arguments of an audit read: the scope path (``None``: all)."""
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= _MAX_SEQ:
        raise InvalidRequest(f"after must be an int in 0..{_MAX_SEQ}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 100_000:
        raise InvalidRequest("limit must be an int in 1..100000")
    return None if scope is None else parse_scope(scope).path


class _PolicyUnreadable(StoreUnavailable):
    """The store holds a policy this worker cannot parse (written by another version of clearance):
    decisions fail closed, never open, until it can read one."""


_POLICY_RETRY = 10.0  # seconds before a failed policy refresh is tried again

_SETTLING: set[asyncio.Future[Any]] = set()  # strong references to settles finishing after a cancel


async def _finished(settle: Awaitable[Settlement], reservation_id: str) -> Settlement:
    """Run an ``aguard`` exit's commit or release to the end even if the task is cancelled while it
    waits (money spent is spent): the caller still gets its CancelledError, the settle finishes in
    the background (a failure is logged; the hold then returns after its TTL)."""
    task = asyncio.ensure_future(settle)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _SETTLING.add(task)
        task.add_done_callback(_settled_in_background(reservation_id))  # (runs at once if already done)
        raise


def _settled_in_background(reservation_id: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        _SETTLING.discard(task)
        if task.cancelled():  # the event loop shut down first (asyncio.run ending right after the cancel)
            logger.warning("clearance: settling %s was cut short; its hold returns after its TTL", reservation_id)
        elif task.exception() is not None:
            logger.error("clearance: could not settle %s: %s", reservation_id, task.exception())

    return done


def _policy_leftovers(
    previous: str | None, budgets: list[Budget]
) -> tuple[list[tuple[str, str, str | None]], list[Budget]]:
    """What applying a policy with ``budgets`` changes beyond writing them, against the stored
    ``previous`` document: the rate-limit budgets it wrote that the new one does not (removed: they
    would go on binding — every call still counts in the unit a remaining limit shares), and the
    ``budgets`` entries it shared such a counter with (set again as they were, the tightest of
    several: the counter held the tighter of entry and rate limit). A budget the new document
    merely leaves out stays (it may be set by hand now); an unreadable stored policy (a newer
    clearance's) changes nothing."""
    if previous is None:
        return [], []
    try:
        old = PolicyDocument.loads(previous, "json", stored=True)
    except InvalidRequest:
        return [], []
    kept = {(b.scope, b.unit, b.period) for b in budgets}
    dropped: set[tuple[str, str, str | None]] = {(rate.scope, rate.unit, rate.per) for rate in old.rate_limits}
    dropped -= kept
    entries: dict[tuple[str, str, str | None], Decimal] = {}
    for entry in old.budgets:
        key = (entry.scope, entry.unit, None if entry.period is None else str(entry.period))
        if key in dropped:
            entries[key] = min(entry.limit, entries.get(key, entry.limit))
    removed = sorted(key for key in dropped if key not in entries)
    return removed, [Budget(scope, unit, limit, period) for (scope, unit, period), limit in entries.items()]


def _cap_tools(decision: Decision, result: HoldResult, proposal: Proposal, policy: Policy, scope: Scope) -> None:
    """Add the tool caps to an allowed decision: ``disabled_tools`` for tool budgets exhausted on the
    chain, ``max_tool_calls=0`` once the run's tool calls are used up (from the probed accounts)."""
    if not (decision.allowed and proposal.probes):
        return
    tool_caps = policy.tool_caps(accounts_of(result.accounts), proposal.run_scope)
    if tool_caps is None:
        return
    base = decision.caps or Caps()
    decision.caps = base.model_copy(
        update={"disabled_tools": tool_caps.disabled_tools, "max_tool_calls": tool_caps.max_tool_calls}
    )
    decision.outcome = Outcome.ALLOW_WITH_CAPS
    which = ", ".join(tool_caps.disabled_tools) or "all tools (tool calls for this run used up)"
    decision.reasons = (
        *decision.reasons,
        Reason("tools_capped", f"tool budget exhausted: {which}", scope.path, rule="tools"),
    )


def _shadow_actual(reservation: object, steps: Amounts | None) -> Amounts | None:
    """What a commit records. A shadow decision's reservation holds nothing: its commit records the
    actual amounts and, for every unit they leave out, what the action asked for — as a commit
    records a held unit it leaves out at its hold (a commit naming only ``usd`` still counts the
    rate-limit units). Any other reservation: ``steps`` as given."""
    if not (isinstance(reservation, Reservation) and reservation.shadow_steps):
        return steps
    if steps is None:
        return reservation.shadow_steps
    named = {unit for unit, _ in steps}
    return (*steps, *((unit, amount) for unit, amount in reservation.shadow_steps if unit not in named))


def _issued(request: HoldRequest) -> HoldRequest:
    """``request`` stamped as sent to the store now (see ``HoldRequest.restamp``): its waits from
    here on (for a worker thread, for the store's lock) count against the store's timeout and move
    its expiry; so does a wait since its expiry was computed (a policy read, a per-run budget
    created, each perhaps waiting for the same lock): the TTL runs from the hold."""
    request.restamp()
    return request


def _reason(rejection: Rejection, plan_count: int) -> Reason:
    unit = rejection.unit
    needed = from_steps(unit, rejection.needed)
    remaining = from_steps(unit, rejection.remaining)
    where = f"{rejection.scope} {unit}" + (f" ({rejection.period})" if rejection.period else "")
    prefix = f"plan {rejection.plan_index + 1}: " if plan_count > 1 else ""
    if rejection.code == "min_headroom":
        threshold = from_steps(unit, rejection.required)
        message = f"{prefix}{where} would keep {EXACT.subtract(remaining, needed):f} < required headroom {threshold:f}"
        return Reason(
            rejection.code,
            message,
            rejection.scope,
            unit,
            rejection.period or None,
            rejection.plan_index,
            needed,
            remaining,
            threshold,
        )
    if rejection.code == "budget_overage" and window_closed(rejection.remaining):
        message = (
            f"{prefix}{where}: its window is closed — older than the windows the store keeps (this "
            "worker's clock is behind the ledger's: stepped back?); denied until the clock reaches them"
        )
        remaining = Decimal(0)
    elif rejection.code == "budget_overage":
        message = f"{prefix}{where} is over its limit by {EXACT.minus(remaining):f}"
    else:
        message = f"{prefix}{where} needs {needed:f}, {remaining:f} remains"
    return Reason(
        rejection.code,
        message,
        rejection.scope,
        unit,
        rejection.period or None,
        rejection.plan_index,
        needed,
        remaining,
    )


def _output_capped(plan: Plan, scope: Scope) -> Reason:
    """Why an output-capped plan was held (a fresh decision and its replays say the same)."""
    tokens = plan.caps.max_output_tokens if plan.caps is not None else None
    message = f"no plan fit at full length; max_output_tokens={tokens} fits"
    return Reason("output_cap", message, scope.path, rule="output_cap")


def _selected(scope: Scope, index: int, count: int, rule: str | None, fits: str = "fits") -> Reason:
    """``plan_selected``: the plan at ``index`` of ``count`` was held (and why, its ``rule``)."""
    message = f"plan {index + 1} of {count} {fits}" + (f" ({rule})" if rule else "")
    return Reason("plan_selected", message, scope.path, plan=index, rule=rule)


_ALLOW = Outcome.ALLOW  # enum members looked up once: _decide runs on every reserve
_ENFORCED = Mode.ENFORCED


_WARN_EVERY = 10.0  # seconds: store trouble is logged once per kind and period, with a count of the rest
_warned: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, decisions not logged since)
_warned_lock = threading.Lock()


def _warn(kind: str, message: str, *args: object) -> None:
    """Log a decision made in store trouble, at most once per ``_WARN_EVERY`` per kind: through an
    outage every decision fails closed (or open), and one line each flooded the logs (46,000 lines
    from one worker)."""
    now = time.monotonic()
    with _warned_lock:
        last, quiet = _warned.get(kind, (-math.inf, 0))
        if now - last < _WARN_EVERY:
            _warned[kind] = (last, quiet + 1)
            return
        _warned[kind] = (now, 0)
    if quiet:
        message += f" (and {quiet} more such decisions since the last such line)"
    logger.warning(message, *args)


def _forget_warnings() -> None:
    """In a forked child: its own warnings (another process's logs), under a fresh lock (one held
    at fork stays held)."""
    global _warned_lock  # noqa: PLW0603 - a fresh lock in a forked child
    _warned_lock = threading.Lock()
    _warned.clear()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_forget_warnings)


def _clock_skew(error: ClockSkew, action: Action, scope: Scope) -> Decision:
    """The denial of a worker whose clock the store does not trust (fail open or not)."""
    _warn("clock_skew", "clearance: denying %s at %s: %s", action.label, scope.path, error)
    reason = Reason("clock_skew", f"denied: {error}", scope.path)
    return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), mode=Mode.FAIL_CLOSED)


def _chosen(action: Action, plans: tuple[Plan, ...] | None, index: int) -> tuple[Amounts, Caps | None]:
    """The held steps and the caps (``None`` when they change nothing) of the chosen plan."""
    if plans is None:
        return action.steps, None
    plan = plans[index]
    caps = plan.caps
    return plan.steps, (caps if caps is not None and not caps.is_empty else None)


def _reservation(record: ReservationRecord) -> Reservation:
    return Reservation(
        id=record.id,
        scope=record.scope,
        steps=record.amounts,
        expires_at=record.expires_at,
        plan_index=record.plan_index,
        status=record.status,
        created_at=record.created_at,
        label=record.label,
        idempotency_key=record.idempotency_key,
        committed_steps=record.committed,
        flags=record.flags,
    )


class Authority:
    """Budget and action authority for agents.

    >>> authority = Authority()                       # in-memory; or Authority.from_url("sqlite:///ledger.db")
    >>> authority.set_budget(Budget("tenant:acme", "usd", "5.00", period="day"))
    >>> decision = authority.reserve(Action.model_call("openai", "gpt-4o", 1200, 800), "tenant:acme/run:r1")
    >>> decision.outcome.value
    'allow'
    >>> authority.commit(decision.reservation, {"usd": "0.0071"}).status
    'committed'
    >>> authority.balance("tenant:acme")["usd"].remaining
    Decimal('4.9929')

    ``store`` is a :class:`Store` or a URL; by default the ``CLEARANCE_STORE`` environment variable,
    else ``memory://``. ``fail_open`` (``True`` or a list of scope prefixes) lets actions go ahead
    while the store is unreachable, bounded per process by ``emergency_limits`` (default 1 USD; the
    Authorities of one store with the same limits share that cap).

    Without ``plans``, a policy turns each action into plans: ``policy`` if given, else the one
    applied to the store (``clearance apply``), re-read when its version changes (checked at most
    every ``policy_refresh`` seconds); ``rules`` are Python rules added on top of either.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        clock: Clock | None = None,
        default_ttl: float = 60.0,
        fail_open: bool | Iterable[str] = False,
        emergency_limits: AmountsLike | None = None,
        policy: Policy | None = None,
        rules: Sequence[PolicyRule] = (),
        policy_refresh: float = 1.0,
    ) -> None:
        if store is None:
            store = os.environ.get("CLEARANCE_STORE") or "memory://"
        self.store: Store = store_from_url(store) if isinstance(store, str) else store
        if not isinstance(self.store, Store):
            raise InvalidRequest(f"store must be a Store or a URL, got {type(store).__name__}")
        if clock is not None and not callable(clock):
            raise InvalidRequest(f"clock must be a callable returning epoch seconds, got {type(clock).__name__}")
        self.clock: Clock = clock or time.time
        self.default_ttl = _check_ttl(default_ttl)
        if isinstance(fail_open, bool):
            self._fail_open: bool | tuple[Scope, ...] = fail_open
        elif isinstance(fail_open, str):  # one scope prefix
            self._fail_open = (parse_scope(fail_open),)
        elif isinstance(fail_open, Iterable):
            self._fail_open = tuple(parse_scope(prefix) for prefix in fail_open)
        else:
            raise InvalidRequest(f"fail_open must be True, False or scope prefixes, got {fail_open!r}")
        limits = to_step_map(emergency_limits if emergency_limits is not None else {"usd": 1}, "emergency_limits")
        self._emergency = emergency_cap_for(self.store.url, limits)
        if policy is not None and not isinstance(policy, Policy):
            raise InvalidRequest(f"policy must be a clearance.Policy, got {type(policy).__name__}")
        if policy is not None:
            policy.document.check_as_written()
        if not all(callable(rule) for rule in rules):
            raise InvalidRequest("rules must be callables rule(action, scope, proposal)")
        if isinstance(policy_refresh, bool) or not isinstance(policy_refresh, int | float) or not policy_refresh >= 0:
            raise InvalidRequest(f"policy_refresh must be a number of seconds >= 0, got {policy_refresh!r}")
        if policy is not None and rules:  # rules come on top of a pinned policy too (its own first)
            policy = Policy(policy.document, rules=(*policy.rules, *rules), version=policy.version)
        self._fixed_policy = policy
        self._rules = tuple(rules)
        self._policy: Policy | None = policy if policy is not None else (Policy(rules=rules) if rules else None)
        self._policy_version = 0
        self._policy_checked = -math.inf
        self._policy_known = False  # a policy version has been read from the store
        # The first policy read in flight, per event loop, with the _policy_resets it began at.
        self._first_reads: dict[asyncio.AbstractEventLoop, tuple[int, asyncio.Task[Policy | None]]] = {}
        self._first_reads_lock = threading.Lock()
        self._policy_resets = 0  # apply_policy's "read it again now": a read under way must not undo it
        self._policy_lock = threading.Lock()  # installs a policy read: never an older one over a newer
        self._policy_unreadable: tuple[int, str] | None = None  # a stored version this worker cannot parse
        self._policy_refresh = float(policy_refresh)
        self._ensured: dict[tuple[str, str, str], float] = {}  # template budget -> when last ensured
        # Would-be holds shadow mode could not release (the store failed just then): (id, expires_at),
        # released by the next shadow decision that can, unless their TTL has returned them first.
        self._shadow_unreleased: deque[tuple[str, str, float]] = deque(maxlen=10_000)  # (id, tenant, expires_at)
        # The reservations of guards whose blocks are running, by id: a block settling its own
        # (by id, or through the copy extend() returned) is seen by its guard.
        self._guarded: dict[str, Reservation] = guarded_for(self.store.url)
        # Keyed holds this process sent without getting an answer (a lost reply, a cancelled task):
        # they may have landed, and a guard retried with their key may run on them (see _guarded).
        # (Tenant, idempotency key) -> the end of the id of that key's hold (ids end alike on every
        # store: SQLite's start with its seq, then the request's digits 12-20); kept by this process
        # only — a forked child starts without them, or parent and child would both take one over.
        self._unanswered: dict[tuple[str, str], str] = {}
        self._unanswered_pid = os.getpid()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Authority:
        """An Authority on the store at ``url`` (``memory://``, ``sqlite:///path.db``, ``redis://…``)."""
        return cls(store_from_url(url), **options)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Authority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close` (closes asyncio connections inside their own loop)."""
        await self.store.aclose()

    async def __aenter__(self) -> Authority:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- reserve -----------------------------------------------------------------------------
    def _request(
        self,
        action: object,
        scope: object,
        plans: Sequence[Plan] | None,
        ttl: float | None,
        idempotency_key: str | None,
        probes: tuple[str, ...] = (),
    ) -> tuple[HoldRequest, Action, Scope, tuple[Plan, ...] | None]:
        """Validate everything and build the store request; ``None`` plans mean "the action as asked"."""
        if not isinstance(action, Action):
            raise InvalidRequest(f"expected an Action, got {type(action).__name__}")
        parsed = parse_scope(scope)  # type: ignore[arg-type]
        chosen = None if plans is None else check_plans(plans)
        if chosen is None:
            specs: tuple[PlanSpec, ...] = (PlanSpec(action.steps, _zeros(len(parsed.chain))),)
        else:
            kinds = parsed.kinds
            specs = tuple(PlanSpec(plan.steps, plan.headroom_ppm(kinds)) for plan in chosen)
        now = self.clock()
        lifetime = self.default_ttl if ttl is None else _check_ttl(ttl)
        request = HoldRequest(
            f"{random_id()}.{parsed.chain[0]}",
            parsed.chain,
            specs,
            now,
            now + lifetime,
            windows_at(now),
            None if idempotency_key is None else _check_key(idempotency_key),
            action.label,
            probes,
            time.monotonic(),  # (re-stamped when sent: see _issued)
            self.clock,
        )
        return request, action, parsed, chosen

    def _decide(
        self, result: HoldResult, action: Action, scope: Scope, plans: tuple[Plan, ...] | None, now: float
    ) -> Decision:
        index = result.plan_index
        if plans is None and index == 0 and not result.rejections:  # the usual allow (hot path)
            reservation = Reservation(
                result.reservation_id or "", scope.path, action.steps, result.expires_at, 0, "held", now, action.label
            )
            return Decision(
                _ALLOW, scope.path, action.label, reservation, None, (), result.accounts, 0, _ENFORCED, result.replayed
            )
        count = 1 if plans is None else len(plans)
        reasons = [_reason(r, count) for r in result.rejections] if result.rejections else []
        if index < 0:
            return Decision(Outcome.DENY, scope.path, action.label, None, None, tuple(reasons), result.accounts)
        steps, caps = _chosen(action, plans, index)
        if index == 0 and caps is None:
            outcome = Outcome.ALLOW
        else:
            outcome = Outcome.ALLOW_WITH_CAPS
            caps = caps or Caps()
            reasons.append(_selected(scope, index, count, plans[index].rule if plans is not None else None))
        reservation = Reservation(
            result.reservation_id or "", scope.path, steps, result.expires_at, index, "held", now, action.label
        )
        return Decision(
            outcome,
            scope.path,
            action.label,
            reservation,
            caps,
            tuple(reasons),
            result.accounts,
            index,
            Mode.ENFORCED,
            result.replayed,
        )

    def _unavailable(
        self,
        error: StoreUnavailable,
        request: HoldRequest,
        action: Action,
        scope: Scope,
        plans: tuple[Plan, ...] | None,
        policy_unread: bool = False,
    ) -> Decision:
        """Store trouble as a decision: fail closed, or open within the emergency cap where configured.
        ``policy_unread``: the store's policy could not be read (this process has not read it yet), so
        a risky action is never failed open (it may need an allow rule that policy would give), nor
        is any action with code ``rules`` (they apply on top of a policy this process cannot know)."""
        if isinstance(error, ClockSkew):  # never failed open: this worker's holds could be reclaimed early
            return _clock_skew(error, action, scope)
        fail_open = self._fail_open
        if policy_unread and (action.risk not in (None, "read") or self._rules or isinstance(error, _PolicyUnreadable)):
            fail_open = False
        if fail_open is not True and not (
            isinstance(fail_open, tuple) and any(scope.is_within(prefix) for prefix in fail_open)
        ):
            _warn("closed", "clearance store unavailable, denying %s at %s: %s", action.label, scope.path, error)
            what = "store unavailable (reading its policy)" if policy_unread else "store unavailable"
            reason = Reason("store_unavailable", f"{what}, failing closed: {error}", scope.path)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), mode=Mode.FAIL_CLOSED)
        key = request.idempotency_key
        # The ladder, as the ledger would take it: the first plan that fits the emergency cap.
        last_over: tuple[str, Amounts] | None = None  # why the last (cheapest) plan did not fit
        for index in range(len(plans) if plans else 1):
            steps, caps = _chosen(action, plans, index)
            reservation = Reservation(
                _LOCAL_PREFIX + request.reservation_id,
                scope.path,
                steps,
                request.expires_at,
                index,
                created_at=request.now,
                label=action.label,
                idempotency_key=key,
                local=True,
            )
            over = self._emergency.take(reservation, request.now, None if key is None else (request.chain[0], key))
            if isinstance(over, Reservation):  # the key's own reservation: a retry (or another thread's)
                return self._replayed_locally(over, action, scope, plans)
            if over is None:
                break
            last_over = (over, steps)
        else:
            assert last_over is not None
            unit, steps = last_over
            limit = self._emergency.limits.get(unit)
            if limit is None:
                message = f"store unavailable and no emergency limit bounds this action (add {unit} to them)"
            elif dict(steps).get(unit, 0) > limit:
                message = f"store unavailable and the action needs more {unit} than this process's whole emergency cap"
            else:
                message = f"store unavailable and this process's emergency cap of {unit} is used"
            reason = Reason("emergency_cap", message, scope.path, unit=unit)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), mode=Mode.FAIL_OPEN)
        # A block will run on this local reservation: a hold of the same request that landed in the
        # store after all is not one a retry may take over (see _guarded).
        if request.idempotency_key is not None:
            self._unanswered.pop((request.chain[0], request.idempotency_key), None)
        _warn("open", "clearance store unavailable, failing open for %s at %s: %s", action.label, scope.path, error)
        reasons = [Reason("fail_open", f"store unavailable, allowed within the emergency cap: {error}", scope.path)]
        index = reservation.plan_index
        outcome = Outcome.ALLOW if index == 0 and caps is None else Outcome.ALLOW_WITH_CAPS
        if outcome is Outcome.ALLOW_WITH_CAPS:  # (as the ledger answers: a later plan says so, caps or not)
            caps = caps or Caps()
            rule = plans[index].rule if plans else None
            reasons.append(_selected(scope, index, len(plans) if plans else 1, rule, "fits the emergency cap"))
        return Decision(outcome, scope.path, action.label, reservation, caps, tuple(reasons), (), index, Mode.FAIL_OPEN)

    def _local_replay(
        self, request: HoldRequest, action: Action, scope: Scope, plans: tuple[Plan, ...] | None
    ) -> Decision | None:
        """A reserve retried with the idempotency key of a reservation this process made while
        failing open: the same reservation (or a denial, as the ledger would), never a second hold —
        whether the store is still down or back. ``None``: the key made no local reservation."""
        key = request.idempotency_key
        emergency = self._emergency
        if key is None or not emergency.keys:
            return None
        found = emergency.find((request.chain[0], key), request.now)
        if found is None:
            return None
        return self._replayed_locally(found, action, scope, plans)

    @staticmethod
    def _replayed_locally(found: Reservation, action: Action, scope: Scope, plans: tuple[Plan, ...] | None) -> Decision:
        """The answer to a retry of a local reservation: the same one (with the caps of whichever of
        the plans it holds), or the ledger's denials."""
        held = dict(found.steps)
        index = next((i for i in range(len(plans)) if dict(plans[i].steps) == held), 0) if plans else 0
        steps, caps = _chosen(action, plans, index)
        if found.status not in ("held", "committed"):
            message = f"this idempotency key's reservation {found.id} is {found.status}: retry with a new key"
            code = "replay_settled"
        elif found.scope != scope.path or found.label != action.label or dict(found.steps) != dict(steps):
            message = (
                f"this idempotency key already holds local reservation {found.id} for {found.label} at "
                f"{found.scope}, or other amounts: use a key per call"
            )
            code = "replay_mismatch"
        else:
            reasons = [Reason("fail_open", "replayed a reservation made while the store was unavailable", scope.path)]
            if index > 0 and plans is not None:  # as the ledger's decision says it
                caps = caps or Caps()
                reasons.append(_selected(scope, index, len(plans), plans[index].rule, "holds"))
            outcome = Outcome.ALLOW if caps is None else Outcome.ALLOW_WITH_CAPS
            held_plan = replace(found, plan_index=index)
            return Decision(
                outcome, scope.path, action.label, held_plan, caps, tuple(reasons), (), index, Mode.FAIL_OPEN, True
            )
        reason = Reason(code, message, scope.path)
        return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), mode=Mode.FAIL_OPEN, replayed=True)

    # --- policies ----------------------------------------------------------------------------
    def apply_policy(self, document: PolicyDocument) -> int:
        """Write a policy's budgets (and rate-limit budgets) into the store, then store the policy
        as the next version; every Authority on the store picks it up. Returns the version."""
        budgets, text = self._policy_budgets(document)
        removed, restored = _policy_leftovers(self.store.policy()[1], budgets)
        for budget in [*budgets, *restored]:
            self.set_budget(budget)
        for scope, unit, period in removed:
            self.remove_budget(scope, unit, period)
        version = self.store.put_policy(text, self.clock())
        self._policy_resets += 1
        self._policy_checked = -math.inf  # this process sees it on its very next decision
        return version

    async def aapply_policy(self, document: PolicyDocument) -> int:
        """Async twin of :meth:`apply_policy`."""
        budgets, text = self._policy_budgets(document)
        removed, restored = _policy_leftovers((await self.store.apolicy())[1], budgets)
        for budget in [*budgets, *restored]:
            await self.aset_budget(budget)
        for scope, unit, period in removed:
            await self.aremove_budget(scope, unit, period)
        version = await self.store.aput_policy(text, self.clock())
        self._policy_resets += 1
        self._policy_checked = -math.inf
        return version

    def _policy_budgets(self, document: PolicyDocument) -> tuple[list[Budget], str]:
        """A policy's budgets and the text to store, the whole document validated and written out
        first: bad input changes nothing (a document that cannot be stored, found only after its
        budgets were written, left them changed under the old policy)."""
        if not isinstance(document, PolicyDocument):
            raise InvalidRequest(f"expected a PolicyDocument, got {type(document).__name__}")
        document.check_as_written()  # (one built in Python skipped parse's checks)
        budgets = [
            Budget(scope, unit, limit, period) for (scope, unit, period), limit in document.budget_limits().items()
        ]
        Policy(document, rules=self._rules)
        try:
            text = document.to_json()
        except ValueError as error:  # (pydantic's serialization error is one: text it cannot write)
            raise InvalidRequest(f"invalid policy: it cannot be stored: {error}") from None
        return budgets, text

    def current_policy(self) -> Policy | None:
        """The policy decisions use now (refreshing it from the store if it is due); ``None`` when
        none is in force. Raises StoreUnavailable while this process has not been able to read the
        store's policy yet (decisions are denied then: see docs/policies.md)."""
        return self._run(self._policy_flow())

    async def acurrent_policy(self) -> Policy | None:
        """Async twin of :meth:`current_policy`."""
        return await self._arun(self._policy_flow())

    def _policy_flow(self) -> Generator[_Op, Any, Policy | None]:
        """The policy in force, read again when its refresh is due. Until this process has read the
        store's policy once, every caller waits for a read (no decision is made as if there were
        none while the first read is under way; on asyncio the tasks of a loop share one: see
        :meth:`_first_policy_read`), and a failed first read raises StoreUnavailable: a decision
        is then store trouble, not one made without the policy."""
        if self._fixed_policy is not None:
            return self._fixed_policy
        if not self._policy_known:
            first: Policy | None = yield (_FIRST_POLICY, ())  # (the drivers run _policy_read_flow for it)
            return first
        return (yield from self._policy_read_flow())

    def _first_policy_read(self) -> Awaitable[Policy | None]:
        """The first read of the store's policy, shared by every task of the running event loop that
        waits for it: a task cancelled meanwhile (``asyncio.wait_for``, say) leaves it running for
        the others. Each reading its own, a crowd of agents on short timeouts cancelled every read
        (each cancel also drops its connection mid-reply) and no decision was made for seconds."""
        loop = asyncio.get_running_loop()
        resets = self._policy_resets
        with self._first_reads_lock:  # (threads run loops of their own)
            shared = self._first_reads.get(loop)
            # Not one begun before an apply_policy of this process (it may have read the version before).
            if shared is None or shared[1].done() or shared[0] != resets:
                for closed in [other for other in self._first_reads if other.is_closed()]:
                    # A loop closed by hand while its read was under way: nothing can run or cancel
                    # that read now (its caller's own task was reported by the loop already).
                    self._first_reads.pop(closed)[1]._log_destroy_pending = False  # type: ignore[attr-defined]
                task = loop.create_task(self._arun(self._policy_read_flow()))
                shared = self._first_reads[loop] = (resets, task)

                def done(finished: asyncio.Task[Policy | None]) -> None:
                    with self._first_reads_lock:
                        if self._first_reads.get(loop, (0, None))[1] is finished:
                            del self._first_reads[loop]
                    if not finished.cancelled():
                        finished.exception()  # retrieved: its waiters may all have been cancelled

                task.add_done_callback(done)
        return asyncio.shield(shared[1])

    def _policy_read_flow(self) -> Generator[_Op, Any, Policy | None]:
        """:meth:`_policy_flow`'s read: the version, then the policy if it changed."""
        checked = time.monotonic()
        known = self._policy_known
        resets = self._policy_resets
        seen = self._policy_version
        if known and checked - self._policy_checked < self._policy_refresh:
            return self._policy
        if known:
            self._policy_checked = checked  # the others keep the known policy while this one reads
        try:
            version = yield ("policy_version", ())
            if version != seen and (self._policy_unreadable is None or self._policy_unreadable[0] != version):
                version, text = yield ("policy", ())
                try:
                    document = PolicyDocument.loads(text, "json", stored=True) if text else None
                    policy = Policy(document, rules=self._rules, version=version) if document or self._rules else None
                except InvalidRequest as error:
                    # Stored by another version of clearance (a rolling upgrade), say: keep deciding
                    # with the policy this process knows; with none known, decisions fail closed.
                    self._policy_unreadable = (version, str(error))
                    logger.error("clearance: cannot read the store's policy version %s: %s", version, error)
                else:
                    with self._policy_lock:  # another thread may have installed a newer one meanwhile
                        if self._policy_version == seen or version > self._policy_version:
                            self._policy, self._policy_version = policy, version
                            self._policy_unreadable = None
            unreadable = self._policy_unreadable
            if unreadable is not None and unreadable[0] == version and not self._policy_known:
                raise _PolicyUnreadable(f"the store's policy version {unreadable[0]} cannot be read: {unreadable[1]}")
            if not known:  # only now, the policy in place: the others may rely on it from here on
                if self._policy_resets == resets:  # (else apply_policy asked for a fresh read meanwhile)
                    self._policy_checked = max(self._policy_checked, checked)
                self._policy_known = True
        except NotImplementedError:
            self._policy_refresh = math.inf  # this store keeps no policies: stop asking
            self._policy_checked = checked
            self._policy_known = True
        except StoreUnavailable as error:
            if not self._policy_known:  # (another thread may have read it meanwhile)
                raise
            # With the store hung every call would first wait out a timeout here (each then outlasts
            # policy_refresh), on top of its own: once this process knows a policy version, it keeps
            # that one for a while. Never before it has read one (it must learn the policy), and not
            # over a reset made meanwhile (apply_policy in this process).
            if self._policy_known and self._policy_checked == checked:
                self._policy_checked = time.monotonic() + _POLICY_RETRY
            logger.warning(
                "clearance: could not refresh the policy, keeping version %s: %s", self._policy_version, error
            )
        return self._policy

    # --- reserve -------------------------------------------------------------------------------
    def _reserve_flow(
        self, action: object, scope: object, plans: Sequence[Plan] | None, ttl: float | None, key: str | None
    ) -> Generator[_Op, Any, Decision]:
        """The whole decision, written once for the sync and the async face: it yields store
        operations and receives their results (see :meth:`_run` and :meth:`_arun`)."""
        request, checked, parsed, chosen = self._request(action, scope, plans, ttl, key)
        proposal: Proposal | None = None
        policy: Policy | None = None
        if plans is None:
            try:
                policy = yield from self._policy_flow()
            except StoreUnavailable as error:
                return self._unavailable(error, request, checked, parsed, chosen, policy_unread=True)
            # An empty policy changes nothing for plain actions, but risk classes still need its
            # allow rules: a policy in force governs risk whatever else it says.
            if policy is not None and (not policy.empty or checked.risk not in (None, "read")):
                proposal = policy.propose(checked, parsed)
                if proposal.deny is None and proposal.plans is not None:
                    request, checked, parsed, chosen = self._request(
                        checked, parsed, proposal.plans, ttl, key, proposal.probes
                    )
                elif proposal.deny is None:
                    request.probes = proposal.probes  # (the action's own plan: only what to report)
        shadow: Decision | None = None
        if proposal is not None and proposal.shadow and proposal.deny is None:
            # Shadow mode: first the caller's own reservation, holding nothing, under its key (a
            # retry finds it and is answered as under enforcement), then the would-be decision,
            # made without the key and its hold released at once.
            found = yield from self._shadow_hold(checked, parsed, ttl, key, request.plans[0].amounts)
            if found.replayed and found.mode is Mode.SHADOW and found.reservation is not None:
                # A retry: no would-be decision, but its commit counts in the run's per-run budgets
                # (its tool_calls): made here if the first try was cut short before it made them.
                try:
                    for template in proposal.templates:
                        yield from self._ensure_flow(template)
                except StoreUnavailable:
                    pass  # (counted once they exist: the store is failing this call anyway)
            if found.replayed or found.mode is not Mode.ENFORCED:
                return found  # a retry's answer, or store trouble (failing open or closed)
            shadow, key = found, None
            request.idempotency_key = None
            would_be: list[HoldRequest] = []  # the would-be holds sent (an output cap's retry too)
            try:
                decision = yield from self._enforced_flow(
                    request, checked, parsed, chosen, proposal, policy, ttl, key, would_be
                )
                return (yield from self._shadow_finish(shadow, decision, parsed))
            except BaseException:
                # Cut short (a cancelled task, a step timeout) while the would-be decision was made
                # or released: its holds, if they landed, have no owner — they kept their budget
                # until their TTL. Released by the tenant's next shadow decision (one never held: skipped).
                for sent in would_be:
                    self._shadow_unreleased.append((sent.reservation_id, parsed.root, sent.expires_at))
                raise
        decision = yield from self._enforced_flow(request, checked, parsed, chosen, proposal, policy, ttl, key)
        if proposal is not None and proposal.shadow:  # (a policy rule denied it: still a shadow decision)
            decision = yield from self._shadow_of_denial(decision, checked, parsed, ttl, key, request.plans[0].amounts)
        return decision

    def _enforced_flow(
        self,
        request: HoldRequest,
        checked: Action,
        parsed: Scope,
        chosen: tuple[Plan, ...] | None,
        proposal: Proposal | None,
        policy: Policy | None,
        ttl: float | None,
        key: str | None,
        would_be: list[HoldRequest] | None = None,
    ) -> Generator[_Op, Any, Decision]:
        """The decision as enforcement makes it, store trouble included (in shadow mode: the
        would-be decision, its holds' requests put in ``would_be`` before they are sent)."""
        if proposal is not None and proposal.deny is None:
            try:  # the per-run budgets this decision must count against: none may be skipped
                for template in proposal.templates:
                    yield from self._ensure_flow(template)
            except StoreUnavailable as error:
                return self._unavailable(error, request, checked, parsed, chosen)
        if proposal is not None and proposal.deny is not None:
            decision = Decision(Outcome.DENY, parsed.path, checked.label, reasons=(proposal.deny, *proposal.notes))
        elif key is not None and (local := self._local_replay(request, checked, parsed, chosen)) is not None:
            return local  # answered as the fail-open decision it replays was
        else:
            if would_be is not None:
                would_be.append(request)
            try:
                result = yield ("hold", (_issued(request),))
            except StoreUnavailable as error:
                return self._unavailable(error, request, checked, parsed, chosen)
            if result.replayed:
                retry = proposal.output_retry if proposal is not None else None
                decision = yield from self._replay_flow(result, checked, parsed, chosen, retry)
                if proposal is not None and policy is not None:  # the tool caps, as of now
                    _cap_tools(decision, result, proposal, policy, parsed)
            else:
                decision = self._decide(result, checked, parsed, chosen, request.now)
                if proposal is not None and policy is not None:
                    decision = yield from self._refine_flow(
                        decision, result, proposal, policy, checked, parsed, chosen, ttl, key, would_be
                    )
        return decision

    def _replay_flow(
        self,
        result: HoldResult,
        action: Action,
        scope: Scope,
        plans: tuple[Plan, ...] | None,
        output_retry: OutputRetry | None,
    ) -> Generator[_Op, Any, Decision]:
        """A reserve retried with its idempotency key: answer with the original reservation, and the
        caps of the plan it actually holds — or deny, if that hold is gone or is none of these plans."""
        rid = result.reservation_id or ""
        try:
            record: ReservationRecord = yield ("reservation", (rid, self.clock()))
        except ClockSkew as error:
            return _clock_skew(error, action, scope)
        except StoreUnavailable as error:
            reason = Reason("store_unavailable", f"store unavailable, failing closed: {error}", scope.path)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), mode=Mode.FAIL_CLOSED)
        except ReservationNotFound:  # forgotten between the hold and this read (its retention ended)
            message = f"this idempotency key's reservation {rid} was just forgotten (past retention): retry"
            reason = Reason("replay_settled", message, scope.path)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), replayed=True)
        if record.status not in ("held", "committed"):
            message = f"this idempotency key's reservation {rid} is {record.status}: retry with a new key"
            reason = Reason("replay_settled", message, scope.path)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), replayed=True)
        if record.scope != scope.path or record.label != action.label:
            # Keys are per tenant: the same key at another scope, or for another action, is another
            # call (one allowed on the first one's hold ran unpaid for, and named itself on a
            # reservation the ledger holds for the first).
            message = (
                f"this idempotency key already holds reservation {rid} for {record.label} at {record.scope}: "
                "use a key per call (one per run and step, say)"
            )
            reason = Reason("replay_mismatch", message, scope.path)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), replayed=True)
        candidates = list(plans) if plans is not None else [Plan.of_steps(dict(action.steps))]
        if output_retry is not None:
            capped = Policy.output_cap_for(output_retry, dict(record.amounts))
            if capped is not None:
                candidates.append(capped)
        held = dict(record.amounts)
        order = [result.plan_index, *range(len(candidates))]
        match = next((i for i in order if 0 <= i < len(candidates) and dict(candidates[i].steps) == held), None)
        if match is None:
            message = f"retried with other plans than reservation {rid} holds: commit or release it, or use a new key"
            reason = Reason("replay_mismatch", message, scope.path)
            return Decision(Outcome.DENY, scope.path, action.label, reasons=(reason,), replayed=True)
        chosen = None if plans is None and match == 0 else tuple(candidates)
        replayed = HoldResult(rid, match, record.expires_at, result.accounts, (), replayed=True)
        decision = self._decide(replayed, action, scope, chosen, record.created_at)
        if output_retry is not None and match == len(candidates) - 1 and candidates[match].rule == "output_cap":
            decision.reasons = (_output_capped(candidates[match], scope), *decision.reasons)
        if decision.reservation is not None:  # the reservation as it stands (a committed one says so)
            found = decision.reservation
            found.status = record.status
            found.idempotency_key = record.idempotency_key
            found.committed_steps = record.committed
            found.flags = record.flags
        return decision

    def _ensure_flow(self, template: tuple[str, str, str, int]) -> Generator[_Op, Any, None]:
        """Create a template (per-run) budget on first use, and while it is used ensure it again at
        least every ``template_refresh`` (an hour, an eighth of the store's retention if less): the
        store keeps a template budget a retention and that much more past the last such call, then
        forgets it (see ``Store.ensure_budget``): kept a whole retention past its last use."""
        scope, unit, period, limit = template
        limit = min(limit, MAX_AMOUNT)  # (a policy stored by an earlier version may name more)
        now = self.clock()
        last = self._ensured.get((scope, unit, period))
        if last is not None and 0 <= now - last < template_refresh(self.store.retention):
            return
        try:
            yield ("ensure_budget", (scope, unit, period, limit, now))
        except NotImplementedError:
            logger.warning("clearance: %s cannot create per-run budgets; %s is not counted", self.store.url, unit)
        if len(self._ensured) > 100_000:
            self._ensured.clear()
        self._ensured[(scope, unit, period)] = now

    def _refine_flow(
        self,
        decision: Decision,
        result: HoldResult,
        proposal: Proposal,
        policy: Policy,
        action: Action,
        scope: Scope,
        plans: tuple[Plan, ...] | None,
        ttl: float | None,
        key: str | None,
        would_be: list[HoldRequest] | None = None,
    ) -> Generator[_Op, Any, Decision]:
        """After the store decided: the output cap when nothing fit, and the tool caps. ``plans``:
        the ones the store was asked to hold (a replay is matched against them and the capped one);
        ``would_be``: see :meth:`_enforced_flow`."""
        notes = tuple(proposal.notes)
        if decision.denied and proposal.output_retry is not None:
            plan = policy.output_cap_plan(proposal.output_retry, accounts_of(result.accounts))
            if plan is not None:
                request, _, _, chosen = self._request(action, scope, [plan], ttl, key, proposal.probes)
                index = len(result.rejections)  # one past the plans that did not fit
                request.first_index = index  # (the ledger records it as that plan of the ladder)
                if would_be is not None:
                    would_be.append(request)
                try:
                    retried: HoldResult = yield ("hold", (_issued(request),))
                except StoreUnavailable as error:
                    return self._unavailable(error, request, action, scope, chosen)
                if retried.replayed:  # the same idempotency key held meanwhile (a concurrent retry)
                    replayed = yield from self._replay_flow(retried, action, scope, plans, proposal.output_retry)
                    _cap_tools(replayed, retried, proposal, policy, scope)
                    return replayed
                second = self._decide(retried, action, scope, chosen, request.now)
                if second.allowed:
                    assert plan.caps is not None
                    assert second.reservation is not None
                    second.outcome = Outcome.ALLOW_WITH_CAPS
                    second.caps = plan.caps
                    capped = (_output_capped(plan, scope), _selected(scope, index, index + 1, plan.rule))
                    second.reasons = (*decision.reasons, *capped)
                    second.plan_index = second.reservation.plan_index = index
                    decision, result = second, retried
        _cap_tools(decision, result, proposal, policy, scope)
        if notes:
            decision.reasons = (*decision.reasons, *notes)
        return decision

    def _shadow_hold(
        self, action: Action, scope: Scope, ttl: float | None, key: str | None, requested: Amounts
    ) -> Generator[_Op, Any, Decision]:
        """Shadow mode's own reservation, under the caller's idempotency key: it holds nothing
        (nothing is enforced) and its commit records the real spend — the actual amounts, and
        ``requested`` (the action as asked) for every unit they leave out. A retry with the key is
        answered with it as under enforcement (``replay_settled`` once settled), the would-be
        decision not made again."""
        request, _, _, chosen = self._request(action, scope, [Plan({}, rule="shadow")], ttl, key)

        def as_asked() -> tuple[HoldRequest, tuple[Plan, ...] | None]:
            # Failing open (or closed) as any decision does: a local reservation holds the action
            # as asked against the emergency cap, which bounds what shadow scopes spend meanwhile.
            asked, _, _, plans = self._request(action, scope, [Plan.of_steps(dict(requested), rule="shadow")], ttl, key)
            return asked, plans

        if key is not None and self._emergency.keys:  # (cheap: only when this process failed open)
            asked, plans = as_asked()
            if (local := self._local_replay(asked, action, scope, plans)) is not None:
                return local  # made failing open: answered as that decision was
        yield from self._release_shadow_leftovers(scope.root)
        try:
            result = yield ("hold", (_issued(request),))
        except StoreUnavailable as error:
            asked, plans = as_asked()
            return self._unavailable(error, asked, action, scope, plans)
        if result.replayed:
            decision = yield from self._replay_flow(result, action, scope, chosen, None)
            if decision.mode is Mode.ENFORCED:  # (store trouble reading it stays what it is)
                note = "shadow mode: a retry with the key of a shadow reservation (no new would-be decision)"
                decision.reasons = (Reason("shadow", note, scope.path, rule="shadow"), *decision.reasons)
                decision.mode = Mode.SHADOW
        else:
            decision = self._decide(result, action, scope, chosen, request.now)
        if decision.reservation is not None and not decision.reservation.local:
            decision.reservation.shadow_steps = requested  # a retry's too: its commit records the same
        return decision

    def _shadow_finish(self, shadow: Decision, would_be: Decision, scope: Scope) -> Generator[_Op, Any, Decision]:
        """Release the would-be decision's hold (nobody else has its id) and report it on the
        shadow decision: the action goes ahead as requested."""
        would_hold = would_be.reservation
        if would_hold is not None:
            if would_hold.local:  # a would-be made failing open: off the emergency cap
                self._emergency.settle(would_hold.id, None, False, self.clock())
            else:
                try:
                    yield ("release", (would_hold.id, self.clock()))
                except StoreUnavailable:  # the next shadow decisions of this tenant try again
                    self._shadow_unreleased.append((would_hold.id, scope.root, would_hold.expires_at))
        summary = f"shadow mode: enforcement would have answered {would_be.outcome.value}"
        if would_be.caps is not None:
            summary += f" with {would_be.caps!r}"
        shadow.reasons = (Reason("shadow", summary, scope.path, rule="shadow"), *would_be.reasons)
        shadow.mode = Mode.SHADOW
        shadow.caps = None
        shadow.outcome = Outcome.ALLOW
        shadow.would_be = would_be
        return shadow

    def _shadow_of_denial(
        self, would_be: Decision, action: Action, scope: Scope, ttl: float | None, key: str | None, requested: Amounts
    ) -> Generator[_Op, Any, Decision]:
        """A shadow decision for a denial made before any hold (a policy rule's)."""
        shadow = yield from self._shadow_hold(action, scope, ttl, key, requested)
        if shadow.replayed or shadow.mode is not Mode.ENFORCED:
            return shadow
        return (yield from self._shadow_finish(shadow, would_be, scope))

    def _release_shadow_leftovers(self, root: str) -> Generator[_Op, Any, None]:
        """Best effort, a few at a time: would-be holds of this tenant an earlier shadow decision
        could not release (its store failed just then). Only this tenant's (on a cluster another
        tenant's node may be down), never failing this decision, and none past its TTL (the
        ledger has given those back already)."""
        leftovers = self._shadow_unreleased
        for _ in range(min(4, len(leftovers))):
            try:
                entry = leftovers.popleft()
            except IndexError:  # (another thread took the last)
                return
            rid, owner, expires_at = entry
            if expires_at <= self.clock():
                continue
            if owner != root:
                leftovers.append(entry)
                continue
            try:
                yield ("release", (rid, self.clock()))
            except StoreUnavailable:
                leftovers.append(entry)
                return
            except ReservationNotFound:  # the ledger lost it (a Redis restarted without persistence)
                continue

    def _unanswered_hold(self, request: HoldRequest) -> None:
        """Remember a keyed hold sent without an answer: it may have landed, and a guard retried with
        its key may take it over (see :meth:`_own_unanswered`)."""
        if request.idempotency_key is not None:
            if len(self._unanswered) >= 10_000 or self._unanswered_pid != os.getpid():
                self._unanswered.clear()
                self._unanswered_pid = os.getpid()
            self._unanswered[(request.chain[0], request.idempotency_key)] = request.reservation_id[12:]

    def _own_unanswered(self, decision: Decision, idempotency_key: str | None) -> bool:
        """Whether a guard's decision holds this process's own keyed hold that never got an answer
        (a lost reply, a cancelled task): no block ran on it, so the guard retried with its key may.
        Whatever the answer, the key has one now: its entry goes (dict.pop: one retry takes it)."""
        reservation = decision.reservation
        if idempotency_key is None or reservation is None or not self._unanswered:
            return False
        end = self._unanswered.pop((reservation.scope.split("/", 1)[0], idempotency_key), None)
        return decision.replayed and end == reservation.id[12:] and self._unanswered_pid == os.getpid()

    def _run(self, flow: Generator[_Op, Any, _T]) -> _T:
        """Drive a flow against the sync face of the store. An exception that leaves it after a hold
        was sent (a step timeout's signal handler, Ctrl-C: anywhere, the hold's call included) means
        the caller got no answer for a hold that may have landed: remembered, as a lost reply is, so
        that a guard retried with its key takes it over (its step never ran) — it was denied
        ``replay_in_progress``, then ``replay_settled``, for good."""
        store = self.store
        sent: HoldRequest | None = None
        try:
            name, args = next(flow)
            while True:
                try:
                    if name == _FIRST_POLICY:
                        value = self._run(self._policy_read_flow())
                    else:
                        if name == "hold" and args[0].idempotency_key is not None:
                            sent = args[0]  # (a keyless one after it, shadow mode's would-be, is not the caller's)
                        value = getattr(store, name)(*args)
                except (StoreUnavailable, NotImplementedError, ReservationNotFound) as error:
                    if name == "hold" and isinstance(error, StoreUnavailable):
                        self._unanswered_hold(args[0])
                    name, args = flow.throw(error)  # (a flow that does not catch it raises it on)
                else:
                    name, args = flow.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except BaseException:
            if sent is not None:
                self._unanswered_hold(sent)
            flow.close()  # (now, not when its frames are freed: a flow cut short says what it left)
            raise

    async def _arun(self, flow: Generator[_Op, Any, _T]) -> _T:
        """Drive a flow against the async face of the store. A release, once started, runs to its
        end even if the task is cancelled meanwhile (a shadow decision's would-be hold, say, whose
        release a cancelled task dropped would keep its budget until its TTL: nobody else has its
        id — an SQLite job still queued for a worker thread is dropped with its task, a Redis
        request waiting for a connection is never sent)."""
        store = self.store
        sent: HoldRequest | None = None  # (see _run: a cancel anywhere after it, its own await included)
        try:
            name, args = next(flow)
            while True:
                try:
                    value: Any
                    if name == _FIRST_POLICY:
                        value = await self._first_policy_read()
                    else:
                        if name == "hold" and args[0].idempotency_key is not None:
                            sent = args[0]  # (a keyless one after it, shadow mode's would-be, is not the caller's)
                        call = getattr(store, "a" + name)(*args)
                        value = await (_finished(call, args[0]) if name == "release" else call)
                except (StoreUnavailable, NotImplementedError, ReservationNotFound) as error:
                    if name == "hold" and isinstance(error, StoreUnavailable):
                        self._unanswered_hold(args[0])
                    name, args = flow.throw(error)  # (a flow that does not catch it raises it on)
                else:
                    name, args = flow.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        except BaseException:
            if sent is not None:
                self._unanswered_hold(sent)
            flow.close()  # (now, not when its frames are freed: a flow cut short says what it left)
            raise

    def reserve(
        self,
        action: Action,
        scope: str | Scope,
        *,
        plans: Sequence[Plan] | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> Decision:
        """Decide whether ``action`` may go ahead at ``scope`` and hold its budget if so.

        With ``plans`` (best first), atomically holds the first plan that fits every budget on every
        level of the scope; otherwise the policy proposes the plans (or, without one, the action's own
        amounts are held). A denial is a Decision, not an exception. Retrying with the same
        ``idempotency_key`` returns the same reservation.
        """
        known = self._policy_known  # read first: _policy_flow sets _policy before it
        if plans is None and (
            not known or self._policy is not None or time.monotonic() - self._policy_checked >= self._policy_refresh
        ):
            return self._run(self._reserve_flow(action, scope, plans, ttl, idempotency_key))
        request, checked, parsed, chosen = self._request(action, scope, plans, ttl, idempotency_key)
        if idempotency_key is not None:
            local = self._local_replay(request, checked, parsed, chosen)
            if local is not None:
                return local
        try:
            result = self.store.hold(request)
            if result.replayed:  # (the replay flow answers its own store trouble)
                return self._run(self._replay_flow(result, checked, parsed, chosen, None))
            return self._decide(result, checked, parsed, chosen, request.now)
        except StoreUnavailable as error:
            self._unanswered_hold(request)
            return self._unavailable(error, request, checked, parsed, chosen)
        except BaseException:  # no answer for a hold that may have landed (see _run)
            self._unanswered_hold(request)
            raise

    async def areserve(
        self,
        action: Action,
        scope: str | Scope,
        *,
        plans: Sequence[Plan] | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> Decision:
        """Async twin of :meth:`reserve`."""
        return await self._arun(self._reserve_flow(action, scope, plans, ttl, idempotency_key))

    # --- settle ------------------------------------------------------------------------------
    def _local(self, rid: str, actual: Amounts | None, commit: bool) -> Settlement:
        return self._emergency.settle(rid, actual, commit, self.clock())

    @staticmethod
    def _actual(actual: AmountsLike | None) -> Amounts | None:
        if actual is None:
            return None
        if type(actual) is dict and len(actual) == 1:  # the usual commit: one unit (hot path)
            for unit, value in actual.items():
                return ((unit, to_steps(unit, value)),)
        return tuple(to_step_map(actual, "actual amounts").items())

    def commit(self, reservation: ReservationRef, actual: AmountsLike | None = None) -> Settlement:
        """Record what the action actually cost and free the rest of its hold.

        ``actual=None`` commits the held amounts. A commit above the hold, after a release or after
        expiry is still recorded (flagged ``over_hold``/``overage``/``after_release``/``late``); a
        repeated commit changes nothing (``replayed``).
        """
        rid = _reservation_id(reservation)
        steps = _shadow_actual(reservation, self._actual(actual))
        if rid.startswith(_LOCAL_PREFIX):
            return settled(reservation, self._local(rid, steps, commit=True), self._guarded)
        return settled(reservation, self.store.commit(rid, steps, self.clock()), self._guarded)

    async def acommit(self, reservation: ReservationRef, actual: AmountsLike | None = None) -> Settlement:
        """Async twin of :meth:`commit`."""
        rid = _reservation_id(reservation)
        steps = _shadow_actual(reservation, self._actual(actual))
        if rid.startswith(_LOCAL_PREFIX):
            return settled(reservation, self._local(rid, steps, commit=True), self._guarded)
        return settled(reservation, await self.store.acommit(rid, steps, self.clock()), self._guarded)

    def release(self, reservation: ReservationRef) -> Settlement:
        """Return the whole hold to the budgets (the action did not run). Idempotent."""
        rid = _reservation_id(reservation)
        if rid.startswith(_LOCAL_PREFIX):
            return settled(reservation, self._local(rid, None, commit=False), self._guarded)
        return settled(reservation, self.store.release(rid, self.clock()), self._guarded)

    async def arelease(self, reservation: ReservationRef) -> Settlement:
        """Async twin of :meth:`release`."""
        rid = _reservation_id(reservation)
        if rid.startswith(_LOCAL_PREFIX):
            return settled(reservation, self._local(rid, None, commit=False), self._guarded)
        return settled(reservation, await self.store.arelease(rid, self.clock()), self._guarded)

    def extend(self, reservation: ReservationRef, ttl: float) -> Reservation:
        """Keep a held reservation alive for at least ``ttl`` more seconds from now (a hold that
        already lives longer is left as it is: an extend never shortens it)."""
        rid = _reservation_id(reservation)
        lifetime = _check_ttl(ttl)
        now = self.clock()
        if rid.startswith(_LOCAL_PREFIX):
            return self._emergency.extend(rid, now + lifetime, now)
        return _reservation(self.store.extend(rid, now + lifetime, now))

    async def aextend(self, reservation: ReservationRef, ttl: float) -> Reservation:
        """Async twin of :meth:`extend`."""
        rid = _reservation_id(reservation)
        lifetime = _check_ttl(ttl)
        now = self.clock()
        if rid.startswith(_LOCAL_PREFIX):
            return self._emergency.extend(rid, now + lifetime, now)
        return _reservation(await self.store.aextend(rid, now + lifetime, now))

    def reservation(self, reservation: ReservationRef) -> Reservation:
        """The current state of a reservation (``ReservationNotFound`` if unknown)."""
        rid = _reservation_id(reservation)
        if rid.startswith(_LOCAL_PREFIX):
            return self._emergency.get(rid, self.clock())
        return _reservation(self.store.reservation(rid, self.clock()))

    def reservations(
        self, scope: str | Scope | None = None, *, status: str | None = "held", limit: int = 1000
    ) -> list[Reservation]:
        """Reservations at or under ``scope`` (default: all held ones), newest first (made at the
        same moment: in an order of the store's, the same at every ``limit``)."""
        path = _listing(scope, status, limit)
        return [_reservation(r) for r in self.store.reservations(path, status, limit, self.clock())]

    async def areservation(self, reservation: ReservationRef) -> Reservation:
        """Async twin of :meth:`reservation`."""
        rid = _reservation_id(reservation)
        if rid.startswith(_LOCAL_PREFIX):
            return self._emergency.get(rid, self.clock())
        return _reservation(await self.store.areservation(rid, self.clock()))

    async def areservations(
        self, scope: str | Scope | None = None, *, status: str | None = "held", limit: int = 1000
    ) -> list[Reservation]:
        """Async twin of :meth:`reservations`."""
        path = _listing(scope, status, limit)
        return [_reservation(r) for r in await self.store.areservations(path, status, limit, self.clock())]

    # --- budgets -----------------------------------------------------------------------------
    def set_budget(self, budget: Budget) -> None:
        """Create or change a budget. Counters are kept, so lowering a limit below what is spent
        puts the scope in overage (it denies until it has room again)."""
        if not isinstance(budget, Budget):
            raise InvalidRequest(f"expected a Budget, got {type(budget).__name__}")
        self.store.set_budget(budget.scope, budget.unit, budget.period_key, budget.steps, self.clock())

    async def aset_budget(self, budget: Budget) -> None:
        """Async twin of :meth:`set_budget`."""
        if not isinstance(budget, Budget):
            raise InvalidRequest(f"expected a Budget, got {type(budget).__name__}")
        await self.store.aset_budget(budget.scope, budget.unit, budget.period_key, budget.steps, self.clock())

    def remove_budget(self, scope: str | Scope, unit: str, period: Period | str | None = None) -> bool:
        """Remove one budget; returns False when there was none. Its counters are kept the store's
        retention (and while something is held on them): set again by then, it continues them —
        removing and setting a budget again within that time never resets its spend — and after,
        it starts anew."""
        path = parse_scope(scope).path
        Budget(path, unit, 0, period)  # validates unit and period the same way set_budget does
        return self.store.remove_budget(path, unit, period_key(period), self.clock())

    async def aremove_budget(self, scope: str | Scope, unit: str, period: Period | str | None = None) -> bool:
        """Async twin of :meth:`remove_budget`."""
        path = parse_scope(scope).path
        Budget(path, unit, 0, period)
        return await self.store.aremove_budget(path, unit, period_key(period), self.clock())

    def balance(self, scope: str | Scope) -> dict[str, Balance]:
        """Budgets at exactly ``scope``, one per unit: when a unit has several periods, the one
        with the least remaining (the binding one). See :meth:`budgets` for all of them."""
        path = parse_scope(scope).path
        now = self.clock()
        return self._by_unit(self.store.accounts(path, windows_at(now), now, False))

    async def abalance(self, scope: str | Scope) -> dict[str, Balance]:
        """Async twin of :meth:`balance`."""
        path = parse_scope(scope).path
        now = self.clock()
        return self._by_unit(await self.store.aaccounts(path, windows_at(now), now, False))

    @staticmethod
    def _by_unit(accounts: list[AccountState]) -> dict[str, Balance]:
        tightest: dict[str, AccountState] = {}
        for account in accounts:
            best = tightest.get(account.unit)
            # Least remaining, then the period binding longest: the same budget a denial names,
            # whatever order the store lists them in.
            if best is None or binds_before(account.remaining, account.period, best.remaining, best.period):
                tightest[account.unit] = account
        return {unit: balance_of(account) for unit, account in tightest.items()}

    def budgets(self, scope: str | Scope | None = None) -> list[Balance]:
        """Every budget at or under ``scope`` (all when ``None``) with its current window's balance."""
        path = None if scope is None else parse_scope(scope).path
        now = self.clock()
        return [balance_of(a) for a in self.store.accounts(path, windows_at(now), now, True)]

    async def abudgets(self, scope: str | Scope | None = None) -> list[Balance]:
        """Async twin of :meth:`budgets`."""
        path = None if scope is None else parse_scope(scope).path
        now = self.clock()
        return [balance_of(a) for a in await self.store.aaccounts(path, windows_at(now), now, True)]

    # --- maintenance -------------------------------------------------------------------------
    def sweep(self) -> int:
        """Return every expired hold to its budgets now; returns how many expired. Not needed for
        correctness (expiry is also reclaimed lazily), but keeps balances and listings tidy."""
        return self.store.sweep(self.clock())

    async def asweep(self) -> int:
        """Async twin of :meth:`sweep`."""
        return await self.store.asweep(self.clock())

    def events(
        self, *, after: int = 0, limit: int = 100, scope: str | Scope | None = None, newest: bool = False
    ) -> list[AuditEvent]:
        """The audit trail: ledger changes with sequence number above ``after``, oldest first — the
        first ``limit`` of them, or with ``newest=True`` the last ``limit`` (what ``events tail`` shows)."""
        return self.store.events(after, limit, _events_query(after, limit, scope), bool(newest))

    async def aevents(
        self, *, after: int = 0, limit: int = 100, scope: str | Scope | None = None, newest: bool = False
    ) -> list[AuditEvent]:
        """Async twin of :meth:`events`."""
        return await self.store.aevents(after, limit, _events_query(after, limit, scope), bool(newest))

    # --- context managers --------------------------------------------------------------------
    def _finish_sync(self, grant: Grant, failed: bool) -> None:
        grant._ended = True
        reservation = grant.decision.reservation
        if reservation is None or settled_by_block(grant, reservation):
            return
        if failed and grant._actual is None:
            try:
                grant.settlement = self.release(reservation)
            except Exception:  # never mask the caller's own exception
                logger.exception("clearance: could not release %s", reservation.id)
            return
        if failed:
            try:
                grant.settlement = self._commit_steps(reservation, grant._actual)
            except Exception:
                logger.exception("clearance: could not commit %s", reservation.id)
            return
        grant.settlement = self._commit_steps(reservation, grant._actual)

    def _unguard(self, reservation: Reservation | None) -> None:
        if reservation is not None and self._guarded.get(reservation.id) is reservation:
            del self._guarded[reservation.id]

    def _commit_steps(self, reservation: Reservation, steps: Amounts | None) -> Settlement:
        steps = _shadow_actual(reservation, steps)
        if reservation.local:
            return self._local(reservation.id, steps, commit=True)
        return self.store.commit(reservation.id, steps, self.clock())

    async def _acommit_steps(self, reservation: Reservation, steps: Amounts | None) -> Settlement:
        steps = _shadow_actual(reservation, steps)
        if reservation.local:
            return self._local(reservation.id, steps, commit=True)
        return await self.store.acommit(reservation.id, steps, self.clock())

    @contextmanager
    def guard(
        self,
        action: Action,
        scope: str | Scope,
        *,
        plans: Sequence[Plan] | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> Iterator[Grant]:
        """Reserve on enter (raise :class:`Denied` on DENY), commit on exit, release on exception::

            with authority.guard(action, "tenant:acme/run:r1") as grant:
                reply = call_model(model=grant.model, max_tokens=grant.max_output_tokens)
                grant.settle({"usd": reply.cost})
        """
        decision = self.reserve(action, scope, plans=plans, ttl=ttl, idempotency_key=idempotency_key)
        decision = guarded_decision(decision, self._own_unanswered(decision, idempotency_key))
        grant = Grant(decision, action)
        reservation = decision.reservation
        if reservation is not None:
            self._guarded[reservation.id] = reservation
        try:
            yield grant
        except BaseException:
            self._unguard(reservation)
            self._finish_sync(grant, failed=True)
            raise
        self._unguard(reservation)
        self._finish_sync(grant, failed=False)

    @asynccontextmanager
    async def aguard(
        self,
        action: Action,
        scope: str | Scope,
        *,
        plans: Sequence[Plan] | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[Grant]:
        """Async twin of :meth:`guard`."""
        decision = await self.areserve(action, scope, plans=plans, ttl=ttl, idempotency_key=idempotency_key)
        decision = guarded_decision(decision, self._own_unanswered(decision, idempotency_key))
        grant = Grant(decision, action)
        reservation = decision.reservation
        if reservation is not None:
            self._guarded[reservation.id] = reservation
        try:
            yield grant
        except BaseException:
            self._unguard(reservation)
            grant._ended = True
            if reservation is not None and not settled_by_block(grant, reservation):
                try:
                    if grant._actual is None:
                        grant.settlement = await _finished(self.arelease(reservation), reservation.id)
                    else:
                        settling = self._acommit_steps(reservation, grant._actual)
                        grant.settlement = await _finished(settling, reservation.id)
                except Exception:  # never mask the caller's own exception
                    logger.exception("clearance: could not settle %s", reservation.id)
            raise
        self._unguard(reservation)
        grant._ended = True
        if reservation is not None and not settled_by_block(grant, reservation):
            grant.settlement = await _finished(self._acommit_steps(reservation, grant._actual), reservation.id)
