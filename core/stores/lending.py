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

A caller that went to the pool and waits there (the store's other commands hold the rest) came
before every caller queued since (callers queue only while someone is ahead of them), so a
connection coming back goes to the pool first while such a caller waits (and once it is served,
callers queued meanwhile go to the pool for what went back there). With a one-connection
pool (``limit`` 0) the lender only passes calls through to the pool: keeping its one connection
would leave the store's other commands none.

One :class:`Lender` per sync client (threads), one :class:`AsyncLender` per event loop's client
(tasks of that loop). A connection handed over may be disconnected (a failed call disconnects
it): redis-py connects it again on its next use. A caller that waited ``wait`` in vain gets
:class:`NoConnection`: its request was never sent, so it is neither retried nor in doubt.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import redis

_GO_TO_POOL = object()  # handed to a waiter instead of a connection: take one from the pool yourself
_EXPIRED = object()  # an asyncio waiter's own timeout


class NoConnection(redis.ConnectionError):
    """No connection came within the wait: the request was never sent."""

    def __init__(self) -> None:
        super().__init__("No connection available.")


class _Wait:
    __slots__ = ("event", "handed")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.handed: Any = None


class _Lending:
    """What both lenders keep. On a cluster a store lends turns per node, not connections (the
    cluster client picks the node's connection itself): ``by_node`` holds those lenders, by node."""

    def __init__(self, limit: int, keep: int, wait: float) -> None:
        self.direct = limit < 1
        self.limit = limit
        self.keep = keep
        self.wait = wait
        self._idle: deque[Any] = deque()
        self._taken = 0  # connections taken from the pool and not given back (in use or kept)
        self._in_pool = 0  # callers waiting in the pool itself
        self.by_node: dict[str, Any] = {}


class Lender(_Lending):
    """Connections of one sync pool for ledger calls, shared by threads (see the module docstring)."""

    def __init__(self, limit: int, keep: int, wait: float) -> None:
        super().__init__(limit, keep, wait)
        self._lock = threading.Lock()
        self._waits: deque[_Wait] = deque()

    def borrow(self, pool: Any) -> tuple[Any, bool]:
        """A connection, and whether it was used before (kept or handed over: check it before use)."""
        if self.direct:
            return pool.get_connection(), False
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
            try:
                served = wait.event.wait(self.wait)
            except BaseException:  # KeyboardInterrupt, a signal handler's exception, gevent.Timeout
                self._leave(pool, wait)
                raise
            if not served:
                with self._lock:
                    if not wait.event.is_set():
                        self._waits.remove(wait)
                        raise NoConnection()
            if wait.handed is not _GO_TO_POOL:
                return wait.handed, True
        with self._lock:
            self._in_pool += 1
        try:
            return pool.get_connection(), False
        except BaseException:
            self._untake()
            raise
        finally:
            with self._lock:
                self._in_pool -= 1
                self._send_to_pool()

    def give_back(self, pool: Any, connection: Any) -> None:
        if not self.direct:
            with self._lock:
                if self._waits and not self._in_pool:
                    self._hand(connection)
                    return
                if len(self._idle) < self.keep and not self._in_pool:
                    self._idle.append(connection)
                    return
                self._taken -= 1
        pool.release(connection)

    def _leave(self, pool: Any, wait: _Wait) -> None:
        """A waiter leaves without using what it may have been handed: that goes on to the next one."""
        with self._lock:
            if not wait.event.is_set():
                self._waits.remove(wait)
                return
        if wait.handed is _GO_TO_POOL:
            self._untake()
        else:
            self.give_back(pool, wait.handed)

    def _untake(self) -> None:
        """A connection taken from the pool is not (it could not be had): the next waiter may try."""
        with self._lock:
            self._taken -= 1
            self._send_to_pool()

    def _send_to_pool(self) -> None:
        """Waiters go to the pool for the connections the ledger calls may take and have not (some
        went back to the pool for a caller waiting there), once nobody waits there. Lock held."""
        while self._waits and self._taken < self.limit and not self._in_pool:
            self._taken += 1
            self._hand(_GO_TO_POOL)

    def _hand(self, handed: Any) -> None:
        wait = self._waits.popleft()
        wait.handed = handed
        wait.event.set()


def _expire(waiting: asyncio.Future[Any]) -> None:
    if not waiting.done():
        waiting.set_result(_EXPIRED)


class AsyncLender(_Lending):
    """The same for the tasks of one event loop (no lock: nothing here awaits between look and act)."""

    def __init__(self, limit: int, keep: int, wait: float) -> None:
        super().__init__(limit, keep, wait)
        self._waits: deque[asyncio.Future[Any]] = deque()

    async def borrow(self, pool: Any) -> tuple[Any, bool]:
        """A connection, and whether it was used before (kept or handed over: check it before use)."""
        if self.direct:
            return await pool.get_connection(), False
        if self._idle:
            return self._idle.pop(), True
        if self._taken < self.limit and not self._waits:
            self._taken += 1
        else:
            loop = asyncio.get_running_loop()
            waiting: asyncio.Future[Any] = loop.create_future()
            self._waits.append(waiting)
            # (not asyncio.wait_for: on Python 3.11 it drops a cancellation that comes with a result)
            timer = loop.call_later(self.wait, _expire, waiting)
            try:
                handed = await waiting
            except BaseException:  # cancelled: leave the queue, keep nothing
                if waiting.done() and not waiting.cancelled() and waiting.result() is not _EXPIRED:
                    self._pass_on(pool, waiting.result())  # handed over in the same moment: pass it on
                elif waiting in self._waits:
                    self._waits.remove(waiting)
                raise
            finally:
                timer.cancel()
            if handed is _EXPIRED:
                if waiting in self._waits:
                    self._waits.remove(waiting)
                raise NoConnection()
            if handed is not _GO_TO_POOL:
                return handed, True
        self._in_pool += 1
        try:
            return await pool.get_connection(), False
        except BaseException:
            self._untake()
            raise
        finally:
            self._in_pool -= 1
            self._send_to_pool()

    def give_back(self, connection: Any) -> Any:
        """Hand ``connection`` over or keep it; or return it, for the caller to release to the pool
        (that may suspend: see clearance.stores.redis._arelease)."""
        if self.direct:
            return connection
        if not self._in_pool:
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
            if not waiting.done():  # (one whose time ran out may still be queued a moment)
                waiting.set_result(handed)
                return True
        return False

    def _pass_on(self, pool: Any, handed: Any) -> None:
        """What a caller leaving was handed in the same moment goes where a give-back would send it
        (releasing to the pool in a task of its own: a cancelled caller cannot await it)."""
        if handed is _GO_TO_POOL:
            self._untake()
            return
        spare = self.give_back(handed)
        if spare is not None:
            task = asyncio.ensure_future(pool.release(spare))
            _RELEASING.add(task)
            task.add_done_callback(_RELEASING.discard)

    def _untake(self) -> None:
        """A connection taken from the pool is not (it could not be had): the next waiter may try."""
        self._taken -= 1
        self._send_to_pool()

    def _send_to_pool(self) -> None:
        """As :meth:`Lender._send_to_pool`."""
        while self._waits and self._taken < self.limit and not self._in_pool:
            self._taken += 1
            if not self._hand(_GO_TO_POOL):
                self._taken -= 1


_RELEASING: set[asyncio.Future[Any]] = set()  # strong references to release tasks while they run
