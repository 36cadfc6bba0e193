"""Lending a redis-py pool's connections to ledger calls, fairly.

Ledger calls keep connections between calls: taking one from redis-py's pool and giving it back
costs ~9 µs a call (locks, metrics), a tenth of a lifecycle's client time. But a kept connection
never passes through the pool, so a caller that found none kept and waited in the pool stayed
there while the kept ones went from caller to caller; under contention (more threads or asyncio
tasks than connections) some waited past the pool's timeout and their calls failed as
``StoreUnavailable`` on a healthy Redis (measured: 77 of 4,000 lifecycles of 200 tasks on 8
connections). A lender queues callers itself, first come first served, and hands a connection that
comes back to the caller that has waited longest; callers go to the pool only while the ledger
calls hold fewer than ``limit`` of its connections (the rest are left to the store's other
commands), and a connection goes back to the pool only when nobody waits and ``keep`` are kept.

One :class:`Lender` per sync client (threads), one :class:`AsyncLender` per event loop's client
(tasks of that loop). A connection handed over may be disconnected (a failed call disconnects
it): redis-py connects it again on its next use.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import redis

_GO_TO_POOL = object()  # handed to a waiter instead of a connection: take one from the pool yourself


def _no_connection() -> redis.ConnectionError:
    return redis.ConnectionError("No connection available.")


class _Wait:
    __slots__ = ("event", "handed")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.handed: Any = None


class Lender:
    """Connections of one sync pool for ledger calls, shared by threads (see the module docstring)."""

    def __init__(self, limit: int, keep: int, wait: float) -> None:
        self.limit = max(1, limit)
        self.keep = keep
        self.wait = wait
        self._lock = threading.Lock()
        self._idle: deque[Any] = deque()
        self._waits: deque[_Wait] = deque()
        self._taken = 0  # connections taken from the pool and not given back (in use or kept)

    def borrow(self, pool: Any) -> tuple[Any, bool]:
        """A connection, and whether it was used before (kept or handed over: check it before use)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
            if self._taken < self.limit and not self._waits:
                self._taken += 1
                wait = None
            else:
                wait = _Wait()
                self._waits.append(wait)
        if wait is not None:
            if not wait.event.wait(self.wait):
                with self._lock:
                    if not wait.event.is_set():
                        self._waits.remove(wait)
                        raise _no_connection()
            if wait.handed is not _GO_TO_POOL:
                return wait.handed, True
        try:
            return pool.get_connection(), False
        except BaseException:
            self._untake()
            raise

    def give_back(self, pool: Any, connection: Any) -> None:
        with self._lock:
            if self._waits:
                self._hand(connection)
                return
            if len(self._idle) < self.keep:
                self._idle.append(connection)
                return
            self._taken -= 1
        pool.release(connection)

    def _untake(self) -> None:
        """A connection taken from the pool is not (it could not be had): the next waiter may try."""
        with self._lock:
            self._taken -= 1
            if self._waits and self._taken < self.limit:
                self._taken += 1
                self._hand(_GO_TO_POOL)

    def _hand(self, handed: Any) -> None:
        wait = self._waits.popleft()
        wait.handed = handed
        wait.event.set()


class AsyncLender:
    """The same for the tasks of one event loop (no lock: nothing here awaits between look and act)."""

    def __init__(self, limit: int, keep: int, wait: float) -> None:
        self.limit = max(1, limit)
        self.keep = keep
        self.wait = wait
        self._idle: deque[Any] = deque()
        self._waits: deque[asyncio.Future[Any]] = deque()
        self._taken = 0

    async def borrow(self, pool: Any) -> tuple[Any, bool]:
        """A connection, and whether it was used before (kept or handed over: check it before use)."""
        if self._idle:
            return self._idle.pop(), True
        if self._taken < self.limit and not self._waits:
            self._taken += 1
        else:
            waiting: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waits.append(waiting)
            try:
                handed = await asyncio.wait_for(waiting, self.wait)
            except BaseException as error:  # timed out or cancelled: leave the queue, keep nothing
                if waiting.done() and not waiting.cancelled():
                    self._pass_on(waiting.result())  # handed over in the same moment: to the next one
                elif waiting in self._waits:
                    self._waits.remove(waiting)
                if isinstance(error, asyncio.TimeoutError):
                    raise _no_connection() from None
                raise
            if handed is not _GO_TO_POOL:
                return handed, True
        try:
            return await pool.get_connection(), False
        except BaseException:
            self._untake()
            raise

    def give_back(self, connection: Any) -> Any:
        """Hand ``connection`` over or keep it; or return it, for the caller to release to the pool
        (that may suspend: see clearance.stores.redis._arelease)."""
        if self._hand(connection):
            return None
        if len(self._idle) < self.keep:
            self._idle.append(connection)
            return None
        self._taken -= 1
        return connection

    def _hand(self, handed: Any) -> bool:
        while self._waits:
            waiting = self._waits.popleft()
            if not waiting.done():  # (one cancelled by its timeout may still be queued a moment)
                waiting.set_result(handed)
                return True
        return False

    def _pass_on(self, handed: Any) -> None:
        if handed is _GO_TO_POOL:
            self._untake()
        elif not self._hand(handed):
            self._idle.append(handed)  # (keeps one more than `keep` until the next give-back)

    def _untake(self) -> None:
        """A connection taken from the pool is not (it could not be had): the next waiter may try."""
        self._taken -= 1
        if self._waits and self._taken < self.limit:
            self._taken += 1
            if not self._hand(_GO_TO_POOL):
                self._taken -= 1
