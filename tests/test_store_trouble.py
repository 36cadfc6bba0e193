"""Store trouble is a decision: fail closed by default, fail open only where configured."""

from __future__ import annotations

import logging
import os
from decimal import Decimal
from pathlib import Path

import pytest

from clearance import Action, Authority, Budget, Denied, Mode, Outcome, ReservationClosed, StoreUnavailable
from clearance.stores.memory import MemoryStore
from clearance.testing import FakeClock


class FlakyStore(MemoryStore):
    """A memory store that can be switched off."""

    down = False

    def hold(self, request):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailable("connection refused (test)")
        return super().hold(request)

    def commit(self, reservation_id, actual, now):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreUnavailable("connection refused (test)")
        return super().commit(reservation_id, actual, now)


ACTION = Action("step", "s", {"usd": "0.4"})
SCOPE = "tenant:acme/run:r1"


def test_fail_closed_by_default(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    authority = Authority(store)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="clearance"):
        decision = authority.reserve(ACTION, SCOPE)
    assert decision.outcome is Outcome.DENY
    assert decision.mode is Mode.FAIL_CLOSED
    assert decision.reasons[0].code == "store_unavailable"
    assert "failing closed" in decision.reasons[0].message
    assert "store unavailable" in caplog.text
    with pytest.raises(Denied), authority.guard(ACTION, SCOPE):
        pytest.fail("must not run")


def test_fail_open_within_the_emergency_cap() -> None:
    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    store.down = True
    first = authority.reserve(ACTION, SCOPE)
    assert first.outcome is Outcome.ALLOW
    assert first.mode is Mode.FAIL_OPEN
    assert first.reasons[0].code == "fail_open"
    assert first.reservation is not None
    assert first.reservation.local
    second = authority.reserve(ACTION, SCOPE)
    third = authority.reserve(ACTION, SCOPE)  # 1.2 > the 1 USD cap
    assert second.allowed
    assert third.outcome is Outcome.DENY
    assert third.reasons[0].code == "emergency_cap"
    assert second.reservation is not None
    authority.commit(second.reservation, {"usd": "0.1"})  # settles the local cap: 0.5 used
    assert authority.reserve(ACTION, SCOPE).allowed
    store.down = False
    assert authority.reserve(ACTION, SCOPE).mode is Mode.ENFORCED
    assert authority.balance("tenant:acme")["usd"].held == ACTION.amounts["usd"]  # only the enforced hold


def test_the_emergency_cap_is_per_process_not_per_authority() -> None:
    """Authorities of one store (by URL) with the same limits share the cap: one built per request,
    or one per framework adapter, each with a cap of its own multiplied what failing open could
    spend (two Authorities let 2 USD through a 1 USD cap). Other limits are another cap."""
    stores = [FlakyStore(), FlakyStore()]  # (one URL: memory://)
    authorities = [Authority(store, fail_open=True, emergency_limits={"usd": 1}) for store in stores]
    for store in stores:
        store.down = True
    allowed = [authority.reserve(ACTION, SCOPE).allowed for _ in range(3) for authority in authorities]
    assert allowed.count(True) == 2  # 0.4 + 0.4 of the one shared 1 USD
    other = Authority(stores[0], fail_open=True, emergency_limits={"usd": 2})
    assert other.reserve(ACTION, SCOPE).allowed


def test_a_forked_child_shares_one_emergency_cap_and_starts_it_afresh() -> None:
    """An Authority built before a fork (gunicorn --preload) and one built in the child share the
    child's cap, which starts empty: the parent's use is not the child's."""
    import os

    store = FlakyStore()
    early = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    assert early.reserve(ACTION, SCOPE).allowed  # the parent uses 0.4 before forking
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report how many of six 0.4 USD reserves its one cap allowed
        late = Authority(store, fail_open=True, emergency_limits={"usd": 1})
        allowed = [a.reserve(ACTION, SCOPE).allowed for _ in range(3) for a in (early, late)]
        os.write(write, f"{allowed.count(True)} {early._emergency is late._emergency}".encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 100).decode() == "2 True" and status == 0
    os.close(read)


def test_fail_open_only_where_configured() -> None:
    store = FlakyStore()
    authority = Authority(store, fail_open=["tenant:internal"])
    store.down = True
    assert authority.reserve(ACTION, "tenant:internal/run:1").mode is Mode.FAIL_OPEN
    assert authority.reserve(ACTION, "tenant:acme/run:1").mode is Mode.FAIL_CLOSED


def test_commit_with_the_store_down_raises_a_typed_error() -> None:
    store = FlakyStore()
    authority = Authority(store)
    decision = authority.reserve(ACTION, SCOPE)
    assert decision.reservation is not None
    store.down = True
    with pytest.raises(StoreUnavailable):
        authority.commit(decision.reservation)


def test_guard_never_masks_the_callers_exception() -> None:
    store = FlakyStore()
    authority = Authority(store)
    with pytest.raises(ZeroDivisionError), authority.guard(ACTION, SCOPE):
        store.down = True
        raise ZeroDivisionError


def test_fail_open_retries_with_a_key_never_hold_twice_and_local_holds_can_be_extended() -> None:
    """A reserve retried with its idempotency key while failing open answers with the same local
    reservation (also once the store is back), never a second hold of the cap; a local reservation
    can be looked up and extended like a ledger one; an action no emergency limit bounds is refused."""
    clock = FakeClock()
    store = FlakyStore()
    authority = Authority(store, clock=clock, fail_open=True, emergency_limits={"usd": 1})
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    store.down = True
    step = Action("step", "s", {"usd": "0.4"})
    first = authority.reserve(step, SCOPE, idempotency_key="k9", ttl=30)
    again = authority.reserve(step, SCOPE, idempotency_key="k9", ttl=30)
    assert first.reservation is not None and again.reservation is not None
    assert again.replayed and again.reservation.id == first.reservation.id and again.mode is Mode.FAIL_OPEN
    assert authority.reserve(step, SCOPE, idempotency_key="k10").allowed  # 0.8 of the 1 USD cap
    assert authority.reserve(step, SCOPE, idempotency_key="k11").denied  # the cap, not a replay
    other = authority.reserve(step, "tenant:acme/run:other", idempotency_key="k9")
    assert other.denied and other.reasons[0].code == "replay_mismatch"
    another = authority.reserve(Action("step", "another", {"usd": "0.4"}), SCOPE, idempotency_key="k9")
    assert another.denied and another.reasons[0].code == "replay_mismatch"  # another action, the same amounts
    # look-up and extend work on local reservations
    clock.advance(20)
    extended = authority.extend(first.reservation, 60)
    assert extended.local and extended.expires_at == clock() + 60
    clock.advance(20)  # past the first TTL, within the extended one
    assert authority.reservation(first.reservation.id).status == "held"
    store.down = False  # back: the key still answers with the local reservation, nothing is held twice
    back = authority.reserve(step, SCOPE, idempotency_key="k9")
    assert back.replayed and back.reservation is not None and back.reservation.id == first.reservation.id
    assert authority.balance("tenant:acme")["usd"].held == 0
    authority.commit(first.reservation, {"usd": "0.3"})
    assert authority.reservation(first.reservation.id).status == "committed"
    with pytest.raises(ReservationClosed):
        authority.extend(first.reservation, 60)
    released = authority.reserve(step, SCOPE, idempotency_key="k10")
    assert released.replayed and released.allowed  # still held locally
    store.down = True
    authority.release(released.reservation)  # type: ignore[arg-type]
    after_release = authority.reserve(step, SCOPE, idempotency_key="k10")
    assert after_release.denied and after_release.reasons[0].code == "replay_settled"
    # units without an emergency limit do not bound anything: refused, with the unit to add
    emails = authority.reserve(Action("send", "email", {"emails": 1}), SCOPE)
    assert emails.denied and emails.reasons[0].code == "emergency_cap" and emails.reasons[0].unit == "emails"
    assert "emergency_limits" in emails.reasons[0].message or "add emails" in emails.reasons[0].message
    assert authority.reserve(Action("call", "m", {"usd": "0.1", "tokens": 900}), SCOPE).allowed  # usd bounds it


def test_concurrent_fail_open_retries_with_one_key_hold_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads retrying the same keyed reserve while failing open: the key is checked under the
    cap's lock with the hold, so one holds and the other gets that same reservation."""
    import threading

    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    cap = authority._emergency
    both_there = threading.Barrier(2)
    real_take = cap.take

    def take(*args: object) -> object:
        both_there.wait(timeout=5)  # both past the first look-up of the key, neither holding yet
        return real_take(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cap, "take", take)
    decisions: list[object] = []

    def retry() -> None:
        decisions.append(authority.reserve(ACTION, SCOPE, idempotency_key="same"))

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = {d.reservation.id for d in decisions}  # type: ignore[attr-defined]
    assert len(ids) == 1 and sorted(d.replayed for d in decisions) == [False, True]  # type: ignore[attr-defined]
    assert cap.used["usd"] == 400_000_000  # 0.4 USD held once


def test_a_held_local_reservations_key_is_never_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are forgotten with their reservation (the 10,000 most recent settled ones), never while
    it is held: many other keyed calls must not turn a retry into a second hold."""
    from clearance.emergency import EmergencyCap

    monkeypatch.setattr(EmergencyCap, "_REMEMBERED", 5)
    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    first = authority.reserve(ACTION, SCOPE, idempotency_key="k0")
    free = Action("step", "free", {"usd": 0})
    for i in range(20):
        other = authority.reserve(free, SCOPE, idempotency_key=f"free{i}")
        assert other.reservation is not None
        authority.commit(other.reservation)
    again = authority.reserve(ACTION, SCOPE, idempotency_key="k0")
    assert again.replayed and again.reservation is not None and first.reservation is not None
    assert again.reservation.id == first.reservation.id
    cap = authority._emergency
    assert len(cap.keys) <= 1 + 5 and len(cap.key_of) == len(cap.keys)


def test_a_local_reservation_replays_with_the_caps_of_the_plan_it_holds() -> None:
    """A keyed retry while failing open finds the local hold among the plans it is given (as the
    ledger's replay does), not only as their first."""
    from clearance import Caps, Plan

    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    cheap = Plan({"usd": "0.1"}, caps=Caps(model="small"))
    first = authority.reserve(ACTION, SCOPE, plans=[cheap], idempotency_key="ladder")
    assert first.caps == Caps(model="small")
    retry = authority.reserve(ACTION, SCOPE, plans=[Plan({"usd": "0.5"}), cheap], idempotency_key="ladder")
    assert retry.replayed and retry.allowed and retry.caps == Caps(model="small") and retry.plan_index == 1
    assert retry.reservation is not None and retry.reservation.plan_index == 1
    assert [r.code for r in retry.reasons] == ["fail_open", "plan_selected"]  # as the ledger says it
    assert retry.reservation is not None and first.reservation is not None
    assert retry.reservation.id == first.reservation.id


def test_a_late_local_commit_keeps_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling an expired local reservation again (a late commit) must not evict it, and its key,
    from the remembered ones: a retry with the key stays a replay, not a second hold."""
    from clearance.emergency import EmergencyCap

    monkeypatch.setattr(EmergencyCap, "_REMEMBERED", 3)
    clock = FakeClock()
    store = FlakyStore()
    authority = Authority(store, clock=clock, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    first = authority.reserve(ACTION, SCOPE, idempotency_key="k0", ttl=5)
    assert first.reservation is not None
    clock.advance(10)  # expired: the oldest remembered one
    for i in range(2):
        other = authority.reserve(Action("step", "free", {"usd": 0}), SCOPE, idempotency_key=f"o{i}")
        authority.release(other.reservation)  # type: ignore[arg-type]
    assert authority.commit(first.reservation, {"usd": "0.1"}).flags == ("late",)
    retry = authority.reserve(ACTION, SCOPE, idempotency_key="k0")
    assert retry.replayed and retry.reservation is not None and retry.reservation.id == first.reservation.id


def test_reservations_made_failing_open_settle_like_ledger_ones() -> None:
    """Reality wins for local reservations too: a commit after their release or past their TTL is
    charged (to the emergency cap) and flagged after_release / late, as on every store — not
    answered as a replay of the release, or charged nothing."""
    clock = FakeClock()
    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 5}, clock=clock)
    ledger = Authority(clock=clock)  # the reference: the same calls on a ledger store
    for each in (authority, ledger):
        each.set_budget(Budget("tenant:acme", "usd", 10))
    store.down = True
    settlements = []
    for each in (authority, ledger):
        released = each.reserve(Action("step", "s", {"usd": "0.5"}), SCOPE, ttl=60)
        expired = each.reserve(Action("step", "s", {"usd": "0.5"}), SCOPE, ttl=5)
        assert released.reservation is not None and expired.reservation is not None
        each.release(released.reservation)
        clock.advance(10)
        after_release = each.commit(released.reservation, {"usd": "0.4"})
        late = each.commit(expired.reservation)
        settlements.append([(s.status, s.charged_steps, s.flags, s.replayed) for s in (after_release, late)])
        clock.advance(1)
    assert settlements[0] == settlements[1]
    assert settlements[0] == [
        ("committed", (("usd", 400_000_000),), ("after_release",), False),
        ("committed", (("usd", 500_000_000),), ("late",), False),
    ]
    assert authority._emergency.used == {"usd": 900_000_000}


def test_failing_open_takes_the_first_plan_that_fits_the_emergency_cap() -> None:
    """The ladder applies when failing open too: the flagship plan past the cap, the cheaper one
    within it is held (it was denied, as if the cap were "used" — nothing was)."""
    from clearance import Caps, Plan

    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    plans = [Plan({"usd": 2}), Plan({"usd": "0.5"}, caps=Caps(model="small"))]
    decision = authority.reserve(ACTION, SCOPE, plans=plans)
    assert decision.outcome is Outcome.ALLOW_WITH_CAPS and decision.mode is Mode.FAIL_OPEN
    assert decision.caps == Caps(model="small") and decision.plan_index == 1
    assert decision.reservation is not None and decision.reservation.amounts == {"usd": 0.5}
    too_big = authority.reserve(Action("step", "s", {"usd": 2}), SCOPE)
    assert too_big.denied and "more usd than this process's whole emergency cap" in too_big.reasons[0].message
    authority.reserve(ACTION, SCOPE, plans=plans)  # the cap's second half
    used = authority.reserve(ACTION, SCOPE, plans=plans)
    assert used.denied and "emergency cap of usd is used" in used.reasons[0].message


@pytest.mark.parametrize(
    "options", [{"fail_open": 5}, {"fail_open": None}, {"clock": "x"}, {"fail_open": ["not a scope"]}]
)
def test_junk_given_to_the_authority_is_invalid_request(options: dict[str, object]) -> None:
    from clearance import InvalidRequest

    with pytest.raises(InvalidRequest):
        Authority("memory://", **options)  # type: ignore[arg-type]


def test_a_guard_whose_block_released_its_reservation_charges_nothing() -> None:
    """A block deciding not to run its action releases the reservation: the guard's exit committed
    the held amounts anyway (flagged after_release), charging an action that never ran."""
    authority = Authority()
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(ACTION, SCOPE) as grant:
        assert grant.reservation is not None
        assert authority.release(grant.reservation).status == "released"
    assert grant.settlement is not None and grant.settlement.status == "released"
    assert authority.balance("tenant:acme")["usd"].spent == 0
    with authority.guard(ACTION, SCOPE) as grant:  # committed in the block: the guard leaves it
        authority.commit(grant.reservation, {"usd": "0.1"})  # type: ignore[arg-type]
    assert grant.settlement is not None and grant.settlement.charged == {"usd": Decimal("0.1")}
    with authority.guard(ACTION, SCOPE) as grant:  # released, then it did cost something after all
        authority.release(grant.reservation)  # type: ignore[arg-type]
        grant.settle({"usd": "0.2"})
    assert grant.settlement is not None and "after_release" in grant.settlement.flags
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("0.3")


def test_settling_a_guard_after_its_block_is_an_error_not_a_lost_cost() -> None:
    from clearance import InvalidRequest

    authority = Authority()
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(ACTION, SCOPE) as grant:
        pass
    with pytest.raises(InvalidRequest, match="after the guard's block ended"):
        grant.settle({"usd": 5})
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("0.4")


def test_settling_a_guard_whose_exit_failed_is_an_error_too() -> None:
    """The store down as the block ends: the exit's commit fails, and a settle() after it (a caller
    trying again) raised nothing before — its cost lost without a word."""
    import asyncio

    from clearance import InvalidRequest

    store = FlakyStore()
    authority = Authority(store)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with pytest.raises(StoreUnavailable), authority.guard(ACTION, SCOPE) as grant:
        store.down = True
    assert grant.settlement is None
    with pytest.raises(InvalidRequest, match="exit's settle failed"):
        grant.settle({"usd": "0.3"})

    async def main() -> None:
        store.down = False
        with pytest.raises(StoreUnavailable):
            async with authority.aguard(ACTION, SCOPE) as agrant:
                store.down = True
        with pytest.raises(InvalidRequest, match="exit's settle failed"):
            agrant.settle({"usd": "0.3"})

    asyncio.run(main())


def test_an_aguard_whose_block_released_its_reservation_charges_nothing() -> None:
    import asyncio

    authority = Authority()
    authority.set_budget(Budget("tenant:acme", "usd", 10))

    async def run() -> None:
        async with authority.aguard(ACTION, SCOPE) as grant:
            await authority.arelease(grant.reservation)  # type: ignore[arg-type]

    asyncio.run(run())
    assert authority.balance("tenant:acme")["usd"].spent == 0


def test_a_guard_whose_block_released_an_expired_hold_charges_nothing() -> None:
    clock = FakeClock()
    authority = Authority(clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(ACTION, SCOPE, ttl=5) as grant:
        clock.advance(6)  # the hold expired while the block ran; it then gave the action up
        assert authority.release(grant.reservation).status == "expired"  # type: ignore[arg-type]
    assert grant.settlement is not None and grant.settlement.status == "expired"
    assert authority.balance("tenant:acme")["usd"].spent == 0


def test_failing_open_onto_a_later_plan_without_caps_says_so() -> None:
    """ALLOW means the first plan: a later one held while failing open is ALLOW_WITH_CAPS, as the
    ledger answers it (and as a retry of it was answered)."""
    from clearance import Caps, Plan

    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"usd": 1})
    store.down = True
    plans = [Plan({"usd": 2}), Plan({"usd": "0.5"})]
    first = authority.reserve(ACTION, SCOPE, plans=plans, idempotency_key="k")
    retry = authority.reserve(ACTION, SCOPE, plans=plans, idempotency_key="k")
    for decision in (first, retry):
        assert decision.outcome is Outcome.ALLOW_WITH_CAPS and decision.caps == Caps()
        assert [r.code for r in decision.reasons] == ["fail_open", "plan_selected"]


def test_releasing_a_committed_reservation_keeps_what_it_says_was_committed() -> None:
    """A block that commits and then releases in its clean-up: the release is a replay; the
    Reservation (and the guard's settlement) kept saying nothing was committed (found in review)."""
    authority = Authority()
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    with authority.guard(ACTION, SCOPE) as grant:
        assert grant.reservation is not None
        authority.commit(grant.reservation, {"usd": "0.3"})
        authority.release(grant.reservation)
    assert grant.reservation.committed == {"usd": Decimal("0.3")}
    assert grant.settlement is not None and grant.settlement.charged == {"usd": Decimal("0.3")}
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("0.3")


def test_local_holds_expire_in_time_order_without_a_scan_of_them_all() -> None:
    """Every call failing open looked at every local hold to find the expired ones (85 ms a
    reserve with 50,000 held through an outage); they wait in expiry order now. An extended hold
    keeps its new time; settled ones' entries do not pile up."""
    from clearance.emergency import _EMERGENCY_CAPS

    clock = FakeClock()
    store = FlakyStore()
    authority = Authority(store, fail_open=True, emergency_limits={"calls": 10**6}, clock=clock)
    store.down = True
    step = Action.tool_call("x")
    short = [authority.reserve(step, SCOPE, ttl=10).reservation for _ in range(3)]
    long = [authority.reserve(step, SCOPE, ttl=1000).reservation for _ in range(3)]
    assert all(r is not None for r in short + long)
    authority.extend(short[0], 500)  # type: ignore[arg-type]
    cap = next(iter(_EMERGENCY_CAPS.values()))
    clock.advance(11)
    assert [authority.reservation(r).status for r in short] == ["held", "expired", "expired"]  # type: ignore[arg-type]
    assert cap.used["calls"] == 4  # (expiry is lazy: judged on that call)
    clock.advance(600)
    assert authority.reservation(short[0]).status == "expired"  # type: ignore[arg-type]
    assert cap.used["calls"] == 3
    for _ in range(5000):  # settled at once: their entries are dropped now and then
        made = authority.reserve(step, SCOPE, ttl=1000).reservation
        authority.commit(made)  # type: ignore[arg-type]
    assert len(cap.expiry) <= 4 * len(cap.holds) + 1025


def test_store_trouble_is_logged_once_a_period_not_once_a_decision(caplog: pytest.LogCaptureFixture) -> None:
    """Through an outage every decision fails closed (or open): one warning each flooded the logs
    (46,000 lines from one worker). One a period per kind now, counting the rest."""
    from clearance import authority as authority_module

    store = FlakyStore()
    authority = Authority(store)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="clearance"):
        for _ in range(50):
            assert authority.reserve(ACTION, SCOPE).denied
    assert caplog.text.count("store unavailable, denying") == 1
    authority_module._warned["closed"] = (-1e9, 49)  # the period is over
    with caplog.at_level(logging.WARNING, logger="clearance"):
        authority.reserve(ACTION, SCOPE)
    assert "and 49 more such decisions" in caplog.text


def test_a_child_forked_while_a_thread_logs_store_trouble_still_decides() -> None:
    """The lock of the store-trouble log throttle, held by another thread at fork time, stayed held in
    the child: its next decision in store trouble hung for good. The child gets a fresh one."""
    import os
    import signal
    import threading

    from clearance import authority as authority_module

    store = FlakyStore()
    authority = Authority(store)
    store.down = True
    inside, done = threading.Event(), threading.Event()

    def logging_thread() -> None:
        with authority_module._warned_lock:  # another thread inside _warn at fork time
            inside.set()
            done.wait(30)

    thread = threading.Thread(target=logging_thread)
    thread.start()
    assert inside.wait(10)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # (hung: killed, and the parent sees it)
        os._exit(0 if authority.reserve(ACTION, SCOPE).denied else 1)
    done.set()
    thread.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_hold_whose_reply_was_lost_is_taken_over_once_not_by_a_forked_child_too(tmp_path: Path) -> None:
    """A keyed hold landed, its answer lost: the guard retried with the key runs on it — in this
    process only (found in review: a forked child inherited the memory of it, and parent and child
    both ran the step on the one hold)."""
    authority = Authority(f"sqlite:///{tmp_path / 'ledger.db'}")
    authority.set_budget(Budget("tenant:f", "usd", 10))
    store = authority.store
    held = store.hold

    def answer_lost(request):  # type: ignore[no-untyped-def]
        held(request)
        raise StoreUnavailable("reply lost (test)")

    store.hold = answer_lost  # type: ignore[method-assign]
    with pytest.raises(Denied), authority.guard(ACTION, "tenant:f/run:r1", idempotency_key="k1"):
        pytest.fail("failed closed: the block does not run")
    store.hold = held  # type: ignore[method-assign]
    child = os.fork()
    if child == 0:  # the child's retry must not run the step the parent's may
        try:
            with authority.guard(ACTION, "tenant:f/run:r1", idempotency_key="k1"):
                os._exit(1)
        except Denied as denied:
            os._exit(0 if denied.decision.reasons[0].code == "replay_in_progress" else 2)
        os._exit(3)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0
    with authority.guard(ACTION, "tenant:f/run:r1", idempotency_key="k1") as grant:
        grant.settle({"usd": "0.4"})  # the parent's retry runs on the hold that landed
    with pytest.raises(Denied):  # and only once
        with authority.guard(ACTION, "tenant:f/run:r1", idempotency_key="k1"):
            pytest.fail("must not run again")
    assert authority.balance("tenant:f")["usd"].spent == Decimal("0.4")


_BAD_RETENTION = ({"retention": float("nan")}, {"retention": -1}, {"retention": float("inf")}, {"retention": "48h"})
_BAD_EMBEDDED_OPTIONS = [
    *(("memory", bad) for bad in (*_BAD_RETENTION, {"audit_capacity": 2**63})),
    *(("sqlite", bad) for bad in (*_BAD_RETENTION, {"audit_capacity": 2**63})),
    ("sqlite", {"busy_timeout": float("nan")}),  # (SQLite's own: a bare ValueError)
    ("sqlite", {"busy_timeout": -1}),
    ("sqlite", {"synchronous": "OFF"}),
]


@pytest.mark.parametrize(("kind", "options"), _BAD_EMBEDDED_OPTIONS)
def test_bad_embedded_store_options_are_invalid_request(kind: str, options: dict[str, object], tmp_path: Path) -> None:
    from clearance import InvalidRequest
    from clearance.stores.memory import MemoryStore
    from clearance.stores.sqlite import SQLiteStore

    with pytest.raises(InvalidRequest):
        if kind == "memory":
            MemoryStore(**options)  # type: ignore[arg-type]
        else:
            SQLiteStore(str(tmp_path / "ledger.db"), **options)  # type: ignore[arg-type]
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("op", ["reserve", "commit", "release", "extend", "expire"])
def test_the_emergency_cap_stays_whole_when_a_call_failing_open_is_interrupted_anywhere(op: str) -> None:
    """An exception at any call inside a fail-open reserve, commit, release, extend or expiry (a step
    timeout's signal handler, Ctrl-C), then the caller's retry: the cap's ``used`` comes back to
    what was committed once every hold has expired. It leaked for good before — a release popping
    the hold and never giving it back, a reserve charging the cap with no hold recorded or recording
    one with no expiry entry, a commit giving the hold back and charging nothing, its retry then
    ReservationNotFound — until a process failing open was denied everything."""
    from interrupts import interrupt_at

    from clearance.emergency import _EMERGENCY_CAPS

    point = 1
    while True:
        _EMERGENCY_CAPS.clear()
        clock = FakeClock()
        store = FlakyStore()
        authority = Authority(store, clock=clock, fail_open=True, emergency_limits={"usd": 10})
        store.down = True
        expected = Decimal(0)
        first = authority.reserve(ACTION, SCOPE, idempotency_key="k1", ttl=30).reservation
        assert first is not None
        if op == "reserve":
            run = lambda: authority.reserve(ACTION, SCOPE, idempotency_key="k2", ttl=30)  # noqa: E731
        elif op == "commit":
            run = lambda: authority.commit(first, {"usd": "0.3"})  # noqa: E731
        elif op == "release":
            run = lambda: authority.release(first)  # noqa: E731
        elif op == "extend":
            run = lambda: authority.extend(first, 600)  # noqa: E731
        else:
            clock.advance(60)  # the first hold is due: the next reserve expires it
            run = lambda: authority.reserve(ACTION, SCOPE, idempotency_key="k2", ttl=30)  # noqa: E731
        interrupted = interrupt_at(point, run)
        run()  # the caller's retry (the same key, the same reservation)
        if op in ("reserve", "expire"):
            again = authority.reserve(ACTION, SCOPE, idempotency_key="k2", ttl=30).reservation
            assert again is not None and again.local
            authority.commit(again, {"usd": "0.3"})
            expected += Decimal("0.3")
        if op == "commit":
            expected += Decimal("0.3")
            assert authority.reservation(first).status == "committed"
        clock.advance(3600)  # every hold left is past its TTL
        cap = authority._emergency
        cap.find(("tenant:acme", "none"), clock())  # (expiry runs on any call)
        assert not cap.holds, (op, point)
        assert cap.used == {"usd": int(expected * 10**9)}, (op, point)
        if not interrupted:
            break
        point += 1
    assert point > 5  # (the call was interrupted at every one of its points)


def test_a_local_hold_taken_or_extended_as_old_expiry_entries_are_dropped_still_expires() -> None:
    """The expiry entries of settled local holds are dropped now and then (past 4 per hold and
    1,024); a hold taken (or extended) just then lost its new entry with them and never expired,
    keeping its share of the emergency cap for the rest of the process (found in review)."""
    from clearance.emergency import _EMERGENCY_CAPS

    small = Action("step", "s", {"usd": "0.001"})
    for extend in (False, True):
        _EMERGENCY_CAPS.clear()
        clock = FakeClock()
        store = FlakyStore()
        authority = Authority(store, clock=clock, fail_open=True, emergency_limits={"usd": 10})
        store.down = True
        if extend:
            big = authority.reserve(Action("step", "s", {"usd": "9"}), SCOPE, ttl=30).reservation
        for _ in range(1028 if extend else 1024):  # settled holds' entries pile up to the threshold
            authority.release(authority.reserve(small, SCOPE, ttl=30).reservation)  # type: ignore[arg-type]
        if extend:
            authority.extend(big, 600)  # type: ignore[arg-type]
        else:
            big = authority.reserve(Action("step", "s", {"usd": "9"}), SCOPE, ttl=30).reservation
        assert big is not None and big.local
        clock.advance(3600)
        cap = authority._emergency
        cap.find(("tenant:acme", "none"), clock())
        assert not cap.holds and cap.used == {"usd": 0}, extend
