"""The ledger's records and its one algorithm, shared by the embedded stores.

Stores speak integers (smallest steps) and plain tuples; the :class:`~clearance.Authority` turns
them into public ``Decision``/``Reservation``/``Balance`` objects. The Redis store implements the same
algorithm in Lua; the contract suite holds every store to the same results.

The invariant every store keeps, for every budget and window at every moment::

    spent + held <= limit          (unless a commit recorded overage: reality wins)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import NamedTuple

from clearance.decision import Settlement
from clearance.periods import Windows
from clearance.units import from_steps

Amounts = tuple[tuple[str, int], ...]
"""``((unit, steps), ...)`` — the stores' form of an amount map."""

HELD = "held"
COMMITTED = "committed"
RELEASED = "released"
EXPIRED = "expired"
STATUSES = (HELD, COMMITTED, RELEASED, EXPIRED)

# Why a plan did not fit one budget.
EXHAUSTED = "budget_exhausted"
OVERAGE = "budget_overage"
MIN_HEADROOM = "min_headroom"

# Flags a commit can carry.
OVER_HOLD = "over_hold"  # actual above what was held for a unit
OVER_LIMIT = "overage"  # a budget ended above its limit
LATE = "late"  # committed after the hold expired
AFTER_RELEASE = "after_release"  # committed after an explicit release


@dataclass(slots=True)
class PlanSpec:
    """A plan in store terms: what to hold, and the headroom (ppm of limit) each level must keep."""

    amounts: Amounts
    headroom_ppm: tuple[int, ...]  # one per chain level; 0 = no requirement


@dataclass(slots=True)
class HoldRequest:
    reservation_id: str
    chain: tuple[str, ...]  # scope paths, root first
    plans: tuple[PlanSpec, ...]
    now: float
    expires_at: float
    windows: Windows
    idempotency_key: str | None = None
    label: str = ""
    # Units to report in the result's accounts without checking them; one ending in "*" stands for
    # every unit that starts with the rest ("tool.*": every tool budget on the chain, however set).
    probes: tuple[str, ...] = ()
    # time.monotonic() when the request was sent to the store (0: unknown). A store that had to wait
    # (for its write lock; on the async face, for a worker thread) counts that wait against its
    # timeout and makes the hold live its TTL from when it is made: one made with the expiry read
    # before a long wait could be born expired, and its budget handed out again at once.
    issued: float = 0.0
    # The caller's clock (None: unknown): a store that waited re-reads it, so that what is due by
    # then (an expired hold, a reservation past retention) is judged at the time the hold is made.
    clock: Callable[[], float] | None = None
    # Where ``plans[0]`` stands in the decision's ladder: an output-cap retry holds the plan after
    # the ladder's alone. Stores record (and audit) the chosen plan's index counted from it; a
    # HoldResult's index stays one into ``plans``.
    first_index: int = 0

    def restamp(self) -> None:
        """The request as sent now. A wait since it was stamped (for a policy read, a worker thread,
        the store's lock, a pooled connection) longer than ``LATE_HOLD`` moves its expiry by that
        wait — the hold lives its TTL from when it is made: one whose expiry was read before a long
        wait could be born expired, its budget handed out again at once — and what is due by then
        (an expired hold, a reservation past retention) is judged at the caller's clock now."""
        sent = time.monotonic()
        if self.issued:
            late = sent - self.issued
            if late > LATE_HOLD:
                self.expires_at += late
                if self.clock is not None:
                    self.now = max(self.now, self.clock())
        self.issued = sent


class _Probed(frozenset[str]):
    """Units, and every unit that starts with one of ``prefixes`` (see ``HoldRequest.probes``)."""

    __slots__ = ("prefixes",)
    prefixes: tuple[str, ...]

    def __new__(cls, units: Iterable[str], prefixes: tuple[str, ...]) -> _Probed:
        self = super().__new__(cls, units)
        self.prefixes = prefixes
        return self

    def __contains__(self, unit: object) -> bool:
        return frozenset.__contains__(self, unit) or (isinstance(unit, str) and unit.startswith(self.prefixes))


def reported_units(units: Iterable[str], probes: tuple[str, ...]) -> AbstractSet[str]:
    """The units whose budgets a hold reports: ``units`` (its plans') and its ``probes`` (see
    ``HoldRequest.probes``), tested with ``in``."""
    return _reported_units(tuple(units), probes)


@lru_cache(maxsize=1024)
def _reported_units(units: tuple[str, ...], probes: tuple[str, ...]) -> AbstractSet[str]:
    """(Memoised: a policy's model calls ask with the same units and probes every time.)"""
    plain = set(units)
    prefixes = []
    for probe in probes:
        if probe.endswith("*"):
            prefixes.append(probe[:-1])
        else:
            plain.add(probe)
    return _Probed(plain, tuple(prefixes)) if prefixes else frozenset(plain)


_PLAN_DETAILS = tuple(f"plan={index}" for index in range(17))


def plan_detail(index: int) -> str:
    """A hold's audit detail: ``plan=<index>``, its plan's index in the decision's ladder."""
    return _PLAN_DETAILS[index] if index < 17 else f"plan={index}"


CLOSED_WINDOW_SPENT = 2**62
"""What a hold reads as spent in a *closed* window: one older than the windows a store keeps (a
clock stepped back past them), whose counts may have been dropped. Reading it as empty would hand
its budget out a second time; nothing fits in it instead, and the denial says why (see
``window_closed``). Far past any real count (each commit adds at most ``MAX_AMOUNT``)."""


def window_closed(remaining: int) -> bool:
    """Whether a rejection's ``remaining`` comes from a closed window (see ``CLOSED_WINDOW_SPENT``)."""
    return remaining <= -(CLOSED_WINDOW_SPENT // 2)


LATE_HOLD = 0.05
"""Seconds a hold may wait after its expiry was computed before that expiry is moved by the wait."""


class AccountState(NamedTuple):
    """One budget and its current window's counters (a tuple: built on every reserve)."""

    scope: str
    unit: str
    period: str
    window: str
    limit: int
    spent: int
    held: int

    @property
    def remaining(self) -> int:
        return self.limit - self.spent - self.held


new_account_state = tuple.__new__
"""``new_account_state(AccountState, (scope, unit, period, window, limit, spent, held))``: an
AccountState without the namedtuple's Python-level ``__new__`` (the stores build one per budget on
every reserve)."""


@dataclass(slots=True)
class Rejection:
    """The first budget that stopped a plan."""

    plan_index: int
    code: str
    scope: str
    unit: str
    period: str
    needed: int
    remaining: int
    required: int = 0  # for min_headroom: what must remain


AccountsSource = tuple[AccountState, ...] | Callable[[], tuple[AccountState, ...]]
"""The chain's account states after a hold: the tuple, or a function building it. The memory store
answers with the function: most callers never read the headroom, and building one AccountState per
budget was a tenth of its reserve at depth 6."""


def accounts_of(source: AccountsSource) -> tuple[AccountState, ...]:
    """The account states of an :data:`AccountsSource`."""
    return source() if callable(source) else source


@dataclass(slots=True)
class HoldResult:
    reservation_id: str | None  # None when denied
    plan_index: int  # -1 when denied
    expires_at: float
    accounts: AccountsSource  # the chain's budgets for the plans' units, after the hold
    rejections: tuple[Rejection, ...]
    replayed: bool = False  # an idempotent retry answered with the original reservation


@dataclass(slots=True)
class ReservationRecord:
    id: str
    scope: str
    root: str
    status: str
    plan_index: int
    amounts: Amounts  # what the chosen plan holds
    holds: tuple[tuple[str, str, str, str, int], ...]  # (scope, unit, period, window, steps)
    windows: Windows
    created_at: float
    expires_at: float
    settled_at: float | None = None
    committed: Amounts | None = None
    flags: tuple[str, ...] = ()
    idempotency_key: str | None = None
    label: str = ""


SettleResult = Settlement
"""What commit or release did: the public :class:`~clearance.Settlement` itself (it holds integer
steps and converts them on read), so the Authority hands the store's answer on without a copy."""


@dataclass(slots=True)
class AuditEvent:
    """One ledger change, written in the same transaction (or script) as the change itself.

    ``kind`` is ``hold``, ``commit``, ``release``, ``expire``, ``extend``, ``budget_set``,
    ``budget_remove`` or ``policy_set``; ``steps`` are the amounts involved in exact integer steps,
    ``amounts`` the same as ``Decimal`` per unit (as on a :class:`~clearance.Reservation`).
    """

    seq: int
    at: float
    kind: str
    scope: str
    reservation_id: str | None = None
    steps: Amounts = ()
    detail: str = ""

    @property
    def amounts(self) -> dict[str, Decimal]:
        return {unit: from_steps(unit, n) for unit, n in self.steps}


@dataclass(slots=True)
class Choice:
    plan_index: int
    holds: list[tuple[int, int]] = field(default_factory=list)  # (index into the budgets given, steps)
    rejections: list[Rejection] = field(default_factory=list)


# Periods from the shortest-lived window to lifetime: of two budgets with as little left, the one
# that stays binding longer is named.
_PERIOD_RANK = {"minute": 0, "hour": 1, "day": 2, "week": 3, "month": 4, "": 5}


def binds_before(remaining: int, period: str, other_remaining: int, other_period: str) -> bool:
    """Whether a budget with ``remaining`` left in ``period`` is the one to name (in a denial, in
    ``balance``) rather than the other of the same unit: less left, or as little for longer."""
    if remaining != other_remaining:
        return remaining < other_remaining
    return _PERIOD_RANK[period] > _PERIOD_RANK[other_period]


def choose_plan(plans: Sequence[PlanSpec], chain: Sequence[str], budgets: Sequence[AccountState]) -> Choice:
    """Pick the first plan that fits every budget on the chain (the ladder), or none.

    ``budgets`` are the current-window states of every budget on the chain. A plan fits when, for
    each budget of a unit it names, ``spent + held + amount <= limit`` and the fraction the plan asks
    to keep at that level would remain. A budget already past its limit (overage) stops any plan
    naming its unit, even with amount 0. The chosen holds are returned as indexes into ``budgets``.
    """
    choice = Choice(plan_index=-1)
    need = dict(plans[0].amounts)
    if need and len(need) == len(plans[0].amounts) and not any(plans[0].headroom_ppm):
        # The usual reserve: the first plan (each unit once, no thresholds) fits, whatever later
        # rungs the ladder has. One pass; on any misfit the general loop below works out the
        # rejections and tries the later plans.
        fits: list[tuple[int, int]] = []
        for position, account in enumerate(budgets):
            amount = need.get(account[1])
            if amount is None:
                continue
            if account[4] - account[5] - account[6] < amount:  # also any overage, even for 0
                break
            if amount:
                fits.append((position, amount))
        else:  # every budget fits (holds in chain order rather than unit by unit: same holds)
            choice.plan_index = 0
            choice.holds = fits
            return choice
    for index, plan in enumerate(plans):
        holds: list[tuple[int, int]] = []
        rejection: Rejection | None = None
        headroom = plan.headroom_ppm
        demands_headroom = any(headroom)
        for unit, amount in plan.amounts:
            # The plan's reason is its first level, root first, that does not fit, whichever unit
            # (a tokens budget at the root before a usd one below it); at one level, its first unit.
            named: Rejection | None = None  # this unit's
            for position, account in enumerate(budgets):
                if account[1] != unit:
                    continue
                if named is not None and account[0] != named.scope:
                    break  # the level's budgets of a unit come together: past them
                if named is None and rejection is not None and chain.index(account[0]) >= chain.index(rejection.scope):
                    break  # no shallower than the level already named (budgets come root first)
                limit = account[4]
                remaining = limit - account[5] - account[6]
                code = ""
                required = 0
                if remaining < 0:
                    code = OVERAGE
                elif amount > remaining:
                    code = EXHAUSTED
                elif demands_headroom:
                    ppm = headroom[chain.index(account[0])]
                    if ppm:
                        required = -(-limit * ppm // 1_000_000)  # ceil
                        if remaining - amount < required:
                            code = MIN_HEADROOM
                if code:
                    # Several budgets of this unit on this level (a daily and a monthly cap) may
                    # not fit: name the tightest, the same on every store whatever their order.
                    if named is None or binds_before(remaining, account[2], named.remaining, named.period):
                        named = Rejection(index, code, account[0], unit, account[2], amount, remaining, required)
                elif amount and rejection is None and named is None:
                    holds.append((position, amount))
            if named is not None:
                rejection = named  # (shallower than any named before it)
        if rejection is None:
            choice.plan_index = index
            choice.holds = holds
            return choice
        choice.rejections.append(rejection)
    return choice


def merge_actual(held: Amounts, actual: Amounts) -> Amounts:
    """``actual``, plus every held unit it does not name at its held amount."""
    if len(actual) >= len(held) and actual[: len(held)] == held:
        return actual
    if len(held) == 1:  # the usual commit: one unit, re-priced
        unit = held[0][0]
        if (len(actual) == 1 and actual[0][0] == unit) or any(named == unit for named, _ in actual):
            return actual
    named = {unit for unit, _ in actual}
    missing = tuple((unit, steps) for unit, steps in held if unit not in named)
    return actual + missing if missing else actual


def commit_flags(prior_status: str, held: Amounts, actual: Amounts) -> list[str]:
    """Flags for a commit of ``actual`` against a reservation that held ``held``."""
    if prior_status == HELD and len(held) == 1 and len(actual) == 1 and held[0][0] == actual[0][0]:
        return [OVER_HOLD] if actual[0][1] > held[0][1] else []  # the usual commit: one unit
    flags: list[str] = []
    if prior_status == EXPIRED:
        flags.append(LATE)
    elif prior_status == RELEASED:
        flags.append(AFTER_RELEASE)
    held_by_unit = dict(held)
    if any(steps > held_by_unit.get(unit, 0) for unit, steps in actual):
        flags.append(OVER_HOLD)
    return flags
