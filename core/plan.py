"""Plans and caps: the concrete ways an action may be performed.

A policy (or the caller) turns an :class:`~clearance.Action` into an ordered list of plans, best
first; ``reserve`` atomically holds the first one that fits every budget. A plan's ``caps`` tell the
adapter what changed compared with the request: another model, fewer output tokens, fewer tools,
or "skip this optional step".
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache
from typing import Any

from pydantic import Field, field_validator

from clearance._model import InputModel
from clearance.errors import InvalidRequest
from clearance.units import EXACT, MAX_AMOUNT, check_unit, from_step_map, from_steps, to_step_map

_KIND_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


class Caps(InputModel):
    """What a degraded plan changes. Every field left at its default means "as requested".

    >>> Caps(model="gpt-4.1-mini", max_output_tokens=300)
    Caps(model='gpt-4.1-mini', max_output_tokens=300)
    """

    model: str | None = Field(default=None, max_length=256)
    max_output_tokens: int | None = Field(default=None, ge=0)
    max_input_tokens: int | None = Field(default=None, ge=0)
    disabled_tools: tuple[str, ...] = ()
    max_tool_calls: int | None = Field(default=None, ge=0)
    skip_optional: bool = False

    @property
    def is_empty(self) -> bool:
        """True when the caps change nothing."""
        return self == _NO_CAPS

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self if v != Caps.model_fields[k].default)
        return f"Caps({fields})"


_NO_CAPS = Caps()


class Plan(InputModel):
    """One way to perform an action: the amounts to hold, the caps it implies, and the headroom
    it demands.

    ``min_headroom`` is a fraction of a budget's limit that must *remain* after this plan's hold:
    a number applies to every budgeted level; a mapping applies per scope kind, e.g.
    ``{"workflow": 0.25}`` = "only while at least 25% of the workflow budget would remain"; the key
    ``"*"`` covers every level not named.
    """

    amounts: dict[str, Decimal]
    caps: Caps | None = None
    min_headroom: float | dict[str, float] = 0.0
    rule: str | None = Field(default=None, max_length=200)
    """Which rule produced this plan (``ladder:gpt-4.1-mini``, ``optional:skip``…), for the decision's reasons."""
    steps: tuple[tuple[str, int], ...] = Field(default=(), exclude=True, repr=False)
    """The amounts in exact integer steps (see :mod:`clearance.units`), as the stores take them."""

    def __init__(
        self,
        amounts: Mapping[str, Any] | None = None,
        caps: Caps | None = None,
        min_headroom: float | Mapping[str, float] = 0.0,
        rule: str | None = None,
    ) -> None:
        steps = to_step_map(amounts, "plan amounts")
        super().__init__(
            amounts=from_step_map(steps),
            caps=caps,
            min_headroom=dict(min_headroom) if isinstance(min_headroom, Mapping) else min_headroom,
            rule=rule,
            steps=tuple(steps.items()),
        )

    @classmethod
    def of_steps(
        cls,
        steps: Mapping[str, int],
        caps: Caps | None = None,
        min_headroom: float | Mapping[str, float] = 0.0,
        rule: str | None = None,
    ) -> Plan:
        """A plan from amounts already in integer steps (policies build plans this way: several per
        model call). Checked as :class:`Plan` checks them, without reading the amounts back from
        decimals; anything unusual takes the general constructor (and its errors)."""
        headroom = _plain_headroom(min_headroom)
        if (
            headroom is not None
            and type(steps) is dict
            and len(steps) <= 64
            and (caps is None or type(caps) is Caps)
            and (rule is None or (type(rule) is str and len(rule) <= 200))
            and all(type(n) is int and 0 <= n <= MAX_AMOUNT and check_unit(unit) for unit, n in steps.items())
        ):
            return cls.model_construct(
                amounts=from_step_map(steps), caps=caps, min_headroom=headroom, rule=rule, steps=tuple(steps.items())
            )
        return cls({unit: from_steps(unit, n) for unit, n in steps.items()}, caps, min_headroom, rule)

    @field_validator("min_headroom", mode="before")
    @classmethod
    def _no_bools(cls, value: object) -> object:
        return no_boolean_fractions(value)

    @field_validator("min_headroom")
    @classmethod
    def _check_headroom(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        fractions = value.values() if isinstance(value, dict) else (value,)
        for fraction in fractions:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError("min_headroom must be a fraction between 0 and 1")
        if isinstance(value, dict):
            for kind in value:
                if kind != "*" and (not kind or not set(kind) <= _KIND_CHARS):
                    raise ValueError(f"min_headroom key {kind!r} is not a scope kind (or '*' for every level)")
        return value

    def headroom_ppm(self, kinds: tuple[str, ...]) -> tuple[int, ...]:
        """The required remaining fraction per chain level, in parts per million."""
        value = self.min_headroom
        if not value:
            return _zeros(len(kinds))
        if isinstance(value, dict):
            required = {kind: ppm_of(fraction) for kind, fraction in value.items()}
            default = required.get("*", 0)
            return tuple(required.get(kind, default) for kind in kinds)
        ppm = ppm_of(value)
        return (ppm,) * len(kinds)


def no_boolean_fractions(value: object) -> object:
    """``value`` (a ``min_headroom``), refused if it is or holds a boolean: ``True`` is not a
    fraction (pydantic would read it as 1.0: nothing may ever be spent, a rung never chosen)."""
    values = value.values() if isinstance(value, Mapping) else (value,)
    if any(isinstance(fraction, bool) for fraction in values):
        raise ValueError("min_headroom must be a fraction between 0 and 1, not a boolean")
    return value


def _plain_headroom(value: object) -> float | dict[str, float] | None:
    """``min_headroom`` as a validated Plan holds it, when it is plainly valid (a fraction, or a
    mapping of scope kinds — or ``*`` — to fractions); ``None`` for anything else."""
    if type(value) is float or type(value) is int:
        return float(value) if 0 <= value <= 1 else None
    if type(value) is dict:
        for kind, fraction in value.items():
            if not (type(fraction) is float or type(fraction) is int) or not 0 <= fraction <= 1:
                return None
            if type(kind) is not str or (kind != "*" and (not kind or not set(kind) <= _KIND_CHARS)):
                return None
        return {kind: float(fraction) for kind, fraction in value.items()}
    return None


@lru_cache(maxsize=1024)
def ppm_of(fraction: float) -> int:
    """A headroom fraction in whole parts per million, rounded up, exactly: a demand is never
    weakened (rounded to nearest, 2.5e-6 kept 2 ppm and 4e-7 none at all)."""
    exact = EXACT.multiply(Decimal(float.__repr__(float(fraction))), Decimal(1_000_000))
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


_ZEROS = tuple((0,) * n for n in range(17))


def _zeros(depth: int) -> tuple[int, ...]:
    """No headroom demanded at any of ``depth`` levels (shared tuples: this is on the hot path)."""
    return _ZEROS[depth] if depth < len(_ZEROS) else (0,) * depth


MAX_PLANS = 16
"""The most plans one reserve may carry."""


def check_plans(plans: object) -> tuple[Plan, ...]:
    if not isinstance(plans, list | tuple) or not plans:
        raise InvalidRequest("plans must be a non-empty list of Plan")
    if len(plans) > MAX_PLANS:
        raise InvalidRequest(f"at most {MAX_PLANS} plans per reservation")
    for plan in plans:
        if not isinstance(plan, Plan):
            raise InvalidRequest(f"plans must contain Plan objects, got {type(plan).__name__}")
    return tuple(plans)
