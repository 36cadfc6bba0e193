"""Random reservation ids without a system call each.

A reservation id starts with 20 random hex digits (80 bits from the OS's CSPRNG): that is what makes it
unguessable and never repeated. ``os.urandom`` is one ``getrandom`` system call per id, one of the
few a lifecycle makes on the embedded stores, and a tenth of the system calls of a lifecycle on Redis.
So the process draws 4 KiB at a time, cuts it into ids, and hands them out: the same bytes, from the
same source. ``list.pop`` is atomic, so threads (and greenlets) never get the same one, with no lock
and no thread-local (whose attribute lookups cost more than the system call saved); two threads
refilling at once only draw twice.

Two processes must never hand out the same ids: a child forked with ids left in the list would
repeat its parent's next ones, so the list is emptied in the child (``os.register_at_fork``).
"""

from __future__ import annotations

import os

_DRAW = 4090  # bytes per system call: 409 ids of 10 bytes
_ID_BYTES = 10

_ids: list[str] = []


def _refill() -> None:
    digits = os.urandom(_DRAW).hex()
    step = 2 * _ID_BYTES
    _ids.extend([digits[i : i + step] for i in range(0, len(digits) - step + 1, step)])


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_ids.clear)


def random_id() -> str:
    """20 random hex digits (10 bytes) from the OS's CSPRNG."""
    while True:
        try:
            return _ids.pop()
        except IndexError:
            _refill()
