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

_GO_TO_POOL = object()  # handed to an asyncio waiter instead of a connection: take one from the pool yourself
_EXPIRED = object()  # an asyncio waiter's own timeout


class NoConnection(redis.ConnectionError):
    """No connection came within the wait: the request was never sent."""

    def __init__(self) -> None:
        super().__init__("No connection available.")


class Loan:
    """What one ledger call has of a sync :class:`Lender`'s, kept by the caller across the call.

    ``held`` is ``None`` (nothing yet), a slot (a connection the lender counted for this call, to be
    taken from the pool) or the connection; ``in_pool`` whether the call waits in the pool itself;
    ``bell`` a lock taken while it is queued and let go to wake it (one call into C each way: an
    Event's ``set``/``wait`` run threading.py's Python code, and an interrupt there left its inner
    lock taken — the woken caller hung for good with the connection handed to it). A step of the
    lender moves something into or out of a loan with nothing between where an interrupt could
    arrive — a signal handler's exception (a step timeout), Ctrl-C — (Python runs those only when a
    function starts and after a call into C returns), so whatever the caller's ``finally`` finds in
    its loan is exactly what it has to give back (:meth:`Lender.give_back`), and a give-back
    interrupted part-way is finished by calling it again. Before loans, an interrupt just after a
    connection left the lender's keeping, or just as one came back, lost it: after as many as the
    lender may take, every call waited in vain."""

    __slots__ = ("bell", "held", "in_pool")

    def __init__(self) -> None:
        self.held: Any = None
        self.in_pool = False
        self.bell: Any = None

    @property
    def connection(self) -> Any:
        """The connection lent, if one was."""
        held = self.held
        return None if held is _SLOT else held


_SLOT = object()  # a loan's: a connection the lender counted for it, to be taken from the pool


class _Lending:
    """What both lenders keep. On a cluster a store lends turns per node, not connections (the cluster
    client picks the node's connection itself): ``by_node`` holds those lenders, by node."""

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
    """Connections of one sync pool for ledger calls, shared by threads (see the module docstring),
    lent into the callers' loans (:class:`Loan`)."""

    def __init__(self, limit: int, keep: int, wait: float) -> None:
        super().__init__(limit, keep, wait)
        self._lock = threading.Lock()
        self._waits: deque[Loan] = deque()

    def borrow(self, pool: Any, loan: Loan) -> bool:
        """Lend a connection into ``loan`` (new, empty); whether it was used before (kept or handed
        over: check it before use). Call it inside the ``try`` whose ``finally`` gives the loan
        back, whatever happens (a failed take from the pool leaves a slot there: it goes back too)."""
        if self.direct:
            loan.held = pool.get_connection()
            return False
        with self._lock:
            if self._idle:
                loan.held = self._idle[-1]  # (subscripts, not pop(): no interrupt between the two)
                del self._idle[-1]
                return True
            if self._taken < self.limit and not self._waits:
                self._taken += 1
                loan.held = _SLOT
            else:
                bell = threading.Lock()
                bell.acquire()
                loan.bell = bell
                self._waits.append(loan)
        if loan.bell is not None:
            loan.bell.acquire(True, self.wait)
            with self._lock:
                if loan.held is None:  # (one handed over in time is taken, however late it was woken)
                    if loan in self._waits:
                        self._waits.remove(loan)
                    raise NoConnection()
            if loan.held is not _SLOT:
                return True
        with self._lock:
            self._in_pool += 1
            loan.in_pool = True
        loan.held = pool.get_connection()
        with self._lock:
            self._in_pool -= 1
            loan.in_pool = False
            self._send_to_pool()
        return False

    def give_back(self, pool: Any, loan: Loan) -> None:
        """Give back what ``loan`` holds: hand the connection to the longest waiter, keep it, or
        release it to the pool; a slot no connection came for frees for the next caller; a caller
        still queued leaves the queue. Called again after an interrupt, it does what is left."""
        if self.direct:
            connection = loan.held
            if connection is not None:
                loan.held = None
                pool.release(connection)
            return
        with self._lock:
            if loan.in_pool:
                self._in_pool -= 1
                loan.in_pool = False
            held = loan.held
            if held is None:
                if loan in self._waits:  # interrupted while queued: nothing may be handed to it now
                    self._waits.remove(loan)
                self._send_to_pool()
                return
            if held is _SLOT:  # no connection came from the pool: the next waiter may try
                loan.held = None
                self._taken -= 1
                self._send_to_pool()
                return
            if self._waits and not self._in_pool:
                waiter = self._waits[0]  # (subscripts, not popleft(): nothing between these four)
                waiter.held = held
                loan.held = None
                del self._waits[0]
                waiter.bell.release()  # (interrupted before: it takes it at its wait's end)
                return
            if len(self._idle) < self.keep and not self._in_pool:
                loan.held = None
                self._idle.append(held)
                return
            loan.held = None
            self._taken -= 1
            # Released before the lock is: an interrupt as the lock is let go would lose it. (One
            # inside redis-py's release may still: its steps cannot be made ours. Lost, not put
            # back twice: a retried give-back finds the loan empty.)
            pool.release(held)

    def _send_to_pool(self) -> None:
        """Waiters go to the pool for the connections the ledger calls may take and have not (some
        went back to the pool for a caller waiting there), once nobody waits there. Lock held."""
        while self._waits and self._taken < self.limit and not self._in_pool:
            waiter = self._waits[0]
            self._taken += 1
            waiter.held = _SLOT
            del self._waits[0]
            waiter.bell.release()


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
