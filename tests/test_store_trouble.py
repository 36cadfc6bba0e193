"""Store trouble is a decision: fail closed by default, fail open only where configured."""

from __future__ import annotations

import logging

import pytest

from clearance import Action, Authority, Budget, Denied, Mode, Outcome, StoreUnavailable
from clearance.stores.memory import MemoryStore


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
