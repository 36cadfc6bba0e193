"""Budgets: a limit for one (scope, unit), optionally per UTC calendar period."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import Field

from clearance._model import InputModel
from clearance.periods import Period, period_key
from clearance.scope import parse_scope
from clearance.units import check_unit, from_steps, to_steps


class Budget(InputModel):
    """A limit of ``unit`` for ``scope``; with ``period`` it resets every UTC minute/hour/day/week/month.

    >>> monthly = Budget("tenant:acme", "usd", "250.00", period="month")
    >>> monthly.limit, monthly.period.value
    (Decimal('250'), 'month')

    Several budgets may sit on one scope and unit with different periods (a daily and a monthly
    cap); a level without a budget does not constrain.
    """

    scope: str
    unit: str
    limit: Decimal
    period: Period | None = None
    steps: int = Field(default=0, exclude=True, repr=False)
    """The limit in exact integer steps."""

    def __init__(self, scope: str, unit: str, limit: Any, period: Period | str | None = None) -> None:
        path = parse_scope(scope).path
        check_unit(unit)
        steps = to_steps(unit, limit)
        key = period_key(period)
        super().__init__(
            scope=path, unit=unit, limit=from_steps(unit, steps), period=Period(key) if key else None, steps=steps
        )

    @property
    def period_key(self) -> str:
        return self.period.value if self.period else ""
