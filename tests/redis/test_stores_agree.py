"""Memory, SQLite and Redis driven through the same random calls must answer alike: decisions (plan,
reasons, headroom, replays), settlements (status, charged, flags), errors, look-ups and every
budget's balance — with clock jumps past TTLs and past retention, idempotency keys reused, late and
repeated commits, commits naming units never held, plans of nothing, budgets set and removed
between a hold and its settlement. Each store's own tests prove it right; this proves they agree
(it found retention, naming and overflow differences that no single-store test could see)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clearance import Action, Authority, Budget, Caps, Plan
from clearance.errors import ClearanceError
from clearance.testing import FakeClock

pytestmark = pytest.mark.redis

LEVELS = ["tenant:d", "tenant:d/app:a", "tenant:d/app:a/run:r"]
LEAVES = ["tenant:d/app:a/run:r", "tenant:d/app:b"]
UNITS = ["usd", "calls", "tokens"]
PERIODS = [None, None, "hour", "day"]  # no minute budgets: the stores keep 8 windows, a run spans < 8 hours
RETENTION = 300

amounts = st.dictionaries(st.sampled_from(UNITS), st.integers(0, 12), max_size=3)
plans = st.lists(st.tuples(amounts, st.sampled_from([0.0, 0.0, 0.25])), min_size=1, max_size=3).filter(
    lambda p: bool(p[0][0])
)  # the action asks for something; later plans may hold nothing
reserve = st.tuples(
    st.just("reserve"), plans, st.sampled_from([None, None, "k1", "k2"]), st.sampled_from([5, 100]),
    st.sampled_from(LEAVES),
)  # fmt: skip
commit = st.tuples(st.just("commit"), st.integers(0, 9), st.one_of(st.none(), amounts))
settle = st.tuples(st.sampled_from(["release", "lookup", "extend"]), st.integers(0, 9))
advance = st.tuples(st.just("advance"), st.sampled_from([1, 7, 60, 150, 400]))
budget = st.tuples(
    st.sampled_from(["set", "remove"]), st.sampled_from(LEVELS), st.sampled_from(UNITS), st.sampled_from(PERIODS),
    st.integers(0, 30),
)  # fmt: skip
check = st.tuples(st.just("check"))  # compare every balance (reading them tidies up: not after every call)
calls = st.lists(st.one_of(reserve, reserve, commit, settle, advance, budget, check), min_size=1, max_size=25)


def _answer(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except ClearanceError as error:
        return "error", type(error).__name__


def _decision(decision: Any) -> tuple[Any, ...]:
    reasons = tuple(
        (r.code, r.scope, r.unit, r.period, r.plan, r.needed, r.remaining, r.threshold) for r in decision.reasons
    )
    headroom = tuple(sorted((h.scope, h.unit, h.period or "", h.limit, h.spent, h.held) for h in decision.headroom))
    return decision.outcome, decision.plan_index, reasons, headroom, decision.replayed


def _balances(authority: Authority) -> tuple[Any, ...]:
    every = sorted((b.scope, b.unit, b.period or "", b.limit, b.spent, b.held) for b in authority.budgets())
    binding = {s: sorted((u, b.period, b.remaining) for u, b in authority.balance(s).items()) for s in LEVELS}
    return tuple(every), binding


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=calls)
# Found 2026-11-27: Redis expired only the reservation a commit named; the others' retention (and their
# idempotency keys) then ran from whenever a later call reclaimed them, not from when memory and SQLite did.
@example(
    script=[
        ("reserve", [({"usd": 0}, 0.0)], "k2", 5, "tenant:d/app:a/run:r"),
        ("reserve", [({"usd": 0}, 0.0)], None, 5, "tenant:d/app:a/run:r"),
        ("advance", 7),
        ("commit", 1, None),
        ("advance", 400),
        ("reserve", [({"usd": 0}, 0.0)], "k2", 5, "tenant:d/app:a/run:r"),
    ]
)
def test_memory_sqlite_and_redis_answer_alike(redis_url_factory: Callable[[], str], script: list[Any]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="clearance-agree-"))
    clock = FakeClock()
    stores = [
        Authority(f"memory://?retention={RETENTION}", clock=clock),
        Authority(f"sqlite:///{folder}/ledger.db?retention={RETENTION}", clock=clock),
        Authority(f"{redis_url_factory()}&retention={RETENTION}", clock=clock),
    ]
    held: list[list[Any]] = [[] for _ in stores]  # each store's reservations, in the same order
    try:
        for authority in stores:
            authority.set_budget(Budget("tenant:d", "usd", 20))
        for step, call in enumerate(script):
            kind = call[0]
            answers: list[Any] = []
            for authority, mine in zip(stores, held, strict=True):
                if kind == "reserve":
                    _, options, key, ttl, scope = call
                    ladder = [
                        Plan(a, min_headroom=h) if a or i == 0 else Plan(a, caps=Caps(skip_optional=True))
                        for i, (a, h) in enumerate(options)
                    ]
                    action = Action("step", "s", options[0][0])
                    answer = _answer(
                        lambda: authority.reserve(action, scope, plans=ladder, ttl=ttl, idempotency_key=key)
                    )
                    if answer[0] == "ok":
                        if answer[1].reservation is not None:
                            mine.append(answer[1].reservation)
                        answer = ("ok", _decision(answer[1]))
                elif kind in ("commit", "release", "lookup", "extend"):
                    if not mine:
                        answers.append(None)
                        continue
                    reservation = mine[call[1] % len(mine)]
                    if kind == "commit":
                        answer = _answer(lambda: authority.commit(reservation, call[2]))
                    elif kind == "release":
                        answer = _answer(lambda: authority.release(reservation))
                    elif kind == "extend":
                        answer = _answer(lambda: authority.extend(reservation, 50).status)
                    else:
                        answer = _answer(lambda: authority.reservation(reservation))
                    if answer[0] == "ok" and kind in ("commit", "release"):
                        s = answer[1]
                        answer = ("ok", (s.status, dict(s.charged), s.flags, s.replayed))
                    elif answer[0] == "ok" and kind == "lookup":
                        r = answer[1]
                        answer = ("ok", (r.status, r.scope, dict(r.amounts), r.plan_index, r.expires_at))
                elif kind in ("advance", "check"):
                    answer = None
                elif kind == "set":
                    _, level, unit, period, limit = call
                    answer = _answer(lambda: authority.set_budget(Budget(level, unit, limit, period=period)))
                else:
                    _, level, unit, period, _ = call
                    answer = _answer(lambda: authority.remove_budget(level, unit, period))
                answers.append(answer)
            if kind == "advance":
                clock.advance(call[1])
            assert answers[0] == answers[1] == answers[2], (step, call, answers)
            if kind == "check" or step == len(script) - 1:
                views = [_balances(authority) for authority in stores]
                assert views[0] == views[1] == views[2], (step, call, views)
    finally:
        for authority in stores:
            authority.close()
        shutil.rmtree(folder, ignore_errors=True)
