"""Helpers for users' own test suites: a controllable clock and a ready in-memory Authority.

>>> from clearance.testing import FakeClock, test_authority
>>> clock = FakeClock()
>>> authority = test_authority(clock=clock)
>>> now = clock.advance(61)   # every 60 s hold has now expired
"""

from __future__ import annotations

import math
import threading
from typing import Any

from clearance.authority import Authority

__all__ = ["FakeClock", "test_authority"]


class FakeClock:
    """A clock that only moves when told to; pass it as ``Authority(clock=...)``."""

    def __init__(self, start: float = 1_798_761_600.0) -> None:  # 2027-01-01T00:00:00Z
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds``; returns the new time."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
            raise ValueError(f"a clock only moves forward, by a finite number of seconds: got {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"a time is a finite number of seconds since the epoch: got {now!r}")
        with self._lock:
            self._now = float(now)


def test_authority(**options: Any) -> Authority:
    """An Authority on a fresh in-memory store, for tests (never reads ``CLEARANCE_STORE``)."""
    return Authority("memory://", **options)


test_authority.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name
