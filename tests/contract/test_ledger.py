"""The ledger contract (design.md points 1-8), run against every store backend."""

from __future__ import annotations

from decimal import Decimal

import pytest

from clearance import (
    Action,
    Authority,
    Budget,
    Caps,
    Denied,
    InvalidRequest,
    Outcome,
    Plan,
    ReservationClosed,
    ReservationNotFound,
)
from clearance.testing import FakeClock
from clearance.units import MAX_AMOUNT

CHAIN = "tenant:acme/workspace:eu/app:support/workflow:triage/agent:planner/run:r1"


def usd(amount: str | int) -> Action:
    return Action("step", "work", {"usd": amount})


def test_allow_holds_on_every_level(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme/workspace:eu/app:support", "usd", 5))
    decision = authority.reserve(usd("1.5"), CHAIN)
    assert decision.outcome is Outcome.ALLOW
    assert decision.reservation is not None
    assert decision.caps is None
    assert authority.balance("tenant:acme")["usd"].held == Decimal("1.5")
    app = authority.balance("tenant:acme/workspace:eu/app:support")["usd"]
    assert (app.limit, app.spent, app.held, app.remaining) == (5, 0, Decimal("1.5"), Decimal("3.5"))
    remaining = {(h.scope, h.unit): h.remaining for h in decision.headroom}
    assert remaining == {
        ("tenant:acme", "usd"): Decimal("8.5"),
        ("tenant:acme/workspace:eu/app:support", "usd"): Decimal("3.5"),
    }
    assert decision.remaining("usd") == Decimal("3.5")


def test_headroom_is_the_state_right_after_the_hold_whenever_it_is_read(authority: Authority) -> None:
    # Stores may build the headroom only when it is read: it must still be the moment of the hold.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "usd", 4))
    first = authority.reserve(usd(1), CHAIN)
    second = authority.reserve(usd(2), CHAIN)
    authority.commit(first.reservation, {"usd": 3})  # type: ignore[arg-type]
    authority.set_budget(Budget("tenant:acme", "usd", 20))
    expected = [("tenant:acme", 10, 0, 1), ("tenant:acme/workspace:eu", 4, 0, 1)]
    assert [(h.scope, h.limit, h.spent, h.held) for h in first.headroom] == expected
    expected = [("tenant:acme", 10, 0, 3), ("tenant:acme/workspace:eu", 4, 0, 3)]
    assert [(h.scope, h.limit, h.spent, h.held) for h in second.headroom] == expected
    assert second.accounts is second.accounts  # built once
    assert authority.balance("tenant:acme")["usd"].remaining == 15


def test_deny_when_any_level_lacks_room_and_holds_nothing(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "usd", 1))
    decision = authority.reserve(usd(2), CHAIN)
    assert decision.outcome is Outcome.DENY
    assert decision.reservation is None
    (reason,) = decision.reasons
    assert reason.code == "budget_exhausted"
    assert reason.scope == "tenant:acme/workspace:eu"
    assert (reason.needed, reason.remaining) == (2, 1)
    assert authority.balance("tenant:acme")["usd"].held == 0


@pytest.mark.parametrize("order", [("usd", "tokens"), ("tokens", "usd")])
def test_a_denial_names_the_first_level_root_first_whichever_unit(authority: Authority, order: tuple[str, ...]) -> None:
    """The reason named the first unit of the action that did not fit, at whatever level: a model
    call (usd, then tokens) short of tokens at the tenant and of usd in its workflow was sent to the
    workflow's usd budget, and raising that one still denied."""
    authority.set_budget(Budget("tenant:acme", "tokens", 100))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "usd", "0.0001"))
    amounts = {"usd": "0.0028", "tokens": 1100}
    decision = authority.reserve(Action("model_call", "m", {unit: amounts[unit] for unit in order}), CHAIN)
    assert [(r.scope, r.unit) for r in decision.reasons] == [("tenant:acme", "tokens")]
    assert decision.binding is not None and (decision.binding.scope, decision.binding.unit) == ("tenant:acme", "tokens")
    # At one level, the action's first unit is named.
    authority.set_budget(Budget("tenant:acme", "usd", "0.0001"))
    decision = authority.reserve(Action("model_call", "m", {unit: amounts[unit] for unit in order}), CHAIN)
    assert [(r.scope, r.unit) for r in decision.reasons] == [("tenant:acme", order[0])]


def test_unbudgeted_levels_do_not_constrain(authority: Authority) -> None:
    decision = authority.reserve(usd(10**6), CHAIN)
    assert decision.outcome is Outcome.ALLOW
    assert decision.headroom == ()


def test_units_are_independent(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 1))
    authority.set_budget(Budget("tenant:acme", "calls", 2))
    assert authority.reserve(Action("tool_call", "search", {"calls": 1}), CHAIN).allowed
    assert authority.reserve(Action("tool_call", "search", {"calls": 1}), CHAIN).allowed
    denied = authority.reserve(Action("tool_call", "search", {"calls": 1, "usd": "0.1"}), CHAIN)
    assert denied.outcome is Outcome.DENY
    assert denied.reasons[0].unit == "calls"
    assert authority.balance("tenant:acme")["usd"].held == 0


def test_ladder_holds_first_plan_that_fits(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme/workspace:eu", "usd", "0.5"))
    plans = [
        Plan({"usd": 1}),
        Plan({"usd": "0.4"}, caps=Caps(model="mini")),
        Plan({"usd": "0.1"}, caps=Caps(model="nano")),
    ]
    decision = authority.reserve(usd(1), CHAIN, plans=plans)
    assert decision.outcome is Outcome.ALLOW_WITH_CAPS
    assert decision.plan_index == 1
    assert decision.caps == Caps(model="mini")
    assert decision.reservation is not None and decision.reservation.amounts == {"usd": Decimal("0.4")}
    assert [r.code for r in decision.reasons] == ["budget_exhausted", "plan_selected"]
    second = authority.reserve(usd(1), CHAIN, plans=plans)
    assert second.plan_index == 2 and second.caps == Caps(model="nano")
    denied = authority.reserve(usd(1), CHAIN, plans=plans)
    assert denied.outcome is Outcome.DENY
    assert denied.binding is not None
    assert (denied.binding.plan, denied.binding.scope) == (2, "tenant:acme/workspace:eu")
    assert second.binding is not None  # what kept the earlier plans out
    assert authority.balance("tenant:acme/workspace:eu")["usd"].held == Decimal("0.5")


def test_first_plan_fitting_is_plain_allow(authority: Authority) -> None:
    decision = authority.reserve(usd(1), CHAIN, plans=[Plan({"usd": 1}), Plan({"usd": 0}, caps=Caps(model="x"))])
    assert decision.outcome is Outcome.ALLOW
    assert decision.caps is None


def test_a_first_rung_that_fits_reports_the_units_later_rungs_name(authority: Authority) -> None:
    """The usual ladder reserve (its first plan fits) takes a one-pass path on the embedded stores;
    its headroom still shows every unit of the ladder, as a reserve taking a later rung does."""
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "tokens", 1000))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "calls", 5))
    plans = [Plan({"usd": 1}), Plan({"tokens": 100}, caps=Caps(model="mini")), Plan({"calls": 1})]
    first = authority.reserve(usd(1), CHAIN, plans=plans)
    assert first.outcome is Outcome.ALLOW and first.plan_index == 0
    assert sorted((a.scope, a.unit, a.spent, a.held) for a in first.accounts) == [
        ("tenant:acme", "usd", 0, 1_000_000_000),
        ("tenant:acme/workspace:eu", "calls", 0, 0),
        ("tenant:acme/workspace:eu", "tokens", 0, 0),
    ]
    authority.set_budget(Budget("tenant:acme", "usd", 1))  # the first rung no longer fits
    second = authority.reserve(usd(1), CHAIN, plans=plans)
    assert second.plan_index == 1
    assert sorted((a.scope, a.unit) for a in second.accounts) == sorted((a.scope, a.unit) for a in first.accounts)


def test_min_headroom_per_level(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    authority.set_budget(Budget("tenant:acme/workspace:eu/app:support/workflow:triage", "usd", 10))
    flagship = Plan({"usd": 3}, min_headroom={"workflow": 0.25})
    mini = Plan({"usd": 1}, caps=Caps(model="mini"))
    assert authority.reserve(usd(3), CHAIN, plans=[flagship, mini]).plan_index == 0  # 7 of 10 left
    assert authority.reserve(usd(3), CHAIN, plans=[flagship, mini]).plan_index == 0  # 4 left >= 2.5
    third = authority.reserve(usd(3), CHAIN, plans=[flagship, mini])  # would leave 1 < 2.5
    assert third.plan_index == 1
    reason = third.reasons[0]
    assert reason.code == "min_headroom"
    assert reason.threshold == Decimal("2.5")
    assert reason.scope == "tenant:acme/workspace:eu/app:support/workflow:triage"


def test_min_headroom_fraction_applies_to_every_level(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    plan = Plan({"usd": 5}, min_headroom=0.5)
    assert authority.reserve(usd(5), CHAIN, plans=[plan]).allowed
    assert authority.reserve(usd(5), CHAIN, plans=[Plan({"usd": 1}, min_headroom=0.5)]).denied


def test_commit_settles_actual_and_frees_rest(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN)
    assert decision.reservation is not None
    settlement = authority.commit(decision.reservation, {"usd": "1.25"})
    assert settlement.status == "committed"
    assert settlement.charged == {"usd": Decimal("1.25")}
    assert settlement.flags == ()
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held, balance.remaining) == (Decimal("1.25"), 0, Decimal("8.75"))


def test_commit_none_commits_the_hold(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN)
    assert decision.reservation is not None
    authority.commit(decision.reservation.id)
    assert authority.balance("tenant:acme")["usd"].spent == 4


def test_commit_is_idempotent(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN)
    assert decision.reservation is not None
    authority.commit(decision.reservation, {"usd": 2})
    again = authority.commit(decision.reservation, {"usd": 3})
    assert again.replayed
    assert again.charged == {"usd": 2}
    assert authority.balance("tenant:acme")["usd"].spent == 2


def test_commit_above_hold_is_recorded_and_overage_denies(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN)
    assert decision.reservation is not None
    settlement = authority.commit(decision.reservation, {"usd": 12})
    assert "over_hold" in settlement.flags
    assert "overage" in settlement.flags
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.remaining) == (12, -2)
    denied = authority.reserve(usd(0), CHAIN)
    assert denied.outcome is Outcome.DENY
    assert denied.reasons[0].code == "budget_overage"
    # Other units are not affected by the usd overage.
    assert authority.reserve(Action("tool_call", "t", {"calls": 1}), CHAIN).allowed
    authority.set_budget(Budget("tenant:acme", "usd", 20))  # room again
    assert authority.reserve(usd(1), CHAIN).allowed


def test_a_commit_charges_the_budgets_as_they_are_now(authority: Authority) -> None:
    """Every store charges a commit on the hold's own counters while no budget was created or removed
    since the hold (the usual case, their fast path); a budget set, changed or removed in between, or a
    unit the hold did not name, must still be charged as the budgets are now — on every store."""
    ws = "tenant:acme/workspace:eu"
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    added = authority.reserve(usd(10), CHAIN)
    authority.set_budget(Budget(ws, "usd", 5))  # a new level after the hold
    assert added.reservation is not None
    settled = authority.commit(added.reservation, {"usd": 8})
    assert "overage" in settled.flags  # 8 spent against the new 5
    assert authority.balance(ws)["usd"].spent == 8
    assert authority.balance("tenant:acme")["usd"].spent == 8

    authority.set_budget(Budget("tenant:other", "usd", 100))
    lowered = authority.reserve(usd(50), "tenant:other/run:r1")
    authority.set_budget(Budget("tenant:other", "usd", 40))  # the limit lowered after the hold
    assert lowered.reservation is not None
    assert "overage" in authority.commit(lowered.reservation, {"usd": 45}).flags
    balance = authority.balance("tenant:other")["usd"]
    assert (balance.spent, balance.held) == (45, 0)

    authority.set_budget(Budget("tenant:third/app:a", "usd", 100))
    authority.set_budget(Budget("tenant:third", "usd", 100))
    removed = authority.reserve(usd(20), "tenant:third/app:a/run:r1")
    assert authority.remove_budget("tenant:third/app:a", "usd")  # removed after the hold
    assert removed.reservation is not None
    assert authority.commit(removed.reservation, {"usd": 15}).flags == ()
    assert authority.balance("tenant:third")["usd"].spent == 15
    authority.set_budget(Budget("tenant:third/app:a", "usd", 100))  # set again: it was not charged
    balance = authority.balance("tenant:third/app:a")["usd"]
    assert (balance.spent, balance.held) == (0, 0)

    authority.set_budget(Budget("tenant:fourth", "usd", 100))
    authority.set_budget(Budget("tenant:fourth", "calls", 10))
    usd_only = authority.reserve(usd(5), "tenant:fourth/run:r1")  # holds usd only
    assert usd_only.reservation is not None
    authority.commit(usd_only.reservation, {"usd": 4, "calls": 3})  # and charges a unit it did not hold
    assert authority.balance("tenant:fourth")["calls"].spent == 3
    assert authority.balance("tenant:fourth")["usd"].spent == 4


def test_commit_after_release_is_recorded_once(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN)
    assert decision.reservation is not None
    released = authority.release(decision.reservation)
    assert released.status == "released"
    assert authority.balance("tenant:acme")["usd"].held == 0
    settlement = authority.commit(decision.reservation, {"usd": 1})
    assert settlement.flags == ("after_release",)
    assert authority.commit(decision.reservation, {"usd": 1}).replayed
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (1, 0)


def test_release_is_idempotent_and_never_undoes_a_commit(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN)
    assert decision.reservation is not None
    authority.release(decision.reservation)
    assert authority.release(decision.reservation).replayed
    other = authority.reserve(usd(4), CHAIN)
    assert other.reservation is not None
    authority.commit(other.reservation, {"usd": 3})
    after = authority.release(other.reservation)
    assert after.replayed and after.status == "committed"
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (3, 0)


def test_expired_hold_returns_lazily(authority: Authority, clock: FakeClock) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    first = authority.reserve(usd(8), CHAIN, ttl=30)
    assert first.allowed
    assert authority.reserve(usd(8), CHAIN).denied
    clock.advance(30)
    assert authority.reserve(usd(8), CHAIN).allowed  # the first hold expired and came back
    assert first.reservation is not None
    assert authority.reservation(first.reservation).status == "expired"
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (0, 8)


def test_commit_after_expiry_is_recorded_as_late(authority: Authority, clock: FakeClock) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN, ttl=5)
    assert decision.reservation is not None
    clock.advance(10)
    settlement = authority.commit(decision.reservation, {"usd": 3})
    assert settlement.flags == ("late",)
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (3, 0)
    assert authority.commit(decision.reservation, {"usd": 3}).replayed
    assert authority.balance("tenant:acme")["usd"].spent == 3


def test_overage_past_the_largest_amount_stays_exact(authority: Authority) -> None:
    # Reality wins: commits are recorded even far past the limit, and the spent counter stays exact
    # past 2^53 (where Lua's numbers stop being exact) on every store.
    authority.set_budget(Budget("tenant:acme", "tokens", 10))
    holds = [authority.reserve(Action("step", "s", {"tokens": 1}), CHAIN).reservation for _ in range(5)]
    for reservation, actual in zip(holds, [MAX_AMOUNT, 1, 1, 1, 3], strict=True):
        assert "overage" in authority.commit(reservation, {"tokens": actual}).flags  # type: ignore[arg-type]
    balance = authority.balance("tenant:acme")["tokens"]
    assert balance.spent == MAX_AMOUNT + 6  # odd past 2^53: no double holds it
    denied = authority.reserve(Action("step", "s", {"tokens": 1}), CHAIN)
    (reason,) = denied.reasons
    assert reason.code == "budget_overage"
    assert reason.remaining == balance.remaining == 10 - MAX_AMOUNT - 6  # exact, not a double's neighbour


def test_a_late_commit_is_remembered_for_retention_from_the_commit(authority: Authority, clock: FakeClock) -> None:
    # Expired, then committed late: retention runs from the last settle, not from the expiry.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN, ttl=5)
    clock.advance(10)
    assert authority.sweep() == 1
    clock.advance(40 * 3600)
    assert authority.commit(decision.reservation, {"usd": 3}).flags == ("late",)  # type: ignore[arg-type]
    clock.advance(8 * 3600 + 60)  # past retention from the expiry, within it from the commit
    authority.sweep()
    authority.reserve(usd(1), CHAIN).reservation  # any call may tidy up
    again = authority.commit(decision.reservation, {"usd": 3})  # type: ignore[arg-type]
    assert again.replayed and authority.balance("tenant:acme")["usd"].spent == 3


def test_an_expired_hold_is_remembered_for_retention_from_its_expiry(authority: Authority, clock: FakeClock) -> None:
    # Not from when it was reclaimed, which is lazy and differs by store (memory on any call, SQLite
    # on a reserve of any tenant, Redis on one of its own): a commit just past the retention was
    # `late` on one store and `ReservationNotFound` on another.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN, ttl=5, idempotency_key="job-1")
    clock.advance(24 * 3600)
    assert authority.sweep() == 1  # reclaimed a day after its expiry
    clock.advance(24 * 3600 + 10)  # 48 h and 5 s after the expiry: within the retention from the reclaim
    with pytest.raises(ReservationNotFound):
        authority.commit(decision.reservation, {"usd": 3})  # type: ignore[arg-type]
    assert not authority.reserve(usd(1), CHAIN, idempotency_key="job-1").replayed  # its key is free
    assert authority.balance("tenant:acme")["usd"].spent == 0


@pytest.mark.parametrize("call", ["commit", "release", "extend", "reservation"])
def test_a_hold_expired_a_retention_ago_is_forgotten_and_its_budget_back(
    authority: Authority, clock: FakeClock, call: str
) -> None:
    # No call at all since the hold (a crashed worker, an idle tenant): the first call that meets it
    # returns its budget and finds it forgotten, as if it had been reclaimed at its expiry.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN, ttl=5, idempotency_key="job-2")
    reservation = decision.reservation
    assert reservation is not None
    clock.advance(48 * 3600 + 10)
    with pytest.raises(ReservationNotFound):
        if call == "commit":
            authority.commit(reservation, {"usd": 3})
        elif call == "release":
            authority.release(reservation)
        elif call == "extend":
            authority.extend(reservation, 60)
        else:
            authority.reservation(reservation)
    usd_balance = authority.balance("tenant:acme")["usd"]
    assert (usd_balance.spent, usd_balance.held) == (0, 0)
    assert [e.kind for e in authority.events(scope="tenant:acme")][-2:] == ["hold", "expire"]
    assert not authority.reserve(usd(1), CHAIN, idempotency_key="job-2").replayed
    assert all(r.id != reservation.id for r in authority.reservations("tenant:acme"))


@pytest.mark.parametrize("busy", [False, True])
def test_a_clock_run_ahead_and_set_back_never_spends_a_window_twice(
    authority: Authority, clock: FakeClock, busy: bool
) -> None:
    """A clock 10 periods ahead, then corrected (a bad NTP source, a VM resumed): SQLite's
    maintenance pass, judging windows by that clock, pruned the window really current, and once the
    clock was back it read as empty: its whole limit spent a second time. ``busy``: the budget itself
    is used in every period meanwhile (memory then prunes that window too)."""
    authority.set_budget(Budget("tenant:acme", "calls", 5, period="hour"))
    start = clock()
    for _ in range(5):
        authority.commit(authority.reserve(Action.tool_call("x"), CHAIN).reservation)  # type: ignore[arg-type]
    for hour in range(10, 20 if busy else 11):  # the clock runs ten hours ahead
        clock.set(start + hour * 3600)
        if busy:
            authority.commit(authority.reserve(Action.tool_call("x"), CHAIN).reservation)  # type: ignore[arg-type]
    authority.sweep()  # (the maintenance pass, with the clock ahead)
    clock.set(start + 60)  # set back: the same hour as the first five calls
    again = authority.reserve(Action.tool_call("x"), CHAIN)
    assert again.denied
    (reason,) = again.reasons
    assert reason.remaining == 0  # never a made-up overage of 2^62
    assert "closed" in reason.message or reason.code == "budget_exhausted"


def test_a_late_commit_into_a_closed_window_does_not_open_it_again(authority: Authority, clock: FakeClock) -> None:
    """SQLite wrote a late commit's counters into a closed window (its own pruned ones gone): it then
    read as all but empty, and four more calls went through against a limit of 5 (found in review)."""
    authority.set_budget(Budget("tenant:acme", "calls", 5, period="hour"))
    start = clock()
    for _ in range(4):
        authority.commit(authority.reserve(Action.tool_call("x"), CHAIN).reservation)  # type: ignore[arg-type]
    late = authority.reserve(Action.tool_call("x"), CHAIN, ttl=10).reservation
    assert late is not None
    for hour in range(10, 20):  # the clock runs ten hours ahead, the budget used every hour
        clock.set(start + hour * 3600)
        authority.commit(authority.reserve(Action.tool_call("x"), CHAIN).reservation)  # type: ignore[arg-type]
    authority.sweep()
    clock.set(start + 60)  # set back into the first hour
    assert authority.commit(late).flags == ("late",)
    allowed = 0
    for _ in range(6):
        decision = authority.reserve(Action.tool_call("x"), CHAIN)
        if decision.reservation is not None:
            allowed += 1
            authority.commit(decision.reservation)
    assert allowed == 0  # the hour's five calls are spent (or its window closed)


def test_sweep_returns_expired_holds(authority: Authority, clock: FakeClock) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:globex", "usd", 10))
    authority.reserve(usd(1), CHAIN, ttl=5)
    authority.reserve(usd(2), "tenant:globex/run:x", ttl=5)
    authority.reserve(usd(3), "tenant:globex/run:y", ttl=50)
    clock.advance(6)
    assert authority.sweep() == 2
    assert authority.sweep() == 0
    assert authority.balance("tenant:globex")["usd"].held == 3
    assert [r.scope for r in authority.reservations()] == ["tenant:globex/run:y"]


def test_extend_pushes_expiry(authority: Authority, clock: FakeClock) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(4), CHAIN, ttl=10)
    assert decision.reservation is not None
    clock.advance(8)
    extended = authority.extend(decision.reservation, 30)
    assert extended.expires_at == pytest.approx(clock() + 30)
    clock.advance(20)
    assert authority.balance("tenant:acme")["usd"].held == 4
    clock.advance(11)
    assert authority.balance("tenant:acme")["usd"].held == 0
    with pytest.raises(ReservationClosed):
        authority.extend(decision.reservation, 30)


def test_idempotent_reserve_holds_once(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    first = authority.reserve(usd(4), CHAIN, idempotency_key="call-1")
    second = authority.reserve(usd(4), CHAIN, idempotency_key="call-1")
    assert first.reservation is not None and second.reservation is not None
    assert second.reservation.id == first.reservation.id
    assert second.replayed
    assert authority.balance("tenant:acme")["usd"].held == 4
    # The same key in another tenant is another reservation.
    other = authority.reserve(usd(4), "tenant:globex/run:r1", idempotency_key="call-1")
    assert other.reservation is not None and other.reservation.id != first.reservation.id
    # The same key at another scope of the tenant is refused, never answered with the first hold
    # (that would allow the call while holding nothing at its own scope).
    authority.set_budget(Budget("tenant:acme/run:r2", "usd", 1))
    elsewhere = authority.reserve(usd(4), "tenant:acme/run:r2", idempotency_key="call-1")
    assert elsewhere.denied and elsewhere.reasons[0].code == "replay_mismatch"
    # So is the same key for another action with the same amounts: allowed on the first one's hold,
    # it ran unpaid for, named on a reservation the ledger holds for the first.
    for another in (Action("side_effect", "send_email", {"usd": 4}), Action("step", "other", {"usd": 4})):
        mismatched = authority.reserve(another, CHAIN, idempotency_key="call-1")
        assert mismatched.denied and mismatched.reasons[0].code == "replay_mismatch"
        assert mismatched.replayed and mismatched.reservation is None
        with pytest.raises(Denied):
            with authority.guard(another, CHAIN, idempotency_key="call-1"):
                pytest.fail("the block of a mismatched key ran")
    assert authority.balance("tenant:acme")["usd"].held == 4


def test_a_listing_cut_at_any_limit_is_the_start_of_a_longer_one(authority: Authority) -> None:
    """Reservations made at the same moment (a busy tenant, a fake clock): on Redis the script cut
    its listing keeping one end of the tie and the client sorted what was left by the other, so
    ``limit=1`` named a reservation the full listing did not start with."""
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    authority.set_budget(Budget("tenant:globex", "usd", 100))
    for tenant in ("tenant:acme", "tenant:globex"):
        for _ in range(5):
            authority.reserve(usd(1), f"{tenant}/run:r1")
    for scope in ("tenant:acme", None):
        whole = [r.id for r in authority.reservations(scope, limit=100)]
        assert len(whole) == (5 if scope else 10)
        for limit in range(1, len(whole) + 1):
            assert [r.id for r in authority.reservations(scope, limit=limit)] == whole[:limit], (scope, limit)


def test_periods_count_each_window_and_settle_where_held(authority: Authority, clock: FakeClock) -> None:
    clock.set(1_798_847_940.0)  # 2027-01-01T23:59:00Z
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="day"))
    authority.set_budget(Budget("tenant:acme", "usd", 100, period="month"))
    late_night = authority.reserve(usd(9), CHAIN)
    assert late_night.reservation is not None
    assert authority.reserve(usd(2), CHAIN).denied
    clock.advance(120)  # next day
    assert authority.balance("tenant:acme")["usd"].period == "day"
    assert authority.reserve(usd(2), CHAIN).allowed
    authority.commit(late_night.reservation, {"usd": 9})  # settles in yesterday's window
    today = {b.period: b for b in authority.budgets("tenant:acme")}
    assert today["day"].spent == 0 and today["day"].held == 2
    assert today["month"].spent == 9 and today["month"].held == 2


def test_budgets_under_a_scope_are_its_subtree_only(authority: Authority) -> None:
    """A listing under a scope reads that tenant's budgets alone (it used to look at every
    tenant's: 100 ms a balance with 100,000 budgets, under the memory store's lock): never a
    sibling sharing its prefix ("tenant:t70", "tenant:t7.x")."""
    for scope in ("tenant:t7", "tenant:t7/run:a", "tenant:t7/run:a/agent:b", "tenant:t70", "tenant:t7.x", "tenant:t6"):
        authority.set_budget(Budget(scope, "usd", 1))
    assert [b.scope for b in authority.budgets("tenant:t7")] == [
        "tenant:t7",
        "tenant:t7/run:a",
        "tenant:t7/run:a/agent:b",
    ]
    assert [b.scope for b in authority.budgets("tenant:t7/run:a")] == ["tenant:t7/run:a", "tenant:t7/run:a/agent:b"]
    assert set(authority.balance("tenant:t7")) == {"usd"}
    assert authority.remove_budget("tenant:t7/run:a", "usd")
    assert [b.scope for b in authority.budgets("tenant:t7")] == ["tenant:t7", "tenant:t7/run:a/agent:b"]
    assert len(authority.budgets()) == 5


def test_balance_reports_the_tightest_period(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    authority.set_budget(Budget("tenant:acme", "usd", 5, period="hour"))
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.limit, balance.period) == (5, "hour")
    assert {b.period for b in authority.budgets("tenant:acme")} == {None, "hour"}


def test_remove_budget(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 1))
    assert authority.reserve(usd(2), CHAIN).denied
    assert authority.remove_budget("tenant:acme", "usd")
    assert not authority.remove_budget("tenant:acme", "usd")
    assert authority.reserve(usd(2), CHAIN).allowed
    assert authority.balance("tenant:acme") == {}


def _removed_counters_kept(authority: Authority, scope: str) -> bool:
    """Whether the store still keeps a removed usd budget's counters at ``scope``."""
    import sqlite3

    from clearance.stores.memory import MemoryStore
    from clearance.stores.redis import RedisStore
    from clearance.stores.sqlite import SQLiteStore

    store = authority.store
    if isinstance(store, MemoryStore):
        return (scope, "usd", "") in store._parked
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:
            return bool(db.execute("SELECT count(*) FROM accounts WHERE scope = ?", (scope,)).fetchone()[0])
    assert isinstance(store, RedisStore)
    ledger = store._keys(scope.split("/", maxsplit=1)[0])[0]
    return bool(store._keyed(ledger, lambda client: client.hexists(ledger, f"={scope}|usd|")))


def test_a_removed_budget_s_counters_are_kept_a_retention_then_forgotten(
    authority: Authority, clock: FakeClock
) -> None:
    """A removed budget's counters were kept for good (set again, it continues them): budgets made
    and removed per run added up without end on every store. They are kept a retention now, and
    longer while something is held on them; then forgotten (set again, a new count)."""
    scope = "tenant:acme/run:r1"
    authority.set_budget(Budget(scope, "usd", 10))
    authority.commit(authority.reserve(usd(3), scope).reservation)  # type: ignore[arg-type]
    assert authority.remove_budget(scope, "usd")
    clock.advance(3600)
    authority.set_budget(Budget(scope, "usd", 10))  # within a retention: its counters go on
    assert authority.balance(scope)["usd"].spent == 3
    assert authority.remove_budget(scope, "usd")
    clock.advance(49 * 3600)
    authority.sweep()
    assert not _removed_counters_kept(authority, scope)
    authority.set_budget(Budget(scope, "usd", 10))  # a new count
    assert authority.balance(scope)["usd"].spent == 0
    authority.commit(authority.reserve(usd(2), scope).reservation)  # type: ignore[arg-type]
    assert authority.remove_budget(scope, "usd")
    clock.advance(49 * 3600)
    authority.set_budget(Budget(scope, "usd", 10))  # past a retention, no sweep meanwhile: a new count too
    assert authority.balance(scope)["usd"].spent == 0
    held = authority.reserve(usd(4), scope, ttl=100 * 3600).reservation
    assert held is not None
    assert authority.remove_budget(scope, "usd")
    clock.advance(49 * 3600)
    authority.sweep()
    assert _removed_counters_kept(authority, scope)  # something is held on them
    authority.set_budget(Budget(scope, "usd", 10))
    assert authority.balance(scope)["usd"].held == 4
    authority.commit(held, {"usd": 1})
    assert authority.balance(scope)["usd"].spent == 1


@pytest.mark.parametrize("sweep", [True, False])
@pytest.mark.parametrize("how", ["set", "ensure"])
def test_a_removed_budget_goes_once_nothing_is_held_on_it_lazily_as_swept(
    authority: Authority, clock: FakeClock, how: str, sweep: bool
) -> None:
    """Whether a removed budget's counters are still there when it is set again must not depend on
    the store, nor on whether a sweep ran: held when its retention ran out, it goes once nothing is
    held on it; a hold that is due to expire but not yet reclaimed is expired first."""
    retention = 48 * 3600
    for case in ("released", "expired"):
        scope = f"tenant:acme/run:{case}"
        authority.set_budget(Budget(scope, "usd", 10))
        authority.commit(authority.reserve(usd(3), scope).reservation)  # type: ignore[arg-type]
        ttl = 3 * retention if case == "released" else retention + 50
        held = authority.reserve(usd(4), scope, ttl=ttl).reservation
        assert held is not None and authority.remove_budget(scope, "usd")
        if case == "released":
            clock.advance(retention + 1)
            authority.sweep()  # due, but held: looked at again a minute later
            authority.release(held)
            clock.advance(61)
        else:
            clock.advance(retention + 100)  # the hold is past its TTL, nothing has reclaimed it yet
        if sweep:
            authority.sweep()
        if how == "set":
            authority.set_budget(Budget(scope, "usd", 10))
        else:
            authority.store.ensure_budget(scope, "usd", "", 10 * 10**9, clock())
        balance = authority.balance(scope)["usd"]
        assert (balance.spent, balance.held) == (0, 0), case


@pytest.mark.parametrize("between", ["nothing", "budgets", "balance", "sweep", "lookup", "another commit"])
def test_a_removed_budget_held_past_its_deadline_is_judged_by_it_whoever_looked(
    authority: Authority, clock: FakeClock, between: str
) -> None:
    """A removed budget still held at its deadline is looked at again later; set again once
    nothing is held on it, it is forgotten (a new count) — whether or not some call happened to look
    at it while it was held (that look used to push its deadline a minute on, on some stores)."""
    scope = "tenant:acme/app:a"
    authority.set_budget(Budget(scope, "usd", 10))
    authority.commit(authority.reserve(usd(3), scope, ttl=5).reservation)  # type: ignore[arg-type]
    held = authority.reserve(usd(1), scope, ttl=72 * 3600).reservation
    other = authority.reserve(usd(1), "tenant:acme/app:b", ttl=72 * 3600).reservation
    assert held is not None and other is not None
    assert authority.remove_budget(scope, "usd")
    clock.advance(48 * 3600 + 1)
    if between == "budgets":
        authority.budgets()
    elif between == "balance":
        authority.balance(scope)
    elif between == "sweep":
        authority.sweep()
    elif between == "lookup":
        authority.reservation(held)
    elif between == "another commit":
        authority.commit(other)
    authority.release(held)
    authority.set_budget(Budget(scope, "usd", 10))
    assert authority.balance(scope)["usd"].spent == 0


def test_tenants_are_isolated(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 1))
    authority.set_budget(Budget("tenant:acme-eu", "usd", 1))
    decision = authority.reserve(usd(1), "tenant:acme-eu/run:r1")
    assert decision.allowed
    assert authority.balance("tenant:acme")["usd"].held == 0
    assert [b.scope for b in authority.budgets("tenant:acme")] == ["tenant:acme"]


def test_unknown_and_malformed_reservation_ids(authority: Authority) -> None:
    with pytest.raises(ReservationNotFound):
        authority.commit("0123456789abcdef0123.tenant:acme")
    with pytest.raises(ReservationNotFound):
        authority.release("0123456789abcdef0123.tenant:acme")
    for bad in ["", "nope", "0123456789abcdef0123.tenant:acme/run:x", "xyz.tenant:acme", "0123456789abcdef0123.{x}"]:
        with pytest.raises(InvalidRequest):
            authority.commit(bad)


def test_audit_trail_records_every_change(authority: Authority, clock: FakeClock) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    held = authority.reserve(usd(1), CHAIN)
    released = authority.reserve(usd(1), CHAIN)
    expiring = authority.reserve(usd(1), CHAIN, ttl=1)
    assert held.reservation and released.reservation and expiring.reservation
    authority.commit(held.reservation, {"usd": "0.5"})
    authority.release(released.reservation)
    clock.advance(2)
    authority.sweep()
    events = authority.events(scope="tenant:acme")
    kinds = [e.kind for e in events]
    assert kinds == ["budget_set", "hold", "hold", "hold", "commit", "release", "expire"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert events[4].reservation_id == held.reservation.id
    assert events[4].amounts == {"usd": Decimal("0.5")}
    assert events[4].steps == (("usd", 500_000_000),)
    assert authority.events(after=events[3].seq, scope="tenant:acme")[0].kind == "commit"
    assert authority.events(scope="tenant:globex") == []


def test_guard_commits_settled_actual(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(usd(4), CHAIN) as grant:
        assert grant.decision.outcome is Outcome.ALLOW
        grant.settle({"usd": "1.5"})
    assert grant.settlement is not None and grant.settlement.status == "committed"
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("1.5")


def test_guard_releases_on_exception_and_raises_denied(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with pytest.raises(RuntimeError), authority.guard(usd(4), CHAIN):
        raise RuntimeError("tool failed")
    assert authority.balance("tenant:acme")["usd"].held == 0
    assert authority.balance("tenant:acme")["usd"].spent == 0
    with pytest.raises(Denied) as info, authority.guard(usd(11), CHAIN):
        pytest.fail("must not run")
    assert info.value.decision.reasons[0].code == "budget_exhausted"


def test_guard_commits_what_was_spent_before_an_exception(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with pytest.raises(ValueError, match="parse"), authority.guard(usd(4), CHAIN) as grant:
        grant.settle({"usd": 2})
        raise ValueError("parse error after the model answered")
    assert authority.balance("tenant:acme")["usd"].spent == 2


def test_a_keyed_guard_retried_while_its_step_runs_does_not_run_it_again(authority: Authority) -> None:
    """A framework's retry of a step (the same key) while the first run is still inside its guard:
    denied ``replay_in_progress``. Before, it ran the step again (its cost dropped: its commit
    replayed) and, failing, released the running step's hold — another step was let in and the
    budget ended over its limit (12 of 10)."""
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(usd(6), CHAIN, idempotency_key="step-7") as first:
        with pytest.raises(Denied) as info, authority.guard(usd(6), CHAIN, idempotency_key="step-7"):
            pytest.fail("must not run the step a second time")
        assert info.value.decision.reasons[0].code == "replay_in_progress"
        assert authority.balance("tenant:acme")["usd"].held == 6  # still the running step's
        assert not authority.reserve(usd(6), CHAIN).allowed
        first.settle({"usd": 6})
    assert authority.balance("tenant:acme")["usd"].spent == 6


def test_a_guard_sees_its_reservation_settled_through_any_reference(authority: Authority) -> None:
    """A block releasing its reservation by id, or through the copy extend() returned (a heartbeat),
    is left so: the guard commits nothing more (it charged the whole hold, flagged after_release)."""
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(usd(1), CHAIN) as grant:
        kept = authority.extend(grant.reservation, 120)  # type: ignore[arg-type]
        authority.release(kept)
    assert grant.settlement is not None and grant.settlement.status == "released"
    with authority.guard(usd(1), CHAIN) as grant:
        authority.release(grant.reservation.id)  # type: ignore[union-attr]
    assert grant.settlement is not None and grant.settlement.status == "released"
    other = Authority(authority.store)  # (another of the process's Authorities: a framework adapter's)
    with authority.guard(usd(1), CHAIN) as grant:
        other.release(grant.reservation.id)  # type: ignore[union-attr]
    assert grant.settlement is not None and grant.settlement.status == "released"
    assert authority.balance("tenant:acme")["usd"].spent == 0



def test_a_guard_whose_block_commits_itself_refuses_a_settle_after_that_commit(authority: Authority) -> None:
    """A block that committed its reservation and then called ``settle()``: the guard's exit commit
    replayed the block's, and the settled amount was recorded nowhere, with no error. Refused now
    (the block's commit recorded the cost); a settle before the block's commit is superseded by it,
    and settle(None) is a mistake, not "no amounts"."""
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(usd(1), CHAIN) as grant:
        authority.commit(grant.reservation, {"usd": "0.3"})  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="committed"):
            grant.settle({"usd": "0.7"})
    assert grant.settlement is not None and grant.settlement.charged == {"usd": Decimal("0.3")}
    with authority.guard(usd(1), CHAIN) as grant:
        grant.settle({"usd": "0.7"})
        authority.commit(grant.reservation.id, {"usd": "0.2"})  # type: ignore[union-attr]
    assert grant.settlement is not None and grant.settlement.charged == {"usd": Decimal("0.2")}
    with authority.guard(usd(1), CHAIN) as grant:
        grant.settle({"usd": "0.4"})
        with pytest.raises(InvalidRequest):
            grant.settle(None)  # type: ignore[arg-type]
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("0.9")


@pytest.mark.asyncio
async def test_async_twins(authority: Authority, clock: FakeClock) -> None:
    await authority.aset_budget(Budget("tenant:acme", "usd", 10))
    decision = await authority.areserve(usd(4), CHAIN, ttl=10)
    assert decision.reservation is not None
    await authority.aextend(decision.reservation, 20)
    await authority.acommit(decision.reservation, {"usd": 1})
    released = await authority.areserve(usd(2), CHAIN)
    assert released.reservation is not None
    await authority.arelease(released.reservation)
    async with authority.aguard(usd(3), CHAIN) as grant:
        grant.settle({"usd": 2})
    with pytest.raises(KeyError):
        async with authority.aguard(usd(3), CHAIN):
            raise KeyError("boom")
    balance = (await authority.abalance("tenant:acme"))["usd"]
    assert (balance.spent, balance.held) == (3, 0)
    assert await authority.asweep() == 0
    # the read-side and admin twins answer what their sync originals answer
    held = await authority.areserve(usd(1), CHAIN)
    assert held.reservation is not None
    assert (await authority.areservation(held.reservation)).status == "held"
    assert [r.id for r in await authority.areservations("tenant:acme")] == [held.reservation.id]
    assert [r.id for r in await authority.areservations(status="committed")] == [
        r.id for r in authority.reservations(status="committed")
    ]
    assert await authority.abudgets("tenant:acme") == authority.budgets("tenant:acme")
    assert [e.seq for e in await authority.aevents(limit=5, newest=True)] == [
        e.seq for e in authority.events(limit=5, newest=True)
    ]
    await authority.aset_budget(Budget("tenant:acme", "calls", 5))
    assert await authority.aremove_budget("tenant:acme", "calls")
    assert not await authority.aremove_budget("tenant:acme", "calls")
    with pytest.raises(InvalidRequest):
        await authority.aevents(after=2**70)
    with pytest.raises(InvalidRequest):
        await authority.areservations(status="pending")


def test_every_public_call_has_an_async_twin() -> None:
    """The README promises an async twin for every call; a new call without one fails here."""
    sync_only = {"from_url"}  # a constructor
    calls = {
        name
        for name, value in vars(Authority).items()
        if callable(value) and not name.startswith("_") and not name.startswith("a") and name not in sync_only
    } | {"apply_policy"}
    missing = sorted(name for name in calls if not hasattr(Authority, "a" + name))
    assert not missing, f"no async twin for {missing}"


def test_audit_reads_past_the_largest_sequence_are_invalid(authority: Authority) -> None:
    with pytest.raises(InvalidRequest):
        authority.events(after=2**70)
    assert authority.events(after=2**63 - 1) == []


def test_model_call_prices_worst_case(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", "0.02"))
    action = Action.model_call("openai", "gpt-4o", 1000, 800)
    assert action.amounts == {"usd": Decimal("0.0105"), "tokens": 1800}
    assert authority.reserve(action, CHAIN).allowed
    assert authority.reserve(action, CHAIN).denied


def test_commit_settles_unnamed_units_at_their_hold(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme", "calls", 10))
    decision = authority.reserve(Action("tool_call", "search", {"usd": 1, "calls": 1}), CHAIN)
    assert decision.reservation is not None
    settlement = authority.commit(decision.reservation, {"usd": "0.25"})
    assert settlement.charged == {"usd": Decimal("0.25"), "calls": 1}
    assert authority.balance("tenant:acme")["calls"].spent == 1
    zero = authority.reserve(Action("tool_call", "search", {"usd": 1, "calls": 1}), CHAIN)
    assert zero.reservation is not None
    assert authority.commit(zero.reservation, {"usd": 0, "calls": 0}).charged == {"usd": 0, "calls": 0}


def test_newest_events_are_read_from_the_end(authority: Authority) -> None:
    for n in range(30):
        authority.set_budget(Budget(f"tenant:acme/run:r{n}", "usd", n + 1))
    authority.set_budget(Budget("tenant:globex", "usd", 1))
    newest = authority.events(limit=5, scope="tenant:acme", newest=True)
    assert [e.scope for e in newest] == [f"tenant:acme/run:r{n}" for n in range(25, 30)]
    assert [e.seq for e in newest] == sorted(e.seq for e in newest)
    everything = authority.events(limit=1000)
    assert authority.events(limit=3, newest=True) == everything[-3:]


def test_a_hold_on_thousands_of_budgets(authority: Authority) -> None:
    """11 levels x 64 units x 6 periods: more counters than one SQL statement or Lua unpack() takes."""
    chain = "/".join(f"l{i}:n" for i in range(11))
    levels = chain.split("/")
    units = [f"u{i}" for i in range(64)]
    for depth in range(1, 12):
        for unit in units:
            for period in (None, "minute", "hour", "day", "week", "month"):
                authority.set_budget(Budget("/".join(levels[:depth]), unit, 100, period=period))
    decision = authority.reserve(Action("step", "wide", dict.fromkeys(units, 3)), chain)
    assert decision.reservation is not None, decision.reasons
    assert len(decision.accounts) == 11 * 64 * 6
    assert {(b.spent, b.held) for b in authority.budgets(chain)} == {(0, 3)}
    authority.commit(decision.reservation, dict.fromkeys(units, 2))
    assert {(b.spent, b.held) for b in authority.budgets(chain)} == {(2, 0)}
    assert {(b.spent, b.held) for b in authority.budgets(levels[0])} == {(2, 0)}


def test_past_retention_a_reservation_is_forgotten_without_a_sweep(authority: Authority, clock: FakeClock) -> None:
    # Forgetting is lazy like expiry: no sweep and no other call in between, yet a reservation
    # settled more than retention ago is gone — its id is unknown and its idempotency key free again.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    first = authority.reserve(usd(2), CHAIN, idempotency_key="job-7")
    authority.commit(first.reservation, {"usd": 1})  # type: ignore[arg-type]
    released = authority.reserve(usd(1), CHAIN)
    authority.release(released.reservation)  # type: ignore[arg-type]
    clock.advance(72 * 3600)
    with pytest.raises(ReservationNotFound):  # the first call after: nothing has tidied up yet
        authority.commit(released.reservation, {"usd": 1})  # type: ignore[arg-type]
    with pytest.raises(ReservationNotFound):
        authority.reservation(first.reservation)  # type: ignore[arg-type]
    again = authority.reserve(usd(2), CHAIN, idempotency_key="job-7")
    assert again.outcome is Outcome.ALLOW and not again.replayed
    assert again.reservation is not None and first.reservation is not None
    assert again.reservation.id != first.reservation.id
    with pytest.raises(ReservationNotFound):
        authority.commit(first.reservation, {"usd": 1})
    usd_balance = authority.balance("tenant:acme")["usd"]
    assert (usd_balance.spent, usd_balance.held) == (1, 2)


def test_a_replay_long_after_its_window_reports_real_counters(authority: Authority, clock: FakeClock) -> None:
    # A replayed reserve reports the window of its original hold. Stores keep a period budget's
    # recent windows only (memory and Redis: 8): a window dropped since reads as empty, never as
    # a placeholder (the memory store once reported spent = 2^53 there).
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    first = authority.reserve(usd(4), CHAIN, idempotency_key="job-1")
    authority.commit(first.reservation, {"usd": 3})  # type: ignore[arg-type]
    for _ in range(10):  # ten more minutes, each opening its window
        clock.advance(60)
        authority.commit(authority.reserve(usd(1), CHAIN).reservation)  # type: ignore[arg-type]
    replay = authority.reserve(usd(4), CHAIN, idempotency_key="job-1")
    assert replay.replayed and replay.reservation is not None
    assert replay.reservation.id == first.reservation.id  # type: ignore[union-attr]
    (headroom,) = replay.headroom
    assert (headroom.limit, headroom.held) == (10, 0)
    assert headroom.spent in (3, 0)  # that window's spend, or nothing where it is gone
    assert authority.balance("tenant:acme")["usd"].spent == 1


def test_a_hold_in_an_old_window_settles_against_that_windows_counters(authority: Authority, clock: FakeClock) -> None:
    # A hold kept while nine newer minute windows open: its window is not pruned while it holds, and
    # its commit is compared with that window's counters — also on the general path a budget
    # created meanwhile (another tenant's) sends it down. Memory pruned the window and lost the
    # overage flag then.
    authority.set_budget(Budget("tenant:acme", "calls", 10, period="minute"))
    held = authority.reserve(Action("step", "x", {"calls": 6}), "tenant:acme/run:1", ttl=3600)
    assert held.reservation is not None
    other = authority.reserve(Action("step", "x", {"calls": 4}), "tenant:acme/run:2")
    authority.commit(other.reservation, {"calls": 4})  # type: ignore[arg-type]
    for _ in range(9):
        clock.advance(60)
        authority.commit(authority.reserve(Action("step", "x", {"calls": 1}), CHAIN).reservation)  # type: ignore[arg-type]
    authority.set_budget(Budget("tenant:zzz", "usd", 1))
    settled = authority.commit(held.reservation, {"calls": 8})  # that window: 4 + 8 = 12 of 10
    assert set(settled.flags) == {"over_hold", "overage"}


def test_a_late_commit_reopening_an_old_window_never_pushes_out_the_current_one(
    authority: Authority, clock: FakeClock
) -> None:
    # Every window but one holds something; a late commit into the free one (made before the
    # current window opened) re-opens it. Memory once pruned the current window then (the only
    # one with nothing held): its spend was gone and the minute's budget handed out again.
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    late = None
    for minute in range(8):
        if minute == 3:  # touches no usd counter: its window opens for usd only at the late commit
            late = authority.reserve(Action("step", "x", {"calls": 1}), "tenant:acme/run:z", ttl=60)
        else:
            held = authority.reserve(Action("step", "x", {"usd": "0.01"}), f"tenant:acme/run:h{minute}", ttl=3600)
            assert held.allowed
        clock.advance(60)
    spend = authority.reserve(Action("step", "x", {"usd": "9.9"}), "tenant:acme/run:c")
    authority.commit(spend.reservation, {"usd": "9.9"})  # type: ignore[arg-type]
    assert late is not None and late.reservation is not None
    authority.commit(late.reservation, {"calls": 1, "usd": "0.001"})  # into minute 3's window
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("9.9")
    assert authority.reserve(Action("step", "x", {"usd": "9.9"}), "tenant:acme/run:d").denied


def test_a_late_commit_over_the_limit_is_flagged_even_when_its_window_is_gone(
    authority: Authority, clock: FakeClock
) -> None:
    # The hold expired and its minute's counters were pruned (ten minutes later, after a sweep):
    # a commit of 15 against a limit of 10 is still recorded, and flagged overage on its own.
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    expired = authority.reserve(usd(1), CHAIN, ttl=30)
    for _ in range(10):
        clock.advance(60)
        authority.commit(authority.reserve(usd(1), CHAIN).reservation)  # type: ignore[arg-type]
    authority.sweep()
    settled = authority.commit(expired.reservation, {"usd": 15})  # type: ignore[arg-type]
    assert set(settled.flags) == {"late", "over_hold", "overage"}


def test_of_several_budgets_on_a_level_the_tightest_is_named(authority: Authority) -> None:
    # A daily and a monthly cap (and a lifetime one) on one scope: whatever order they were set in,
    # a denial names the one with the least left, then the one that binds longest — on every store.
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    authority.set_budget(Budget("tenant:acme", "usd", 5, period="month"))
    authority.set_budget(Budget("tenant:acme", "usd", 3, period="day"))
    authority.commit(authority.reserve(usd(2), CHAIN).reservation)  # type: ignore[arg-type]
    (reason,) = authority.reserve(usd(4), CHAIN).reasons  # day 1 left, month 3, lifetime 98
    assert (reason.code, reason.period, reason.remaining) == ("budget_exhausted", "day", 1)
    authority.set_budget(Budget("tenant:acme", "usd", 3, period="month"))  # month 1 left too
    (reason,) = authority.reserve(usd(4), CHAIN).reasons
    assert (reason.period, reason.remaining) == ("month", 1)
    authority.set_budget(Budget("tenant:acme", "usd", 1, period="hour"))  # hour 1 left too (a new window)
    (reason,) = authority.reserve(usd(4), CHAIN).reasons
    assert (reason.period, reason.remaining) == ("month", 1)  # as little left as the others, for longest
    assert authority.balance("tenant:acme")["usd"].period == "month"  # balance names the same one
    authority.set_budget(Budget("tenant:acme", "usd", 1, period="month"))  # spent 2 of 1: overage
    plans = [Plan({"usd": 4}), Plan({"usd": 0}, caps=Caps(skip_optional=True))]
    denied = authority.reserve(usd(4), CHAIN, plans=plans)
    assert [(r.plan, r.code, r.period, r.remaining) for r in denied.reasons] == [
        (0, "budget_overage", "month", -1),
        (1, "budget_overage", "month", -1),
    ]
    assert denied.outcome is Outcome.DENY


def test_a_plan_of_nothing_before_a_one_unit_plan(authority: Authority) -> None:
    # The first plan holds nothing (skip the optional step): chosen, with the chain's usd in the
    # headroom (the Redis script once read the two plans as one odd unit "|;usd").
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    plans = [Plan({}, caps=Caps(skip_optional=True)), Plan({"usd": 5})]
    decision = authority.reserve(usd(5), CHAIN, plans=plans)
    assert decision.outcome is Outcome.ALLOW_WITH_CAPS and decision.plan_index == 0
    assert decision.reservation is not None and decision.reservation.amounts == {}
    assert [(h.scope, h.unit, h.remaining) for h in decision.headroom] == [("tenant:acme", "usd", 10)]
    assert authority.commit(decision.reservation).charged == {}


@pytest.mark.parametrize("general", [False, True], ids=["fast", "general"])
def test_a_commit_is_not_flagged_overage_by_holds_that_have_expired(
    authority: Authority, clock: FakeClock, general: bool
) -> None:
    # Expired holds return to their budgets on any call touching them: a commit that fits once they
    # are back is no overage, whether or not anything reclaimed them before it (memory always did).
    authority.set_budget(Budget("tenant:acme", "usd", 20))
    stale = authority.reserve(usd(12), CHAIN, ttl=5)
    live = authority.reserve(usd(4), CHAIN, ttl=100)
    other = authority.reserve(usd(4), CHAIN, ttl=100)
    assert stale.allowed and live.allowed and other.allowed
    if general:  # a budget created since the hold: the commit reads the chain's budgets again
        authority.set_budget(Budget("tenant:acme/workspace:eu", "calls", 5))
    clock.advance(10)
    assert authority.commit(live.reservation, {"usd": 5}).flags == ("over_hold",)  # type: ignore[arg-type]
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (5, 4)
    # ... and one that does not fit even then still is.
    assert authority.commit(other.reservation, {"usd": 16}).flags == ("over_hold", "overage")  # type: ignore[arg-type]


def test_commits_of_holds_in_several_units(authority: Authority) -> None:
    # A model call holds usd and tokens; its commit charges each budget its own unit (the Redis
    # store does it from the hold's counters when no budget changed since, reading the chain's
    # budgets otherwise: both ways must agree with the others).
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.set_budget(Budget("tenant:acme", "tokens", 1000))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "usd", 5))
    authority.set_budget(Budget("tenant:acme/workspace:eu", "calls", 5))

    def step(amounts: dict[str, int], actual: dict[str, int]) -> tuple[str, ...]:
        decision = authority.reserve(Action("model_call", "m", amounts), CHAIN)
        assert decision.allowed
        return authority.commit(decision.reservation, actual).flags  # type: ignore[arg-type]

    def spent() -> tuple[object, ...]:
        top, workspace = authority.balance("tenant:acme"), authority.balance("tenant:acme/workspace:eu")
        held = (top["usd"].held, top["tokens"].held, workspace["usd"].held, workspace["calls"].held)
        assert held == (0, 0, 0, 0)
        return top["usd"].spent, top["tokens"].spent, workspace["usd"].spent, workspace["calls"].spent

    assert step({"usd": 2, "tokens": 300}, {"usd": 1}) == ()  # tokens settle at their held amount
    assert spent() == (1, 300, 1, 0)
    assert step({"tokens": 300, "usd": 2}, {"tokens": 100, "usd": 0}) == ()  # another order; usd 0
    assert spent() == (1, 400, 1, 0)
    assert step({"usd": 1, "tokens": 0}, {"usd": 1, "tokens": 50}) == ("over_hold",)  # tokens held 0
    assert spent() == (2, 450, 2, 0)
    assert step({"usd": 1, "tokens": 100, "calls": 1}, {"calls": 2}) == ("over_hold",)
    assert spent() == (3, 550, 3, 2)
    assert step({"usd": 1, "tokens": 100}, {"usd": 4, "tokens": 0}) == ("over_hold", "overage")
    assert spent() == (7, 550, 7, 2)


def test_a_key_is_free_past_retention_even_when_forgetting_is_out_of_order(
    authority: Authority, clock: FakeClock
) -> None:
    # Settles that reach the store out of time order (threads, or a clock stepped back) leave a
    # reservation due to be forgotten behind one that is not yet: its key is free on time anyway.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    start = clock()
    clock.set(start + 30 * 3600)
    later = authority.reserve(usd(1), CHAIN, idempotency_key="A")
    authority.commit(later.reservation)  # type: ignore[arg-type]
    clock.set(start)
    earlier = authority.reserve(usd(1), CHAIN, idempotency_key="B")
    authority.commit(earlier.reservation)  # type: ignore[arg-type]
    clock.set(start + 50 * 3600)  # past the earlier one's retention, within the later one's
    again = authority.reserve(usd(1), CHAIN, idempotency_key="B")
    assert again.allowed and not again.replayed
    assert authority.reserve(usd(1), CHAIN, idempotency_key="A").replayed


def test_an_extend_that_finds_its_hold_expired_keeps_the_expiry(authority: Authority, clock: FakeClock) -> None:
    # The extend is refused, but the expiry it found is recorded there and then (retention runs from
    # it): SQLite rolled it back with the error, and a commit days later was recorded as late.
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(usd(1), CHAIN, ttl=5)
    clock.advance(7)
    with pytest.raises(ReservationClosed):
        authority.extend(decision.reservation, 50)  # type: ignore[arg-type]
    assert [e.kind for e in authority.events(scope="tenant:acme", newest=True, limit=1)] == ["expire"]
    clock.advance(49 * 3600)
    with pytest.raises(ReservationNotFound):
        authority.commit(decision.reservation)  # type: ignore[arg-type]


def test_a_replay_reports_the_reservation_as_it_stands(authority: Authority) -> None:
    # A reserve retried with its key after the commit: the same reservation, committed, with its key,
    # what was committed and its flags (the key and the commit were missing from the answer).
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    first = authority.reserve(usd(1), CHAIN, idempotency_key="job-7")
    authority.commit(first.reservation, {"usd": 2})  # type: ignore[arg-type]
    again = authority.reserve(usd(1), CHAIN, idempotency_key="job-7")
    assert again.replayed and again.reservation is not None
    found = again.reservation
    assert (found.status, found.idempotency_key, found.flags) == ("committed", "job-7", ("over_hold",))
    assert found.committed == {"usd": 2}


def test_an_extend_never_shortens_a_hold(authority: Authority, clock: FakeClock) -> None:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:acme/run:r1", ttl=600)
    assert decision.reservation is not None
    expires = decision.reservation.expires_at
    assert authority.extend(decision.reservation, 1).expires_at == expires  # a heartbeat of 1 s
    clock.advance(100)
    assert authority.reservation(decision.reservation).status == "held"
    assert authority.extend(decision.reservation, 900).expires_at == clock() + 900
    assert [e.kind for e in authority.events(limit=10)].count("extend") == 1
