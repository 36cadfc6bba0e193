"""What a guard gives its block — the :class:`Grant` — and how a guard decides whether its block may
run and what to leave of a reservation the block settled itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clearance.action import Action
from clearance.decision import Decision, Outcome, Reason, Reservation, Settlement
from clearance.errors import Denied, InvalidRequest
from clearance.ledger import Amounts
from clearance.plan import Caps
from clearance.units import to_step_map

AmountsLike = Mapping[str, Any]
ReservationRef = Reservation | str


def guarded_decision(decision: Decision, unanswered: bool = False) -> Decision:
    """The decision a guard may run its block on, else :class:`Denied`. A guard retried with the
    idempotency key of one that already committed (its block ran, its cost is recorded) is denied
    ``replay_settled``, as a replay of a released or expired reservation is: running the block again
    would do the step twice and its cost would be dropped (the commit replays)."""
    if decision.denied:
        raise Denied(decision)
    reservation = decision.reservation
    if decision.replayed and reservation is not None and reservation.status == "committed":
        message = f"this idempotency key's reservation {reservation.id} is committed: the step it guards has run"
        reason = Reason("replay_settled", message, decision.scope)
        denied = Decision(Outcome.DENY, decision.scope, decision.action_label, reasons=(reason,), replayed=True)
        denied.mode = decision.mode  # (a local replay says it was made failing open)
        raise Denied(denied)
    if decision.replayed and reservation is not None and reservation.status == "held":
        if unanswered:  # this process's own keyed hold whose reply never came: no block ran on it
            return decision
        # Its first guard may still be running the step: running it again does it twice, drops this
        # run's cost (its commit replays) and, should this run fail, releases the running step's hold.
        message = (
            f"this idempotency key's reservation {reservation.id} is held: its step may be under way (or its "
            f"process gone); it is settled, or returns at its TTL (expires_at {reservation.expires_at:.3f}): "
            "retry with a new key then"
        )
        reason = Reason("replay_in_progress", message, decision.scope)
        denied = Decision(Outcome.DENY, decision.scope, decision.action_label, reasons=(reason,), replayed=True)
        denied.mode = decision.mode
        raise Denied(denied)
    return decision


class Grant:
    """What ``guard`` yields: the decision, what to call with (:attr:`model`,
    :attr:`max_output_tokens`, :attr:`max_input_tokens`: the caps where a degraded plan set them,
    else the action's own), and :meth:`settle` to record the actual amounts."""

    __slots__ = ("_actual", "_ended", "action", "decision", "settlement")

    def __init__(self, decision: Decision, action: Action | None = None) -> None:
        self.decision = decision
        self.action = action
        self._actual: Amounts | None = None
        self._ended = False
        self.settlement: Settlement | None = None

    @property
    def model(self) -> str | None:
        """The model to call: the cheaper one a degraded plan chose, else the action's."""
        caps = self.decision.caps
        if caps is not None and caps.model is not None:
            return caps.model
        return self.action.model if self.action is not None else None

    @property
    def max_output_tokens(self) -> int | None:
        """The output limit to pass to the model — the one the hold was priced at: an output cap's,
        else the action's ``max_output_tokens`` (``Caps.max_output_tokens`` alone is ``None`` unless
        a cap changed it, and a call sent without a limit can cost more than was held)."""
        return self._limit("max_output_tokens", "max_output_tokens")

    @property
    def max_input_tokens(self) -> int | None:
        """The input to send at most: a context cap's, else the action's ``input_tokens``."""
        return self._limit("max_input_tokens", "input_tokens")

    def _limit(self, cap: str, estimate: str) -> int | None:
        caps = self.decision.caps
        capped: int | None = getattr(caps, cap) if caps is not None else None
        if capped is not None:
            return capped
        given = self.action.metadata.get(estimate) if self.action is not None else None
        return given if isinstance(given, int) and not isinstance(given, bool) else None

    @property
    def reservation(self) -> Reservation | None:
        return self.decision.reservation

    @property
    def caps(self) -> Caps | None:
        return self.decision.caps

    @property
    def skipped(self) -> bool:
        """True when the decision says to skip this optional step."""
        caps = self.decision.caps
        return caps is not None and caps.skip_optional

    def settle(self, actual: AmountsLike) -> None:
        """Record what the action actually cost; committed when the ``with`` block ends
        (even if it then raises: money spent is spent). Inside the block only: once it has ended
        its reservation is settled, and an actual given now would be lost (``InvalidRequest``) — so
        it is once the block has committed the reservation itself: its commit recorded the cost (a
        settle before that commit is superseded by it, as a later settle supersedes an earlier one).
        After a release by the block, a settle is committed all the same (flagged ``after_release``)."""
        if actual is None:  # (to_step_map's None means "no amounts given": here it is a mistake)
            raise InvalidRequest("settle() needs the actual amounts, {unit: amount}; got None")
        steps = tuple(to_step_map(actual, "actual amounts").items())
        reservation = self.decision.reservation
        if not self._ended and reservation is not None and reservation.status == "committed":
            raise InvalidRequest(
                f"settle() after the block committed reservation {reservation.id} itself: that commit "
                "recorded its cost, and this one would be lost (commit once: through settle() or commit())"
            )
        if self._ended:
            state = "unsettled: its exit's settle failed" if self.settlement is None else self.settlement.status
            rid = self.reservation.id if self.reservation is not None else "-"
            raise InvalidRequest(
                f"settle() after the guard's block ended: reservation {rid} is "
                f"{state} already (settle inside the block; a later cost is not recorded)"
            )
        self._actual = steps


def settled(
    reservation: ReservationRef, settlement: Settlement, guarded: dict[str, Reservation] | None = None
) -> Settlement:
    """``settlement``, after telling the caller's Reservation object (when given one) what became of
    it: a guard whose block released or committed its reservation itself leaves it so. So is the
    guard's own object, in ``guarded`` (the running guards', by id), whatever reference the block
    settled it through: by id, or the copy extend() returned."""
    if guarded:
        own = guarded.get(settlement.reservation_id)
        if own is not None and own is not reservation:
            settled(own, settlement)
    if isinstance(reservation, Reservation):
        reservation.status = settlement.status
        # (a release of a committed reservation answers "committed" with nothing charged by it:
        # what was committed stays as it was)
        if settlement.status == "committed" and (settlement.charged_steps or not settlement.replayed):
            reservation.committed_steps, reservation.flags = settlement.charged_steps, settlement.flags
    return settlement


def settled_by_block(grant: Grant, reservation: Reservation) -> bool:
    """Whether the guard's block released or committed the reservation itself (through this
    Authority, given the Reservation; a release that found it expired too): then the guard leaves
    it as it is — committing the held amounts after a release charged an action that never ran.
    (A block that only ``settle()``s is committed by the guard, after a release too: money spent is
    spent; after the block's own commit, that commit stands — see ``Grant.settle``.)"""
    status = reservation.status
    if status not in ("released", "committed", "expired") or (grant._actual is not None and status != "committed"):
        return False
    grant.settlement = Settlement(
        reservation.id, reservation.status, reservation.committed_steps or (), reservation.flags, replayed=True
    )
    return True


# The running guards' reservations, per store (by URL) and shared like the emergency caps: a block
# settling its reservation through another Authority of the store (a framework adapter's) is seen too.
_GUARDED: dict[str, dict[str, Reservation]] = {}


def guarded_for(url: str) -> dict[str, Reservation]:
    return _GUARDED.setdefault(url, {})  # (one dict operation on str keys: atomic, no lock needed)
