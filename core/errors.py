"""The exception tree.

Every error clearance raises on purpose is a :class:`ClearanceError`::

    ClearanceError
    ├── InvalidRequest          bad input; nothing was changed
    │   └── ReservationClosed   the reservation is settled or expired and cannot be extended
    ├── Denied                  raised by ``guard``/``aguard`` only; carries the Decision
    ├── StoreUnavailable        the ledger could not be reached in time; nothing is known to have changed
    │   └── ClockSkew           this worker's clock is too far off the store's to be trusted with expiry
    └── ReservationNotFound     the store has never seen this id (or forgot it after the retention window)

An ordinary denial from ``reserve`` is *not* an exception: it is a ``Decision`` with
``outcome == Outcome.DENY``. ``Denied`` exists for the context managers, where the caller's
block must not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clearance.decision import Decision


class ClearanceError(Exception):
    """Base class of every error clearance raises on purpose."""


class InvalidRequest(ClearanceError, ValueError):
    """The request is malformed (scope, unit, amount, id, ...). The ledger is unchanged."""


class ReservationClosed(InvalidRequest):
    """The reservation was already committed, released or expired, so it cannot be extended."""

    def __init__(self, reservation_id: str, status: str) -> None:
        super().__init__(f"reservation {reservation_id} is {status}; only a held reservation can be extended")
        self.reservation_id = reservation_id
        self.status = status


class Denied(ClearanceError):
    """The action may not go ahead. ``.decision`` says why (reasons, headroom)."""

    def __init__(self, decision: Decision) -> None:
        reasons = "; ".join(r.message for r in decision.reasons) or "denied"
        super().__init__(f"{decision.action_label} at {decision.scope}: {reasons}")
        self.decision = decision


class StoreUnavailable(ClearanceError):
    """The store did not answer (down, refusing, too slow). Raised by calls that cannot be a decision."""


class ClockSkew(StoreUnavailable):
    """This worker's clock is further off the store's than the store allows (Redis ``max_clock_skew``).
    Expiry is judged by the workers' clocks, so such a worker could hand a budget out twice: its
    reserves are denied (reason ``clock_skew``) even when the Authority fails open."""


class ReservationNotFound(ClearanceError, LookupError):
    """The store has no reservation with this id (never made, or past the retention window)."""

    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"no reservation {reservation_id!r} in this store")
        self.reservation_id = reservation_id
