"""The Lua ladder against the Python one: the same budgets and plans on the memory store and on Redis
must give the same plan, the same rejections (code, scope, unit, period, numbers, in order), the
same headroom and the same settlements."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearance import Action, Authority, Budget, Plan
from clearance.testing import FakeClock

pytestmark = pytest.mark.redis

LEVELS = ["tenant:d", "tenant:d/app:a", "tenant:d/app:a/workflow:w", "tenant:d/app:a/workflow:w/run:r"]
UNITS = ["usd", "calls", "tokens"]
PERIODS = [None, "day", "hour"]

budgets = st.lists(
    st.tuples(st.sampled_from(LEVELS), st.sampled_from(UNITS), st.sampled_from(PERIODS), st.integers(0, 30)),
    max_size=8,
)
plan = st.tuples(
    st.dictionaries(st.sampled_from(UNITS), st.integers(0, 12), min_size=1, max_size=3),
    st.one_of(
        st.none(),
        st.sampled_from([0.1, 0.25, 0.5]),
        st.dictionaries(st.sampled_from(["tenant", "app", "workflow", "run"]), st.sampled_from([0.2, 0.6]), max_size=2),
    ),
)
steps = st.lists(
    st.tuples(st.lists(plan, min_size=1, max_size=3), st.sampled_from(["commit", "release", "keep", "over"])),
    min_size=1,
    max_size=8,
)


def _view(decision: object) -> tuple[object, ...]:
    d: object = decision
    reasons = tuple(
        (r.code, r.scope, r.unit, r.period, r.plan, r.needed, r.remaining, r.threshold)
        for r in d.reasons  # type: ignore[attr-defined]
    )
    headroom = tuple(sorted((h.scope, h.unit, h.period or "", h.limit, h.spent, h.held) for h in d.headroom))  # type: ignore[attr-defined]
    return d.outcome, d.plan_index, reasons, headroom  # type: ignore[attr-defined]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=budgets, script=steps)
def test_lua_ladder_matches_python(redis_url_factory: object, setup: list, script: list) -> None:  # type: ignore[type-arg]
    clock = FakeClock()
    memory = Authority("memory://", clock=clock)
    redis = Authority(redis_url_factory(), clock=clock)  # type: ignore[operator]
    try:
        for level, unit, period, limit in setup:
            for authority in (memory, redis):
                authority.set_budget(Budget(level, unit, limit, period=period))
        for n, (plans, then) in zip(itertools.count(), script):
            specs = [
                Plan(amounts) if headroom is None else Plan(amounts, min_headroom=headroom)
                for amounts, headroom in plans
            ]
            action = Action("step", "s", plans[0][0])
            results = [a.reserve(action, LEVELS[-1], plans=specs, ttl=100) for a in (memory, redis)]
            assert _view(results[0]) == _view(results[1]), n
            if results[0].reservation is None:
                continue
            settle = []
            for authority, decision in zip((memory, redis), results):
                assert decision.reservation is not None
                if then == "commit":
                    settle.append(authority.commit(decision.reservation, {"usd": 1}))
                elif then == "over":
                    settle.append(authority.commit(decision.reservation, {"calls": 40, "tokens": 2}))
                elif then == "release":
                    settle.append(authority.release(decision.reservation))
            if settle:
                a, b = settle
                assert (a.status, a.charged, a.flags, a.replayed) == (b.status, b.charged, b.flags, b.replayed)
            clock.advance(7)
        assert [(x.scope, x.unit, x.period, x.limit, x.spent, x.held) for x in memory.budgets()] == [
            (x.scope, x.unit, x.period, x.limit, x.spent, x.held) for x in redis.budgets()
        ]
    finally:
        memory.close()
        redis.close()
