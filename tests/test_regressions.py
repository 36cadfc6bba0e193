"""Regressions found in review: idempotent retries, fail-open reservations, rule interactions, junk input."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from clearance import (
    Action,
    Authority,
    Budget,
    Caps,
    InvalidRequest,
    Mode,
    Outcome,
    Plan,
    Policy,
    PolicyDocument,
    ReservationNotFound,
    Scope,
    StoreUnavailable,
)
from clearance.ledger import HoldRequest, HoldResult
from clearance.stores.memory import MemoryStore
from clearance.testing import FakeClock

RUN = "tenant:acme/workflow:triage/run:r1"


def policy(document: dict[str, object]) -> Policy:
    return Policy(PolicyDocument.parse(document))


def test_a_retry_after_the_hold_expired_is_denied_not_allowed_unheld(store_url: str, clock: FakeClock) -> None:
    authority = Authority(store_url, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 1))
    first = authority.reserve(Action("step", "s", {"usd": 1}), RUN, ttl=5, idempotency_key="k")
    assert first.allowed
    clock.advance(10)
    assert authority.reserve(Action("step", "s", {"usd": 1}), RUN).allowed  # someone else takes the budget
    retry = authority.reserve(Action("step", "s", {"usd": 1}), RUN, idempotency_key="k")
    assert retry.outcome is Outcome.DENY
    assert retry.reasons[0].code == "replay_settled"
    assert authority.balance("tenant:acme")["usd"].remaining == 0


def test_a_retry_answers_with_the_plan_actually_held(store_url: str) -> None:
    ladder = {"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"]}
    authority = Authority(store_url, policy=policy({"ladders": [ladder], "output_cap": {"floor": 50}}))
    authority.set_budget(Budget("tenant:acme", "usd", "0.0003"))
    action = Action.model_call("openai", "gpt-4.1", 1000, 1000)
    first = authority.reserve(action, RUN, idempotency_key="k")
    retry = authority.reserve(action, RUN, idempotency_key="k")
    assert first.caps is not None
    assert first.caps.max_output_tokens == 500
    assert retry.replayed
    assert retry.caps == first.caps
    assert retry.reservation is not None
    assert first.reservation is not None
    assert retry.reservation.id == first.reservation.id
    plain = Authority(store_url)  # the same key retried with other plans: a clear denial, never a wrong caps
    plain.store = authority.store
    mismatch = plain.reserve(action, RUN, plans=[Plan({"usd": 5})], idempotency_key="k")
    assert mismatch.outcome is Outcome.DENY
    assert mismatch.reasons[0].code == "replay_mismatch"


def test_shadow_mode_with_an_idempotency_key() -> None:
    authority = Authority(
        policy=policy({"shadow": ["tenant:acme"], "ladders": [{"rungs": ["gpt-4.1", "gpt-4.1-mini"]}]})
    )
    authority.set_budget(Budget("tenant:acme", "usd", "0.0001"))
    action = Action.model_call("openai", "gpt-4.1", 1000, 1000)
    for _ in range(2):
        decision = authority.reserve(action, RUN, idempotency_key="k")
        assert decision.mode is Mode.SHADOW
        assert decision.allowed


def test_two_rate_limits_on_one_kind_count_each_action_once() -> None:
    document = PolicyDocument.parse(
        {
            "rate_limits": [
                {"scope": "tenant:acme", "kind": "tool_call", "limit": 4, "per": "minute"},
                {"scope": "tenant:acme", "kind": "tool_call", "limit": 100, "per": "hour"},
            ]
        }
    )
    authority = Authority(policy=Policy(document), clock=FakeClock(1_800_000_000.0))
    authority.apply_policy(document)
    allowed = [authority.reserve(Action.tool_call("calc"), RUN).allowed for _ in range(6)]
    assert allowed == [True] * 4 + [False] * 2


def test_fail_open_reservations_replay_expire_and_are_not_invented(clock: FakeClock) -> None:
    class Down(MemoryStore):
        def hold(self, request):  # type: ignore[no-untyped-def]
            raise StoreUnavailable("down")

    authority = Authority(Down(), clock=clock, fail_open=True, emergency_limits={"usd": 1})
    first = authority.reserve(Action("step", "s", {"usd": "0.4"}), RUN, ttl=5)
    assert first.reservation is not None
    assert authority.commit(first.reservation).replayed is False
    assert authority.commit(first.reservation).replayed is True
    with pytest.raises(ReservationNotFound):
        authority.commit("local-never-issued")
    crashed = authority.reserve(Action("step", "s", {"usd": "0.6"}), RUN, ttl=5)
    assert crashed.allowed  # 0.4 + 0.6: the cap is now full
    assert authority.reserve(Action("step", "s", {"usd": "0.1"}), RUN).denied
    clock.advance(10)  # the crashed worker's local hold expires and comes back
    assert authority.reserve(Action("step", "s", {"usd": "0.5"}), RUN).allowed


def test_store_down_while_creating_a_per_run_budget_is_a_decision() -> None:
    class Down(MemoryStore):
        def ensure_budget(self, *args):  # type: ignore[no-untyped-def]
            raise StoreUnavailable("down")

        def hold(self, request):  # type: ignore[no-untyped-def]
            raise StoreUnavailable("down")

    authority = Authority(Down(), policy=policy({"tools": {"calls_per_run": 3}}))
    decision = authority.reserve(Action.tool_call("calc"), RUN)
    assert decision.mode is Mode.FAIL_CLOSED


def test_output_cap_keeps_the_cheapest_rungs_threshold() -> None:
    ladder = {"rungs": [{"model": "gpt-4.1", "min_headroom": 0.5}, {"model": "gpt-4.1-mini", "min_headroom": 0.25}]}
    authority = Authority(policy=policy({"ladders": [ladder], "output_cap": {"floor": 10}}))
    authority.set_budget(Budget("tenant:acme", "usd", "0.0025"))  # the mini at full length would leave 20%
    decision = authority.reserve(Action.model_call("openai", "gpt-4.1", 1000, 1000), RUN)
    assert decision.caps is not None
    assert decision.caps.max_output_tokens is not None
    balance = authority.balance("tenant:acme")["usd"]
    assert balance.remaining >= balance.limit / 4


def test_an_optional_step_never_gets_a_rung_a_required_one_is_refused() -> None:
    ladder = {"rungs": [{"model": "gpt-4.1", "min_headroom": {"*": 0.5}}, "gpt-4.1-mini"]}
    authority = Authority(policy=policy({"ladders": [ladder], "optional": [{"level": "workflow", "below": 0.2}]}))
    authority.set_budget(Budget("tenant:acme/workflow:triage", "usd", "0.015"))
    required = authority.reserve(Action.model_call("openai", "gpt-4.1", 1000, 1000), RUN, plans=None)
    optional = Action.model_call("openai", "gpt-4.1", 1000, 1000, optional=True)
    assert required.caps == Caps(model="gpt-4.1-mini")
    assert authority.reserve(optional, RUN).caps in (Caps(model="gpt-4.1-mini"), Caps(skip_optional=True))


def test_tool_names_become_unit_tokens() -> None:
    document = PolicyDocument.parse(
        {"budgets": [{"scope": "tenant:acme", "unit": "tool.googlesearch.calls", "limit": 1}], "tools": {}}
    )
    authority = Authority(policy=Policy(document))
    authority.apply_policy(document)
    assert authority.reserve(Action.tool_call("GoogleSearch"), RUN).allowed
    assert authority.reserve(Action.tool_call("GoogleSearch"), RUN).denied
    caps = authority.reserve(Action.model_call("openai", "gpt-4.1", 10, 10), RUN).caps
    assert caps is not None
    assert caps.disabled_tools == ("googlesearch",)


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.reserve(Action("step", "s"), RUN, ttl=10**400),
        lambda a: Action("step", "s", metadata=[1]),
        lambda a: a.reservations(limit="x"),
        lambda a: a.reservations(limit=-1),
        lambda a: Authority(policy_refresh="x"),
        lambda a: Authority(rules=[1]),
        lambda a: Authority("memory://?retention=-1"),
    ],
)
def test_junk_is_an_invalid_request(call: object) -> None:
    with pytest.raises(InvalidRequest):
        call(Authority())  # type: ignore[operator]


def test_a_hand_built_scope_is_revalidated() -> None:
    authority = Authority()
    authority.set_budget(Budget("tenant:victim", "usd", 1))
    forged = Scope(path="tenant:attacker", segments=(("tenant", "attacker"),), chain=("tenant:victim",))
    authority.reserve(Action("step", "x", {"usd": 1}), forged)
    assert authority.balance("tenant:victim")["usd"].remaining == 1


def test_a_minute_budget_keeps_few_windows_in_memory_and_old_holds_still_settle(clock: FakeClock) -> None:
    store = MemoryStore()
    authority = Authority(store, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    authority.set_budget(Budget("tenant:acme", "usd", 1000))
    first = authority.reserve(Action("model_call", "m", {"usd": 3}), "tenant:acme/run:r1")
    assert first.reservation is not None
    for _ in range(50):  # fifty more minutes, a lifecycle in each
        clock.advance(60)
        decision = authority.reserve(Action("model_call", "m", {"usd": 1}), "tenant:acme/run:r1", ttl=3600)
        assert decision.reservation is not None
        authority.commit(decision.reservation)
    minute = store._levels["tenant:acme"][("usd", "minute")]
    assert len(minute.counters) <= 8  # not one per minute for the life of the process
    authority.commit(first.reservation, {"usd": 2})  # late (it expired): recorded, flagged, nothing breaks
    balances = {b.period: b for b in authority.budgets("tenant:acme")}
    assert balances["minute"].held == 0 and balances["minute"].spent == 1  # this minute's own lifecycle
    assert balances[None].spent == 52 and balances[None].held == 0


def test_late_commits_reopening_old_windows_never_prune_the_current_one(clock: FakeClock) -> None:
    store = MemoryStore()
    authority = Authority(store, clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    old = []
    for _ in range(9):  # nine holds in nine earlier minutes, each left to expire
        decision = authority.reserve(Action("model_call", "m", {"usd": 1}), "tenant:acme/run:old", ttl=30)
        assert decision.reservation is not None
        old.append(decision.reservation)
        clock.advance(60)
    now_held = authority.reserve(Action("model_call", "m", {"usd": 5}), "tenant:acme/run:r1")
    assert now_held.allowed
    for reservation in old:  # late commits settle in their own (re-opened) windows
        assert "late" in authority.commit(reservation, {"usd": 1}).flags
    assert authority.balance("tenant:acme")["usd"].held == 5  # this minute's counters are still the live ones
    assert authority.reserve(Action("model_call", "m", {"usd": 6}), "tenant:acme/run:r2").denied


def test_a_clock_stepped_back_past_the_kept_windows_finds_them_closed_not_empty(clock: FakeClock) -> None:
    # Found by review: the memory store keeps 8 windows per period budget; a window it pruned used
    # to open again empty, so a clock stepped back into it could spend its limit a second time.
    authority = Authority(MemoryStore(), clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    start = clock()
    spent = authority.reserve(Action("model_call", "m", {"usd": 10}), "tenant:acme/run:r1")
    assert spent.reservation is not None
    authority.commit(spent.reservation)
    for _ in range(8):  # eight more minutes: the first one's counters are pruned
        clock.advance(60)
        decision = authority.reserve(Action("model_call", "m", {"usd": 1}), "tenant:acme/run:r1")
        assert decision.reservation is not None
        authority.commit(decision.reservation)
    clock.set(start)  # the clock steps back into the pruned minute
    again = authority.reserve(Action("model_call", "m", {"usd": 10}), "tenant:acme/run:r1")
    assert again.denied and again.reasons[0].code == "budget_overage"
    clock.set(start + 8 * 60)  # back to now: the current window is intact
    assert authority.reserve(Action("model_call", "m", {"usd": 9}), "tenant:acme/run:r1").allowed


def test_a_late_commit_in_a_window_no_longer_kept_is_recorded_without_false_overage(clock: FakeClock) -> None:
    # Found by review of the closed window above: commits must not see it (charge dropped, flagged overage).
    authority = Authority(MemoryStore(), clock=clock)
    authority.set_budget(Budget("tenant:acme", "usd", 10, period="minute"))
    authority.set_budget(Budget("tenant:acme", "usd", 100))
    late = authority.reserve(Action("model_call", "m", {"usd": 2}), "tenant:acme/run:r1", ttl=30)
    live = authority.reserve(Action("model_call", "m", {"usd": 2}), "tenant:acme/run:r2", ttl=3600)
    assert late.reservation is not None and live.reservation is not None
    for _ in range(9):  # nine more minutes of traffic: the holds' minute is no longer kept
        clock.advance(60)
        decision = authority.reserve(Action("model_call", "m", {"usd": 1}), "tenant:acme/run:r3")
        assert decision.reservation is not None
        authority.commit(decision.reservation)
    authority.set_budget(Budget("tenant:acme/run:r2", "usd", 50))  # a new budget: commits take the general path
    assert authority.commit(late.reservation, {"usd": 2}).flags == ("late",)
    assert authority.commit(live.reservation, {"usd": 2}).flags == ()
    assert authority.balance("tenant:acme")["usd"].spent == 1  # this minute's own lifecycle
    spent = {(b.scope, b.period): b.spent for b in authority.budgets("tenant:acme")}
    assert spent[("tenant:acme", None)] == 13 and spent[("tenant:acme/run:r2", None)] == 2


def _with_slow_commits(seconds: float) -> Authority:
    """An Authority on a memory store whose async commits take ``seconds`` (a slow or hung store)."""

    class Slow(MemoryStore):
        async def acommit(self, reservation_id, actual, now):  # type: ignore[no-untyped-def]
            await asyncio.sleep(seconds)
            return self.commit(reservation_id, actual, now)

    authority = Authority(Slow())
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    return authority


def test_an_aguard_cancelled_while_its_exit_commit_waits_still_commits() -> None:
    """Money spent is spent: a task cancelled while aguard's exit commit is on its way (a slow or
    hung store) still gets its CancelledError, and the commit finishes in the background."""
    authority = _with_slow_commits(0.05)

    async def work() -> None:
        async with authority.aguard(Action("step", "s", {"usd": 1}), RUN) as grant:
            grant.settle({"usd": "0.4"})

    async def main() -> None:
        task = asyncio.ensure_future(work())
        await asyncio.sleep(0.01)  # inside the exit commit's sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)  # the commit finishes in the background

    asyncio.run(main())
    balance = authority.balance("tenant:acme")["usd"]
    assert (balance.spent, balance.held) == (Decimal("0.4"), 0)


def test_an_aguard_settle_cut_short_by_the_loop_ending_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    authority = _with_slow_commits(1.0)

    async def work() -> None:
        async with authority.aguard(Action("step", "s", {"usd": 1}), RUN):
            pass

    async def main() -> None:
        task = asyncio.ensure_future(work())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # then asyncio.run ends, cancelling the background settle

    asyncio.run(main())
    assert any("was cut short" in record.getMessage() for record in caplog.records)


def test_a_failed_policy_refresh_backs_off_only_once_a_version_is_known() -> None:
    """A process that never read a policy version keeps trying (it must learn the policy); one that
    has backs off, but never over a reset made meanwhile (apply_policy in this process)."""
    import math
    import time

    from clearance import StoreUnavailable

    class Flaky(MemoryStore):
        fail = True
        hook: object = None

        def policy_version(self) -> int:
            if callable(self.hook):
                self.hook()
            if self.fail:
                raise StoreUnavailable("blip (test)")
            return super().policy_version()

    store = Flaky()
    authority = Authority(store, policy_refresh=0)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    authority.reserve(Action("step", "s", {"usd": 1}), RUN)
    assert authority._policy_checked <= time.monotonic()  # no back-off: no version known yet
    store.fail = False
    authority.reserve(Action("step", "s", {"usd": 1}), RUN)
    store.fail = True

    def applied_meanwhile() -> None:
        authority._policy_checked = -math.inf  # what apply_policy does

    store.hook = applied_meanwhile
    authority.reserve(Action("step", "s", {"usd": 1}), RUN)
    assert authority._policy_checked == -math.inf  # the reset stands
    store.hook = None
    authority.reserve(Action("step", "s", {"usd": 1}), RUN)
    assert authority._policy_checked > time.monotonic()  # known version, store failing: back off


def test_memory_ensure_budget_never_undoes_an_operators_limit_set_meanwhile() -> None:
    """ensure_budget (a per-run budget template) creates a budget only if there is none: looking and
    creating are one lock section, so an operator's set_budget landing right after the look is not
    overwritten by the template (it was: looked, let go of the lock, then set the template's limit)."""
    from clearance.stores.memory import MemoryStore

    store = MemoryStore()
    lock = store._lock
    scope = "tenant:acme/run:r1"

    class OperatorActsOnRelease:
        """The store's lock; the first time a section ends, the operator sets a limit."""

        pending = True

        def __enter__(self) -> None:
            lock.acquire()

        def __exit__(self, *exc: object) -> None:
            lock.release()
            if OperatorActsOnRelease.pending:
                OperatorActsOnRelease.pending = False
                store.set_budget(scope, "usd", "", 500, 1.0)

    store._lock = OperatorActsOnRelease()  # type: ignore[assignment]
    store.ensure_budget(scope, "usd", "", 10, 1.0)
    store._lock = lock
    [state] = store.accounts(scope, (("", ""),), 2.0, False)
    assert state.limit == 500


def test_a_guard_retried_with_the_key_of_one_that_committed_does_not_run_again() -> None:
    """A guard whose idempotency key already committed (its block ran, its cost is recorded) is
    denied replay_settled: running the block again would do the step twice, its cost dropped."""
    from clearance import Denied

    authority = Authority()
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    runs = 0
    with authority.guard(Action("step", "s", {"usd": 1}), RUN, idempotency_key="step-1") as grant:
        runs += 1
        grant.settle({"usd": "0.4"})
    with (
        pytest.raises(Denied) as denied,
        authority.guard(Action("step", "s", {"usd": 1}), RUN, idempotency_key="step-1"),
    ):
        runs += 1
    assert runs == 1
    assert denied.value.decision.reasons[0].code == "replay_settled"
    assert authority.balance("tenant:acme")["usd"].spent == Decimal("0.4")
    # reserve itself still answers a retry with the committed reservation (a lost reply, say)
    replay = authority.reserve(Action("step", "s", {"usd": 1}), RUN, idempotency_key="step-1")
    assert replay.replayed and replay.reservation is not None and replay.reservation.status == "committed"


def test_a_model_call_is_priced_exactly_whatever_the_callers_decimal_context() -> None:
    import decimal

    from clearance.pricing import price_nano_usd

    with decimal.localcontext() as context:
        context.prec = 3
        held = dict(Action.model_call("openai", "gpt-4o", 1001, 500).steps)["usd"]
    assert held == price_nano_usd("openai", "gpt-4o", 1001, 500)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("m", "nan", 1), {}),
        (("m", "abc", 1), {}),
        (("m", 1, "nan"), {}),
        (("m", 1, "inf"), {}),
        (("m", -1, 1), {}),
        (("m", True, 1), {}),
        (("", 1, 1), {}),
        (("m", 1, 1), {"provider": 5}),
    ],
)
def test_bad_prices_are_invalid_requests(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    from clearance.pricing import register_price

    with pytest.raises(InvalidRequest):
        register_price(*args, **kwargs)  # type: ignore[arg-type]


def test_the_fallback_price_is_checked_and_a_zero_output_price_is_a_price() -> None:
    from clearance.pricing import set_fallback_price

    for bad in (("abc",), ("inf",), (1, "nan"), (-1,)):
        with pytest.raises(InvalidRequest):
            set_fallback_price(*bad)
    try:
        set_fallback_price(5, 0)
        call = Action.model_call("nosuchprovider", "no-such-model", 0, 1_000_000)
        assert call.amounts["usd"] == 0  # output priced at 0, not at the input price
        with pytest.raises(InvalidRequest):
            Action.model_call(5, "gpt-4o", 1, 1)  # type: ignore[arg-type]
    finally:
        set_fallback_price(None)


def test_a_fake_clock_moves_by_finite_seconds_only() -> None:
    clock = FakeClock()
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError):
            clock.advance(bad)
    with pytest.raises(ValueError):
        clock.set(float("nan"))
    assert clock() == FakeClock()()


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
def test_min_headroom_is_never_weakened_by_rounding(url: str, tmp_path: Path) -> None:
    """min_headroom went to whole parts per million rounded to nearest: 2.5e-6 kept 2 ppm and 4e-7
    none, so a plan could keep less than it demanded. It is rounded up now."""
    authority = Authority(url if url != "sqlite" else f"sqlite:///{tmp_path / 'ledger.db'}")
    authority.set_budget(Budget("tenant:h", "usd", 1000))
    for fraction, leaves in ((2.5e-6, "0.002"), (4e-7, "0.0001")):
        amount = Decimal(1000) - Decimal(leaves)
        ladder = [Plan({"usd": amount}, min_headroom=fraction), Plan({"usd": "0.000000001"})]
        decision = authority.reserve(Action("step", "s", {"usd": amount}), "tenant:h", plans=ladder)
        assert decision.plan_index == 1 and decision.reasons[0].code == "min_headroom", (fraction, decision)
        authority.release(decision.reservation)  # type: ignore[arg-type]
    assert Plan({"usd": 1}, min_headroom=0.3333334).headroom_ppm(("tenant",)) == (333334,)


def test_decisions_never_use_the_callers_decimal_context() -> None:
    """A denial's numbers were computed in the caller's decimal context: wrong in its message with
    prec=3, and with Inexact trapped reserve() raised — after the store had held a later rung of the
    ladder (that hold stayed until its TTL)."""
    from decimal import Inexact, localcontext

    authority = Authority("memory://")
    authority.set_budget(Budget("tenant:l", "usd", 1))
    ladder = [Plan({"usd": "0.912345678"}, min_headroom=0.5), Plan({"usd": "0.123456789"})]
    with localcontext() as context:
        context.prec = 3
        context.traps[Inexact] = True
        decision = authority.reserve(Action("step", "s", {"usd": "0.912345678"}), "tenant:l", plans=ladder)
    assert decision.plan_index == 1
    assert "would keep 0.087654322 < required headroom 0.5" in decision.reasons[0].message


# A lone surrogate: what json.loads gives for a tool name cut off mid-emoji ("search\ud83d"). No store
# can encode it: it was accepted, then SQLite and Redis raised a bare UnicodeEncodeError (memory held it).
SURROGATE = json.loads('"search\\ud83d"')


def test_a_lone_surrogate_in_an_action_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        Action("tool_call", SURROGATE, {"usd": 1})
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        Action.model_call("openai", "gpt-4o", input_tokens=10, max_output_tokens=10, name=SURROGATE)
    assert Action("tool_call", "search \U0001f50d é", {"usd": 1}).name == "search \U0001f50d é"  # real characters


@pytest.mark.parametrize(
    "entry",
    [
        {"rate_limits": [{"scope": "tenant:acme", "kind": "tool_call", "name": SURROGATE, "limit": 3}]},
        {"tools": {"toolsets": {SURROGATE: ["search"]}}},
        {"tools": {"toolsets": {"web": [SURROGATE]}}},
    ],  # (a field with a length limit, a rung's model, pydantic refuses as not unicode itself)
)
def test_a_policy_with_a_lone_surrogate_is_refused_before_anything_is_written(
    entry: dict[str, object], store_url: str, clock: FakeClock
) -> None:
    """It passed validation, then apply wrote its budgets and failed storing the policy: the usd
    limit raised from 5 to 50 under the old policy, a bare PydanticSerializationError."""
    authority = Authority(store_url, clock=clock)
    authority.apply_policy(PolicyDocument.parse({"budgets": [{"scope": "tenant:acme", "unit": "usd", "limit": "5"}]}))
    document = {"budgets": [{"scope": "tenant:acme", "unit": "usd", "limit": "50"}], **entry}
    with pytest.raises(InvalidRequest, match="surrogate"):
        PolicyDocument.loads(json.dumps(document), "json")
    built = PolicyDocument.parse(document, stored=True)  # (read as stored: not checked as written)
    with pytest.raises(InvalidRequest, match="surrogate"):
        authority.apply_policy(built)
    assert authority.balance("tenant:acme")["usd"].limit == 5
    assert authority.store.policy()[0] == 1
    assert [b.unit for b in authority.budgets("tenant:acme")] == ["usd"]
    authority.close()


def test_a_policy_that_cannot_be_stored_changes_no_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    authority = Authority("memory://")
    document = PolicyDocument.parse({"budgets": [{"scope": "tenant:acme", "unit": "usd", "limit": "50"}]})

    def unwritable(self: PolicyDocument) -> str:
        raise ValueError("Error serializing to JSON")

    monkeypatch.setattr(PolicyDocument, "to_json", unwritable)
    with pytest.raises(InvalidRequest, match="cannot be stored"):
        authority.apply_policy(document)
    with pytest.raises(InvalidRequest, match="cannot be stored"):
        asyncio.run(authority.aapply_policy(document))
    assert authority.budgets("tenant:acme") == []


def test_the_first_window_of_a_process_is_right_at_any_minute() -> None:
    """The one-entry window cache started as minute -1 with no windows: a process whose first
    call fell in the minute before the epoch got none (a bare KeyError on every store)."""
    code = (
        "from clearance.periods import windows_at, window_at; "
        "print(windows_at(-30.0) == tuple((p, window_at(-30.0, p)) for p, _ in windows_at(0.0)))"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert finished.stdout.strip() == "True"


class _AnswerLost(MemoryStore):
    """Its first hold of the kind asked for lands, then the caller is interrupted before the answer
    (a step timeout's signal handler, Ctrl-C; a task cancelled as the reply arrives)."""

    def __init__(self, keyed: bool) -> None:
        super().__init__()
        self.keyed, self.armed = keyed, True

    def _lose(self, request: HoldRequest, error: BaseException) -> None:
        if self.armed and (request.idempotency_key is not None) == self.keyed:
            self.armed = False
            raise error

    def hold(self, request: HoldRequest) -> HoldResult:
        result = super().hold(request)
        self._lose(request, KeyboardInterrupt())
        return result

    async def ahold(self, request: HoldRequest) -> HoldResult:
        result = super().hold(request)
        self._lose(request, asyncio.CancelledError())
        return result


def test_a_keyed_guard_interrupted_after_its_hold_landed_runs_once_on_retry() -> None:
    """Sync: an interrupt after the hold landed was not remembered as an unanswered hold (only a
    store error was), so the guard retried with its key was denied ``replay_in_progress`` — and,
    after the TTL, ``replay_settled`` for good: the step could never run under its key."""
    authority = Authority(_AnswerLost(keyed=True), clock=FakeClock())
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    step = Action("step", "x", {"usd": 1})
    with pytest.raises(KeyboardInterrupt), authority.guard(step, "tenant:acme/run:r1", idempotency_key="k"):
        pytest.fail("the block ran without a decision")
    with authority.guard(step, "tenant:acme/run:r1", idempotency_key="k") as grant:
        grant.settle({"usd": 1})
    balance = authority.balance("tenant:acme")["usd"]
    assert balance.spent == 1 and balance.held == 0


@pytest.mark.asyncio
async def test_a_shadow_aguard_cancelled_at_its_would_be_hold_runs_on_retry_and_frees_that_hold() -> None:
    """Shadow mode: a task cancelled while the would-be decision was made left the caller's shadow
    reservation unremembered (its key then denied for good) and the would-be hold with no owner,
    keeping its budget until its TTL."""
    clock = FakeClock()
    authority = Authority(_AnswerLost(keyed=False), clock=clock, default_ttl=600)
    document = 'shadow: ["tenant:globex"]\nbudgets: [{scope: "tenant:globex", unit: usd, limit: 10}]'
    authority.apply_policy(PolicyDocument.loads(document, "yaml"))
    step = Action("step", "x", {"usd": 1})
    with pytest.raises(asyncio.CancelledError):
        async with authority.aguard(step, "tenant:globex/run:r1", idempotency_key="k"):
            pytest.fail("the block ran without a decision")
    async with authority.aguard(step, "tenant:globex/run:r1", idempotency_key="k") as grant:
        grant.settle({"usd": 1})
    balance = authority.balance("tenant:globex")["usd"]
    assert balance.spent == 1 and balance.held == 0  # (the would-be hold released by the retry's decision)


def test_a_shadow_decision_interrupted_at_its_output_cap_retry_frees_that_hold() -> None:
    """The would-be decision's second hold (the output cap's retry, another reservation id) was not
    among those queued for release when the decision was cut short: it kept its budget until its
    TTL, and the tenant's would-be decisions meanwhile were denied (found in review)."""

    class Lost(MemoryStore):
        keyless = 0

        def hold(self, request: HoldRequest) -> HoldResult:
            result = super().hold(request)
            if request.idempotency_key is None:
                self.keyless += 1
                if self.keyless == 2:  # the output cap's retry lands, its answer is lost
                    raise KeyboardInterrupt
            return result

    clock = FakeClock()
    authority = Authority(Lost(), clock=clock, default_ttl=600)
    document = {"shadow": ["tenant:globex"], "output_cap": {"floor": 64}}
    authority.apply_policy(PolicyDocument.parse(document))
    authority.set_budget(Budget("tenant:globex", "usd", 1))
    call = Action.model_call("openai", "gpt-4o", 1000, 200_000)  # 2.0025: only an output cap fits
    with pytest.raises(KeyboardInterrupt):
        authority.reserve(call, "tenant:globex/run:r1", idempotency_key="k")
    assert authority.balance("tenant:globex")["usd"].held > 0  # the capped would-be hold, no owner
    again = authority.reserve(call, "tenant:globex/run:r2")  # the tenant's next shadow decision
    assert again.would_be is not None and again.would_be.allowed  # (its own would-be hold fits again)
    assert authority.balance("tenant:globex")["usd"].held == 0


def test_a_shadow_tool_call_retried_after_an_interrupt_counts_on_its_run() -> None:
    """A shadow decision cut short before it made the run's per-run budget (``calls_per_run``): its
    keyed retry replays the shadow reservation without a would-be decision, so that budget was
    never made and the call's commit counted nowhere (the run showed 1 call after 2)."""

    class Interrupted(MemoryStore):
        armed = True

        def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt
            return super().ensure_budget(scope, unit, period, limit, now)

    authority = Authority(Interrupted(), clock=FakeClock())
    authority.apply_policy(PolicyDocument.loads('shadow: ["tenant:globex"]\ntools: {calls_per_run: 20}', "yaml"))
    call, run = Action.tool_call("web_search"), "tenant:globex/run:r1"
    with pytest.raises(KeyboardInterrupt):
        authority.reserve(call, run, idempotency_key="t1")
    retried = authority.reserve(call, run, idempotency_key="t1")
    assert retried.replayed and retried.reservation is not None
    authority.commit(retried.reservation, {"calls": 1})
    authority.commit(authority.reserve(call, run, idempotency_key="t2").reservation, {"calls": 1})  # type: ignore[arg-type]
    assert [(b.unit, b.spent) for b in authority.budgets(run)] == [("tool_calls", 2)]
