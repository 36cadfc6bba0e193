"""Random interleavings of reserve/commit/release/extend/expire against a small reference ledger.

The reference model below is deliberately naive (dicts, loops, lifetime budgets); after every step
each store's balances must equal the model's, and holds alone never take a budget past its limit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule, run_state_machine_as_test

from clearance import Action, Authority, Budget, Outcome, Plan
from clearance.testing import FakeClock

SCOPES = ["tenant:a", "tenant:a/app:x", "tenant:a/app:x/run:1", "tenant:a/app:y", "tenant:b", "tenant:b/run:2"]
LEAVES = ["tenant:a/app:x/run:1", "tenant:a/app:y", "tenant:b/run:2", "tenant:a/app:x"]
UNITS = ["usd", "calls"]


def chain_of(scope: str) -> list[str]:
    parts = scope.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass
class ModelReservation:
    scope: str
    amounts: dict[str, int]
    holds: list[tuple[str, str, int]]
    expires_at: float
    status: str = "held"


@dataclass
class Model:
    limits: dict[tuple[str, str], int] = field(default_factory=dict)
    spent: dict[tuple[str, str], int] = field(default_factory=dict)
    reservations: dict[str, ModelReservation] = field(default_factory=dict)
    now: float = 0.0

    def held(self, key: tuple[str, str]) -> int:
        return sum(
            steps for r in self.reservations.values() if r.status == "held" for s, u, steps in r.holds if (s, u) == key
        )

    def reclaim(self) -> None:
        for r in self.reservations.values():
            if r.status == "held" and r.expires_at <= self.now:
                r.status = "expired"

    def choose(self, scope: str, plans: list[dict[str, int]]) -> int:
        for index, plan in enumerate(plans):
            fits = True
            for unit, amount in plan.items():
                for level in chain_of(scope):
                    key = (level, unit)
                    if key in self.limits:
                        remaining = self.limits[key] - self.spent.get(key, 0) - self.held(key)
                        if remaining < 0 or amount > remaining:
                            fits = False
            if fits:
                return index
        return -1


class LedgerMachine(RuleBasedStateMachine):
    make_url: Callable[[], str] = staticmethod(lambda: "memory://")

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(start=1_800_000_000.0)
        self.authority = Authority(self.make_url(), clock=self.clock)
        self.model = Model(now=self.clock())

    def teardown(self) -> None:
        self.authority.close()

    @rule(scope=st.sampled_from(SCOPES), unit=st.sampled_from(UNITS), limit=st.integers(0, 40))
    def set_budget(self, scope: str, unit: str, limit: int) -> None:
        self.authority.set_budget(Budget(scope, unit, limit))
        self.model.limits[(scope, unit)] = limit * (10**9 if unit == "usd" else 1)

    @rule(
        target=reservations,
        scope=st.sampled_from(LEAVES),
        plans=st.lists(
            st.dictionaries(st.sampled_from(UNITS), st.integers(0, 15), min_size=1, max_size=2), min_size=1, max_size=3
        ),
        ttl=st.sampled_from([1, 5, 30]),
    )
    def reserve(self, scope: str, plans: list[dict[str, int]], ttl: int) -> str:
        self.model.reclaim()
        expected = self.model.choose(scope, [self._steps(p) for p in plans])
        decision = self.authority.reserve(Action("step", "s", plans[0]), scope, plans=[Plan(p) for p in plans], ttl=ttl)
        assert decision.plan_index == expected, (decision.reasons, expected)
        if expected < 0:
            assert decision.outcome is Outcome.DENY
            return ""
        assert decision.reservation is not None
        amounts = self._steps(plans[expected])
        holds = [
            (level, unit, amount)
            for unit, amount in amounts.items()
            for level in chain_of(scope)
            if (level, unit) in self.model.limits and amount
        ]
        self.model.reservations[decision.reservation.id] = ModelReservation(scope, amounts, holds, self.model.now + ttl)
        for level, unit, _ in holds:
            key = (level, unit)
            assert self.model.spent.get(key, 0) + self.model.held(key) <= self.model.limits[key]
        return decision.reservation.id

    @staticmethod
    def _steps(amounts: dict[str, int]) -> dict[str, int]:
        return {unit: amount * (10**9 if unit == "usd" else 1) for unit, amount in amounts.items()}

    @rule(rid=consumes(reservations), actual=st.none() | st.dictionaries(st.sampled_from(UNITS), st.integers(0, 20)))
    def commit(self, rid: str, actual: dict[str, int] | None) -> None:
        if not rid:
            return
        self.model.reclaim()
        res = self.model.reservations[rid]
        settlement = self.authority.commit(rid, actual)
        steps = dict(res.amounts) if actual is None else {**res.amounts, **self._steps(actual)}
        assert settlement.replayed == (res.status == "committed")
        if res.status != "committed":
            expected_flag = {"expired": "late", "released": "after_release"}.get(res.status)
            assert (
                (expected_flag in settlement.flags)
                if expected_flag
                else not ({"late", "after_release"} & set(settlement.flags))
            )
            for unit, amount in steps.items():
                for level in chain_of(res.scope):
                    if (level, unit) in self.model.limits:
                        self.model.spent[(level, unit)] = self.model.spent.get((level, unit), 0) + amount
            res.status = "committed"

    @rule(rid=reservations)
    def release(self, rid: str) -> None:
        if not rid:
            return
        self.model.reclaim()
        res = self.model.reservations[rid]
        settlement = self.authority.release(rid)
        if res.status == "held":
            res.status = "released"
            assert not settlement.replayed
        else:
            assert settlement.replayed and settlement.status == res.status

    @rule(rid=reservations, ttl=st.sampled_from([1, 10]))
    def extend(self, rid: str, ttl: int) -> None:
        if not rid:
            return
        self.model.reclaim()
        res = self.model.reservations[rid]
        if res.status == "held":
            self.authority.extend(rid, ttl)
            res.expires_at = max(res.expires_at, self.model.now + ttl)  # an extend never shortens
        else:
            with pytest.raises(Exception, match=res.status):
                self.authority.extend(rid, ttl)

    @rule(seconds=st.sampled_from([0.5, 1, 3, 10]))
    def advance(self, seconds: float) -> None:
        self.model.now = self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        before = sum(1 for r in self.model.reservations.values() if r.status == "held")
        self.model.reclaim()
        after = sum(1 for r in self.model.reservations.values() if r.status == "held")
        assert self.authority.sweep() == before - after

    @invariant()
    def balances_match_the_model(self) -> None:
        self.model.reclaim()
        actual = {(b.scope, b.unit): b for b in self.authority.budgets()}
        assert set(actual) == set(self.model.limits)
        for key, limit in self.model.limits.items():
            scale = 10**9 if key[1] == "usd" else 1
            balance = actual[key]
            spent, held = self.model.spent.get(key, 0), self.model.held(key)
            assert (balance.limit * scale, balance.spent * scale, balance.held * scale) == (limit, spent, held), key


def run_machine(make_url: Callable[[], str], examples: int) -> None:
    machine = type("Machine", (LedgerMachine,), {"make_url": staticmethod(make_url)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )


@pytest.mark.memory
def test_memory_store_matches_reference() -> None:
    run_machine(lambda: "memory://", 150)


@pytest.mark.sqlite
def test_sqlite_store_matches_reference() -> None:
    with tempfile.TemporaryDirectory() as folder:
        counter = iter(range(10**6))
        run_machine(lambda: f"sqlite:///{Path(folder) / f'l{next(counter)}.db'}", 40)


@pytest.mark.redis
def test_redis_store_matches_reference(request: pytest.FixtureRequest) -> None:
    """Needs ``redis_url_factory`` (tests/redis_servers.py): each call returns the URL of a fresh, empty ledger."""
    try:
        factory = request.getfixturevalue("redis_url_factory")
    except pytest.FixtureLookupError:
        pytest.skip("the redis store is not available in this checkout")
    run_machine(factory, 30)
