"""Exact amounts, the scope grammar, periods and pricing."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearance import Action, Authority, Budget, InvalidRequest, Policy, PolicyDocument, Scope
from clearance.periods import windows_at
from clearance.pricing import price_usd, register_price, set_fallback_price
from clearance.units import MAX_AMOUNT, from_steps, to_steps


@given(st.decimals(min_value=0, max_value=9_000_000, places=9, allow_nan=False, allow_infinity=False))
def test_usd_round_trips_exactly(amount: Decimal) -> None:
    assert from_steps("usd", to_steps("usd", amount)) == amount


@given(
    st.floats(min_value=0, max_value=9_000_000, allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e-05, 0.1 + 0.2, 5e-324, 8999999.999999999])
)
def test_float_money_is_its_shortest_repr_rounded_up(amount: float) -> None:
    # The float fast path must agree with the Decimal path: repr() (0.1 stays 0.1), then round up.
    expected = int((Decimal(repr(amount)) * 10**9).to_integral_value(rounding=ROUND_CEILING))
    assert to_steps("usd", amount) == expected
    assert to_steps("tool.search.usd", amount) == expected
    assert to_steps("usd", repr(amount)) == expected


def test_usd_rounds_up_below_a_nano_dollar() -> None:
    assert to_steps("usd", "0.0000000001") == 1
    assert to_steps("usd", 0.1) == 100_000_000  # the float's shortest repr, not its binary expansion


def test_whole_units_reject_fractions_and_bounds_hold() -> None:
    assert to_steps("tokens", "12") == 12
    with pytest.raises(InvalidRequest):
        to_steps("tokens", "1.5")
    assert to_steps("tokens", MAX_AMOUNT) == MAX_AMOUNT
    with pytest.raises(InvalidRequest):
        to_steps("tokens", MAX_AMOUNT + 1)
    with pytest.raises(InvalidRequest):
        to_steps("usd", 10_000_000)


def test_scope_chain_and_helpers() -> None:
    scope = Scope.of(tenant="acme", workflow="triage", run="r-1")
    assert scope.path == "tenant:acme/workflow:triage/run:r-1"
    assert scope.chain == ("tenant:acme", "tenant:acme/workflow:triage", "tenant:acme/workflow:triage/run:r-1")
    assert scope.root == "tenant:acme"
    assert scope.level_of("workflow") == 1
    assert scope.is_within("tenant:acme")
    assert not scope.is_within("tenant:ac")
    assert scope.child("tool", "search").path.endswith("/tool:search")


@pytest.mark.parametrize(
    "bad", ["tenant:a/", "tenant:a b", "tenant:{a}", "TENANT:a", "a" * 40 + ":x", "t:" + "x" * 129]
)
def test_scope_grammar_rejects(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        Scope.parse(bad)


def test_windows_are_utc_calendar_windows() -> None:
    windows = dict(windows_at(1_798_847_940.0))  # 2027-01-01T23:59:00Z, a Friday in ISO week 53 of 2026
    assert windows == {
        "": "",
        "minute": "2027-01-01T23:59",
        "hour": "2027-01-01T23",
        "day": "2027-01-01",
        "week": "2026-W53",
        "month": "2027-01",
    }


def test_pricing_uses_genai_prices_and_custom_rates() -> None:
    assert price_usd("openai", "gpt-4o", 1000, 800) == Decimal("0.0105")
    register_price("house-model", 1, 2)
    assert price_usd(None, "house-model", 1_000_000, 1_000_000) == 3
    with pytest.raises(InvalidRequest, match="no price known"):
        Action.model_call(None, "unheard-of-model", 1, 1)
    set_fallback_price(10, 30)
    try:
        action = Action.model_call(None, "unheard-of-model", 100_000, 10_000)
        assert action.amounts["usd"] == Decimal("1.3")
    finally:
        set_fallback_price(None)


def test_a_price_that_depends_on_the_time_of_day_is_not_kept_past_its_hours(monkeypatch: pytest.MonkeyPatch) -> None:
    """deepseek-chat costs twice as much from 00:30 to 16:30 UTC: a worker that first priced it
    off-peak must not go on holding the off-peak price at peak time (under the real worst case)."""
    import datetime as real

    from genai_prices import Usage, calc_price

    from clearance import pricing

    moments = {"now": real.datetime(2026, 11, 26, 20, 0, tzinfo=real.UTC)}

    class Clock(real.datetime):
        @classmethod
        def now(cls, tz: real.tzinfo | None = None) -> real.datetime:  # type: ignore[override]
            return moments["now"]

    monkeypatch.setattr(pricing, "datetime", Clock)
    def clock() -> float:
        return moments["now"].timestamp()

    monkeypatch.setattr(pricing, "_clock", clock)
    pricing._rates.clear()

    def worst_case_at(moment: real.datetime) -> Decimal:
        usage = Usage(input_tokens=100_000, output_tokens=8_000)
        calc = calc_price(usage, "deepseek-chat", provider_id="deepseek", genai_request_timestamp=moment)
        return Decimal(calc.total_price)

    off_peak = Action.model_call("deepseek", "deepseek-chat", 100_000, 8_000).amounts["usd"]
    assert off_peak >= worst_case_at(moments["now"])
    moments["now"] = real.datetime(2026, 11, 27, 0, 29, tzinfo=real.UTC)
    assert Action.model_call("deepseek", "deepseek-chat", 100_000, 8_000).amounts["usd"] == off_peak  # cached
    moments["now"] = real.datetime(2026, 11, 27, 10, 0, tzinfo=real.UTC)
    peak = Action.model_call("deepseek", "deepseek-chat", 100_000, 8_000).amounts["usd"]
    assert peak >= worst_case_at(moments["now"]) > off_peak
    moments["now"] = real.datetime(2026, 11, 27, 16, 30, tzinfo=real.UTC)
    assert Action.model_call("deepseek", "deepseek-chat", 100_000, 8_000).amounts["usd"] == off_peak
    pricing._rates.clear()


def test_a_price_registered_while_a_lookup_runs_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup of genai-prices' rate that began before ``register_price`` must not cache that rate
    over the registered one (the override was ignored for the rest of the process)."""
    import threading

    import genai_prices

    from clearance import pricing

    pricing._rates.clear()
    started, go_on = threading.Event(), threading.Event()
    real_calc = genai_prices.calc_price

    def slow_calc(*args: object, **kwargs: object) -> object:
        started.set()
        go_on.wait(5)
        return real_calc(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(genai_prices, "calc_price", slow_calc)
    looking = threading.Thread(target=price_usd, args=("openai", "gpt-4o-mini", 1_000_000, 0))
    looking.start()
    assert started.wait(5)
    register_price("gpt-4o-mini", 50, 50, provider="openai")
    go_on.set()
    looking.join()
    try:
        assert price_usd("openai", "gpt-4o-mini", 1_000_000, 0) == 50
    finally:
        pricing._custom.pop(("openai", "gpt-4o-mini"), None)
        pricing._custom_folded.pop(("openai", "gpt-4o-mini"), None)
        pricing._rates.clear()


def test_a_model_calls_extra_amounts_cannot_replace_its_price() -> None:
    """``extra`` adds other units; a ``usd`` there replaced the worst-case price (and a policy
    re-pricing the call then dropped it): refused, clearly."""
    with pytest.raises(InvalidRequest, match="extra takes other units only, got usd"):
        Action.model_call("openai", "gpt-4o", 1000, 800, extra={"usd": "0.01"})
    with pytest.raises(InvalidRequest, match="got tokens"):
        Action.model_call("openai", "gpt-4o", 1000, 800, extra={"tokens": 5, "emails": 1})
    action = Action.model_call("openai", "gpt-4o", 1000, 800, extra={"requests": 1})
    assert action.amounts["requests"] == 1
    assert action.amounts["usd"] == Decimal("0.0105")


def test_amounts_never_depend_on_the_callers_decimal_context() -> None:
    """A program that sets a low Decimal precision (or rounding down) must not get its money
    rounded: conversions and prices use their own exact context."""
    from decimal import ROUND_DOWN, Subnormal, localcontext

    from clearance import Authority, Budget, Plan
    from clearance.pricing import _tiered

    expected_price = price_usd("openai", "gpt-4o", 123_457, 7_891)
    expected_tiered = price_usd("google", "gemini-2.5-pro", 223_457, 98_765)  # tiered: genai-prices computes it
    _tiered.cache_clear()
    with localcontext() as context:
        context.prec = 6
        context.rounding = ROUND_DOWN
        assert to_steps("usd", Decimal("1234.5641")) == 1_234_564_100_000
        assert to_steps("usd", "2345.67491") == 2_345_674_910_000
        assert from_steps("usd", 1_234_564_100_001) == Decimal("1234.564100001")
        assert price_usd("openai", "gpt-4o", 123_457, 7_891) == expected_price
        context.traps[Subnormal] = True
        assert price_usd("google", "gemini-2.5-pro", 223_457, 98_765) == expected_tiered
        authority = Authority()
        authority.set_budget(Budget("tenant:ctx", "usd", "5000"))
        decision = authority.reserve(Action("step", "s", {"usd": Decimal("1234.5641")}), "tenant:ctx")
        assert decision.reservation is not None
        authority.commit(decision.reservation, {"usd": Decimal("2345.6749")})
        assert authority.balance("tenant:ctx")["usd"].spent == Decimal("2345.6749")
        assert authority.balance("tenant:ctx")["usd"].remaining == Decimal("2654.3251")
    # Digits past the default 28 of precision, and tiny exponents, still round up to the next step.
    assert to_steps("usd", "1.0000000000000000000000000000001") == 1_000_000_001
    assert to_steps("usd", "1e-999999999") == 1
    assert to_steps("usd", Decimal("1e-999999999")) == 1
    with pytest.raises(InvalidRequest, match="not a bool"):
        Plan({"usd": 1}, min_headroom=True)


def test_the_unit_names_seen_are_bounded_and_forgetting_them_changes_no_amount(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every distinct tool name makes units (`tool.<name>.calls` under a policy): the names seen
    are kept in a bounded table, and a unit forgotten from it still converts at its scale."""
    from clearance import units

    monkeypatch.setattr(units, "_MAX_KNOWN_UNITS", 100)
    for i in range(250):
        assert to_steps(f"tool.mcp_{i}.calls", 2) == 2
        assert to_steps(f"tool.mcp_{i}.usd", "0.5") == 500_000_000
        assert len(units._known_units) <= 100
    assert to_steps("tool.mcp_0.usd", 1) == 10**9  # long forgotten: still at its scale
    assert to_steps("usd", "0.000000001") == 1


def test_model_names_without_end_do_not_grow_genai_prices_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """genai-prices keeps every model name it is asked about, found or not, for good: with names from
    user input (a fine-tune per tenant) ~440 bytes a name without end, past clearance's own bounded
    cache. Its caches are emptied past a bound."""
    from genai_prices import data_snapshot

    from clearance import pricing

    monkeypatch.setattr(pricing, "_GENAI_CACHE_LIMIT", 50)
    set_fallback_price("3", "15")
    try:
        for i in range(300):
            Action.model_call("openai", f"ft:gpt-4.1-mini:tenant{i}:support", 1200, 400)
        snapshot = data_snapshot.get_snapshot()
        sizes = [len(getattr(snapshot, n)) for n in ("_lookup_cache", "_provider_cache", "_provider_misses")]
        assert max(sizes) <= 51, sizes
        assert Action.model_call("openai", "gpt-4.1", 1000, 100).amounts["usd"] > 0  # still priced
    finally:
        set_fallback_price(None)


def test_a_per_request_fee_is_part_of_a_model_calls_worst_case() -> None:
    """Some models charge per request on top of their tokens (perplexity's sonar: $12 per 1,000):
    left out, every such call was held 7.7x short of its price."""
    from genai_prices import Usage, calc_price

    for provider, model in (("perplexity", "sonar"), ("perplexity", "sonar-pro"), ("openai", "gpt-4o")):
        held = Action.model_call(provider, model, input_tokens=1000, max_output_tokens=800).amounts["usd"]
        price = calc_price(Usage(input_tokens=1000, output_tokens=800), model, provider_id=provider).total_price
        assert held >= Decimal(price), (model, held, price)
        assert held - Decimal(price) < Decimal("1e-9")


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "whisper-1"),
        ("openai", "tts-1"),
        ("mistral", "mistral-ocr-latest"),
        ("elevenlabs", "eleven_realtime_v1_max"),  # tokens and $4.8 per audio hour: held 0.01 of 4.81
    ],
)
def test_a_model_not_priced_by_tokens_is_refused_not_held_as_free(provider: str, model: str) -> None:
    """Models genai-prices prices by audio hours, characters or pages were held at $0 — past any
    budget, an exhausted one included. Refused like an unknown model (a fallback price prices them)."""
    with pytest.raises(InvalidRequest, match="not priced by tokens"):
        Action.model_call(provider, model, input_tokens=10_000, max_output_tokens=10_000)
    set_fallback_price("1", "2")
    try:
        held = Action.model_call(provider, model, input_tokens=1_000_000, max_output_tokens=1_000_000)
        assert held.amounts["usd"] == 3
    finally:
        set_fallback_price(None)


def test_a_cache_read_dearer_than_input_is_held_at_its_price() -> None:
    """Input the provider may serve from its cache was held at the input price, though a few models'
    cache reads cost more (OpenRouter's deepseek-pro: 0.23 against 0.225 per million)."""
    from genai_prices import Usage, calc_price

    provider, model = "openrouter", "~deepseek/deepseek-pro-latest"
    held = Action.model_call(provider, model, input_tokens=1_000_000, max_output_tokens=0).amounts["usd"]
    read = Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000, output_tokens=0)
    assert held >= Decimal(calc_price(read, model, provider_id=provider).total_price)


def test_a_model_call_at_a_service_tier_is_held_at_that_tiers_price() -> None:
    """OpenAI's priority tier costs twice the default (Anthropic's fast more): a call sent at it was
    held at the default price, half short. ``service_tier`` prices the model's variant, and a
    policy's cheaper rungs are priced at the same tier."""
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=10_000, output_tokens=4_000)
    for tier in ("priority", "flex"):
        held = Action.model_call("openai", "gpt-5", 10_000, 4_000, service_tier=tier)
        price = calc_price(usage, "gpt-5", provider_id="openai", price_context={"service_tier": tier}).total_price
        assert held.amounts["usd"] == Decimal(price).quantize(Decimal("1e-9"), rounding=ROUND_CEILING)
        assert held.metadata["service_tier"] == tier
    fast = Usage(input_tokens=10_000, output_tokens=4_000)  # Anthropic's fast mode: its "speed"
    opus = calc_price(fast, "claude-opus-4-8", provider_id="anthropic", price_context={"speed": "fast"}).total_price
    held = Action.model_call("anthropic", "claude-opus-4-8", 10_000, 4_000, service_tier="fast").amounts["usd"]
    assert held == Decimal(opus).quantize(Decimal("1e-9"), rounding=ROUND_CEILING)
    assert held == 2 * Action.model_call("anthropic", "claude-opus-4-8", 10_000, 4_000).amounts["usd"]
    default = Action.model_call("openai", "gpt-5", 10_000, 4_000).amounts["usd"]
    assert Action.model_call("openai", "gpt-5", 10_000, 4_000, service_tier="priority").amounts["usd"] == 2 * default
    ladder = {"ladders": [{"provider": "openai", "rungs": ["gpt-5", "gpt-5-mini"]}]}
    authority = Authority("memory://", policy=Policy(PolicyDocument.parse(ladder)))
    authority.set_budget(Budget("tenant:a", "usd", "0.06"))  # not the flagship at priority (0.105)
    call = Action.model_call("openai", "gpt-5", 10_000, 4_000, service_tier="priority")
    decision = authority.reserve(call, "tenant:a")
    mini = Action.model_call("openai", "gpt-5-mini", 10_000, 4_000, service_tier="priority").amounts["usd"]
    assert decision.reservation is not None and decision.reservation.amounts["usd"] == mini
    for bad in ("Priority", "", "a b", 5):
        with pytest.raises(InvalidRequest, match="service_tier"):
            Action.model_call("openai", "gpt-5", 10, 10, service_tier=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("provider", "model", "kinds"),
    [
        ("openai", "gpt-audio", ("audio",)),  # flat: audio in 32, out 64 per million against 2.5 / 10
        ("openai", "gpt-realtime", ("audio", "image")),  # the dearest kind per direction
        ("google", "gemini-2.5-flash-image", ("image",)),  # image output 30 against 2.5
        ("google", "gemini-2.5-flash", ("audio",)),  # audio input 1.0 against 0.3
        ("google", "gemini-2.5-pro", ("audio",)),  # tiered, no audio price of its own: as text
    ],
)
def test_a_model_call_that_may_carry_audio_or_images_is_held_at_their_price(
    provider: str, model: str, kinds: tuple[str, ...]
) -> None:
    """Every token was priced at the text rate: a gpt-audio call was held 6.8x short, an image
    model's 11x. ``modalities`` holds each direction at its dearest kind, as genai-prices prices it;
    a policy re-prices the call's rungs with them."""
    from genai_prices import Usage, calc_price

    for input_tokens, output_tokens in ((1000, 4000), (300_000, 1000)):
        held = Action.model_call(provider, model, input_tokens, output_tokens, modalities=kinds).amounts["usd"]
        text = Action.model_call(provider, model, input_tokens, output_tokens).amounts["usd"]
        worst = Decimal(0)
        for i in kinds:
            for o in kinds:  # (audio in, image out: a call may)
                usage = Usage(
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    **{f"input_{i}_tokens": input_tokens, f"output_{o}_tokens": output_tokens},
                )
                price = calc_price(usage, model, provider_id=provider)
                worst = max(worst, Decimal(price.total_price))
        assert held >= worst >= text, (model, held, worst)
        assert held - worst < Decimal("1e-8") or held == text  # (not held more than its worst)
    with pytest.raises(InvalidRequest, match="modalities"):
        Action.model_call(provider, model, 10, 10, modalities="audio")
    with pytest.raises(InvalidRequest, match="modalities"):
        Action.model_call(provider, model, 10, 10, modalities=["smell"])
    ladder = {"ladders": [{"provider": "openai", "rungs": ["gpt-audio", "gpt-audio-mini"]}]}
    authority = Authority("memory://", policy=Policy(PolicyDocument.parse(ladder)))
    authority.set_budget(Budget("tenant:a", "usd", "0.1"))  # not gpt-audio's 0.288: its mini's 0.09
    call = Action.model_call("openai", "gpt-audio", 1000, 4000, modalities=["audio"])
    decision = authority.reserve(call, "tenant:a")
    mini = Action.model_call("openai", "gpt-audio-mini", 1000, 4000, modalities=["audio"]).amounts["usd"]
    assert decision.caps is not None and decision.caps.model == "gpt-audio-mini"
    assert decision.reservation is not None and decision.reservation.amounts["usd"] == mini  # (not 0.0102)


def test_a_float_subclass_is_an_amount_like_any_float() -> None:
    """numpy's float64 is a float whose repr() is "np.float64(0.0123)": taken for a number's text,
    it raised a bare decimal.InvalidOperation from Budget, Action and commit (the cost unrecorded)."""

    class Float64(float):
        def __repr__(self) -> str:
            return f"np.float64({float.__repr__(self)})"

    authority = Authority("memory://")
    authority.set_budget(Budget("tenant:a", "usd", Float64(5.0)))
    decision = authority.reserve(Action("step", "x", {"usd": Float64(0.0123)}), "tenant:a")
    assert decision.reservation is not None
    assert authority.commit(decision.reservation, {"usd": Float64(0.01)}).charged == {"usd": Decimal("0.01")}


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("anthropic", "claude-3-5-haiku-latest"),  # flat rates, with 5-minute and 1-hour cache writes
        ("anthropic", "claude-sonnet-4-5"),  # tiered: genai-prices computes it
        ("openai", "gpt-4o"),  # no cache-write price: written tokens cost what input does
    ],
)
def test_a_model_call_that_may_write_the_prompt_cache_is_held_at_the_cache_write_price(
    provider: str, model: str
) -> None:
    from genai_prices import Usage, calc_price

    for writes, hour in ((0, 0), (600_000, 0), (600_000, 250_000), (1_000_000, 1_000_000)):
        action = Action.model_call(
            provider, model, 1_000_000, 2_000, cache_write_tokens=writes, cache_write_1h_tokens=hour
        )
        counts = {"cache_write_tokens": writes, "cache_write_1h_tokens": hour} if writes else {}
        usage = Usage(input_tokens=1_000_000, output_tokens=2_000, **counts)
        expected = calc_price(usage, model_ref=model, provider_id=provider).total_price
        assert action.amounts["usd"] == expected, (writes, hour)
        assert action.amounts["tokens"] == 1_002_000  # (cache writes are input tokens)
    # Anthropic's writes cost 1.25x (5 minutes) and 2x (1 hour) its input: without them, held short.
    plain = Action.model_call("anthropic", "claude-3-5-haiku-latest", 1_000_000, 0).amounts["usd"]
    written = Action.model_call("anthropic", "claude-3-5-haiku-latest", 1_000_000, 0, cache_write_tokens=1_000_000)
    assert (plain, written.amounts["usd"]) == (Decimal("0.8"), Decimal("1"))


@pytest.mark.parametrize(
    "counts",
    [
        {"cache_write_tokens": 1001},  # more than the input
        {"cache_write_tokens": 10, "cache_write_1h_tokens": 11},  # 1-hour writes are some of the writes
        {"cache_write_tokens": -1},
        {"cache_write_tokens": True},
        {"cache_write_tokens": 1.5},
    ],
)
def test_cache_writes_outside_the_input_are_invalid(counts: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        Action.model_call("anthropic", "claude-3-5-haiku-latest", 1000, 10, **counts)  # type: ignore[arg-type]


def test_a_model_calls_price_and_token_counts_cannot_be_replaced_through_its_arguments() -> None:
    # Pairs instead of a mapping went past the check that keeps usd and tokens out of extra: held at $0.
    with pytest.raises(InvalidRequest, match="extra must be a mapping"):
        Action.model_call("openai", "gpt-4o", 1000, 800, extra=[("usd", 0)])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="metadata must be a mapping"):
        Action.model_call("openai", "gpt-4o", 1000, 800, metadata=[("k", 1)])  # type: ignore[arg-type]
    # The token counts the hold was priced from win over the caller's metadata: a grant said to
    # send 32,000 output tokens on a call held for 800.
    action = Action.model_call(
        "openai", "gpt-4o", 1000, 800, metadata={"max_output_tokens": 32_000, "cache_write_tokens": 900, "k": 1}
    )
    assert action.metadata == {"k": 1, "input_tokens": 1000, "max_output_tokens": 800}
    authority = Authority()
    with authority.guard(action, "tenant:acme/run:r1") as grant:
        assert (grant.max_output_tokens, grant.max_input_tokens) == (800, 1000)


def test_a_registered_price_applies_to_every_name_genai_prices_reads_as_that_model() -> None:
    from clearance import pricing

    register_price("gpt-4o", 50, 50, provider="openai")
    register_price("Acme-FT", 40, 40)
    set_fallback_price(1)
    try:
        for provider, model in (("openai", "gpt-4o"), (None, "gpt-4o"), ("OpenAI", "gpt-4o"), ("openai", "GPT-4o")):
            assert price_usd(provider, model, 1_000_000, 0) == 50, (provider, model)  # (was $2.50: bundled)
        assert price_usd(None, "acme-ft", 1_000_000, 0) == 40  # (was the $1 fallback)
    finally:
        set_fallback_price(None)
        pricing._custom.clear()
        pricing._custom_folded.clear()
        pricing._rates.clear()


@pytest.mark.parametrize("price", ["1e999999999999999999", "1e100000000", 10**17])
def test_a_price_no_ledger_amount_can_hold_is_invalid(price: object) -> None:
    with pytest.raises(InvalidRequest, match="largest supported price"):  # (was OverflowError, MemoryError, a hang)
        register_price("absurd-model", price, 1)
    with pytest.raises(InvalidRequest, match="largest supported price"):
        set_fallback_price(price)


def test_a_tiered_model_is_priced_at_the_moment_the_pricing_clock_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiered models are priced call by call by genai-prices: at the moment of the clock a cached
    rate is judged by, not at genai-prices' own now (a moved clock held them below their price)."""
    import datetime as real

    from genai_prices import Usage, calc_price

    from clearance import pricing

    moment = real.datetime(2026, 4, 1, 12, 0, tzinfo=real.UTC)  # before grok-4.20's 2026-04-30 price cut
    monkeypatch.setattr(pricing, "_clock", moment.timestamp)
    pricing._rates.clear()
    pricing._tiered.cache_clear()
    try:
        held = Action.model_call("x-ai", "grok-4.20", 300_000, 8_000).amounts["usd"]
        usage = Usage(input_tokens=300_000, output_tokens=8_000)
        truth = calc_price(usage, "grok-4.20", provider_id="x-ai", genai_request_timestamp=moment).total_price
        assert held == Decimal(truth)  # (was 0.79 against 1.296)
    finally:
        pricing._rates.clear()
        pricing._tiered.cache_clear()


def test_cache_writes_that_cost_less_than_input_never_lower_the_hold() -> None:
    """"May write": a call that writes less than it may pays input for the rest, so where a write
    costs less than input (minimax's highspeed models, OpenRouter's Gemini) the hold is the price
    without the writes (found in review: declaring writes lowered it, 0.0624 to 0.0399)."""
    for provider, model in (("minimax", "MiniMax-M2.1-highspeed"), ("openrouter", "google/gemini-2.5-pro")):
        plain = Action.model_call(provider, model, 100_000, 1000).amounts["usd"]
        for hour in (0, 50_000, 100_000):
            counts = {"cache_write_tokens": 100_000, "cache_write_1h_tokens": hour}
            written = Action.model_call(provider, model, 100_000, 1000, **counts)
            assert written.amounts["usd"] >= plain, (model, hour)


def test_a_registered_price_names_its_cache_write_rates_and_keeps_custom_names_apart() -> None:
    from clearance import pricing

    try:
        register_price("claude-sonnet-4-5", 3, 15, provider="anthropic")  # writes at the input rate
        assert price_usd("anthropic", "claude-sonnet-4-5", 100_000, 0, cache_write_tokens=100_000) == Decimal("0.3")
        rates = {"cache_write_per_mtok": "3.75", "cache_write_1h_per_mtok": 6}
        register_price("claude-sonnet-4-5", 3, 15, provider="anthropic", **rates)
        writes = {"cache_write_tokens": 100_000, "cache_write_1h_tokens": 40_000}
        full = price_usd("anthropic", "claude-sonnet-4-5", 100_000, 0, **writes)
        assert full == Decimal("0.4650")  # 60k at 3.75 + 40k at 6 per million
        with pytest.raises(InvalidRequest):
            register_price("m", 1, 1, cache_write_per_mtok=-1)
        # Two custom models told apart by case keep their own prices; another case finds the last.
        register_price("ft:gpt-4o:acme:Legal", 100, 100)
        register_price("ft:gpt-4o:acme:legal", 1, 1)
        assert price_usd(None, "ft:gpt-4o:acme:Legal", 1_000_000, 0) == 100
        assert price_usd(None, "ft:gpt-4o:acme:legal", 1_000_000, 0) == 1
        # An override applies to the model a routed name resolves to.
        register_price("claude-3-5-haiku-latest", 50, 50, provider="anthropic")
        assert price_usd("litellm", "anthropic/claude-3-5-haiku-latest", 1_000_000, 0) == 50
    finally:
        pricing._custom.clear()
        pricing._custom_folded.clear()
        pricing._rates.clear()


def test_a_provider_less_override_applies_to_a_routed_name_and_a_clock_set_back_reprices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: an override registered without a provider did not reach a routed name
    (litellm's "anthropic/..."); and a cached rate was used after the clock stepped back before the
    moment it was looked up (deepseek's off-peak price kept at peak: half the price held)."""
    import datetime as real

    from clearance import pricing

    try:
        register_price("claude-3-5-haiku-latest", 50, 50)
        assert price_usd("litellm", "anthropic/claude-3-5-haiku-latest", 1_000_000, 0) == 50
    finally:
        pricing._custom.clear()
        pricing._custom_folded.clear()
        pricing._rates.clear()

    def at(hour: int) -> float:
        return real.datetime(2026, 11, 27, hour, 0, tzinfo=real.UTC).timestamp()

    monkeypatch.setattr(pricing, "_clock", lambda: at(17))  # off-peak (16:30-00:30 UTC)
    off_peak = price_usd("deepseek", "deepseek-chat", 1_000_000, 0)
    monkeypatch.setattr(pricing, "_clock", lambda: at(10))  # stepped back into peak hours
    try:
        assert price_usd("deepseek", "deepseek-chat", 1_000_000, 0) == 2 * off_peak
    finally:
        pricing._rates.clear()
