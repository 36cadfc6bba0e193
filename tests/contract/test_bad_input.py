"""Bad input gets a clear, typed error and changes nothing (ledger contract point 7)."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearance import Action, Authority, Budget, Caps, InvalidRequest, Plan, ReservationNotFound

GOOD_SCOPE = "tenant:acme/run:r1"

junk_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "tenant",
            "tenant:",
            ":acme",
            "tenant:acme/",
            "/tenant:acme",
            "tenant:ac me",
            "tenant:{acme}",
            "tenant:a/b",
            "Tenant:acme",
            "tenant:acme\n",
            "tenant:a:b",
            "tenant:acme//run:1",
            "tenant:" + "x" * 129,
            "/".join(f"k{i}:v" for i in range(17)),
            "tenant:acme\x00",
            "0123456789abcdef0123.tenant:{x}",
        ]
    ),
)
junk_amount = st.one_of(
    st.sampled_from(
        [-1, "-0.5", float("nan"), float("inf"), -math.inf, "NaN", "Infinity", "1e400", 2**60, "abc", True]
    ),
    st.sampled_from([None, [], {}, object(), b"1", Decimal("NaN"), Decimal("-1"), "1" * 70]),
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not math.isfinite(f) or f < 0),
)
junk_unit = st.one_of(
    st.sampled_from(["", "USD", "u sd", "1usd", "usd:x", "usd/x", "u" * 70, None, 5]), st.text(max_size=5)
)


def snapshot(authority: Authority) -> tuple[Any, ...]:
    return (
        authority.budgets(),
        [(r.id, r.status) for r in authority.reservations(status=None)],
        [e.seq for e in authority.events(limit=10_000)],
    )


@pytest.fixture
def seeded(authority: Authority) -> Authority:
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(Action("step", "s", {"usd": 1}), GOOD_SCOPE)
    assert decision.reservation is not None
    return authority


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def valid_scope(value: object) -> bool:
    try:
        from clearance.scope import parse_scope

        parse_scope(value)  # type: ignore[arg-type]
    except InvalidRequest:
        return False
    return True


@SETTINGS
@given(scope=junk_text)
def test_junk_scopes(seeded: Authority, scope: str) -> None:
    if valid_scope(scope):
        return
    before = snapshot(seeded)
    action = Action("step", "s", {"usd": 1})
    for call in (
        lambda: seeded.reserve(action, scope),
        lambda: seeded.balance(scope),
        lambda: seeded.set_budget(Budget(scope, "usd", 1)),
        lambda: seeded.remove_budget(scope, "usd"),
        lambda: seeded.budgets(scope),
        lambda: seeded.reservations(scope),
        lambda: seeded.events(scope=scope),
    ):
        with pytest.raises(InvalidRequest):
            call()
    assert snapshot(seeded) == before


@SETTINGS
@given(amount=junk_amount, unit=junk_unit)
def test_junk_amounts_and_units(seeded: Authority, amount: Any, unit: Any) -> None:
    before = snapshot(seeded)
    (held,) = seeded.reservations()
    for call in (
        lambda: Action("step", "s", {"usd": amount}),
        lambda: Action("step", "s", {unit: 1}) if not _valid_unit(unit) else _raise(),
        lambda: Budget("tenant:acme", "usd", amount),
        lambda: Budget("tenant:acme", unit, 1) if not _valid_unit(unit) else _raise(),
        lambda: Plan({"usd": amount}),
        lambda: seeded.commit(held, {"usd": amount}),
        lambda: seeded.commit(held, {unit: 1}) if not _valid_unit(unit) else _raise(),
    ):
        with pytest.raises(InvalidRequest):
            call()
    assert snapshot(seeded) == before


def _valid_unit(unit: Any) -> bool:
    try:
        Action("step", "s", {unit: 1})
    except InvalidRequest:
        return False
    return True


def _raise() -> None:
    raise InvalidRequest("valid input, nothing to check")


@SETTINGS
@given(
    ttl=st.one_of(st.sampled_from([0, -1, math.nan, math.inf, 10**9, "60", None, True]), st.floats(max_value=0)),
    key=st.sampled_from(["", "x" * 201, "a\nb", 5, b"k"]),
    plans=st.sampled_from([[], "plan", [1], [None], [Plan({"usd": 1})] * 17, ({"usd": 1},)]),
)
def test_junk_reserve_options(seeded: Authority, ttl: Any, key: Any, plans: Any) -> None:
    before = snapshot(seeded)
    action = Action("step", "s", {"usd": 1})
    (held,) = seeded.reservations()
    for call in (
        lambda: seeded.reserve(action, GOOD_SCOPE, ttl=ttl) if ttl is not None else _raise(),
        lambda: seeded.reserve(action, GOOD_SCOPE, idempotency_key=key),
        lambda: seeded.reserve(action, GOOD_SCOPE, plans=plans),
        lambda: seeded.reserve({"kind": "step"}, GOOD_SCOPE),  # type: ignore[arg-type]
        lambda: seeded.extend(held, ttl) if ttl is not None else _raise(),
        lambda: seeded.set_budget({"scope": "tenant:acme"}),  # type: ignore[arg-type]
        lambda: seeded.events(after=-1),
        lambda: seeded.reservations(status="bogus"),
    ):
        with pytest.raises(InvalidRequest):
            call()
    assert snapshot(seeded) == before


@SETTINGS
@given(rid=st.one_of(st.text(max_size=60), st.sampled_from([None, 5, b"x", "0123456789abcdef0123.tenant:a/b"])))
def test_junk_reservation_ids(seeded: Authority, rid: Any) -> None:
    before = snapshot(seeded)
    for call in (lambda: seeded.commit(rid), lambda: seeded.release(rid), lambda: seeded.extend(rid, 10)):
        with pytest.raises((InvalidRequest, ReservationNotFound)):
            call()
    assert snapshot(seeded) == before


def test_well_formed_unknown_id_is_not_found(seeded: Authority) -> None:
    before = snapshot(seeded)
    with pytest.raises(ReservationNotFound):
        seeded.commit("ffffffffffffffffffff.tenant:acme")
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    "build",
    [
        lambda: Action("Model Call", "x"),
        lambda: Action("step", ""),
        lambda: Action("step", "x", risk="Write!"),
        lambda: Action("step", "x\x00"),
        lambda: Caps(max_output_tokens=-1),
        lambda: Caps(unknown=1),  # type: ignore[call-arg]
        lambda: Plan({"usd": 1}, min_headroom=1.5),
        lambda: Plan({"usd": 1}, min_headroom={"Workflow!": 0.1}),
        lambda: Budget("tenant:acme", "usd", 1, period="fortnight"),
        lambda: Action.model_call("openai", "no-such-model-xyz", 10, 10),
        lambda: Action.model_call("openai", "gpt-4o", -1, 10),
        lambda: Authority("nosuch://x"),
        lambda: Authority("memory://", default_ttl=0),
    ],
)
def test_constructors_raise_invalid_request(build: Any) -> None:
    with pytest.raises(InvalidRequest):
        build()
