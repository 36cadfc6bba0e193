"""Budget periods and their UTC calendar windows.

A period budget counts each window on its own: ``day`` windows start at 00:00 UTC, ``week``
windows on Monday 00:00 UTC (ISO weeks), ``month`` windows on the 1st. A hold is settled in the
window it was made in, so the store keeps the window ids it reserved against. Window ids are
computed here, once per minute, and handed to the stores as plain strings (the Redis store's Lua
has no calendar).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from clearance.errors import InvalidRequest


class Period(StrEnum):
    """A budget's calendar period; ``None`` on a budget means lifetime."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


LIFETIME = ""
"""The period key of a budget without a period (its single window is also ``""``)."""

ALL_PERIODS: tuple[str, ...] = (LIFETIME, *(p.value for p in Period))

WINDOWS_KEPT = 8
"""Windows a period budget keeps counters for: its 8 latest, on every store (the Redis scripts'
``KEEP_WINDOWS``); older ones go unless something is still held in them."""

Windows = tuple[tuple[str, str], ...]
"""``((period, window_id), ...)`` for every period, lifetime first."""


def period_key(period: Period | str | None) -> str:
    """Normalise a user period (``None`` or ``"lifetime"``, ``"day"``, ``Period.DAY``) to its store key."""
    if period is None or period in (LIFETIME, "lifetime"):
        return LIFETIME
    try:
        return Period(period).value
    except ValueError:
        raise InvalidRequest(
            f"invalid period {period!r}: expected one of {', '.join(p.value for p in Period)}, "
            "or lifetime (None)"
        ) from None


def windows_at(now: float) -> Windows:
    """The window id of every period at ``now`` (epoch seconds, UTC)."""
    global _cache  # noqa: PLW0603 - a one-entry cache; races only recompute the same value
    minute = int(now // 60)
    cached_minute, cached = _cache
    if minute == cached_minute:
        return cached
    result = _windows_of_minute(minute)
    _cache = (minute, result)
    return result


def window_at(now: float, period: str) -> str:
    """The window id of ``period`` at ``now``, bypassing ``windows_at``'s cache (which holds the
    current minute for the hot path): for looking at other times."""
    return window_of(_windows_of_minute(int(now // 60)), period)


_SECONDS = {"minute": 60, "hour": 3600, "day": 86400, "week": 604800}


def window_back(now: float, period: str, count: int) -> str:
    """The id of the window ``count`` windows before ``period``'s window at ``now`` (months by the
    calendar): the oldest of the ``count + 1`` latest. ``""`` for lifetime."""
    if period == LIFETIME:
        return ""
    if period == "month":
        t = datetime.fromtimestamp(int(now // 60) * 60, UTC)
        months = t.year * 12 + t.month - 1 - count
        return f"{months // 12:04d}-{months % 12 + 1:02d}"
    return window_at(now - count * _SECONDS[period], period)


def _windows_of_minute(minute: int) -> Windows:
    t = datetime.fromtimestamp(minute * 60, UTC)
    iso_year, iso_week, _ = t.isocalendar()
    return (
        (LIFETIME, ""),
        ("minute", t.strftime("%Y-%m-%dT%H:%M")),
        ("hour", t.strftime("%Y-%m-%dT%H")),
        ("day", t.strftime("%Y-%m-%d")),
        ("week", f"{iso_year:04d}-W{iso_week:02d}"),
        ("month", t.strftime("%Y-%m")),
    )


_cache: tuple[int, Windows] = (-1, _windows_of_minute(-1))  # (a real entry: minute -1 is a time too)


def window_of(windows: Windows, period: str) -> str:
    for key, window in windows:
        if key == period:
            return window
    raise InvalidRequest(f"no window for period {period!r}")
