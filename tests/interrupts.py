"""Exceptions made to arrive where CPython takes a signal handler's: at a call into clearance, or
right after a C call inside it returns (the tests' stand-in for a step timeout or Ctrl-C)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class Interrupted(BaseException):
    """What a signal handler raises (a step timeout), or Ctrl-C."""


def interrupt_at(point: int, call: Callable[[], object], *, anywhere: bool = False) -> bool:
    """Run ``call()``, raising :class:`Interrupted` at its ``point``-th call or C-call return inside
    clearance (``anywhere``: in any module it calls, the standard library's included, but the
    tests'); whether it got that far (False: ``call`` has fewer points, and ran whole)."""
    seen = 0
    here = os.path.dirname(os.path.abspath(__file__))

    def profile(frame: Any, event: str, arg: object) -> None:
        nonlocal seen
        name = frame.f_code.co_filename
        if event in ("call", "c_return") and (
            "clearance" in name or (anywhere and not os.path.abspath(name).startswith(here))
        ):
            seen += 1
            if seen == point:
                sys.setprofile(None)
                raise Interrupted

    sys.setprofile(profile)
    try:
        call()
    except Interrupted:
        return True
    finally:
        sys.setprofile(None)
    return False
