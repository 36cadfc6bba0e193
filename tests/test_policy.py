"""Policies: each rule alone, rules combined, shadow mode, policies as versioned data."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearance import Action, Authority, Budget, Caps, Denied, InvalidRequest, Mode, Outcome, Plan, Policy
from clearance.policy_file import PolicyDocument
from clearance.testing import FakeClock

RUN = "tenant:acme/workflow:triage/run:r1"
LADDER = {"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"]}


def authority_with(document: dict[str, object], store: str = "memory://", **options: object) -> Authority:
    return Authority(store, policy=Policy(PolicyDocument.parse(document)), **options)  # type: ignore[arg-type]


def flagship(input_tokens: int = 1000, output_tokens: int = 1000) -> Action:
    return Action.model_call("openai", "gpt-4.1", input_tokens, output_tokens)


def test_no_policy_changes_nothing() -> None:
    authority = authority_with({})
    authority.set_budget(Budget("tenant:acme", "usd", "0.005"))
    assert authority.reserve(flagship(), RUN).outcome is Outcome.DENY


def test_ladder_falls_to_the_first_rung_that_fits(store_url: str) -> None:
    authority = authority_with(store=store_url, document={"ladders": [LADDER]})
    authority.set_budget(Budget("tenant:acme/workflow:triage", "usd", "0.0125"))
    first = authority.reserve(flagship(), RUN)  # $0.01 fits
    assert first.outcome is Outcome.ALLOW
    second = authority.reserve(flagship(), RUN)  # $0.0025 left: the mini ($0.002) fits
    assert second.outcome is Outcome.ALLOW_WITH_CAPS
    assert second.caps == Caps(model="gpt-4.1-mini")
    assert second.reservation is not None
    assert second.reservation.amounts["usd"] == Decimal("0.002")
    assert second.reasons[0].code == "budget_exhausted"
    assert second.reasons[-1].rule == "ladder:gpt-4.1-mini"
    third = authority.reserve(flagship(), RUN)  # $0.0005 left: the nano fits exactly
    assert third.caps == Caps(model="gpt-4.1-nano")
    assert authority.reserve(flagship(), RUN).outcome is Outcome.DENY


def test_a_cheaper_request_starts_lower_on_the_ladder() -> None:
    authority = authority_with({"ladders": [LADDER]})
    authority.set_budget(Budget("tenant:acme", "usd", "0.001"))
    decision = authority.reserve(Action.model_call("openai", "gpt-4.1-mini", 1000, 1000), RUN)
    assert decision.caps == Caps(model="gpt-4.1-nano")


def test_a_hand_built_model_call_keeps_what_it_holds_beyond_its_tokens() -> None:
    """An Action built by hand with the model call's metadata and a worst case of its own (a fee
    it knows of): a policy re-priced it from its tokens — 5 USD held as 0.01 — once any rule was in
    force. What it holds beyond its price as asked now comes on top of every plan's price."""
    rates = {"rate_limits": [{"scope": "tenant:acme", "kind": "model_call", "limit": 100}]}
    authority = authority_with({**rates, "ladders": [LADDER]})
    authority.set_budget(Budget("tenant:acme", "usd", "100"))
    meta = {"input_tokens": 1000, "max_output_tokens": 1000}
    amounts = {"usd": "5", "tokens": 2000}
    own = Action("model_call", "gpt-4.1", amounts, provider="openai", model="gpt-4.1", metadata=meta)
    held = authority.reserve(own, RUN).reservation
    assert held is not None and held.amounts["usd"] == Decimal("5")
    built = Action.model_call("openai", "gpt-4.1", 1000, 1000)  # (its own price: held as it is)
    same = authority.reserve(built, RUN).reservation
    assert same is not None and same.amounts["usd"] == built.amounts["usd"]
    authority.set_budget(Budget("tenant:acme", "usd", "10.005"))  # 4.995 left: not the 5 as asked
    fee = Decimal("5") - built.amounts["usd"]
    cheaper = authority.reserve(own, RUN)
    assert cheaper.caps == Caps(model="gpt-4.1-mini") and cheaper.reservation is not None
    mini = Action.model_call("openai", "gpt-4.1-mini", 1000, 1000).amounts["usd"]
    assert cheaper.reservation.amounts["usd"] == mini + fee  # the fee on the cheaper rung too


def test_soft_threshold_keeps_the_flagship_for_when_there_is_room() -> None:
    ladder = {"provider": "openai", "rungs": [{"model": "gpt-4.1", "min_headroom": {"workflow": 0.5}}, "gpt-4.1-mini"]}
    authority = authority_with({"ladders": [ladder]})
    authority.set_budget(Budget("tenant:acme/workflow:triage", "usd", "0.04"))
    assert authority.reserve(flagship(), RUN).caps is None  # leaves 0.03 >= 0.02
    assert authority.reserve(flagship(), RUN).caps is None  # leaves 0.02 >= 0.02
    degraded = authority.reserve(flagship(), RUN)  # would leave 0.01 < 0.02
    assert degraded.caps == Caps(model="gpt-4.1-mini")
    assert degraded.reasons[0].code == "min_headroom"
    assert degraded.reasons[0].threshold == Decimal("0.02")


def test_output_cap_offers_what_the_headroom_pays_for(store_url: str) -> None:
    authority = authority_with(store=store_url, document={"ladders": [LADDER], "output_cap": {"floor": 100}})
    authority.set_budget(Budget("tenant:acme", "usd", "0.0003"))  # nano at full length costs 0.0005
    decision = authority.reserve(flagship(), RUN)
    assert decision.outcome is Outcome.ALLOW_WITH_CAPS
    assert decision.caps is not None
    assert decision.caps.model == "gpt-4.1-nano"
    # 1000 input tokens cost 0.0001; each output token 0.0000004 → 500 tokens fit in 0.0003.
    assert decision.caps.max_output_tokens == 500
    assert [r.code for r in decision.reasons][-2:] == ["output_cap", "plan_selected"]
    assert authority.balance("tenant:acme")["usd"].remaining == 0


def test_an_output_capped_hold_is_recorded_as_the_plan_it_is(store_url: str) -> None:
    """The retry holds the capped plan alone: the ledger and the audit trail recorded it as plan 0 —
    the undegraded request — while the decision said plan 3; and a retry with the key gave other
    reasons than the decision it replays."""
    document = {"ladders": [{"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini"]}], "output_cap": {"floor": 64}}
    authority = authority_with(document, store=store_url)
    authority.set_budget(Budget("tenant:acme", "usd", "0.001"))
    decision = authority.reserve(flagship(), RUN, idempotency_key="k")
    assert decision.caps is not None and decision.caps.max_output_tokens is not None
    assert decision.reservation is not None
    assert decision.plan_index == decision.reservation.plan_index == 2
    assert authority.reservation(decision.reservation).plan_index == 2
    assert [e.detail for e in authority.events(scope="tenant:acme") if e.kind == "hold"] == ["plan=2"]
    again = authority.reserve(flagship(), RUN, idempotency_key="k")
    assert again.replayed and again.caps == decision.caps
    assert again.plan_index == again.reservation.plan_index == 2  # type: ignore[union-attr]
    tail = [(r.code, r.message) for r in decision.reasons][-2:]
    assert [(r.code, r.message) for r in again.reasons] == tail  # (the replay has no rejections to report)


def test_output_cap_respects_its_floor() -> None:
    authority = authority_with({"ladders": [LADDER], "output_cap": {"floor": 600}})
    authority.set_budget(Budget("tenant:acme", "usd", "0.0003"))
    assert authority.reserve(flagship(), RUN).outcome is Outcome.DENY


def test_context_cap_trims_input_heavy_calls() -> None:
    authority = authority_with({"ladders": [LADDER], "context_cap": {"dominance": 0.6, "keep": 0.25, "floor": 1000}})
    authority.set_budget(Budget("tenant:acme", "tokens", 30_000))
    decision = authority.reserve(flagship(100_000, 500), RUN)  # input is ~98% of the price
    assert decision.outcome is Outcome.ALLOW_WITH_CAPS
    assert decision.caps == Caps(model="gpt-4.1-nano", max_input_tokens=25_000)
    assert decision.reservation is not None
    assert decision.reservation.amounts["tokens"] == 25_500


def test_a_degraded_model_call_is_priced_with_its_cache_writes() -> None:
    """A ladder's cheaper model, a context cap and an output cap re-price the call: each with the
    prompt-cache writes the call said it may make (at most the input kept), or held short."""
    ladder = {"provider": "anthropic", "rungs": ["claude-3-7-sonnet-latest", "claude-3-5-haiku-latest"]}
    writes = {"cache_write_tokens": 80_000, "cache_write_1h_tokens": 30_000}

    def call(model: str, input_tokens: int, output_tokens: int, **counts: int) -> Action:
        return Action.model_call("anthropic", model, input_tokens, output_tokens, **counts)

    authority = authority_with({"ladders": [ladder]})
    cheaper = call("claude-3-5-haiku-latest", 100_000, 1000, **writes).amounts["usd"]
    authority.set_budget(Budget("tenant:acme", "usd", cheaper))  # the haiku with its writes, exactly
    decision = authority.reserve(call("claude-3-7-sonnet-latest", 100_000, 1000, **writes), RUN)
    assert decision.caps == Caps(model="claude-3-5-haiku-latest")
    assert decision.reservation is not None and decision.reservation.amounts["usd"] == cheaper

    trimming = authority_with({"ladders": [ladder], "context_cap": {"dominance": 0.6, "keep": 0.25, "floor": 1000}})
    trimming.set_budget(Budget("tenant:acme", "tokens", 30_000))
    decision = trimming.reserve(call("claude-3-7-sonnet-latest", 100_000, 500, **writes), RUN)
    assert decision.caps == Caps(model="claude-3-5-haiku-latest", max_input_tokens=25_000)
    kept = call("claude-3-5-haiku-latest", 25_000, 500, cache_write_tokens=25_000, cache_write_1h_tokens=25_000)
    assert decision.reservation is not None and decision.reservation.amounts["usd"] == kept.amounts["usd"]

    capped = authority_with({"ladders": [ladder], "output_cap": {"floor": 100}})
    longest = call("claude-3-5-haiku-latest", 100_000, 400, **writes).amounts["usd"]
    capped.set_budget(Budget("tenant:acme", "usd", longest))
    decision = capped.reserve(call("claude-3-7-sonnet-latest", 100_000, 1000, **writes), RUN)
    assert decision.caps is not None and decision.caps.max_output_tokens == 400
    assert decision.reservation is not None and decision.reservation.amounts["usd"] == longest


def test_tool_budget_exhausted_disables_the_tool_for_model_calls(store_url: str) -> None:
    authority = authority_with(
        store=store_url,
        document={
            "budgets": [{"scope": "tenant:acme", "unit": "tool.web_search.calls", "limit": 2}],
            "tools": {"toolsets": {"search": ["web_search", "news_search"]}},
        },
    )
    authority.apply_policy(authority.current_policy().document)  # type: ignore[union-attr]
    for _ in range(2):
        assert authority.reserve(Action.tool_call("web_search"), RUN).allowed
    denied = authority.reserve(Action.tool_call("web_search"), RUN)
    assert denied.outcome is Outcome.DENY
    assert denied.reasons[0].unit == "tool.web_search.calls"
    assert authority.reserve(Action.tool_call("news_search"), RUN).allowed
    model = authority.reserve(flagship(), RUN)
    assert model.outcome is Outcome.ALLOW_WITH_CAPS
    assert model.caps == Caps(disabled_tools=("web_search",))
    assert model.reasons[-1].code == "tools_capped"


def test_a_long_tool_name_counts_in_the_budget_written_with_it(store_url: str) -> None:
    """Names were cut to 40 characters inside units: a budget written, as documented, with an MCP
    tool's whole name was accepted and never charged (three calls against a limit of 1), and two
    tools sharing their first 40 characters shared one counter."""
    comment = "mcp__github__create_pull_request_review_comment"  # 47 characters
    thread = "mcp__github__create_pull_request_review_thread"
    document = {
        "budgets": [{"scope": "tenant:acme", "unit": f"tool.{comment}.calls", "limit": 1}],
        "tools": {"toolsets": {"github": [comment, thread]}},
    }
    authority = authority_with(document, store=store_url)
    authority.apply_policy(PolicyDocument.parse(document))
    assert authority.reserve(Action.tool_call(comment), RUN).allowed
    denied = authority.reserve(Action.tool_call(comment), RUN)
    assert denied.denied and denied.reasons[0].unit == f"tool.{comment}.calls"
    assert authority.reserve(Action.tool_call(thread), RUN).allowed  # a counter of its own
    assert authority.reserve(flagship(), RUN).caps == Caps(disabled_tools=(comment,))


def test_names_too_long_for_a_unit_keep_a_counter_each() -> None:
    from clearance.policy import tool_unit

    first, second = "a" * 70 + "_first", "a" * 70 + "_second"
    units = {tool_unit("tool", first, "calls"), tool_unit("tool", second, "calls")}
    assert len(units) == 2 and all(len(unit) <= 128 for unit in units)
    assert tool_unit("tool", first, "calls") == tool_unit("tool", first.upper(), "calls")  # (one token)


@pytest.mark.parametrize("document", [{"tools": {"toolsets": {"search": ["web.search", "news"]}}}, {"output_cap": {}}])
def test_a_tool_budget_set_outside_the_policy_disables_the_tool_too(
    store_url: str, document: dict[str, object]
) -> None:
    """Only the tool budgets the policy document named were looked at: one set with set_budget (or
    the CLI, or left by an earlier policy) denied the tool call, yet model calls kept offering it."""
    authority = authority_with(document, store=store_url)
    authority.set_budget(Budget("tenant:acme", "tool.web_search.calls", 1))
    authority.set_budget(Budget("tenant:acme/workflow:triage", "toolset.search.calls", 5))
    assert authority.reserve(Action.tool_call("web.search"), RUN).allowed
    assert authority.reserve(Action.tool_call("web.search"), RUN).denied
    model = authority.reserve(flagship(), RUN, idempotency_key="m1")
    named = "web.search" if "tools" in document else "web_search"  # (by its token when in no toolset)
    assert model.outcome is Outcome.ALLOW_WITH_CAPS and model.caps == Caps(disabled_tools=(named,))
    assert authority.reserve(flagship(), RUN, idempotency_key="m1").caps == model.caps  # a retry too
    assert authority.reserve(Action.tool_call("news"), RUN).allowed


def test_toolset_budget_disables_every_tool_of_the_set() -> None:
    document = {
        "budgets": [{"scope": "tenant:acme", "unit": "toolset.search.calls", "limit": 1}],
        "tools": {"toolsets": {"search": ["web_search", "news_search"]}},
    }
    authority = authority_with(document)
    authority.apply_policy(PolicyDocument.parse(document))
    assert authority.reserve(Action.tool_call("news_search"), RUN).allowed
    assert authority.reserve(Action.tool_call("web_search"), RUN).denied
    caps = authority.reserve(flagship(), RUN).caps
    assert caps is not None
    assert caps.disabled_tools == ("news_search", "web_search")


def test_tool_calls_per_run(store_url: str) -> None:
    authority = authority_with(store=store_url, document={"tools": {"calls_per_run": 2}})
    for _ in range(2):
        assert authority.reserve(Action.tool_call("calc"), RUN).allowed
    assert authority.reserve(Action.tool_call("calc"), RUN).denied
    assert authority.reserve(Action.tool_call("calc"), "tenant:acme/workflow:triage/run:r2").allowed
    caps = authority.reserve(flagship(), RUN).caps
    assert caps is not None
    assert caps.max_tool_calls == 0
    assert authority.reserve(flagship(), "tenant:acme/workflow:triage/run:r2").caps is None


def _with_option(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


def _counting_runs(store_url: str, calls: int) -> tuple[Authority, FakeClock]:
    """An Authority counting ``calls`` tool calls per run, on a store keeping things 800 s: a run's
    budget for 1000 s past its last refresh (a retention and twice the refresh interval, 100 s)."""
    clock = FakeClock()
    document = {"tools": {"calls_per_run": calls}}
    return authority_with(document, store=_with_option(store_url, "retention=800"), clock=clock), clock


def _tool_call_budgets(authority: Authority) -> list[str]:
    return sorted(b.scope for b in authority.budgets() if b.unit == "tool_calls")


def test_a_runs_budget_is_forgotten_once_the_run_is_idle(store_url: str) -> None:
    """A run has no end the ledger could see: its per-run budget (and counter) is forgotten once
    unused for the retention; a run seen again after that starts a new count."""
    authority, clock = _counting_runs(store_url, calls=2)
    for run in ("r1", "r2"):
        decision = authority.reserve(Action.tool_call("calc"), f"tenant:acme/run:{run}")
        authority.commit(decision.reservation)  # type: ignore[arg-type]
    assert _tool_call_budgets(authority) == ["tenant:acme/run:r1", "tenant:acme/run:r2"]
    clock.advance(500)
    authority.sweep()
    assert len(_tool_call_budgets(authority)) == 2  # not yet
    clock.advance(600)
    authority.sweep()
    assert _tool_call_budgets(authority) == []
    removed = [e for e in authority.events(limit=100) if e.kind == "budget_remove"]
    assert sorted(e.scope for e in removed) == ["tenant:acme/run:r1", "tenant:acme/run:r2"]
    assert all(e.detail == "period=lifetime idle" for e in removed)
    again = authority.reserve(Action.tool_call("calc"), "tenant:acme/run:r1")
    assert again.allowed
    assert authority.balance("tenant:acme/run:r1")["tool_calls"].spent == 0  # a new count
    authority.close()


def test_a_run_in_use_keeps_its_budget(store_url: str) -> None:
    """While a run keeps calling, its budget is never forgotten: the count holds however long the
    run lasts (the Authority ensures the budget again at least every retention / 8)."""
    authority, clock = _counting_runs(store_url, calls=4)
    allowed = 0
    for _ in range(16):  # 16 x 150 s: three retentions
        decision = authority.reserve(Action.tool_call("calc"), RUN)
        if decision.allowed:
            allowed += 1
            authority.commit(decision.reservation)  # type: ignore[arg-type]
        clock.advance(150)
        authority.sweep()
    assert allowed == 4
    assert authority.balance(RUN)["tool_calls"].spent == 4
    authority.close()


def test_a_runs_budget_with_a_hold_waits_for_it(store_url: str) -> None:
    authority, clock = _counting_runs(store_url, calls=2)
    held = authority.reserve(Action.tool_call("calc"), RUN, ttl=5000)
    assert held.reservation is not None
    clock.advance(1000)
    authority.sweep()
    assert _tool_call_budgets(authority) == [RUN]  # something is held on it
    assert authority.commit(held.reservation).status == "committed"
    clock.advance(61)
    authority.sweep()
    assert _tool_call_budgets(authority) == [RUN]  # in use until just now: kept a retention more
    clock.advance(801)
    authority.sweep()
    assert _tool_call_budgets(authority) == []
    authority.close()


def test_a_reservation_outliving_its_runs_budget_still_reads(store_url: str) -> None:
    """A late commit (after expiry) is remembered a retention from then, longer than the run's
    budget it held on: looking it up must not fail for the budget being gone."""
    authority, clock = _counting_runs(store_url, calls=2)
    held = authority.reserve(Action.tool_call("calc"), RUN, ttl=100)
    assert held.reservation is not None
    clock.advance(700)
    authority.sweep()  # expired
    assert "late" in authority.commit(held.reservation).flags
    clock.advance(310)
    authority.sweep()
    assert _tool_call_budgets(authority) == []
    record = authority.reservation(held.reservation.id)
    assert record.status == "committed"
    assert [r.id for r in authority.reservations(RUN, status=None)] == [held.reservation.id]
    authority.close()


def test_a_run_making_only_model_calls_keeps_its_budget(store_url: str) -> None:
    """A run whose tool calls are used up goes on with model calls capped at max_tool_calls=0:
    those calls read its budget, so they keep it too (found in review: the cap lifted after the
    retention, and the run got its tool calls again)."""
    authority, clock = _counting_runs(store_url, calls=2)
    for _ in range(2):
        decision = authority.reserve(Action.tool_call("calc"), RUN)
        authority.commit(decision.reservation)  # type: ignore[arg-type]
    for _ in range(10):  # 10 x 100 s of model calls only
        decision = authority.reserve(flagship(), RUN)
        assert decision.caps is not None and decision.caps.max_tool_calls == 0
        authority.release(decision.reservation)  # type: ignore[arg-type]
        clock.advance(100)
        authority.sweep()
    assert authority.reserve(Action.tool_call("calc"), RUN).denied
    authority.close()


def test_a_runs_budget_is_kept_a_retention_after_a_long_hold_settles(store_url: str) -> None:
    """A hold outliving the retention keeps the run's budget in use: once it settles the budget is
    kept a whole retention more (found in review: it went a minute later, and the run's count with it)."""
    authority, clock = _counting_runs(store_url, calls=1)
    held = authority.reserve(Action.tool_call("calc"), RUN, ttl=1100)
    assert held.reservation is not None
    for _ in range(11):
        clock.advance(100)
        authority.sweep()
    authority.commit(held.reservation)
    for _ in range(3):
        clock.advance(100)
        authority.sweep()
    assert authority.reserve(Action.tool_call("calc"), RUN).denied  # 1 of 1 used: still counted
    authority.close()


def test_an_operators_budget_on_a_run_is_never_forgotten(store_url: str) -> None:
    authority, clock = _counting_runs(store_url, calls=2)
    authority.set_budget(Budget("tenant:acme/run:own", "tool_calls", 5))
    assert authority.reserve(Action.tool_call("calc"), "tenant:acme/run:own").allowed  # no template over it
    assert authority.reserve(Action.tool_call("calc"), RUN).allowed  # a template...
    authority.set_budget(Budget(RUN, "tool_calls", 3))  # ...made an operator's
    clock.advance(2000)
    authority.sweep()
    assert _tool_call_budgets(authority) == sorted([RUN, "tenant:acme/run:own"])
    assert authority.balance("tenant:acme/run:own")["tool_calls"].limit == 5
    authority.close()


def test_optional_steps_are_skipped_below_the_threshold() -> None:
    authority = authority_with({"optional": [{"level": "workflow", "below": 0.5}]})
    authority.set_budget(Budget("tenant:acme/workflow:triage", "usd", 10))
    optional = Action("step", "summarize", {"usd": 3}, optional=True)
    assert authority.reserve(optional, RUN).outcome is Outcome.ALLOW  # leaves 7
    skipped = authority.reserve(optional, RUN)  # would leave 4 < 5
    assert skipped.outcome is Outcome.ALLOW_WITH_CAPS
    assert skipped.caps == Caps(skip_optional=True)
    assert skipped.reservation is not None
    assert skipped.reservation.amounts == {}
    assert authority.balance("tenant:acme/workflow:triage")["usd"].held == 3
    required = Action("step", "answer", {"usd": 3})
    assert authority.reserve(required, RUN).outcome is Outcome.ALLOW  # required steps are not skipped


def test_risky_actions_need_an_allow_rule_and_count_their_unit() -> None:
    authority = authority_with({"risk": [{"scope": "tenant:acme", "allow": ["external"], "amounts": {"emails": 1}}]})
    authority.set_budget(Budget("tenant:acme", "emails", 1, period="day"))
    email = Action("side_effect", "send_email", risk="external")
    allowed = authority.reserve(email, RUN)
    assert allowed.allowed
    assert allowed.reservation is not None
    assert allowed.reservation.amounts == {"emails": 1}
    assert any(r.code == "risk_allowed" for r in allowed.reasons)
    assert authority.reserve(email, RUN).denied  # the daily email budget is used
    pay = authority.reserve(Action("side_effect", "charge_card", risk="payment"), RUN)
    assert pay.denied
    assert pay.reasons[0].code == "risk_not_allowed"
    odd = authority.reserve(Action("side_effect", "launch", risk="rocket"), RUN)
    assert odd.reasons[0].code == "risk_unknown"
    assert authority.reserve(email, "tenant:globex/run:x").denied  # the rule covers acme only
    assert authority.reserve(Action("tool_call", "read_file", risk="read"), RUN).allowed


def test_any_policy_in_force_governs_risk_even_one_with_nothing_else() -> None:
    """Risk needs an allow rule whenever a policy is in force: an empty policy must not let
    payments through that a policy with only an output cap denies."""
    pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
    capped = authority_with({"output_cap": {"floor": 100}})
    empty = authority_with({})
    for authority in (capped, empty):
        authority.set_budget(Budget("tenant:acme", "usd", 10))
        denied = authority.reserve(pay, RUN)
        assert denied.denied and denied.reasons[0].code == "risk_not_allowed"
        assert authority.reserve(Action("step", "plain", {"usd": 1}), RUN).allowed
    no_policy = Authority()
    no_policy.set_budget(Budget("tenant:acme", "usd", 10))
    assert no_policy.reserve(pay, RUN).allowed  # no policy at all: budgets alone decide


def test_rate_limits_in_the_same_atomic_step(store_url: str, clock: FakeClock) -> None:
    authority = authority_with(
        {"rate_limits": [{"scope": "tenant:acme", "kind": "tool_call", "limit": 3, "per": "minute"}]},
        store_url,
        clock=clock,
    )
    authority.apply_policy(authority.current_policy().document)  # type: ignore[union-attr]
    clock.set(1_800_000_000.0)  # the start of a minute
    decisions = [authority.reserve(Action.tool_call("calc"), RUN) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[3].reasons[0].unit == "rate.tool_call"
    assert authority.reserve(flagship(), RUN).allowed  # model calls are not rate limited here
    for decision in decisions[:3]:
        assert decision.reservation is not None
        authority.commit(decision.reservation, {"calls": 1})  # rate units settle at their hold
    clock.advance(60)
    assert authority.reserve(Action.tool_call("calc"), RUN).allowed


def test_shadow_mode_with_the_store_failing_midway_is_still_a_decision() -> None:
    """The shadow step releases the would-be hold; the store failing there is no exception out of
    reserve: the shadow decision (made before) stands, the would-be hold is left to the tenant's
    next shadow decisions (or its TTL)."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class ReleaseFails(MemoryStore):
        def release(self, reservation_id, now):  # type: ignore[no-untyped-def]
            raise StoreUnavailable("gone (test)")

    document = PolicyDocument.parse({"ladders": [LADDER], "shadow": ["tenant:globex"]})
    authority = Authority(ReleaseFails(), policy=Policy(document))
    authority.set_budget(Budget("tenant:globex", "usd", "0.005"))  # the flagship does not fit: capped
    decision = authority.reserve(flagship(), "tenant:globex/run:r1")
    assert decision.allowed and decision.mode is Mode.SHADOW and decision.reasons[0].code == "shadow"
    assert authority.balance("tenant:globex")["usd"].held > 0  # the would-be hold, until its TTL


def test_shadow_mode_reports_but_never_enforces(store_url: str) -> None:
    authority = authority_with(store=store_url, document={"ladders": [LADDER], "shadow": ["tenant:globex"]})
    authority.set_budget(Budget("tenant:globex", "usd", "0.0001"))
    decision = authority.reserve(flagship(), "tenant:globex/run:r1")
    assert decision.outcome is Outcome.ALLOW
    assert decision.mode is Mode.SHADOW
    assert decision.caps is None
    assert decision.would_be is not None
    assert decision.would_be.outcome is Outcome.DENY
    assert decision.reasons[0].code == "shadow"
    assert decision.reservation is not None
    authority.commit(decision.reservation, {"usd": "0.01"})  # reality is still recorded
    assert authority.balance("tenant:globex")["usd"].spent == Decimal("0.01")
    assert authority.balance("tenant:globex")["usd"].held == 0
    enforced = authority.reserve(flagship(), "tenant:acme/run:r1")
    assert enforced.mode is Mode.ENFORCED


def test_code_rules_can_override() -> None:
    def never_flagship(action: Action, scope: object, proposal: object) -> None:
        plans = getattr(proposal, "plans", None)
        if plans and plans[0].caps is None:
            proposal.plans = plans[1:]  # type: ignore[attr-defined]

    authority = Authority(
        "memory://", policy=Policy(PolicyDocument.parse({"ladders": [LADDER]}), rules=[never_flagship])
    )
    assert authority.reserve(flagship(), RUN).caps == Caps(model="gpt-4.1-mini")
    # the same rule passed as Authority(rules=...) on top of a pinned policy (it was ignored)
    pinned = Authority("memory://", policy=Policy(PolicyDocument.parse({"ladders": [LADDER]})), rules=[never_flagship])
    assert pinned.reserve(flagship(), RUN).caps == Caps(model="gpt-4.1-mini")


def test_applied_policy_reaches_every_worker(store_url: str, clock: FakeClock) -> None:
    admin = Authority(store_url, clock=clock)
    # another worker on the same ledger (an in-memory store can only be shared as an object)
    worker = Authority(admin.store if store_url == "memory://" else store_url, clock=clock, policy_refresh=0)
    admin.set_budget(Budget("tenant:acme", "usd", "0.005"))
    assert worker.reserve(flagship(), RUN).denied
    version = admin.apply_policy(PolicyDocument.parse({"ladders": [LADDER]}))
    assert version == 1
    decision = worker.reserve(flagship(), RUN)
    assert decision.caps == Caps(model="gpt-4.1-mini")
    assert worker.current_policy() is not None
    assert admin.apply_policy(PolicyDocument.parse({})) == 2
    assert worker.reserve(flagship(), RUN).denied


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.decimals(min_value=0, max_value="0.05", places=4),
    calls=st.lists(
        st.tuples(st.sampled_from(["gpt-4.1", "gpt-4.1-mini"]), st.integers(1, 5000), st.integers(1, 3000)),
        max_size=12,
    ),
    headroom=st.sampled_from([0.0, 0.25, 0.5]),
    floor=st.integers(1, 500),
)
def test_no_policy_ever_holds_more_than_the_budgets_allow(
    limit: Decimal, calls: list[tuple[str, int, int]], headroom: float, floor: int
) -> None:
    ladder = {
        "provider": "openai",
        "rungs": [{"model": "gpt-4.1", "min_headroom": {"workflow": headroom}}, "gpt-4.1-mini", "gpt-4.1-nano"],
    }
    authority = authority_with(
        {
            "ladders": [ladder],
            "output_cap": {"floor": floor},
            "context_cap": {"floor": 100},
            "tools": {"calls_per_run": 3},
        }
    )
    authority.set_budget(Budget("tenant:acme/workflow:triage", "usd", limit))
    authority.set_budget(Budget("tenant:acme", "tokens", 20_000))
    for model, tokens_in, tokens_out in calls:
        decision = authority.reserve(Action.model_call("openai", model, tokens_in, tokens_out), RUN)
        if decision.caps is not None and decision.caps.max_output_tokens is not None:
            assert decision.caps.max_output_tokens >= floor
        for budget in authority.budgets():
            assert budget.spent + budget.held <= budget.limit


def test_policy_file_formats_agree(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "p.yaml").write_text("ladders:\n  - provider: openai\n    rungs: [gpt-4.1, gpt-4.1-mini]\n")
    (folder / "p.toml").write_text('[[ladders]]\nprovider = "openai"\nrungs = ["gpt-4.1", "gpt-4.1-mini"]\n')
    assert PolicyDocument.load(folder / "p.yaml") == PolicyDocument.load(folder / "p.toml")


@pytest.mark.parametrize(
    "document",
    [
        {"ladders": [{"rungs": []}]},
        {"optional": [{"level": "workflow", "below": 2}]},
        {"budgets": [{"scope": "tenant:a/", "unit": "usd", "limit": 1}]},
        {"budgets": [{"scope": "tenant:a", "unit": "usd", "limit": -1}]},
        {"rate_limits": [{"scope": "tenant:a", "kind": "tool_call", "limit": 1, "per": "fortnight"}]},
        {"unknown_rule": 1},
        {"version": 2},
    ],
)
def test_bad_policies_are_invalid_requests(document: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        PolicyDocument.parse(document)


def test_plans_given_explicitly_bypass_the_policy() -> None:
    authority = authority_with({"ladders": [LADDER]})
    authority.set_budget(Budget("tenant:acme", "usd", "0.005"))
    assert authority.reserve(flagship(), RUN, plans=[Plan({"usd": "0.01"})]).denied


def test_rules_combined(store_url: str, clock: FakeClock) -> None:
    document = PolicyDocument.parse(
        {
            "budgets": [
                {"scope": "tenant:acme/workflow:triage", "unit": "usd", "limit": "0.03"},
                {"scope": "tenant:acme", "unit": "emails", "limit": 1, "period": "day"},
            ],
            "ladders": [
                {
                    "provider": "openai",
                    "rungs": [{"model": "gpt-4.1", "min_headroom": {"workflow": 0.5}}, "gpt-4.1-mini"],
                }
            ],
            "optional": [{"level": "workflow", "below": 0.6}],
            "risk": [{"scope": "tenant:acme", "allow": ["external"], "amounts": {"emails": 1}}],
            "rate_limits": [{"scope": "tenant:acme", "kind": "model_call", "limit": 3, "per": "minute"}],
        }
    )
    authority = Authority(store_url, clock=clock, policy=Policy(document))
    authority.apply_policy(document)
    clock.set(1_800_000_000.0)
    first = authority.reserve(flagship(), RUN)  # 0.01 of 0.03: 0.02 remains >= 0.015
    assert first.outcome is Outcome.ALLOW
    second = authority.reserve(flagship(), RUN)  # would leave 0.01 < 0.015: the mini
    assert second.caps == Caps(model="gpt-4.1-mini")
    assert second.reservation is not None
    assert second.reservation.amounts["rate.model_call"] == 1
    optional = authority.reserve(Action.model_call("openai", "gpt-4.1-mini", 1000, 1000, optional=True), RUN)
    assert optional.caps == Caps(skip_optional=True)  # would leave 0.016 of 0.03, under 60%: skipped
    email = Action("side_effect", "send_email", risk="external")
    assert authority.reserve(email, RUN).allowed
    assert authority.reserve(email, RUN).denied  # one email a day
    third = authority.reserve(flagship(), RUN)
    fourth = authority.reserve(flagship(), RUN)
    assert third.allowed
    assert fourth.denied  # the fourth counted model call this minute (the skipped optional one held nothing)
    assert any(r.unit == "rate.model_call" for r in fourth.reasons)
    for budget in authority.budgets():
        assert budget.spent + budget.held <= budget.limit


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parent.parent.glob("examples/policies/*")))
def test_example_policies_are_valid(path: Path) -> None:
    document = PolicyDocument.load(path)
    Policy(document)  # builds
    assert document == PolicyDocument.loads(document.to_json(), "json")  # survives storage


def test_no_decision_skips_a_policy_another_thread_is_still_reading() -> None:
    """A new process's first decisions all wait for the store's policy: while one thread's first
    read is under way, another's decision must not be made as if there were no policy (a payment
    that needs an allow rule went through)."""
    import threading

    from clearance.stores.memory import MemoryStore

    first_read_started, let_it_finish = threading.Event(), threading.Event()

    class SlowFirstRead(MemoryStore):
        reads = 0

        def policy_version(self) -> int:
            SlowFirstRead.reads += 1
            if SlowFirstRead.reads == 1:
                first_read_started.set()
                assert let_it_finish.wait(10)
            return super().policy_version()

    store = SlowFirstRead()
    Authority(store).apply_policy(PolicyDocument.parse({}))  # in force: risk needs an allow rule
    worker = Authority(store)
    worker.set_budget(Budget("tenant:acme", "usd", 10))
    pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
    decisions: list[object] = []
    SlowFirstRead.reads = 0
    first = threading.Thread(target=lambda: decisions.append(worker.reserve(pay, RUN)))
    first.start()
    assert first_read_started.wait(10)
    try:
        second = worker.reserve(pay, RUN)
    finally:
        let_it_finish.set()
        first.join(10)
    assert second.denied and second.reasons[0].code == "risk_not_allowed"
    assert [d.reasons[0].code for d in decisions] == ["risk_not_allowed"]  # type: ignore[attr-defined]
    assert worker.balance("tenant:acme")["usd"].held == 0


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_failed_first_policy_read_is_store_trouble_not_no_policy(fail_open: bool) -> None:
    """Until a process has read the store's policy once, a decision whose policy read fails is store
    trouble (fail closed; with fail_open, plain actions fail open but risky ones never do) — not a
    decision made without the policy, then or for the next policy_refresh seconds."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class FirstReadFails(MemoryStore):
        failures = 1

        def policy_version(self) -> int:
            if FirstReadFails.failures > 0:
                FirstReadFails.failures -= 1
                raise StoreUnavailable("policy key unreachable (test)")
            return super().policy_version()

    store = FirstReadFails()
    Authority(store).apply_policy(PolicyDocument.parse({}))
    worker = Authority(store, fail_open=fail_open, policy_refresh=60)
    worker.set_budget(Budget("tenant:acme", "usd", 10))
    pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
    plain = Action("step", "plain", {"usd": 1})
    FirstReadFails.failures = 2
    denied = worker.reserve(pay, RUN)
    assert denied.denied and denied.mode is Mode.FAIL_CLOSED
    assert denied.reasons[0].code == "store_unavailable" and "policy" in denied.reasons[0].message
    during = worker.reserve(plain, RUN)
    if fail_open:
        assert during.allowed and during.mode is Mode.FAIL_OPEN
    else:
        assert during.denied and during.reasons[0].code == "store_unavailable"
    assert worker.balance("tenant:acme")["usd"].held == 0  # nothing held in the ledger meanwhile
    after = worker.reserve(pay, RUN)  # the store answers again: the policy is read and applies
    assert after.denied and after.reasons[0].code == "risk_not_allowed"
    assert worker.reserve(plain, RUN).allowed


def test_agents_on_short_timeouts_share_the_first_policy_read() -> None:
    """Until a process has read the store's policy, every decision waits for that read. Each task
    reading its own, agents whose ``asyncio.wait_for`` timeouts were shorter than the read cancelled
    every read and no decision was ever made (a cold worker stuck for seconds on a healthy Redis).
    The tasks of a loop share one read now: cancelled callers leave it running for the next."""
    import asyncio

    from clearance.stores.memory import MemoryStore

    class SlowPolicyRead(MemoryStore):
        async def apolicy_version(self) -> int:
            await asyncio.sleep(0.05)  # longer than any caller below waits
            return await super().apolicy_version()

    authority = Authority(SlowPolicyRead())
    authority.set_budget(Budget("tenant:acme", "usd", 1000))
    step = Action("step", "s", {"usd": 1})

    async def agents() -> int:
        decided = 0
        deadline = asyncio.get_running_loop().time() + 5

        async def agent() -> None:
            nonlocal decided
            while not decided and asyncio.get_running_loop().time() < deadline:
                try:
                    await asyncio.wait_for(authority.areserve(step, RUN), timeout=0.02)
                except TimeoutError:
                    continue
                decided += 1

        await asyncio.gather(*(agent() for _ in range(20)))
        return decided

    assert asyncio.run(agents()) > 0
    assert authority._first_reads == {}  # nothing left in flight


def test_async_apply_policy_during_a_shared_first_read_is_seen_by_the_next_decision() -> None:
    """The tasks of a loop share the first policy read; one begun before this process applied a
    policy may have read the version before, so a task's decision after its apply must not join it
    (it was decided without the new policy: a payment allowed with no allow rule). And a loop
    closed while its read was under way is not kept."""
    import asyncio

    from clearance.stores.memory import MemoryStore

    async def main() -> None:
        got_version, go_on = asyncio.Event(), asyncio.Event()

        class SlowRead(MemoryStore):
            slow = False

            async def apolicy_version(self) -> int:
                version = await super().apolicy_version()
                if SlowRead.slow:
                    SlowRead.slow = False
                    got_version.set()
                    await go_on.wait()
                return version

        authority = Authority(SlowRead(), policy_refresh=60)
        await authority.aset_budget(Budget(RUN, "usd", 10))
        pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
        SlowRead.slow = True
        first = asyncio.create_task(authority.areserve(pay, RUN))  # a cold worker's first read
        await got_version.wait()
        await authority.aapply_policy(PolicyDocument.parse({}))  # in force now: risk needs an allow rule
        asyncio.get_running_loop().call_later(0.05, go_on.set)
        decision = await authority.areserve(pay, RUN)  # this task's next decision, after its apply returned
        await first
        assert decision.denied and decision.reasons[0].code == "risk_not_allowed", decision

    asyncio.run(main())

    class Slower(MemoryStore):
        async def apolicy_version(self) -> int:
            await asyncio.sleep(0.2)
            return await super().apolicy_version()

    authority = Authority(Slower())
    step = Action("step", "s", {"usd": 1})
    for _ in range(3):  # a loop closed by hand while the shared read was under way
        loop = asyncio.new_event_loop()
        with pytest.raises(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(authority.areserve(step, RUN), 0.01))
        loop.close()
    assert len(authority._first_reads) <= 1
    assert asyncio.run(authority.areserve(step, RUN)).allowed
    assert authority._first_reads == {}


def test_apply_policy_during_the_first_read_is_seen_by_the_next_decision() -> None:
    """apply_policy asks this process to read the policy again on its next decision; a first read
    that was under way (and got the version before) must not undo that for policy_refresh seconds."""
    import threading

    from clearance.stores.memory import MemoryStore

    got_version, go_on = threading.Event(), threading.Event()

    class SlowRead(MemoryStore):
        slow = False

        def policy_version(self) -> int:
            version = super().policy_version()
            if SlowRead.slow:
                SlowRead.slow = False
                got_version.set()
                assert go_on.wait(10)
            return version

    authority = Authority(SlowRead(), policy_refresh=60)
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
    SlowRead.slow = True
    first = threading.Thread(target=authority.reserve, args=(pay, RUN))
    first.start()
    assert got_version.wait(10)
    try:
        authority.apply_policy(PolicyDocument.parse({}))  # in force now: risk needs an allow rule
    finally:
        go_on.set()
        first.join(10)
    denied = authority.reserve(pay, RUN)
    assert denied.denied and denied.reasons[0].code == "risk_not_allowed"


def test_code_rules_are_never_skipped_by_failing_open_before_the_policy_is_read() -> None:
    """Code rules apply on top of the store's policy; with that policy unread (its first read
    failed) a decision cannot apply them as they would be: fail closed even with fail_open. And
    current_policy() says the policy is unknown rather than answering 'none'."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class ReadFails(MemoryStore):
        def policy_version(self) -> int:
            raise StoreUnavailable("policy key unreachable (test)")

    def no_plain_steps(action: Action, scope: object, proposal: object) -> None:
        from clearance.decision import Reason

        if action.name == "plain":
            proposal.deny = Reason("custom", "no plain steps", scope.path)  # type: ignore[attr-defined]

    authority = Authority(ReadFails(), fail_open=True, rules=[no_plain_steps])
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    decision = authority.reserve(Action("step", "plain", {"usd": 1}), RUN)
    assert decision.denied and decision.mode is Mode.FAIL_CLOSED
    assert decision.reasons[0].code == "store_unavailable"
    with pytest.raises(StoreUnavailable):
        authority.current_policy()


def test_a_per_run_budget_that_cannot_be_created_is_store_trouble() -> None:
    """calls_per_run creates each run's budget on first use; when that fails the decision is store
    trouble, not a hold made without the budget (every tool call was allowed)."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class EnsureFails(MemoryStore):
        fail = True

        def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
            if EnsureFails.fail:
                raise StoreUnavailable("registry node down (test)")
            return super().ensure_budget(scope, unit, period, limit, now)

    authority = authority_with({"tools": {"calls_per_run": 2}}, EnsureFails())  # type: ignore[arg-type]
    denied = authority.reserve(Action.tool_call("calc"), RUN)
    assert denied.denied and denied.reasons[0].code == "store_unavailable"
    assert authority.budgets(RUN) == []
    EnsureFails.fail = False
    assert [authority.reserve(Action.tool_call("calc"), RUN).allowed for _ in range(3)] == [True, True, False]


def test_a_stored_policy_this_worker_cannot_parse_fails_closed_and_keeps_the_last_good_one() -> None:
    """A policy written by another version of clearance (a rolling upgrade, say): never an exception
    out of reserve. With no policy known the decisions fail closed (even with fail_open); with one
    known, it stays in force; a readable version later is picked up."""
    from clearance.stores.memory import MemoryStore

    store = MemoryStore()
    store.put_policy('{"budgets": [], "new_feature": {}}', 0.0)
    fresh = Authority(store, fail_open=True, policy_refresh=0)
    fresh.set_budget(Budget("tenant:acme", "usd", 10))
    for _ in range(2):
        denied = fresh.reserve(Action("step", "s", {"usd": 1}), RUN)
        assert denied.denied and denied.mode is Mode.FAIL_CLOSED and "cannot be read" in denied.reasons[0].message
    store.put_policy(PolicyDocument.parse({}).to_json(), 0.0)  # readable again: risk needs an allow rule
    pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
    assert fresh.reserve(pay, RUN).reasons[0].code == "risk_not_allowed"
    store.put_policy('{"budgets": [], "new_feature": {}}', 0.0)
    assert fresh.reserve(pay, RUN).reasons[0].code == "risk_not_allowed"  # the last good one stays
    assert fresh.reserve(Action("step", "s", {"usd": 1}), RUN).allowed


def test_shadow_mode_returns_a_would_be_hold_made_failing_open_to_the_emergency_cap() -> None:
    """Shadow mode releases the would-be hold; one made while failing open is local and must go back
    to this process's emergency cap (it was charged for it until its TTL)."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class DownAfterFirstHold(MemoryStore):
        holds = 0

        def hold(self, request):  # type: ignore[no-untyped-def]
            DownAfterFirstHold.holds += 1
            if DownAfterFirstHold.holds > 1:
                raise StoreUnavailable("down (test)")
            return super().hold(request)

    document = {"ladders": [LADDER], "output_cap": {"floor": 100}, "shadow": ["tenant:acme"]}
    authority = authority_with(document, DownAfterFirstHold(), fail_open=True)  # type: ignore[arg-type]
    authority.set_budget(Budget("tenant:acme", "usd", "0.0003"))  # nothing fits: the capped retry fails open
    decision = authority.reserve(flagship(), RUN)  # the shadow reservation first (in the ledger)
    assert decision.allowed and decision.mode is Mode.SHADOW and decision.reservation is not None
    assert decision.would_be is not None and decision.would_be.mode is Mode.FAIL_OPEN
    assert not authority._emergency.holds  # the would-be one, made failing open, is back in the cap
    assert authority._emergency.used == {"usd": 0}


def test_an_output_cap_retry_that_meets_a_concurrent_retry_of_its_key_answers_with_that_reservation() -> None:
    """The output-cap hold of a reserve with an idempotency key can find the key already held by a
    concurrent retry of the same call (with another plan): the answer is that reservation, as for
    any replay — not an IndexError, nor caps the reservation does not hold."""
    import threading

    from clearance.stores.memory import MemoryStore

    key = "step-7"
    others: list[object] = []

    class ConcurrentRetry(MemoryStore):
        holds = 0

        def hold(self, request):  # type: ignore[no-untyped-def]
            ConcurrentRetry.holds += 1
            if ConcurrentRetry.holds == 2:  # before the output-cap hold: the budget grows, the retry runs
                authority.set_budget(Budget("tenant:acme", "usd", "0.0006"))
                retry = threading.Thread(
                    target=lambda: others.append(authority.reserve(flagship(), RUN, idempotency_key=key))
                )
                retry.start()
                retry.join()
            return super().hold(request)

    authority = authority_with({"ladders": [LADDER], "output_cap": {"floor": 100}}, ConcurrentRetry())  # type: ignore[arg-type]
    authority.set_budget(Budget("tenant:acme", "usd", "0.0003"))
    first = authority.reserve(flagship(), RUN, idempotency_key=key)
    [retry] = others
    assert first.reservation is not None and retry.reservation is not None  # type: ignore[attr-defined]
    assert first.reservation.id == retry.reservation.id  # type: ignore[attr-defined]
    assert first.caps == retry.caps == Caps(model="gpt-4.1-nano")  # type: ignore[attr-defined]
    assert first.reservation.amounts == retry.reservation.amounts  # type: ignore[attr-defined]


def test_a_slow_policy_read_never_puts_an_older_version_back() -> None:
    """Thread A reads version 1 slowly; meanwhile version 2 is applied and thread B reads and
    installs it. A's late reply must not put version 1 back (for policy_refresh seconds)."""
    import threading

    from clearance.stores.memory import MemoryStore

    got_v1, go_on = threading.Event(), threading.Event()

    class SlowPolicyRead(MemoryStore):
        slow = False

        def policy_version(self) -> int:
            return int(self._policy[0])  # (not through policy(): only the document read is slow)

        def policy(self) -> tuple[int, str | None]:
            result = super().policy()
            if SlowPolicyRead.slow and threading.current_thread().name == "A":
                got_v1.set()
                assert go_on.wait(10)
            return result

    store = SlowPolicyRead()
    admin = Authority(store)  # another process
    admin.apply_policy(PolicyDocument.parse({"risk": [{"allow": ["payment"]}]}))  # v1: payments allowed
    worker = Authority(store, policy_refresh=60)
    worker.set_budget(Budget("tenant:acme", "usd", 100))
    pay = Action("side_effect", "charge_card", {"usd": 1}, risk="payment")
    SlowPolicyRead.slow = True
    first = threading.Thread(target=worker.reserve, args=(pay, RUN), name="A")
    first.start()
    assert got_v1.wait(10)
    try:
        admin.apply_policy(PolicyDocument.parse({}))  # v2: payments need an allow rule
        assert worker.reserve(pay, RUN).reasons[0].code == "risk_not_allowed"
    finally:
        go_on.set()
        first.join(10)
    later = worker.reserve(pay, RUN)
    assert later.denied and later.reasons[0].code == "risk_not_allowed"
    assert worker.current_policy().version == 2  # type: ignore[union-attr]


def test_a_ladder_rung_that_cannot_be_priced_is_skipped_and_said_so() -> None:
    """A rung this process cannot price (a typo, a model registered on other workers only) is
    skipped with reason ladder_unpriced: every call on the ladder used to raise InvalidRequest."""
    ladder = {"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mnii", "gpt-4.1-nano"]}
    authority = authority_with({"ladders": [ladder]})
    authority.set_budget(Budget("tenant:acme", "usd", "0.005"))  # the flagship does not fit: the nano does
    decision = authority.reserve(flagship(), RUN)
    assert decision.caps == Caps(model="gpt-4.1-nano")
    assert any(r.code == "ladder_unpriced" and "gpt-4.1-mnii" in r.message for r in decision.reasons)


def test_a_rule_denial_is_never_failed_open_by_a_per_run_budget_it_could_not_create() -> None:
    """A rule that denies comes first: the per-run budget templates are not even looked at, so
    the store being down there cannot turn the denial into a fail-open allow."""
    from clearance import StoreUnavailable
    from clearance.decision import Reason
    from clearance.stores.memory import MemoryStore

    class Down(MemoryStore):
        def ensure_budget(self, scope: str, unit: str, period: str, limit: int, now: float) -> bool:
            raise StoreUnavailable("down (test)")

        def hold(self, request):  # type: ignore[no-untyped-def]
            raise StoreUnavailable("down (test)")

    def no_rm(action: Action, scope: object, proposal: object) -> None:
        if action.name == "rm":
            proposal.deny = Reason("custom", "rm is never allowed", scope.path)  # type: ignore[attr-defined]

    policy = Policy(PolicyDocument.parse({"tools": {"calls_per_run": 5}}), rules=[no_rm])
    authority = Authority(Down(), policy=policy, fail_open=True, emergency_limits={"calls": 10})
    decision = authority.reserve(Action.tool_call("rm"), RUN)
    assert decision.denied and decision.mode is Mode.ENFORCED and decision.reasons[0].code == "custom"


def test_a_would_be_hold_shadow_mode_could_not_release_is_released_by_the_next_shadow_decision() -> None:
    """Shadow mode releases the would-be hold before its own; when the store fails just then the
    decision is store trouble, and the would-be hold (nobody else knows its id) is released by the
    next shadow decision instead of keeping its budget until its TTL."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class ReleaseFailsOnce(MemoryStore):
        failures = 1

        def release(self, reservation_id, now):  # type: ignore[no-untyped-def]
            if ReleaseFailsOnce.failures:
                ReleaseFailsOnce.failures -= 1
                raise StoreUnavailable("gone (test)")
            return super().release(reservation_id, now)

    document = PolicyDocument.parse({"ladders": [LADDER], "shadow": ["tenant:globex"]})
    authority = Authority(ReleaseFailsOnce(), policy=Policy(document))
    authority.set_budget(Budget("tenant:globex", "usd", "0.005"))  # the flagship does not fit: capped
    first = authority.reserve(flagship(), "tenant:globex/run:r1")
    assert first.allowed and first.mode is Mode.SHADOW
    assert authority.balance("tenant:globex")["usd"].held > 0  # the would-be hold, for now
    second = authority.reserve(flagship(), "tenant:globex/run:r2")
    assert second.allowed and second.mode is Mode.SHADOW
    assert authority.balance("tenant:globex")["usd"].held == 0  # both would-be holds released


def test_a_shadow_decision_cancelled_while_it_releases_the_would_be_hold_still_releases_it() -> None:
    """``asyncio.wait_for`` around an agent step can cancel ``areserve`` while it releases the
    would-be hold (on SQLite a job still queued for a worker thread, on Redis a request waiting for
    a connection): the release used to be dropped, and nobody else has that hold's id, so it kept
    its budget until its TTL. A release, once started, runs to its end."""
    import asyncio

    from clearance.stores.memory import MemoryStore

    class SlowRelease(MemoryStore):
        async def arelease(self, reservation_id, now):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.05)  # waiting for a worker thread or a connection
            return self.release(reservation_id, now)

    document = PolicyDocument.parse({"ladders": [LADDER], "shadow": ["tenant:globex"]})
    authority = Authority(SlowRelease(), policy=Policy(document))
    authority.set_budget(Budget("tenant:globex", "usd", "0.005"))  # the flagship does not fit: capped

    async def cancelled_midway() -> None:
        task = asyncio.ensure_future(authority.areserve(flagship(), "tenant:globex/run:r1"))
        await asyncio.sleep(0.01)  # the would-be hold is made; its release is under way
        assert authority.balance("tenant:globex")["usd"].held > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)

    asyncio.run(cancelled_midway())
    assert authority.balance("tenant:globex")["usd"].held == 0


def test_a_would_be_hold_left_unreleased_never_fails_another_tenants_shadow_decisions() -> None:
    """Leftover would-be holds are released best effort, by later decisions of their own tenant
    only: one whose store keeps failing (its cluster node down) must not fail the shadow decisions
    of tenants on healthy nodes (they were all denied store_unavailable until its TTL)."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class TenantANodeDown(MemoryStore):
        down = False

        def release(self, reservation_id, now):  # type: ignore[no-untyped-def]
            if TenantANodeDown.down and reservation_id.endswith(".tenant:a"):
                raise StoreUnavailable("tenant:a's node is down (test)")
            return super().release(reservation_id, now)

    document = PolicyDocument.parse({"ladders": [LADDER], "shadow": ["tenant:a", "tenant:b"]})
    authority = Authority(TenantANodeDown(), policy=Policy(document))
    for tenant in ("tenant:a", "tenant:b"):
        authority.set_budget(Budget(tenant, "usd", "0.005"))  # the flagship does not fit: capped
    TenantANodeDown.down = True
    assert authority.reserve(flagship(), "tenant:a/run:1").mode is Mode.SHADOW  # its would-be hold stays
    for run in range(3):
        decision = authority.reserve(flagship(), f"tenant:b/run:{run}")
        assert decision.allowed and decision.mode is Mode.SHADOW, decision.reasons
    assert authority.balance("tenant:b")["usd"].held == 0
    TenantANodeDown.down = False
    assert authority.reserve(flagship(), "tenant:a/run:2").mode is Mode.SHADOW
    assert authority.balance("tenant:a")["usd"].held == 0  # the leftover went with tenant:a's next decision


def test_a_risk_class_amount_in_usd_comes_on_top_of_a_model_calls_price() -> None:
    """A risk rule that adds ``usd`` to a write used to replace the model call's price with it: a
    $0.18 call held $0.01 under a $0.05 budget (and overspent at its commit)."""
    document = PolicyDocument.parse({"risk": [{"allow": ["write"], "amounts": {"usd": "0.01"}}], "ladders": [LADDER]})
    authority = Authority("memory://", policy=Policy(document))
    authority.set_budget(Budget("tenant:acme", "usd", "0.05"))
    call = Action.model_call("openai", "gpt-4.1", input_tokens=10_000, max_output_tokens=20_000, risk="write")
    assert call.amounts["usd"] == Decimal("0.18")
    decision = authority.reserve(call, "tenant:acme")
    assert decision.caps is not None and decision.caps.model == "gpt-4.1-mini"  # $0.18 + $0.01 does not fit
    assert decision.reservation is not None
    assert decision.reservation.amounts["usd"] == Decimal("0.036") + Decimal("0.01")


def test_every_optional_rule_that_applies_binds() -> None:
    """A ``"*"`` rule and a rule for the level, or two for one level: the strictest applies (the
    last one listed used to win, and a level's own rule hid the ``"*"`` one)."""
    for rules in (
        [{"level": "*", "below": 0.3}, {"level": "workflow", "below": 0.2}],
        [{"level": "workflow", "below": 0.3}, {"level": "workflow", "below": 0.2, "scope": "tenant:acme"}],
    ):
        authority = Authority("memory://", policy=Policy(PolicyDocument.parse({"optional": rules})))
        authority.set_budget(Budget("tenant:acme/workflow:w", "usd", 10))
        authority.commit(
            authority.reserve(Action("step", "spend", {"usd": "7.5"}), "tenant:acme/workflow:w").reservation
        )  # type: ignore[arg-type]
        polish = authority.reserve(Action("step", "polish", {"usd": "0.01"}, optional=True), "tenant:acme/workflow:w")
        assert polish.caps is not None and polish.caps.skip_optional, rules  # 25% left, below 30%


def test_the_output_cap_is_not_stopped_by_a_tool_budget_the_call_does_not_hold() -> None:
    """Model calls probe tool budgets (for the tool caps) without holding them: one exhausted or in
    overage used to withhold the output cap, denying a call every budget it holds could pay for."""
    document = PolicyDocument.parse(
        {
            "budgets": [{"scope": "tenant:acme", "unit": "tool.web_search.calls", "limit": 5}],
            "ladders": [{"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini"]}],
            "output_cap": {"floor": 128},
            "tools": {"toolsets": {"search": ["web_search"]}},
        }
    )
    authority = Authority("memory://")
    authority.apply_policy(document)
    authority.set_budget(Budget("tenant:acme", "usd", "0.01"))
    for _ in range(5):
        authority.commit(authority.reserve(Action.tool_call("web_search"), "tenant:acme").reservation)  # type: ignore[arg-type]
    authority.set_budget(Budget("tenant:acme", "tool.web_search.calls", 3))  # lowered below what was spent
    decision = authority.reserve(Action.model_call("openai", "gpt-4.1", 1000, 8000), "tenant:acme")
    assert decision.caps is not None and decision.caps.max_output_tokens is not None
    assert decision.caps.disabled_tools == ("web_search",)


RUNGS_16 = ["gpt-4.1", *["gpt-4.1-mini"] * 14, "gpt-4.1-nano"]


def test_a_16_rung_ladder_with_a_context_cap_and_an_optional_skip_still_decides() -> None:
    """16 rungs plus a context cap's plan and an optional step's skip made 18 plans: every reserve
    on that ladder raised (a policy that passed ``policy check``). Past 16 plans the rungs after the
    15th go and the last plan (the skip) stays; a stored policy with 16 rungs still parses."""
    document = PolicyDocument.parse(
        {
            "ladders": [{"provider": "openai", "rungs": RUNGS_16}],
            "context_cap": {"dominance": 0.5, "keep": 0.5, "floor": 1000},
            "optional": [{"level": "*", "below": 0.2}],
        }
    )
    authority = Authority("memory://", policy=Policy(document))
    authority.set_budget(Budget("tenant:acme", "usd", 10))
    for optional, input_tokens in ((False, 500), (True, 500), (False, 50_000), (True, 50_000)):
        call = Action.model_call("openai", "gpt-4.1", input_tokens, 100, optional=optional)
        assert authority.reserve(call, "tenant:acme").allowed


def test_policy_budgets_on_one_counter_all_bind() -> None:
    """Two budget entries on one scope, unit and period, or a budget on a rate limit's unit: the
    tightest applies (the last written used to win)."""
    document = PolicyDocument.parse(
        {
            "budgets": [
                {"scope": "tenant:x", "unit": "usd", "limit": 5, "period": "day"},
                {"scope": "tenant:x", "unit": "usd", "limit": 7, "period": "day"},
                {"scope": "tenant:x", "unit": "rate.tool_call", "limit": 1, "period": "minute"},
            ],
            "rate_limits": [{"scope": "tenant:x", "kind": "tool_call", "limit": 100, "per": "minute"}],
        }
    )
    authority = Authority("memory://", clock=FakeClock())
    authority.apply_policy(document)
    limits = {(b.unit, b.period): b.limit for b in authority.budgets("tenant:x")}
    assert limits == {("usd", "day"): 5, ("rate.tool_call", "minute"): 1}


def test_rate_limits_sharing_a_scope_kind_and_window_all_bind() -> None:
    """Two limits on one counter (2 and 5 tool calls a minute): the tightest binds. The last one
    listed used to overwrite the other's budget."""
    clock = FakeClock()
    rates = [{"scope": "tenant:acme", "kind": "tool_call", "limit": n, "per": "minute"} for n in (2, 5)]
    authority = Authority("memory://", clock=clock)
    authority.apply_policy(PolicyDocument.parse({"rate_limits": rates}))
    outcomes = [authority.reserve(Action.tool_call("t"), "tenant:acme").allowed for _ in range(4)]
    assert outcomes == [True, True, False, False]


def test_a_retry_with_the_key_keeps_the_tool_caps(store_url: str) -> None:
    """A reserve retried with its idempotency key answers with the same reservation and caps: the
    tool caps (from the probed tool budgets) were dropped from the retry's answer."""
    document = PolicyDocument.parse(
        {
            "budgets": [{"scope": "tenant:acme", "unit": "tool.web_search.calls", "limit": 2}],
            "ladders": [{"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini"]}],
            "tools": {"toolsets": {"search": ["web_search"]}, "calls_per_run": 5},
        }
    )
    authority = Authority(store_url)
    authority.apply_policy(document)
    for _ in range(2):
        authority.commit(authority.reserve(Action.tool_call("web_search"), RUN).reservation)  # type: ignore[arg-type]
    first = authority.reserve(flagship(), RUN, idempotency_key="k1")
    retry = authority.reserve(flagship(), RUN, idempotency_key="k1")
    assert first.caps is not None and first.caps.disabled_tools == ("web_search",)
    assert retry.replayed and retry.reservation is not None and first.reservation is not None
    assert retry.reservation.id == first.reservation.id
    assert retry.caps == first.caps and retry.outcome is first.outcome
    authority.close()


def test_shadow_mode_records_the_spend_of_a_guard_that_does_not_settle(store_url: str) -> None:
    """Under shadow every decision is Mode.SHADOW (a plain allow came back ENFORCED), and a guard
    that does not settle records what the action asked for, as enforcement would have — the empty
    shadow hold used to record nothing once enforcement would have denied (rate counts included)."""
    rates = [{"scope": "tenant:globex", "kind": "tool_call", "limit": 2, "per": "minute"}]
    authority = Authority(store_url, clock=FakeClock())
    authority.apply_policy(PolicyDocument.parse({"shadow": ["tenant:globex"], "rate_limits": rates}))
    authority.set_budget(Budget("tenant:globex", "usd", 1))
    would_be = []
    for _ in range(4):
        with authority.guard(Action.tool_call("search", {"usd": "0.4"}), "tenant:globex") as grant:
            assert grant.decision.mode is Mode.SHADOW and grant.decision.allowed
            assert grant.decision.would_be is not None and grant.decision.reasons[0].code == "shadow"
            would_be.append(grant.decision.would_be.outcome)
    assert would_be == [Outcome.ALLOW, Outcome.ALLOW, Outcome.DENY, Outcome.DENY]
    balances = authority.balance("tenant:globex")
    assert balances["usd"].spent == Decimal("1.6") and balances["rate.tool_call"].spent == 4
    authority.close()


def test_shadow_mode_a_partial_commit_and_a_retried_guard_record_as_enforcement_would(store_url: str) -> None:
    """Under shadow, a commit naming only ``usd`` still counts the rest of what the action asked for
    (tokens, the rate unit), and a guard retried with its idempotency key after it finished is
    denied ``replay_settled`` — its block ran, and was recorded, once. Both held only when
    enforcement would have allowed; when it would have denied, the rate counts were lost and the
    retried block ran (and was recorded) again."""
    rates = [{"scope": "tenant:globex", "kind": "model_call", "limit": 1, "per": "minute"}]
    authority = Authority(store_url, clock=FakeClock())
    authority.apply_policy(PolicyDocument.parse({"shadow": ["tenant:globex"], "rate_limits": rates}))
    authority.set_budget(Budget("tenant:globex", "usd", 1))
    authority.set_budget(Budget("tenant:globex", "tokens", 10**9))
    for run in ("r1", "r2"):  # the second: enforcement would have denied it (one call a minute)
        decision = authority.reserve(flagship(), f"tenant:globex/run:{run}")
        assert decision.mode is Mode.SHADOW and decision.reservation is not None
        authority.commit(decision.reservation, {"usd": "0.001"})
    balances = authority.balance("tenant:globex")
    assert balances["rate.model_call"].spent == 2 and balances["tokens"].spent == 4000
    step = Action("step", "s", {"usd": "0.4"})
    with authority.guard(step, "tenant:globex/run:r3", idempotency_key="k"):
        pass
    with (
        pytest.raises(Denied, match="the step it guards has run"),
        authority.guard(step, "tenant:globex/run:r3", idempotency_key="k"),
    ):
        pytest.fail("a retried guard must not run its block again")
    assert authority.balance("tenant:globex")["usd"].spent == Decimal("0.402")
    authority.close()


def test_shadow_mode_gives_the_callers_key_to_the_shadow_reservation(store_url: str) -> None:
    """Under shadow the caller's idempotency key names the reservation the caller got (the shadow
    one), never the would-be hold released at once: a keyed guard retried after its block ran is
    denied however enforcement would answer now (a rate window rolled over: the block ran and was
    charged twice), a retry is answered with the shadow reservation (no new would-be decision
    stacked on it), and a key of the caller's own spelled like a derived one is not confused."""
    clock = FakeClock()
    rates = [{"scope": "tenant:globex", "kind": "step", "limit": 1, "per": "minute"}]
    authority = Authority(store_url, clock=clock)
    authority.apply_policy(PolicyDocument.parse({"shadow": ["tenant:globex/app:beta"], "rate_limits": rates}))
    authority.set_budget(Budget("tenant:globex", "usd", 100))
    step = Action("step", "s", {"usd": 1})
    beta = "tenant:globex/app:beta"
    with authority.guard(step, f"{beta}/run:r0"):  # the minute's one step
        pass
    with authority.guard(step, f"{beta}/run:r1", idempotency_key="k") as grant:
        assert grant.decision.mode is Mode.SHADOW and grant.decision.would_be is not None
        assert grant.decision.would_be.outcome is Outcome.DENY
    again = authority.reserve(step, f"{beta}/run:r1", idempotency_key="k")  # its shadow reservation again
    assert again.replayed and again.mode is Mode.SHADOW and again.would_be is None
    cheaper = authority.reserve(Action("step", "s", {"usd": "0.5"}), f"{beta}/run:r1", idempotency_key="k")
    assert cheaper.replayed and cheaper.allowed  # the same action, other amounts: the shadow one holds nothing
    another = authority.reserve(Action("step", "other", {"usd": 1}), f"{beta}/run:r1", idempotency_key="k")
    assert another.denied and another.reasons[-1].code == "replay_mismatch" and another.mode is Mode.SHADOW
    clock.advance(61)  # enforcement would allow it now
    with (
        pytest.raises(Denied, match="the step it guards has run"),
        authority.guard(step, f"{beta}/run:r1", idempotency_key="k"),
    ):
        pytest.fail("a retried guard must not run its block again")
    assert authority.balance("tenant:globex")["usd"].spent == 2
    enforced = authority.reserve(step, "tenant:globex/app:prod", idempotency_key="shadow:abc")
    shadowed = authority.reserve(step, f"{beta}/run:r2", idempotency_key="abc")
    assert enforced.mode is Mode.ENFORCED and shadowed.mode is Mode.SHADOW and shadowed.allowed
    authority.close()


def test_a_rate_limit_a_new_policy_version_drops_stops_binding(store_url: str) -> None:
    """Applying a version without a rate limit removes its budget: it went on binding (every call
    still counts in the unit a remaining limit shares). Other budgets the new version leaves out
    stay (they may be set by hand now)."""
    clock = FakeClock()
    authority = Authority(store_url, clock=clock)
    minute = {"scope": "tenant:acme", "kind": "tool_call", "limit": 3, "per": "minute"}
    hour = {"scope": "tenant:acme", "kind": "tool_call", "limit": 100, "per": "hour"}
    budget = {"scope": "tenant:acme", "unit": "usd", "limit": 5}
    authority.apply_policy(PolicyDocument.parse({"budgets": [budget], "rate_limits": [minute, hour]}))
    for _ in range(3):
        authority.commit(authority.reserve(Action.tool_call("t"), "tenant:acme").reservation)  # type: ignore[arg-type]
    assert authority.reserve(Action.tool_call("t"), "tenant:acme").denied
    authority.apply_policy(PolicyDocument.parse({"rate_limits": [hour]}))
    assert authority.reserve(Action.tool_call("t"), "tenant:acme").allowed
    kept = {(b.unit, b.period) for b in authority.budgets("tenant:acme")}
    assert kept == {("usd", None), ("rate.tool_call", "hour")}
    authority.close()


def test_shadow_mode_keyed_retries_replay_even_when_the_store_failed_midway() -> None:
    """The shadow reservation is made first, under the caller's key: the store failing for the
    would-be decision after it, or for it (failing open: a local reservation), leaves a retry of a
    guard that ran denied, its block run once — it ran twice."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    class FailingHolds(MemoryStore):
        failing: set[int] = set()
        calls = 0

        def hold(self, request):  # type: ignore[no-untyped-def]
            FailingHolds.calls += 1
            if FailingHolds.calls in FailingHolds.failing:
                raise StoreUnavailable("down (test)")
            return super().hold(request)

    step = Action("step", "s", {"usd": 3})
    for failing in ({2}, {1, 2, 3, 4}):  # the would-be hold only; every hold (fail open)
        FailingHolds.calls, FailingHolds.failing = 0, failing
        document = PolicyDocument.parse({"shadow": ["tenant:globex"]})
        authority = Authority(FailingHolds(), fail_open=True, emergency_limits={"usd": 10}, policy=Policy(document))
        authority.set_budget(Budget("tenant:globex", "usd", 100))
        with authority.guard(step, "tenant:globex/run:r1", idempotency_key="k"):
            pass
        with pytest.raises(Denied) as denied, authority.guard(step, "tenant:globex/run:r1", idempotency_key="k"):
            pytest.fail(f"a retried guard ran its block again (holds failing: {failing})")
        assert denied.value.decision.reasons[-1].code == "replay_settled", denied.value.decision.reasons
        made = authority.reserve(step, "tenant:globex/run:r2", idempotency_key="k2").reservation
        again = authority.reserve(step, "tenant:globex/run:r2", idempotency_key="k2").reservation
        assert made is not None and again is not None and again.id == made.id


def test_shadow_mode_retries_commit_what_was_asked_and_the_emergency_cap_bounds_failing_open(
    store_url: str,
) -> None:
    """A keyed retry's shadow reservation records what was asked too (its commit recorded nothing,
    so whichever of concurrent retries committed first decided whether the spend was counted); with
    the store down, shadow scopes fail open within the emergency cap like any other (they ignored it)."""
    from clearance import StoreUnavailable
    from clearance.stores.memory import MemoryStore

    rates = [{"scope": "tenant:globex", "kind": "step", "limit": 100, "per": "minute"}]
    authority = Authority(store_url, clock=FakeClock())
    authority.apply_policy(PolicyDocument.parse({"shadow": ["tenant:globex"], "rate_limits": rates}))
    authority.set_budget(Budget("tenant:globex", "usd", 100))
    step = Action("step", "s", {"usd": 1})
    first = authority.reserve(step, "tenant:globex/run:r1", idempotency_key="k")
    retry = authority.reserve(step, "tenant:globex/run:r1", idempotency_key="k")
    assert retry.replayed and retry.reservation is not None
    authority.commit(retry.reservation)  # the retry's answer committed first, without amounts
    assert first.reservation is not None and authority.commit(first.reservation).replayed
    balances = authority.balance("tenant:globex")
    assert balances["usd"].spent == 1 and balances["rate.step"].spent == 1
    authority.close()

    class Down(MemoryStore):
        def hold(self, request):  # type: ignore[no-untyped-def]
            raise StoreUnavailable("down (test)")

    document = PolicyDocument.parse({"shadow": ["tenant:globex"]})
    failing = Authority(Down(), fail_open=True, emergency_limits={"usd": 2}, policy=Policy(document))
    outcomes = [failing.reserve(step, f"tenant:globex/run:{i}").allowed for i in range(4)]
    assert outcomes == [True, True, False, False]


def test_a_budgets_entry_on_a_dropped_rate_limits_counter_stays_as_set() -> None:
    """A `budgets` entry and a rate limit on one counter: the tightest was written. A version that
    drops both leaves the entry's own limit (the rate limit's kept binding)."""
    minute = {"scope": "tenant:acme", "kind": "tool_call", "limit": 3, "per": "minute"}
    entries = [{"scope": "tenant:acme", "unit": "rate.tool_call", "limit": n, "period": "minute"} for n in (10, 50)]
    authority = Authority("memory://", clock=FakeClock())
    authority.apply_policy(PolicyDocument.parse({"budgets": entries, "rate_limits": [minute]}))
    assert [b.limit for b in authority.budgets("tenant:acme")] == [3]
    authority.apply_policy(PolicyDocument.parse({}))
    assert [b.limit for b in authority.budgets("tenant:acme")] == [10]  # the tightest entry, whatever its place


def test_a_run_seen_again_after_its_budget_went_idle_starts_a_new_count(store_url: str) -> None:
    """Whether the maintenance got to the idle budget first (on Redis it waits its turn behind
    older due entries; on SQLite for the next pass) or the run's own next call does, the run starts
    a new count — the stores agreed only when maintenance came first."""
    authority, clock = _counting_runs(store_url, calls=1)
    decision = authority.reserve(Action.tool_call("calc"), RUN)
    authority.commit(decision.reservation)  # type: ignore[arg-type]
    clock.advance(1100)  # idle past the retention (and the refresh margin); nothing else ran
    again = authority.reserve(Action.tool_call("calc"), RUN)
    assert again.allowed
    assert authority.balance(RUN)["tool_calls"].held == 1
    assert [e.detail for e in authority.events(limit=20) if e.kind == "budget_remove"] == ["period=lifetime idle"]
    authority.close()


@pytest.mark.parametrize(
    ("text", "fmt", "found"),
    [
        ("tools: {calls_per_run: 100000000000000000000000}", "yaml", "calls_per_run"),
        ("tools: {calls_per_run: true}", "yaml", "calls_per_run"),
        ("optional: [{level: tenant, below: yes}]", "yaml", "below"),  # 1.0: every optional step skipped
        ("output_cap: {floor: true}", "yaml", "floor"),
        ("context_cap: {keep: true}", "yaml", "keep"),  # 1.0: no input ever trimmed
        ("context_cap: {dominance: on}", "yaml", "dominance"),
        ("context_cap: {floor: true}", "yaml", "floor"),
        ("rate_limits: [{scope: 'tenant:a', kind: tool_call, limit: 9007199254740992}]", "yaml", "limit"),
        ("budgets: []\nrisk: []\nbudgets: []", "yaml", "given twice"),
        ('{"output_cap": {}, "output_cap": {"floor": 5}}', "json", "given twice"),
        ("optional: [{level: 'Bad Level!', below: 0.5}]", "yaml", "not a scope kind"),
        ("tools: {calls_per_run: 3, run_kind: 'Run'}", "yaml", "not a scope kind"),
        ("ladders: [{rungs: [{model: gpt-4.1, min_headroom: {'Not A Kind': 0.4}}]}]", "yaml", "not a scope kind"),
        ('{"ladders": [{"rungs": ["gpt\\n4.1"]}]}', "json", "rungs"),
    ],
)
def test_policy_documents_refuse_what_could_never_work(text: str, fmt: str, found: str) -> None:
    """Found in a hunt through policy files: each passed `policy check` (and `apply`), then broke
    every decision (a calls_per_run past 2^53 on SQLite), silently dropped a rule (a key given twice
    in YAML or JSON; TOML refused it) or made one that could never apply (a kind outside the
    scope grammar)."""
    with pytest.raises(InvalidRequest, match=found):
        PolicyDocument.loads(text, fmt)


def test_policy_documents_as_written_before_still_read() -> None:
    """YAML merge keys repeat keys by design; whole numbers written 60.0 were always counts."""
    merged = PolicyDocument.loads(
        "budgets:\n"
        "  - &monthly {scope: 'tenant:acme', unit: usd, limit: 500, period: month}\n"
        "  - {<<: *monthly, scope: 'tenant:globex'}\n"
    )
    assert [b.scope for b in merged.budgets] == ["tenant:acme", "tenant:globex"]
    counts = PolicyDocument.loads(
        "tools: {calls_per_run: 20.0}\nrate_limits: [{scope: 'tenant:a', kind: tool_call, limit: 60.0}]"
    )
    assert counts.tools.calls_per_run == 20 and counts.rate_limits[0].limit == 60


def test_a_policy_stored_by_an_earlier_version_is_still_read_by_workers() -> None:
    """Checks added for documents as written (a rule's kind in the scope grammar, say) must not
    make a policy an earlier version applied unreadable: every fresh worker failed closed on every
    call until the policy was fixed (found in review)."""
    from clearance.stores.memory import MemoryStore

    store = MemoryStore()
    stored = '{"optional":[{"level":"Workflow","below":0.2}],"tools":{"calls_per_run":100000000000000000000000}}'
    store.put_policy(stored, 0.0)
    worker = Authority(store)
    assert worker.reserve(Action.tool_call("calc"), RUN).allowed  # (its count clipped to what stores hold)
    with pytest.raises(InvalidRequest, match="not a scope kind"):
        PolicyDocument.loads('{"optional":[{"level":"Workflow","below":0.2}]}', "json")


def test_a_key_given_twice_beside_a_merge_key_is_refused() -> None:
    text = "budgets:\n  - &m {scope: 'tenant:acme', unit: usd, limit: 500}\n  - {<<: *m, limit: 100, limit: 100000}\n"
    with pytest.raises(InvalidRequest, match="given twice"):
        PolicyDocument.loads(text)
    top = "<<: {version: 1}\nbudgets: []\nbudgets: [{scope: 'tenant:a', unit: usd, limit: 5000}]\n"
    with pytest.raises(InvalidRequest, match="given twice"):
        PolicyDocument.loads(top)


def test_a_policy_built_in_python_is_checked_as_written_when_applied() -> None:
    document = PolicyDocument(optional=[{"level": "Workflow", "below": 0.2}])  # type: ignore[list-item]
    with pytest.raises(InvalidRequest, match="not a scope kind"):
        Authority().apply_policy(document)
    with pytest.raises(InvalidRequest, match="not a scope kind"):
        Authority(policy=Policy(document))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('risk: [{scope: "tenant:a", allow: [Write]}]', "risk.0.allow: 'Write' is not a word"),
        ('risk: [{scope: "tenant:a", allow: ["external "]}]', "'external ' is not a word"),
        ('risk: [{scope: "tenant:a", allow: [write], kinds: [Tool]}]', "risk.0.kinds: 'Tool' is not a word"),
        ('tools: {toolsets: {s: ["web\\nsearch: fake line"]}}', "tools.toolsets.s: .* has a control character"),
        ('tools: {toolsets: {"s\\t": [x]}}', "tools.toolsets: .* has a control character"),
    ],
)
def test_names_no_action_carries_or_no_line_prints_are_refused(text: str, problem: str) -> None:
    """A risk class no Action can carry (``Write``) made an allow rule that never applied (the
    actions it meant were denied); a newline in a tool name split ``policy check``'s rules."""
    with pytest.raises(InvalidRequest, match=problem):
        PolicyDocument.loads(text)


@pytest.mark.parametrize("headroom", [True, {"workflow": True}])
def test_a_rungs_headroom_is_a_fraction_not_a_boolean(headroom: object) -> None:
    """``min_headroom: true`` was read as 1.0: the rung demanded the whole budget stay untouched and
    could never be chosen. Refused, as Plan refuses it."""
    document = {"ladders": [{"rungs": [{"model": "gpt-4.1", "min_headroom": headroom}, {"model": "gpt-4.1-mini"}]}]}
    with pytest.raises(InvalidRequest, match="not a boolean"):
        PolicyDocument.parse(document)


@pytest.mark.parametrize(("budget", "model", "output"), [("10", "gpt-4.1", 800), ("0.0035", "gpt-4.1-mini", 800)])
def test_a_grant_says_what_to_call_with_and_that_fits_the_hold(budget: str, model: str, output: int) -> None:
    """The README's recipe passed ``grant.caps and grant.caps.max_output_tokens`` — ``None`` unless
    an output cap set it — so an obedient caller sent no output limit and could cost more than held."""
    from clearance.pricing import price_usd

    authority = Authority(policy=Policy(PolicyDocument.load("examples/policies/default.yaml")))
    authority.set_budget(Budget("tenant:acme", "usd", budget))
    action = Action.model_call("openai", "gpt-4.1", input_tokens=3_200, max_output_tokens=800)
    with authority.guard(action, RUN) as grant:
        assert (grant.model, grant.max_output_tokens, grant.max_input_tokens) == (model, output, 3_200)
        assert grant.reservation is not None
        cost = price_usd("openai", grant.model, grant.max_input_tokens, grant.max_output_tokens)
        assert cost <= grant.reservation.amounts["usd"]
        grant.settle({"usd": cost})
    assert grant.settlement is not None and grant.settlement.flags == ()


def test_a_grant_under_an_output_cap_passes_the_cap() -> None:
    document = {"ladders": [{"provider": "openai", "rungs": ["gpt-4.1", "gpt-4.1-mini"]}], "output_cap": {"floor": 64}}
    authority = authority_with(document)
    authority.set_budget(Budget("tenant:acme", "usd", "0.001"))
    with authority.guard(flagship(1000, 1000), RUN) as grant:
        assert grant.caps is not None and grant.caps.max_output_tokens is not None
        assert (grant.model, grant.max_output_tokens) == ("gpt-4.1-mini", grant.caps.max_output_tokens)
        assert grant.max_output_tokens < 1000
    with authority.guard(Action.tool_call("calc"), "tenant:acme/run:r2") as plain:
        assert (plain.model, plain.max_output_tokens, plain.max_input_tokens) == (None, None, None)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.dictionaries(st.sampled_from(["usd", "tokens", "calls", "tool.x.usd"]), st.integers(-2, 2**53 + 2)),
    headroom=st.one_of(
        st.floats(-0.5, 1.5),
        st.booleans(),
        st.dictionaries(st.sampled_from(["workflow", "*", "Run", ""]), st.one_of(st.floats(-0.1, 1.1), st.booleans())),
    ),
    rule=st.one_of(st.none(), st.text(max_size=210)),
)
def test_a_plan_from_steps_is_the_plan_its_amounts_make(
    steps: dict[str, int], headroom: object, rule: str | None
) -> None:
    """Plan.of_steps skips reading its amounts back from decimals (policies build several plans per
    model call): it must accept and refuse exactly what the constructor does, and build the same plan."""
    from clearance.units import from_steps

    def build(make: object) -> object:
        try:
            return make()  # type: ignore[operator]
        except InvalidRequest as error:
            return type(error)

    caps = Caps(model="gpt-4.1-mini")
    fast = build(lambda: Plan.of_steps(steps, caps, headroom, rule))  # type: ignore[arg-type]
    amounts = {unit: from_steps(unit, n) for unit, n in steps.items()}
    slow = build(lambda: Plan(amounts, caps, headroom, rule))  # type: ignore[arg-type]
    assert fast == slow
    if isinstance(fast, Plan):
        assert isinstance(slow, Plan) and fast.steps == slow.steps and fast.model_dump() == slow.model_dump()


def test_a_rate_limits_unit_is_named_as_every_version_named_it() -> None:
    """An applied policy made its rate budgets under these names: a worker of a later version
    deriving another name from the stored document would count where no budget is (found in review:
    a change to long names left such limits unenforced until the policy was applied again)."""
    name = "mcp__github__create_pull_request_review_comment_reply"
    rate = {"scope": "tenant:a", "kind": "tool_call", "name": name, "limit": 2, "per": "hour"}
    document = PolicyDocument.parse({"rate_limits": [rate]})
    assert document.rate_limits[0].unit == "rate.tool_call.mcp__github__create_pull_request_review_comment_r"


def test_a_runs_tool_calls_are_counted_a_whole_retention_past_its_last_use(store_url: str, clock: FakeClock) -> None:
    """A run's budget was kept only half a retention past its last refresh: a run paused 25 h (the
    docs promise 48) got its ``calls_per_run`` back, on every store."""
    authority = Authority(store_url, clock=clock, policy_refresh=0)
    authority.apply_policy(PolicyDocument.parse({"tools": {"calls_per_run": 2}}))
    hour = 3600.0

    def call() -> Outcome:
        decision = authority.reserve(Action.tool_call("web_search"), RUN)
        if decision.reservation is not None:
            authority.commit(decision.reservation)
        return decision.outcome

    assert call() is Outcome.ALLOW
    clock.advance(23 * hour)
    assert call() is Outcome.ALLOW
    clock.advance(48 * hour - 60)  # paused a minute short of a retention: still its count
    assert call() is Outcome.DENY
    clock.advance(48 * hour + 2 * hour + 60)  # unused past a retention (and the refresh margin): a new count
    assert call() is Outcome.ALLOW
    authority.close()


def test_every_store_forgets_a_runs_budget_at_the_same_moment(store_url: str) -> None:
    """Found in review: Redis summed the keep time in another order than the other stores, so at the
    very moment the others forgot a run's budget it kept it (a last-bit difference of the doubles)."""
    clock = FakeClock(254.768)
    authority = Authority(_with_option(store_url, "retention=10.1"), clock=clock)
    assert authority.store.ensure_budget("tenant:a/run:r", "tool_calls", "", 5, clock())
    clock.advance(267.393 - clock())  # 254.768 + 10.1 + 2 * 10.1 / 8, as the stores sum it
    authority.sweep()
    assert [b.scope for b in authority.budgets() if b.unit == "tool_calls"] == []
    authority.close()


def test_refreshing_runs_do_not_pile_up_the_memory_stores_queue() -> None:
    """Found in review: refreshed every two hours or so (it was every day), each refresh queued
    another entry: 25 per run in use. A refresh queues none now; the due entry queues the new time."""
    clock = FakeClock()
    authority = authority_with({"tools": {"calls_per_run": 10**6}}, store="memory://", clock=clock)
    runs = [f"tenant:acme/run:r{i}" for i in range(50)]
    for _ in range(200):  # 200 hours of every run making a call an hour
        for run in runs:
            decision = authority.reserve(Action.tool_call("calc"), run)
            authority.commit(decision.reservation)  # type: ignore[arg-type]
        clock.advance(3600)
        authority.sweep()
    assert len(authority.store._templates) <= 2 * len(runs)  # type: ignore[attr-defined]
    assert authority.balance(runs[0])["tool_calls"].spent == 200  # every run kept its count
    authority.close()
