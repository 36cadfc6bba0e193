"""Token usage → USD, from genai-prices' maintained price table.

genai-prices works offline from its bundled table, but one ``calc_price`` costs ~80 µs, so the
per-token rates of a model are looked up once and cached; a flat-rate model is then priced with two
integer multiplications. Models with tiered prices (e.g. long-context surcharges) fall back to
``calc_price`` for the exact token counts, memoised.

Prices are in nano-dollars per token, kept as ``Decimal`` so sub-nano rates stay exact until the
final round-up.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from decimal import ROUND_CEILING, Context, Decimal, localcontext
from functools import lru_cache
from typing import Any

from clearance.errors import InvalidRequest
from clearance.units import EXACT, USD_SCALE

# genai-prices does its Decimal arithmetic in the current context; a caller's (say prec=6, or traps
# on) must not round or break a price, so its calls run in this one (Python's defaults, more digits).
_GENAI_CONTEXT = Context(prec=100)
_NANO_PER_MTOK = EXACT.divide(Decimal(USD_SCALE), Decimal(1_000_000))


@dataclass(frozen=True, slots=True)
class ModelRate:
    """USD per million tokens for one model (input, output)."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal

    def nano_usd(self, input_tokens: int, output_tokens: int) -> int:
        exact = EXACT  # never the caller's decimal context (which may round, and round down)
        usd_per_mtok = exact.add(
            exact.multiply(input_tokens, self.input_per_mtok), exact.multiply(output_tokens, self.output_per_mtok)
        )
        return int(exact.multiply(usd_per_mtok, _NANO_PER_MTOK).to_integral_value(rounding=ROUND_CEILING))


_lock = threading.Lock()
_custom: dict[tuple[str | None, str], ModelRate] = {}
_fallback: ModelRate | None = None
_rates: dict[tuple[str | None, str], ModelRate | None] = {}


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
    return price


def register_price(model: str, input_per_mtok: Any, output_per_mtok: Any, *, provider: str | None = None) -> None:
    """Price a model genai-prices does not know (or override one), in USD per million tokens."""
    if not isinstance(model, str) or not model or not (provider is None or isinstance(provider, str)):
        raise InvalidRequest("register_price needs a model name (and, optionally, a provider name)")
    rate = ModelRate(_price("input_per_mtok", input_per_mtok), _price("output_per_mtok", output_per_mtok))
    with _lock:
        _custom[(provider, model)] = rate
        _rates.clear()


def set_fallback_price(input_per_mtok: Any | None, output_per_mtok: Any | None = None) -> None:
    """Price unknown models at this rate instead of raising ``InvalidRequest``; ``None`` turns it off."""
    global _fallback  # noqa: PLW0603 - process-wide configuration by design
    rate = None
    if input_per_mtok is not None:
        given = _price("input_per_mtok", input_per_mtok)
        # (None: the input price for output too; 0 is a price like any other)
        rate = ModelRate(given, given if output_per_mtok is None else _price("output_per_mtok", output_per_mtok))
    with _lock:
        _fallback = rate
        _rates.clear()


def _lookup(provider: str | None, model: str) -> ModelRate | None:
    """Flat rate of a model, or ``None`` when its prices are tiered (use :func:`_tiered`)."""
    key = (provider, model)
    if key in _rates:
        return _rates[key]
    custom = _custom.get(key) or _custom.get((None, model))
    if custom is not None:
        _rates[key] = custom
        return custom
    from genai_prices import Usage, calc_price  # imported on first use: keeps `import clearance` light

    try:
        with localcontext(_GENAI_CONTEXT):
            calc = calc_price(Usage(input_tokens=1, output_tokens=1), model_ref=model, provider_id=provider)
    except LookupError:
        if _fallback is not None:
            _rates[key] = _fallback
            return _fallback
        raise InvalidRequest(
            f"no price known for model {model!r}"
            + (f" of provider {provider!r}" if provider else "")
            + "; register one with clearance.pricing.register_price() or set_fallback_price()"
        ) from None
    price = calc.model_price
    rate: ModelRate | None = None
    if isinstance(price.input_mtok, Decimal | int) and isinstance(price.output_mtok, Decimal | int | None):
        rate = ModelRate(Decimal(price.input_mtok), Decimal(price.output_mtok or 0))
    _rates[key] = rate
    return rate


@lru_cache(maxsize=4096)
def _tiered(provider: str | None, model: str, input_tokens: int, output_tokens: int) -> int:
    from genai_prices import Usage, calc_price

    with localcontext(_GENAI_CONTEXT):  # genai-prices computes in the current context: never the caller's
        calc = calc_price(
            Usage(input_tokens=input_tokens, output_tokens=output_tokens), model_ref=model, provider_id=provider
        )
    return int(EXACT.multiply(Decimal(calc.total_price), USD_SCALE).to_integral_value(rounding=ROUND_CEILING))


def price_nano_usd(provider: str | None, model: str, input_tokens: int, output_tokens: int) -> int:
    """Price of a call in nano-dollars (rounded up)."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest("a model name is required to price a model call")
    if provider is not None and not isinstance(provider, str):
        raise InvalidRequest(f"provider must be a name or None, got {provider!r}")
    for name, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**40:
            raise InvalidRequest(f"{name} must be a non-negative int, got {value!r}")
    rate = _lookup(provider, model)
    if rate is not None:
        return rate.nano_usd(input_tokens, output_tokens)
    return _tiered(provider, model, input_tokens, output_tokens)


def price_usd(provider: str | None, model: str, input_tokens: int, output_tokens: int) -> Decimal:
    """Price of a call in USD, as an exact ``Decimal`` (nano-dollar resolution)."""
    return Decimal(price_nano_usd(provider, model, input_tokens, output_tokens)).scaleb(-9, EXACT)
