"""Units and exact amounts.

The ledger stores every amount as an integer count of the unit's smallest step:

* ``usd`` is kept in **nano-dollars** (1 USD = 10**9). Estimates and actuals with more than nine
  decimals are rounded *up* to the next nano-dollar, so money is never under-counted.
* so is every unit whose name ends in ``.usd`` (``tool.web_search.usd``: money per tool or toolset);
* every other unit (``tokens``, ``calls``, ``emails``, user-defined ones) counts whole steps; a
  fractional amount such as ``1.5`` tokens is an :class:`InvalidRequest`.

The largest amount, limit or balance is ``MAX_AMOUNT = 2**53 - 1`` steps (about 9,007,199 USD,
or 9.0e15 tokens): the Redis store computes in Lua, whose numbers are doubles and exact only up to
2**53, and every store enforces the same bound so that a budget means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from decimal import MAX_EMAX, MIN_EMIN, ROUND_CEILING, Context, Decimal, InvalidOperation

from clearance.errors import InvalidRequest

MAX_AMOUNT = 2**53 - 1
"""Largest amount in smallest steps any store accepts."""

USD_SCALE = 10**9
MAX_UNIT_LENGTH = 128
_UNIT_RE = re.compile(r"[a-z][a-z0-9_.-]{0,127}")
NAME_ROOM = 64
"""The most characters a tool's or toolset's name takes inside a unit."""
_TOKEN_BAD = re.compile(r"[^a-z0-9_-]")
_PLAIN_USD = re.compile(r"([0-9]{1,8})(?:\.([0-9]{1,9}))?")  # at most 9 decimals: nothing to round
# Unit names seen valid -> their scale. Bounded (dynamic tool names make units without end: every
# MCP tool is a `tool.<name>.calls`): emptied when full, and every reader copes with a unit gone.
_known_units: dict[str, int] = {}
_MAX_KNOWN_UNITS = 65_536

# Decimal arithmetic here never uses the caller's context (a program may set ``getcontext().prec = 6``):
# enough digits for any amount the API accepts to scale exactly, any exponent, and rounding up
# where rounding happens at all (a Decimal with more digits than this is rounded up, never down).
EXACT = Context(prec=200, rounding=ROUND_CEILING, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[InvalidOperation])

AmountLike = int | str | Decimal | float
"""What the API accepts for an amount: int, str, Decimal or finite float."""


def check_unit(unit: object) -> str:
    """Return ``unit`` if it is a valid unit name (``[a-z][a-z0-9_.-]{0,127}``), else raise."""
    if isinstance(unit, str):
        if unit in _known_units:
            return unit
        if _UNIT_RE.fullmatch(unit):
            if len(_known_units) >= _MAX_KNOWN_UNITS:
                _known_units.clear()
            _known_units[unit] = scale_of(unit)
            return unit
    raise InvalidRequest(f"invalid unit name {unit!r}: expected [a-z][a-z0-9_.-]{{0,127}}")


def plain_token(name: str) -> str:
    """A name as a unit can hold it: lower case, anything but ``[a-z0-9_-]`` (dots included)
    replaced by ``_`` (``GoogleSearch`` → ``googlesearch``, ``web.search`` → ``web_search``)."""
    return _TOKEN_BAD.sub("_", name.lower()) or "_"


def name_token(name: str) -> str:
    """A tool's or toolset's name as it appears inside a unit: its :func:`plain_token`, and one
    longer than ``NAME_ROOM`` keeps its first 55 characters and ends in ``-`` and 8 hex digits of
    its hash: cutting long names short made tools that share a prefix (MCP tools:
    ``mcp__github__create_pull_request_review_...``) share one counter, and a budget written with
    the whole name never counted anything. (Rate limits keep their names cut: see ``RateLimit.unit``.)"""
    token = plain_token(name)
    if len(token) <= NAME_ROOM:
        return token
    return f"{token[: NAME_ROOM - 9]}-{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def scale_of(unit: str) -> int:
    """How many smallest steps make one ``unit`` (10**9 for ``usd`` and ``*.usd``, else 1)."""
    return USD_SCALE if unit == "usd" or unit.endswith(".usd") else 1


def _as_decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool):
        raise InvalidRequest(f"{what}: a bool is not an amount")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{what}: {value!r} is not a finite amount")
        # repr() gives the shortest string that round-trips, so 0.1 stays 0.1, not 0.1000000000000000055…
        # (float's own: a subclass's may be another text — numpy's float64 is "np.float64(0.1)")
        return Decimal(float.__repr__(value))
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, str):
        if len(value) > 64:
            raise InvalidRequest(f"{what}: amount string too long")
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise InvalidRequest(f"{what}: {value!r} is not a number") from None
    else:
        raise InvalidRequest(f"{what}: {type(value).__name__} is not an amount (use int, str, Decimal or float)")
    if not result.is_finite():
        raise InvalidRequest(f"{what}: {value!r} is not a finite amount")
    return result


def to_steps(unit: str, value: object) -> int:
    """Convert a user amount of ``unit`` into exact integer steps, validating it."""
    scale = _known_units.get(unit) if type(unit) is str else None
    if scale is None:
        scale = scale_of(check_unit(unit))
    if type(value) is int and value >= 0:  # the common case for tokens, calls and whole dollars
        steps = value * scale
        if steps <= MAX_AMOUNT:
            return steps
    kind = type(value)
    if (kind is str or kind is float) and scale != 1:
        # The common cases for money, "0.0071" or 0.0071 (a float's repr is the shortest string that
        # round-trips): exact integer arithmetic, no Decimal context needed. Anything else (an
        # exponent, more than 9 decimals to round up, a sign, nan) takes the general path below.
        plain = _PLAIN_USD.fullmatch(value if kind is str else repr(value))  # type: ignore[call-overload]
    else:
        plain = None
    if plain is not None:
        whole, fraction = plain.groups()
        steps = int(whole) * USD_SCALE + (int(fraction.ljust(9, "0")) if fraction else 0)
        if steps <= MAX_AMOUNT:
            return steps
    d = _as_decimal(value, f"amount of {unit}")
    if d < 0:
        raise InvalidRequest(f"amount of {unit} must not be negative, got {d}")
    if d > MAX_AMOUNT // scale + 1:  # cheap guard before scaling huge exponents
        raise InvalidRequest(f"amount of {unit} {d} exceeds the largest supported amount")
    if scale == 1:
        if d != d.to_integral_value():
            raise InvalidRequest(f"amount of {unit} must be a whole number, got {d}")
        steps = int(d)
    else:
        steps = int(EXACT.multiply(d, scale).to_integral_value(rounding=ROUND_CEILING))
    if steps > MAX_AMOUNT:
        raise InvalidRequest(
            f"amount of {unit} {d} exceeds the largest supported amount ({from_steps(unit, MAX_AMOUNT)})"
        )
    return steps


def to_step_map(amounts: Mapping[str, object] | None, what: str = "amounts") -> dict[str, int]:
    """Convert ``{unit: amount}`` into ``{unit: steps}``; raise on anything malformed."""
    if amounts is None:
        return {}
    if type(amounts) is not dict and not isinstance(amounts, Mapping):  # the ABC check is slow: dicts first
        raise InvalidRequest(f"{what} must be a mapping of unit to amount, got {type(amounts).__name__}")
    if len(amounts) > 64:
        raise InvalidRequest(f"{what}: at most 64 units")
    return {unit: to_steps(unit, value) for unit, value in amounts.items()}


def from_steps(unit: str, steps: int) -> Decimal:
    """Convert integer steps back into a ``Decimal`` amount of ``unit``."""
    scale = scale_of(unit)
    if scale == 1:
        return Decimal(steps)
    # exact (whatever the caller's context), and with the shortest exponent: 7500000 nano → Decimal("0.0075")
    return EXACT.divide(Decimal(steps), scale)


def from_step_map(steps: Mapping[str, int]) -> dict[str, Decimal]:
    """Convert ``{unit: steps}`` back into ``{unit: Decimal}``."""
    return {unit: from_steps(unit, n) for unit, n in steps.items()}
