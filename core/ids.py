"""Random reservation ids without a system call each.

A reservation id starts with 20 random hex digits (80 bits from the OS's CSPRNG): that is what makes it
unguessable and never repeated. ``os.urandom`` is one ``getrandom`` system call per id, one of the
few a lifecycle makes on the embedded stores, and a tenth of the system calls of a lifecycle on Redis.
So each thread draws 4 KiB at a time and hands out slices of it: the same bytes, from the same source.
A thread's first draw is small (64 bytes): a short-lived thread, or a greenlet where gevent makes
thread-locals per greenlet, makes an id or two, and 4 KiB costs ~14 µs to draw and turn into hex.

Two processes must never hand out the same bytes: a child forked while its parent's thread held
undrawn bytes would repeat the parent's next ids. Only the forking thread lives on in the child, so
emptying that thread's pool there (``os.register_at_fork``) makes the child draw afresh.
"""

from __future__ import annotations

import os
import threading

_FIRST_DRAW = 64  # bytes: 6 ids of 10 bytes
_DRAW = 4096  # bytes per system call after that: 409 ids


class _Pool(threading.local):
    """One thread's undrawn random bytes, as hex digits."""

    def __init__(self) -> None:
        self.digits = ""
        self.at = 0
        self.draw = _FIRST_DRAW


_pool = _Pool()


def _empty() -> None:
    _pool.digits = ""
    _pool.at = 0


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_empty)


def random_hex(digits: int) -> str:
    """``digits`` (even) random hex digits from the OS's CSPRNG."""
    pool = _pool
    at = pool.at
    end = at + digits
    if end > len(pool.digits):
        pool.digits = os.urandom(max(pool.draw, digits // 2)).hex()
        pool.draw = _DRAW
        at, end = 0, digits
    pool.at = end
    return pool.digits[at:end]
