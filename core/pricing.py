"""Token usage → USD, from genai-prices' maintained price table.

genai-prices works offline from its bundled table, but one ``calc_price`` costs ~80 µs, so the
per-token rates of a model are looked up once and cached; a flat-rate model is then priced with two
integer multiplications. Models with tiered prices (e.g. long-context surcharges) fall back to
``calc_price`` for the exact token counts, memoised.

Some prices depend on when the call is made: off-peak hours (deepseek's models cost half from 16:30
to 00:30 UTC) and prices that change on a start date. A cached rate is kept only until the next
such change (computed from the model's price conditions), so a worker that first priced a model
off-peak does not hold the off-peak price at peak time — under the call's real worst case.

Prices are in nano-dollars per token, kept as ``Decimal`` so sub-nano rates stay exact until the
final round-up.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_CEILING, Context, Decimal, localcontext
from functools import lru_cache
from typing import Any, ClassVar

from clearance.errors import InvalidRequest
from clearance.units import EXACT, MAX_AMOUNT, USD_SCALE

# genai-prices does its Decimal arithmetic in the current context; a caller's (say prec=6, or traps
# on) must not round or break a price, so its calls run in this one (Python's defaults, more digits).
_GENAI_CONTEXT = Context(prec=100)
_NANO_PER_MTOK = EXACT.divide(Decimal(USD_SCALE), Decimal(1_000_000))


@dataclass(frozen=True, slots=True)
class ModelRate:
    """USD per million tokens for one model (input, output), USD per request (a fee some providers
    charge on every call, whatever its tokens: left out, every such call was held short), and USD
    per million input tokens written to the prompt cache (5-minute and 1-hour writes: Anthropic's
    cost 1.25x and 2x its input; ``None``: the model has no such price, they cost what input does)."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    per_request: Decimal = Decimal(0)
    cache_write_per_mtok: Decimal | None = None
    cache_write_1h_per_mtok: Decimal | None = None

    def nano_usd(
        self, input_tokens: int, output_tokens: int, cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0
    ) -> int:
        """The price in nano-dollars, rounded up; cache writes are part of ``input_tokens`` and 1-hour
        writes part of ``cache_write_tokens`` (as genai-prices counts them)."""
        exact = EXACT  # never the caller's decimal context (which may round, and round down)
        usd_per_mtok = exact.add(
            exact.multiply(input_tokens - cache_write_tokens, self.input_per_mtok),
            exact.multiply(output_tokens, self.output_per_mtok),
        )
        if cache_write_tokens:
            five_minute = self.cache_write_per_mtok if self.cache_write_per_mtok is not None else self.input_per_mtok
            one_hour = self.cache_write_1h_per_mtok if self.cache_write_1h_per_mtok is not None else five_minute
            usd_per_mtok = exact.add(
                usd_per_mtok,
                exact.add(
                    exact.multiply(cache_write_tokens - cache_write_1h_tokens, five_minute),
                    exact.multiply(cache_write_1h_tokens, one_hour),
                ),
            )
        usd = exact.multiply(usd_per_mtok, _NANO_PER_MTOK)
        if self.per_request:
            usd = exact.add(usd, exact.multiply(self.per_request, USD_SCALE))
        return int(usd.to_integral_value(rounding=ROUND_CEILING))


def _nano(usd: Any) -> int:
    """USD (genai-prices' Decimal) in nano-dollars, rounded up."""
    return int(EXACT.multiply(Decimal(usd), USD_SCALE).to_integral_value(rounding=ROUND_CEILING))


_lock = threading.Lock()
# Registered prices by (provider, model) as given (the provider stripped and lower-cased, as
# genai-prices reads it), and by the model's name lower-cased too: genai-prices matches a model it
# knows whatever its case, so an override of ``gpt-4o`` must price ``GPT-4o`` (the exact name first:
# two custom models told apart by case keep their own prices).
_custom: dict[tuple[str | None, str], ModelRate] = {}
_custom_folded: dict[tuple[str | None, str], ModelRate] = {}
_fallback: ModelRate | None = None
_generation = 0  # +1 by every register_price / set_fallback_price: a lookup begun before must not cache
# (provider, model, service tier, kinds of tokens) -> (its flat rate, or None when priced call by
# call; until when, in epoch seconds, it applies; the moment it was looked up, at which a
# call-by-call price is computed)
_RateKey = tuple[str | None, str, str | None, tuple[str, ...]]  # (provider, model, tier, kinds)
_rates: dict[_RateKey, tuple[ModelRate | None, float, datetime | None]] = {}
_clock = _time.time  # (a name of this module's: tests move it)
_MAX_RATES = 4096  # models cached (with a fallback price, model names from user input are all priced)


_TIER = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def check_service_tier(tier: object) -> None:
    """A service tier is a short lower-case name (``priority``, ``flex``, ``fast``), or ``None``."""
    if tier is not None and not (isinstance(tier, str) and _TIER.fullmatch(tier)):
        raise InvalidRequest(f"service_tier must be a tier name such as 'priority' ([a-z0-9_-], 1-32), got {tier!r}")


def modalities_of(modalities: object) -> tuple[str, ...]:
    """``modalities`` checked (a sequence of ``audio``, ``image``, ``video``), sorted, without repeats."""
    if isinstance(modalities, str) or not isinstance(modalities, Sequence | frozenset | set):
        raise InvalidRequest(f"modalities must be a sequence of {', '.join(MODALITIES)}, got {modalities!r}")
    unknown = [kind for kind in modalities if kind not in MODALITIES]
    if unknown:
        raise InvalidRequest(f"modalities must be among {', '.join(MODALITIES)}, got {unknown[0]!r}")
    return tuple(sorted(set(modalities)))


def _price(name: str, value: Any) -> Decimal:
    """A price in USD per million tokens: a finite, non-negative number (``InvalidRequest`` if not)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        price = Decimal(str(value))
    except (ArithmeticError, ValueError, TypeError):
        raise InvalidRequest(f"{name} must be a number of USD per million tokens, got {value!r}") from None
    if not price.is_finite() or price < 0:
        raise InvalidRequest(f"{name} must be finite and non-negative, got {value!r}")
    if price > MAX_AMOUNT:  # (one token would cost more than any amount the ledger holds: 1e99999 hung)
        raise InvalidRequest(f"{name} exceeds the largest supported price ({MAX_AMOUNT} USD per million tokens)")
    return price


def _provider_key(provider: str | None) -> str | None:
    return provider.strip().lower() if provider is not None else None


def _custom_rate(provider: str | None, model: str) -> ModelRate | None:
    """The price registered for ``model`` of ``provider`` (normalised) if any: its exact name's,
    else the one whose name differs only in case."""
    return _custom.get((provider, model)) or _custom_folded.get((provider, model.lower()))


def register_price(
    model: str,
    input_per_mtok: Any,
    output_per_mtok: Any,
    *,
    provider: str | None = None,
    cache_write_per_mtok: Any | None = None,
    cache_write_1h_per_mtok: Any | None = None,
) -> None:
    """Price a model genai-prices does not know (or override one), in USD per million tokens;
    prompt-cache writes (5-minute, 1-hour) at their own rates if given, else at the input rate (an
    override of a model whose writes cost more than its input should give them)."""
    if not isinstance(model, str) or not model or not (provider is None or isinstance(provider, str)):
        raise InvalidRequest("register_price needs a model name (and, optionally, a provider name)")
    given = (("cache_write_per_mtok", cache_write_per_mtok), ("cache_write_1h_per_mtok", cache_write_1h_per_mtok))
    writes = [None if value is None else _price(name, value) for name, value in given]
    rate = ModelRate(
        _price("input_per_mtok", input_per_mtok), _price("output_per_mtok", output_per_mtok), Decimal(0), *writes
    )
    global _generation  # noqa: PLW0603 - process-wide configuration by design
    provider = _provider_key(provider)
    with _lock:
        _custom[(provider, model)] = rate
        _custom_folded[(provider, model.lower())] = rate
        _generation += 1
        _rates.clear()


def set_fallback_price(input_per_mtok: Any | None, output_per_mtok: Any | None = None) -> None:
    """Price unknown models at this rate instead of raising ``InvalidRequest``; ``None`` turns it off."""
    global _fallback, _generation  # noqa: PLW0603 - process-wide configuration by design
    rate = None
    if input_per_mtok is not None:
        given = _price("input_per_mtok", input_per_mtok)
        # (None: the input price for output too; 0 is a price like any other)
        rate = ModelRate(given, given if output_per_mtok is None else _price("output_per_mtok", output_per_mtok))
    with _lock:
        _fallback = rate
        _generation += 1
        _rates.clear()


def _next_change(prices: Any, at: datetime) -> float:
    """When the price of a model that applies at ``at`` may next change (epoch seconds; ``inf`` for
    a model with one price): its next start date, or the next start or end of an off-peak window."""
    if not isinstance(prices, list):
        return math.inf
    changes: list[datetime] = []
    for conditional in prices:
        constraint = getattr(conditional, "constraint", None)
        start_date = getattr(constraint, "start_date", None)
        if start_date is not None:
            changes.append(datetime.combine(start_date, time(0), tzinfo=UTC))
        for moment in (getattr(constraint, "start_time", None), getattr(constraint, "end_time", None)):
            if isinstance(moment, time):
                # The next time of day after ``at`` (its offset can put it on the day before or after);
                # genai-prices reads naive times as UTC.
                aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
                changes.extend(datetime.combine(at.date() + timedelta(days=d), aware) for d in (-1, 0, 1, 2))
    after = [change for change in changes if change > at]
    return min(after).timestamp() if after else math.inf


def _store_rate(
    key: _RateKey, entry: tuple[ModelRate | None, float, datetime | None], generation: int
) -> tuple[ModelRate | None, float, datetime | None]:
    with _lock:
        if generation != _generation:  # a price was registered meanwhile: this lookup may predate it
            return entry
        if len(_rates) >= _MAX_RATES:
            _rates.clear()
        _rates[key] = entry
    return entry


_GENAI_CACHE_LIMIT = 8192


def _trim_genai_caches() -> None:
    """genai-prices keeps every model name it is asked about, found or not, for good (its snapshot's
    look-up caches): with names from user input (a fine-tune per tenant) that is ~440 bytes a name
    without end. Past a bound they are emptied — caches only: the next look-ups fill them again
    (its code only gets, tests and adds, so emptying one under another thread is safe)."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    for name in ("_lookup_cache", "_provider_cache", "_provider_misses"):
        cache = getattr(snapshot, name, None)
        if isinstance(cache, dict | set) and len(cache) > _GENAI_CACHE_LIMIT:
            cache.clear()


def _context(tier: str | None) -> dict[str, str] | None:
    """genai-prices' price context of a call: its service tier, which picks the model's price
    variant — OpenAI's and Google's ``service_tier`` (``priority``, ``flex``), Anthropic's ``speed``
    (``fast``: passed as ``service_tier`` alone, a fast Opus call was held at half its price)."""
    return None if tier is None else {"service_tier": tier, "speed": tier}


def _lookup(
    provider: str | None, model: str, tier: str | None = None, kinds: tuple[str, ...] = ()
) -> tuple[ModelRate | None, float, datetime | None]:
    """Flat rate of a model (``None`` when its prices are tiered: use :func:`_tiered`) at a service
    ``tier`` for tokens that may be of the ``kinds`` besides text, until when it applies (epoch
    seconds), and the moment it was looked up (a tiered model is priced at it)."""
    key = (provider, model, tier, kinds)
    entry = _rates.get(key)
    now = _clock()
    # (within its period both ways: a clock stepped back before ``at`` is in another period)
    if entry is not None and now < entry[1] and (entry[2] is None or entry[2].timestamp() <= now):
        return entry
    generation = _generation
    provider_key = _provider_key(provider)
    custom = _custom_rate(provider_key, model) or _custom_rate(None, model)
    if custom is not None:
        return _store_rate(key, (custom, math.inf, None), generation)
    from genai_prices import Usage, calc_price  # imported on first use: keeps `import clearance` light

    at = datetime.fromtimestamp(_clock(), UTC)  # (one clock: the one a cached rate is judged by)
    try:
        with localcontext(_GENAI_CONTEXT):
            usage = Usage(input_tokens=1, output_tokens=1)
            calc = calc_price(
                usage, model_ref=model, provider_id=provider, genai_request_timestamp=at, price_context=_context(tier)
            )
    except LookupError:
        _trim_genai_caches()
        fallback = _fallback
        if fallback is not None:
            return _store_rate(key, (fallback, math.inf, None), generation)
        raise InvalidRequest(
            f"no price known for model {model!r}"
            + (f" of provider {provider!r}" if provider else "")
            + "; register one with clearance.pricing.register_price() or set_fallback_price()"
        ) from None
    _trim_genai_caches()
    # An override for the provider and model genai-prices resolved the names to (no provider given,
    # an alias, a routed name such as litellm's "anthropic/claude-sonnet-4-5").
    resolved = (
        _custom_rate(calc.provider.id, model)
        or _custom_rate(calc.provider.id, calc.model.id)
        or _custom_rate(None, calc.model.id)
    )
    if resolved is not None:
        return _store_rate(key, (resolved, math.inf, None), generation)
    price = calc.model_price
    if (price.input_mtok is None and price.output_mtok is None) or any(
        name.endswith(_NOT_TOKENS) for name, value in vars(price).items() if value is not None
    ):
        # Priced by audio hours, characters or pages, wholly (whisper, tts, OCR: genai-prices
        # answers $0 for tokens, and the call was held as free) or in part (a realtime voice
        # model's $4.8 per audio hour: held 0.01 of 4.81). Not a price tokens can express.
        if _fallback is not None:
            return _store_rate(key, (_fallback, math.inf, None), generation)
        raise InvalidRequest(
            f"model {model!r}" + (f" of provider {provider!r}" if provider else "") + " is not priced by tokens "
            f"alone ({price}); register a token price with clearance.pricing.register_price() or "
            "set_fallback_price()"
        )
    rate: ModelRate | None = None
    cache_writes = (getattr(price, "cache_write_mtok", None), getattr(price, "cache_write_1h_mtok", None))
    if (
        isinstance(price.input_mtok, Decimal | int)
        and isinstance(price.output_mtok, Decimal | int | None)
        and all(isinstance(write, Decimal | int | None) for write in cache_writes)
    ):
        fee = getattr(price, "requests_kcount", None)  # USD per 1,000 requests (perplexity's sonar)
        per_request = EXACT.divide(Decimal(fee), Decimal(1000)) if isinstance(fee, Decimal | int) else Decimal(0)
        five_minute, one_hour = (None if write is None else Decimal(write) for write in cache_writes)
        rate = ModelRate(Decimal(price.input_mtok), Decimal(price.output_mtok or 0), per_request, five_minute, one_hour)
        if rate.nano_usd(1, 1) != _nano(calc.total_price) or rate.nano_usd(*_CACHE_PROBE) != _calc_nano(
            provider, model, *_CACHE_PROBE, at=at, tier=tier
        ):
            rate = None  # a charge the flat rate does not carry: priced exactly, call by call
        read = getattr(price, "cache_read_mtok", None)
        if rate is not None and isinstance(read, Decimal | int) and read > rate.input_per_mtok:
            # A cache read that costs more than input (OpenRouter's deepseek-pro): input tokens the
            # provider may serve from its cache are held at the dearer of the two.
            rate = dataclasses.replace(rate, input_per_mtok=Decimal(read))
        if rate is not None and kinds:
            rate = _dearest(rate, price, kinds)
    return _store_rate(key, (rate, _next_change(calc.model.prices, at), at), generation)


_NOT_TOKENS = ("_hours", "_mchars", "_kpages", "_gpixels")
"""genai-prices' price keys of units no token count says (durations, characters, pages, pixels)."""

MODALITIES = ("audio", "image", "video")
"""Kinds of tokens besides text a model call may send or receive (genai-prices prices each)."""


def _dearest(rate: ModelRate, price: Any, kinds: tuple[str, ...]) -> ModelRate | None:
    """``rate`` with each input and output token at the dearest of text and ``kinds`` (an audio
    call's tokens may all be audio: gpt-realtime's cost 4x its text), or ``None`` when a kind's
    price is tiered (then priced call by call)."""
    inputs = [rate.input_per_mtok]
    outputs = [rate.output_per_mtok]
    for kind in kinds:
        for prices, names in (
            (inputs, (f"input_{kind}_mtok", f"cache_{kind}_read_mtok")),
            (outputs, (f"output_{kind}_mtok",)),
        ):
            for name in names:
                value = getattr(price, name, None)
                if isinstance(value, Decimal | int):
                    prices.append(Decimal(value))
                elif value is not None:
                    return None
    return dataclasses.replace(rate, input_per_mtok=max(inputs), output_per_mtok=max(outputs))


# Token counts whose price, compared with genai-prices' own, tells whether a model's cache writes
# are priced by its flat rate (input, output, cache writes of which 1-hour ones).
_CACHE_PROBE = (7, 1, 3, 1)


def _calc_nano(
    provider: str | None,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    *,
    at: datetime | None = None,
    tier: str | None = None,
    kinds: tuple[str, ...] = (),
) -> int:
    """genai-prices' price of a call in nano-dollars, rounded up (computed, ~80 µs): its input
    at the dearest of plain input and cache reads, and for tokens that may be of ``kinds``, each
    direction at the dearest of text and those kinds."""
    from genai_prices import Usage, calc_price

    counts = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    if cache_write_tokens:  # (genai-prices refuses 1-hour writes without the writes they are part of)
        counts.update(cache_write_tokens=cache_write_tokens, cache_write_1h_tokens=cache_write_1h_tokens)
    with localcontext(_GENAI_CONTEXT):  # genai-prices computes in the current context: never the caller's
        where = {"model_ref": model, "provider_id": provider, "genai_request_timestamp": at}
        calc = calc_price(Usage(**counts), **where, price_context=_context(tier))  # type: ignore[arg-type]
        price = calc.total_price
        plain = input_tokens - cache_write_tokens
        read = getattr(calc.model_price, "cache_read_mtok", None)
        if read is not None and plain:  # "may read", as for the flat rate
            reading = calc_price(
                Usage(**counts, cache_read_tokens=plain), **where, price_context=_context(tier)  # type: ignore[arg-type]
            )
            price = max(price, reading.total_price)
        extra_in = extra_out = Decimal(0)
        for kind in kinds:  # (each direction at its dearest kind: the two may differ)
            of_kind = {f"input_{kind}_tokens": plain, f"output_{kind}_tokens": output_tokens}
            other = calc_price(Usage(**counts, **of_kind), **where, price_context=_context(tier))  # type: ignore[arg-type]
            extra_in = max(extra_in, other.input_price - calc.input_price)
            extra_out = max(extra_out, other.output_price - calc.output_price)
        price += extra_in + extra_out
    return _nano(price)


@lru_cache(maxsize=4096)
def _tiered(
    provider: str | None,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_write_tokens: int,
    cache_write_1h_tokens: int,
    at: datetime | None,
    tier: str | None,
    kinds: tuple[str, ...],
) -> int:
    """The exact price of a tiered model's call at ``at``, a moment of the price period its rate
    entry covers (memoised per entry: every moment of a period has the same prices)."""
    writes = (cache_write_tokens, cache_write_1h_tokens)
    return _calc_nano(provider, model, input_tokens, output_tokens, *writes, at=at, tier=tier, kinds=kinds)


def price_nano_usd(
    provider: str | None,
    model: str,
    input_tokens: int,
    output_tokens: int,
    *,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    service_tier: str | None = None,
    modalities: Sequence[str] = (),
) -> int:
    """Price of a call in nano-dollars (rounded up). ``cache_write_tokens``: how many of the input
    tokens may be written to the provider's prompt cache (priced at its cache-write rate where it
    has one), of which ``cache_write_1h_tokens`` with a one-hour lifetime — genai-prices' counting.
    ``service_tier``: the tier the call asks for (``priority``, ``flex``, ``fast``: the model's price
    variant for it, where genai-prices has one; ``None``: the default tier). ``modalities``: kinds
    of tokens besides text the call may send or receive (``audio``, ``image``, ``video``): each of
    its input and output tokens is priced at the dearest of text and those."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest("a model name is required to price a model call")
    check_service_tier(service_tier)
    kinds = modalities_of(modalities)
    if provider is not None and not isinstance(provider, str):
        raise InvalidRequest(f"provider must be a name or None, got {provider!r}")
    for name, value in (
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cache_write_tokens", cache_write_tokens),
        ("cache_write_1h_tokens", cache_write_1h_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**40:
            raise InvalidRequest(f"{name} must be a non-negative int, got {value!r}")
    if not cache_write_1h_tokens <= cache_write_tokens <= input_tokens:
        raise InvalidRequest(
            "cache writes are part of the input, one-hour ones part of the cache writes: need "
            f"cache_write_1h_tokens ({cache_write_1h_tokens}) <= cache_write_tokens ({cache_write_tokens}) "
            f"<= input_tokens ({input_tokens})"
        )
    rate, _, at = _lookup(provider, model, service_tier, kinds)

    def priced(write: int, write_1h: int) -> int:
        if rate is not None:
            return rate.nano_usd(input_tokens, output_tokens, write, write_1h)
        return _tiered(provider, model, input_tokens, output_tokens, write, write_1h, at, service_tier, kinds)

    if not cache_write_tokens:
        return priced(0, 0)
    # "May write": each kind of write happens or not (tokens not written are plain input), and a
    # write can cost less than input (minimax's highspeed models, OpenRouter's Gemini): the worst.
    five_minute = cache_write_tokens - cache_write_1h_tokens
    return max(
        priced(cache_write_tokens, cache_write_1h_tokens),
        priced(0, 0),
        priced(five_minute, 0),
        priced(cache_write_1h_tokens, cache_write_1h_tokens),
    )


def price_usd(
    provider: str | None,
    model: str,
    input_tokens: int,
    output_tokens: int,
    *,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    service_tier: str | None = None,
    modalities: Sequence[str] = (),
) -> Decimal:
    """Price of a call in USD, as an exact ``Decimal`` (nano-dollar resolution)."""
    prompt = Prompt(input_tokens, cache_write_tokens, cache_write_1h_tokens, service_tier, modalities_of(modalities))
    nano = prompt.nano_usd(provider, model, output_tokens)
    return Decimal(nano).scaleb(-9, EXACT)


_WRITE_KEYS = (("cache_write_tokens", "cache_write"), ("cache_write_1h_tokens", "cache_write_1h"))
"""The metadata keys of a prompt's cache writes (Action.model_call's keyword names)."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """A model call's input as it is priced: its tokens, of which ``cache_write`` may be written to
    the provider's prompt cache, of which ``cache_write_1h`` for an hour (see Action.model_call).
    It travels in the action's metadata (``to_metadata``/``of_metadata``): policies re-price it."""

    tokens: int
    cache_write: int = 0
    cache_write_1h: int = 0
    tier: str | None = None  # the service tier it is sent at (see price_nano_usd)
    kinds: tuple[str, ...] = ()  # kinds of tokens besides text it may carry (see price_nano_usd)

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"input_tokens", "service_tier", "modalities", *(key for key, _ in _WRITE_KEYS)}
    )

    def to_metadata(self) -> dict[str, int | str | tuple[str, ...]]:
        meta: dict[str, int | str | tuple[str, ...]] = {"input_tokens": self.tokens}
        if self.cache_write:
            meta.update({key: getattr(self, name) for key, name in _WRITE_KEYS})
        if self.tier is not None:
            meta["service_tier"] = self.tier
        if self.kinds:
            meta["modalities"] = self.kinds
        return meta

    @classmethod
    def of_metadata(cls, meta: Mapping[str, Any]) -> Prompt | None:
        """The input a model call was priced from (None: not built by Action.model_call)."""
        tokens = meta.get("input_tokens")
        write, write_1h = (meta.get(key, 0) for key, _ in _WRITE_KEYS)
        tier = meta.get("service_tier")
        kinds = meta.get("modalities", ())
        if type(tokens) is not int or type(write) is not int or type(write_1h) is not int:
            return None
        known = tuple(kind for kind in kinds if kind in MODALITIES) if isinstance(kinds, tuple | list) else ()
        return cls(tokens, write, write_1h, tier if isinstance(tier, str) else None, known)

    def cut_to(self, kept: int) -> Prompt:
        """This input cut to ``kept`` tokens (a context cap): it writes at most those to the cache."""
        write = min(self.cache_write, kept)
        return Prompt(kept, write, min(self.cache_write_1h, write), self.tier, self.kinds)

    def nano_usd(self, provider: str | None, model: str, output_tokens: int) -> int:
        return price_nano_usd(
            provider,
            model,
            self.tokens,
            output_tokens,
            cache_write_tokens=self.cache_write,
            cache_write_1h_tokens=self.cache_write_1h,
            service_tier=self.tier,
            modalities=self.kinds,
        )
