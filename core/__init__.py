"""clearance — an external budget and action authority for AI agents.

Before an agent's next model call, tool call or side effect, clearance decides — atomically,
across every worker and every level of tenant / workspace / app / workflow / agent / run — whether
it may go ahead, go ahead degraded, or must stop; it holds the budget while the action runs and
settles the actual cost afterwards.

>>> from clearance import Authority, Action, Budget
>>> authority = Authority()
>>> authority.set_budget(Budget("tenant:acme", "usd", "10"))
>>> decision = authority.reserve(Action.model_call("openai", "gpt-4o", 1000, 500), "tenant:acme/run:r1")
>>> decision.outcome
<Outcome.ALLOW: 'allow'>
"""

from clearance.action import Action
from clearance.authority import Authority
from clearance.budget import Budget
from clearance.decision import Balance, Decision, Mode, Outcome, Reason, Reservation, Settlement
from clearance.errors import (
    ClearanceError,
    ClockSkew,
    Denied,
    InvalidRequest,
    ReservationClosed,
    ReservationNotFound,
    StoreUnavailable,
)
from clearance.grant import Grant
from clearance.ledger import AuditEvent
from clearance.periods import Period
from clearance.plan import Caps, Plan
from clearance.policy import Policy, Proposal
from clearance.policy_file import PolicyDocument
from clearance.scope import Scope
from clearance.stores import Store, store_from_url

__version__ = "0.1.0"

__all__ = [
    "Action",
    "AuditEvent",
    "Authority",
    "Balance",
    "Budget",
    "Caps",
    "ClearanceError",
    "ClockSkew",
    "Decision",
    "Denied",
    "Grant",
    "InvalidRequest",
    "Mode",
    "Outcome",
    "Period",
    "Plan",
    "Policy",
    "PolicyDocument",
    "Proposal",
    "Reason",
    "Reservation",
    "ReservationClosed",
    "ReservationNotFound",
    "Scope",
    "Settlement",
    "Store",
    "StoreUnavailable",
    "__version__",
    "store_from_url",
]
