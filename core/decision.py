"""What ``reserve`` answers: a Decision, and the public views of reservations and balances.

These are output records, built by the Authority from the store's integer results, so they are
plain slotted dataclasses rather than validating models: treat them as read-only. (They are not
frozen because a frozen dataclass costs five times as much to build, and two are built per call.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from clearance.units import from_step_map, from_steps

if TYPE_CHECKING:
    from clearance.ledger import AccountsSource, AccountState, Amounts
    from clearance.plan import Caps


class Outcome(StrEnum):
    """``ALLOW``: the first plan, as requested. ``ALLOW_WITH_CAPS``: a degraded plan; ``Decision.caps``
    says what changed. ``DENY``: nothing fits, or a rule forbids it."""

    ALLOW = "allow"
    ALLOW_WITH_CAPS = "allow_with_caps"
    DENY = "deny"


class Mode(StrEnum):
    """How the decision was reached."""

    ENFORCED = "enforced"  # the ledger decided
    FAIL_CLOSED = "fail_closed"  # the store was unavailable: denied
    FAIL_OPEN = "fail_open"  # the store was unavailable: allowed within the emergency cap
    SHADOW = "shadow"  # a shadow-mode scope: allowed as requested; ``would_be`` says what enforcement would do


@dataclass(slots=True)
class Reason:
    """One machine-readable reason behind a decision.

    ``code`` is stable (``budget_exhausted``, ``budget_overage``, ``min_headroom``, ``plan_selected``,
    ``store_unavailable``, ``fail_open``, ``emergency_cap``, rule codes from policies); the numbers
    say how far off the plan was.
    """

    code: str
    message: str
    scope: str | None = None
    unit: str | None = None
    period: str | None = None
    plan: int | None = None
    needed: Decimal | None = None
    remaining: Decimal | None = None
    threshold: Decimal | None = None
    rule: str | None = None


@dataclass(slots=True)
class Balance:
    """A budget's state in its current window. ``remaining`` may be negative after overage."""

    scope: str
    unit: str
    limit: Decimal
    spent: Decimal
    held: Decimal
    remaining: Decimal
    period: str | None = None
    window: str = ""


Headroom = Balance
"""The headroom of a decision is the balance of each budgeted level and unit after the hold."""


def balance_of(account: AccountState) -> Balance:
    unit = account.unit
    return Balance(
        scope=account.scope,
        unit=unit,
        limit=from_steps(unit, account.limit),
        spent=from_steps(unit, account.spent),
        held=from_steps(unit, account.held),
        remaining=from_steps(unit, account.remaining),
        period=account.period or None,
        window=account.window,
    )


@dataclass(slots=True)
class Reservation:
    """Budget held for a chosen plan. Commit it with the actual amounts, release it, or extend it;
    past ``expires_at`` (epoch seconds) its hold returns to the budgets by itself."""

    id: str
    scope: str
    steps: Amounts
    expires_at: float
    plan_index: int = 0
    status: str = "held"
    created_at: float = 0.0
    label: str = ""
    idempotency_key: str | None = None
    committed_steps: Amounts | None = None
    flags: tuple[str, ...] = ()
    local: bool = False  # made while the store was down (fail open): settles only in this process
    # Shadow mode: what the action asked for (its hold is empty: nothing is enforced). A commit of
    # this object without actual amounts records these, as enforcement would have recorded its hold.
    shadow_steps: Amounts = ()

    @property
    def amounts(self) -> dict[str, Decimal]:
        """What is (or was) held, per unit."""
        return from_step_map(dict(self.steps))

    @property
    def committed(self) -> dict[str, Decimal] | None:
        """The actual amounts recorded by commit, per unit."""
        return None if self.committed_steps is None else from_step_map(dict(self.committed_steps))


@dataclass(slots=True)
class Settlement:
    """What ``commit`` or ``release`` did. ``flags`` carry ``over_hold``, ``overage``, ``late``,
    ``after_release``; ``replayed`` means a retry of a call that had already taken effect."""

    reservation_id: str
    status: str
    charged_steps: Amounts = ()
    flags: tuple[str, ...] = ()
    replayed: bool = False

    @property
    def charged(self) -> dict[str, Decimal]:
        """What this commit recorded as spent, per unit."""
        return from_step_map(dict(self.charged_steps))


@dataclass(slots=True)
class Decision:
    """The answer to "may this action go ahead, and in what form?"::

        decision = authority.reserve(action, "tenant:acme/run:r1")
        if decision.outcome is Outcome.DENY:
            ...  # decision.reasons say why, with numbers
    """

    outcome: Outcome
    scope: str
    action_label: str
    reservation: Reservation | None = None
    caps: Caps | None = None
    reasons: tuple[Reason, ...] = ()
    _accounts: AccountsSource = field(default=(), repr=False, compare=False)
    """The chain's account states after the hold, or a function building them on first read."""
    plan_index: int = -1
    mode: Mode = Mode.ENFORCED
    replayed: bool = False
    would_be: Decision | None = None
    """In shadow mode, the decision enforcement would have made."""

    @property
    def accounts(self) -> tuple[AccountState, ...]:
        """The state of every budget on the scope chain for the units involved, after the hold
        (integer steps; :attr:`headroom` has them as Decimal balances)."""
        accounts = self._accounts
        if callable(accounts):
            accounts = self._accounts = accounts()
        return accounts

    @property
    def headroom(self) -> tuple[Balance, ...]:
        """What remains of every budget on the scope chain for the units involved, after the hold."""
        return tuple(balance_of(account) for account in self.accounts)

    @property
    def allowed(self) -> bool:
        """True for ALLOW and ALLOW_WITH_CAPS."""
        return self.outcome is not Outcome.DENY

    @property
    def denied(self) -> bool:
        return self.outcome is Outcome.DENY

    @property
    def binding(self) -> Reason | None:
        """The budget (or rule) that stopped the last plan tried: for a denial, what would have to
        change for the action to go ahead. ``None`` when nothing was refused."""
        refused = [r for r in self.reasons if r.code not in ("plan_selected", "risk_allowed", "fail_open")]
        if not refused:
            return None
        last = max((r.plan or 0) for r in refused)
        return next(r for r in refused if (r.plan or 0) == last)

    def remaining(self, unit: str, scope: str | None = None) -> Decimal | None:
        """The smallest remaining amount of ``unit`` over the chain (or at ``scope``), if budgeted."""
        values = [a.remaining for a in self.accounts if a.unit == unit and (scope is None or a.scope == scope)]
        return from_steps(unit, min(values)) if values else None
