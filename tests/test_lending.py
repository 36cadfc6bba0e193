"""The lender of ledger-call connections (clearance.stores.lending), against a fake pool: callers
are served first come first served, a connection coming back goes to the longest waiter, nobody
waits past the lender's wait, and a failed take from the pool passes the turn on."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from typing import Any

import pytest
import redis
from interrupts import interrupt_at

from clearance.stores.lending import AsyncLender, Lender, Loan, NoConnection


class FakePool:
    """Hands out numbered connections; ``fail`` makes the next get raise."""

    def __init__(self) -> None:
        self.made = 0
        self.released: list[Any] = []
        self.fail = False

    def get_connection(self) -> Any:
        if self.fail:
            self.fail = False
            raise redis.ConnectionError("connecting to nowhere")
        self.made += 1
        return f"c{self.made}"

    def release(self, connection: Any) -> None:
        self.released.append(connection)


class AsyncFakePool(FakePool):
    async def get_connection(self) -> Any:
        return FakePool.get_connection(self)


def lend(lender: Lender, pool: Any) -> tuple[Loan, bool]:
    """A sync borrow as a ledger call makes it: into a loan of its own."""
    loan = Loan()
    used = lender.borrow(pool, loan)
    return loan, used


def lent(lender: Lender, pool: Any) -> tuple[Any, bool]:
    """What a borrow lent, and whether it was used before."""
    loan, used = lend(lender, pool)
    return loan.held, used


def _waiting(lender: Lender, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(lender._waits) < count:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_connection_coming_back_goes_to_the_longest_waiter() -> None:
    pool, lender = FakePool(), Lender(limit=1, keep=1, wait=5.0)
    first, used = lend(lender, pool)
    assert (first.held, used) == ("c1", False)
    served: list[tuple[int, Any]] = []

    def wait_for_one(n: int) -> None:
        loan, used = lend(lender, pool)
        assert used
        served.append((n, loan.held))
        lender.give_back(pool, loan)

    threads = []
    for n in range(3):
        thread = threading.Thread(target=wait_for_one, args=(n,))
        thread.start()
        _waiting(lender, n + 1)  # queued in this order
        threads.append(thread)
    lender.give_back(pool, first)
    for thread in threads:
        thread.join(5)
    assert served == [(0, "c1"), (1, "c1"), (2, "c1")]  # in turn, one connection, never the pool
    assert pool.made == 1 and pool.released == []
    assert lent(lender, pool) == ("c1", True)  # kept (keep=1)


def test_nobody_waits_past_the_wait_and_a_late_caller_leaves_the_queue() -> None:
    pool, lender = FakePool(), Lender(limit=1, keep=0, wait=0.05)
    held, _ = lend(lender, pool)
    started = time.monotonic()
    with pytest.raises(NoConnection, match="No connection available"):
        lend(lender, pool)
    assert time.monotonic() - started < 2
    assert not lender._waits
    lender.give_back(pool, held)  # keep=0 and nobody waiting: back to the pool
    assert pool.released == ["c1"] and held.held is None
    assert lent(lender, pool) == ("c2", False)


def test_limit_leaves_the_rest_of_the_pool_and_keep_bounds_what_is_kept() -> None:
    pool, lender = FakePool(), Lender(limit=3, keep=2, wait=0.05)
    loans = [lend(lender, pool)[0] for _ in range(3)]
    with pytest.raises(redis.ConnectionError):
        lend(lender, pool)  # a fourth would be the pool's last
    for loan in loans:
        lender.give_back(pool, loan)
    assert pool.released == ["c3"]  # two kept, the third back to the pool
    assert lender._taken == 2


def test_a_failed_take_from_the_pool_passes_the_turn_to_a_waiter() -> None:
    pool, lender = FakePool(), Lender(limit=1, keep=0, wait=5.0)
    pool.fail = True
    failed = Loan()
    with pytest.raises(redis.ConnectionError):
        lender.borrow(pool, failed)
    lender.give_back(pool, failed)  # (as a ledger call's finally does) the slot it was counted for
    assert lender._taken == 0
    assert lent(lender, pool) == ("c1", False)  # the slot is free again

    # A waiter queued behind a caller whose take then fails goes to the pool itself.
    gate = threading.Event()

    class GatedPool(FakePool):
        def get_connection(self) -> Any:
            if threading.current_thread().name == "failing":
                assert gate.wait(5)
                raise redis.ConnectionError("connecting to nowhere")
            return super().get_connection()

    gated, lender = GatedPool(), Lender(limit=1, keep=0, wait=5.0)

    def failing() -> None:
        loan = Loan()
        try:
            lender.borrow(gated, loan)
        except redis.ConnectionError:
            pass
        finally:
            lender.give_back(gated, loan)

    first = threading.Thread(target=failing, name="failing")
    first.start()
    deadline = time.monotonic() + 5
    while not lender._in_pool:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(lent(lender, gated)))
    waiter.start()
    _waiting(lender, 1)
    gate.set()
    first.join(5)
    waiter.join(5)
    assert got == [("c1", False)] and lender._taken == 1


def test_async_callers_are_served_in_turn_and_time_out_cleanly() -> None:
    async def main() -> None:
        pool, lender = AsyncFakePool(), AsyncLender(limit=1, keep=1, wait=5.0)
        first, _ = await lender.borrow(pool)
        order: list[int] = []

        async def wait_for_one(n: int) -> None:
            connection, used = await lender.borrow(pool)
            assert used and connection == "c1"
            order.append(n)
            await asyncio.sleep(0)
            assert lender.give_back(connection) is None

        tasks = [asyncio.ensure_future(wait_for_one(n)) for n in range(4)]
        await asyncio.sleep(0.01)
        assert lender.give_back(first) is None
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3] and pool.made == 1

        short = AsyncLender(limit=1, keep=0, wait=0.05)
        held, _ = await short.borrow(pool)
        with pytest.raises(redis.ConnectionError, match="No connection available"):
            await short.borrow(pool)
        assert not short._waits
        cancelled = asyncio.ensure_future(short.borrow(pool))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not short._waits
        assert short.give_back(held) == held  # nobody waiting, keep=0: for the caller to release

    asyncio.run(main())


def test_an_async_caller_that_gives_up_as_it_is_served_passes_the_connection_on() -> None:
    async def main() -> None:
        pool, lender = AsyncFakePool(), AsyncLender(limit=1, keep=0, wait=5.0)
        held, _ = await lender.borrow(pool)
        first = asyncio.ensure_future(lender.borrow(pool))
        second = asyncio.ensure_future(lender.borrow(pool))
        await asyncio.sleep(0.01)
        assert lender.give_back(held) is None  # handed to the first waiter...
        first.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):  # (asyncio.wait_for on 3.11 would drop the cancel)
            await first
        assert await second == ("c1", True)  # the connection went on to the next one
        assert pool.made == 1

    asyncio.run(main())


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


@pytest.mark.skipif(sys.platform == "win32", reason="setitimer")
def test_a_waiter_interrupted_while_waiting_leaves_the_queue_and_loses_nothing() -> None:
    # KeyboardInterrupt, a signal handler's exception (a request deadline), gevent.Timeout: raised
    # out of the wait. The waiter must leave the queue, or the next connection coming back would be
    # handed to nobody and lost for good.
    pool, lender = FakePool(), Lender(limit=1, keep=1, wait=5.0)
    held, _ = lend(lender, pool)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    waiter = Loan()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_Interrupted):
            lender.borrow(pool, waiter)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        lender.give_back(pool, waiter)  # (as a ledger call's finally does)
    assert not lender._waits
    lender.give_back(pool, held)
    assert lent(lender, pool) == ("c1", True)  # kept, not handed to the one who left

    # Interrupted just as it was handed one: it goes on to the next caller (or is kept).
    lender2 = Lender(limit=1, keep=1, wait=5.0)
    held2, _ = lend(lender2, pool)
    connection = held2.held
    queued = Loan()
    queued.bell = threading.Lock()
    queued.bell.acquire()
    lender2._waits.append(queued)
    lender2.give_back(pool, held2)  # handed to `queued`
    assert queued.held == connection and held2.held is None
    lender2.give_back(pool, queued)  # ... which leaves without using it
    assert lent(lender2, pool) == (connection, True) and not lender2._waits


def test_a_one_connection_pool_is_used_directly() -> None:
    # Keeping the only connection for ledger calls would leave the store's other commands none.
    pool, lender = FakePool(), Lender(limit=0, keep=0, wait=0.05)
    first, used = lend(lender, pool)
    assert (first.held, used) == ("c1", False)
    lender.give_back(pool, first)
    assert pool.released == ["c1"] and not lender._idle


def test_a_caller_waiting_in_the_pool_is_served_before_later_ones() -> None:
    # Callers queue in the lender only behind someone; one that went to the pool (the store's other
    # commands held the rest) came first, so a connection coming back goes to the pool for it.
    class SlowPool(FakePool):
        def __init__(self) -> None:
            super().__init__()
            self.free: list[Any] = []
            self.returned = threading.Event()

        def get_connection(self) -> Any:
            if self.made == 0:
                return super().get_connection()
            assert self.returned.wait(5)  # the store's other commands hold the rest, until one comes back
            return self.free.pop() if self.free else super().get_connection()

        def release(self, connection: Any) -> None:
            self.free.append(connection)
            self.returned.set()

    pool, lender = SlowPool(), Lender(limit=2, keep=2, wait=5.0)
    held, _ = lend(lender, pool)
    got: dict[str, Any] = {}
    early = threading.Thread(target=lambda: got.setdefault("early", lent(lender, pool)))
    early.start()
    deadline = time.monotonic() + 5
    while not lender._in_pool:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    late = threading.Thread(target=lambda: got.setdefault("late", lent(lender, pool)))
    late.start()
    _waiting(lender, 1)
    lender.give_back(pool, held)  # to the pool, for the one waiting there
    early.join(5)
    assert got["early"] == ("c1", False)
    late.join(5)  # then the one queued behind it goes to the pool for the slot that freed
    assert got["late"] == ("c2", False)
    assert lender._taken == 2 and not lender._waits


def test_slots_given_back_to_the_pool_for_its_waiter_are_offered_to_the_queue_after() -> None:
    # A and B hold connections, C waits in the pool, W1 and W2 queue. A's and B's connections go to
    # the pool (C came first); once C is served, the queue must be sent to the pool for the two
    # slots freed, or W1 and W2 wait out their time with the lender well under its limit.
    gate = threading.Event()

    class GatedPool(FakePool):
        def get_connection(self) -> Any:
            if threading.current_thread().name == "C":
                assert gate.wait(5)  # waiting in the pool (the store's other commands hold the rest)
            return super().get_connection()

    pool, lender = GatedPool(), Lender(limit=3, keep=1, wait=2.0)
    a, _ = lend(lender, pool)
    b, _ = lend(lender, pool)
    c = threading.Thread(target=lambda: lend(lender, pool), name="C")
    c.start()
    deadline = time.monotonic() + 5
    while not lender._in_pool:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    got: dict[str, Any] = {}

    def wait_for_one(name: str) -> None:
        try:
            got[name] = lent(lender, pool)
        except NoConnection as error:
            got[name] = error

    queued = []
    for n, name in enumerate(("W1", "W2")):
        thread = threading.Thread(target=wait_for_one, args=(name,))
        thread.start()
        _waiting(lender, n + 1)
        queued.append(thread)
    a_connection, b_connection = a.held, b.held
    lender.give_back(pool, a)
    lender.give_back(pool, b)
    assert pool.released == [a_connection, b_connection]  # to the pool, for C
    gate.set()
    c.join(5)
    for thread in queued:
        thread.join(5)
    assert all(isinstance(got[name], tuple) for name in ("W1", "W2")), got
    assert lender._taken == 3 and not lender._waits and not lender._in_pool


def test_async_slots_given_back_to_the_pool_are_offered_to_the_queue_after() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        class GatedPool(AsyncFakePool):
            gated: object = None

            async def get_connection(self) -> Any:
                if asyncio.current_task() is self.gated:
                    await gate.wait()
                return FakePool.get_connection(self)

        pool, lender = GatedPool(), AsyncLender(limit=3, keep=1, wait=2.0)
        a, _ = await lender.borrow(pool)
        b, _ = await lender.borrow(pool)
        c = pool.gated = asyncio.ensure_future(lender.borrow(pool))
        await asyncio.sleep(0.01)
        assert lender._in_pool == 1
        w1 = asyncio.ensure_future(lender.borrow(pool))
        w2 = asyncio.ensure_future(lender.borrow(pool))
        await asyncio.sleep(0.01)
        for connection in (a, b):
            spare = lender.give_back(connection)
            assert spare is connection  # for the caller to release to the pool, where C waits
            pool.release(spare)
        gate.set()
        assert (await c)[1] is False
        assert isinstance(await w1, tuple) and isinstance(await w2, tuple)
        assert lender._taken == 3 and not lender._waits and not lender._in_pool

    asyncio.run(main())


def _queued(lender: Lender) -> Loan:
    """A caller waiting in the lender's queue (as a borrow that found none leaves it)."""
    loan = Loan()
    loan.bell = threading.Lock()
    loan.bell.acquire()
    lender._waits.append(loan)
    return loan


@pytest.mark.parametrize("scene", ["kept", "from the pool", "handed over", "slot handed over", "to the pool"])
def test_a_borrow_and_give_back_interrupted_at_each_point_lose_nothing(scene: str) -> None:
    """A ledger call's borrow and give-back (its ``finally``, which gives back again if the first was
    interrupted), with an exception at each point where Python runs a signal handler's: every
    connection ends up once in the lender's keeping, in a caller's loan or in the pool, and the
    lender's counts match. Before loans, an interrupt just after a kept connection was taken, or
    as one came back, lost it for good (one fewer for every call after)."""
    point = 0
    while True:
        point += 1
        pool, lender = FakePool(), Lender(limit=3, keep=0 if scene == "to the pool" else 2, wait=5.0)
        live: list[Loan] = []
        giver: Loan | None = None  # the call gives back this loan (else it borrows and gives back)
        if scene == "kept":
            lender.give_back(pool, lend(lender, pool)[0])
        elif scene == "to the pool":
            giver = lend(lender, pool)[0]
        elif scene in ("handed over", "slot handed over"):
            live.extend(lend(lender, pool)[0] for _ in range(2))
            giver = Loan()
            pool.fail = scene == "slot handed over"  # the giver holds a slot whose take failed
            with contextlib.suppress(redis.ConnectionError):
                lender.borrow(pool, giver)
            live.append(_queued(lender))
        if giver is not None:
            live.append(giver)

        def call() -> None:
            loan = giver or Loan()
            try:
                if giver is None:
                    lender.borrow(pool, loan)
            finally:
                try:
                    lender.give_back(pool, loan)
                except BaseException:
                    lender.give_back(pool, loan)
                    raise

        interrupted = interrupt_at(point, call)
        held = [loan.held for loan in live if loan.held is not None]
        connections = [h for h in held if isinstance(h, str)]
        everywhere = [*lender._idle, *connections, *pool.released]
        made = [f"c{n}" for n in range(1, pool.made + 1)]
        assert sorted(everywhere) == made, (scene, point)  # each once: none lost, none twice
        assert lender._taken == len(lender._idle) + len(held), (scene, point)
        assert all(w in live and w.held is None for w in lender._waits) and not lender._in_pool, (scene, point)
        if not interrupted:
            break
    assert point > 2


def test_a_connection_handed_to_a_waiting_thread_arrives_whatever_interrupts_the_giver() -> None:
    """The giver interrupted at any point of its give-back — in the standard library's code it calls
    too: a waiter was woken with a threading.Event, whose set() runs Python code, and an interrupt
    there left the Event's own lock taken; the woken waiter then hung for good, holding the
    connection handed to it. Waiters are woken by letting go of a plain lock now (one C call)."""
    point = 0
    while True:
        point += 1
        pool, lender = FakePool(), Lender(limit=1, keep=1, wait=5.0)
        giver, _ = lend(lender, pool)
        got: list[Any] = []

        def wait_for_one() -> None:
            loan = Loan()
            try:
                lender.borrow(pool, loan)
                got.append(loan.held)
            finally:
                lender.give_back(pool, loan)

        waiter = threading.Thread(target=wait_for_one)
        waiter.start()
        _waiting(lender, 1)

        def give_back() -> None:  # as a ledger call's finally does
            try:
                lender.give_back(pool, giver)
            except BaseException:
                lender.give_back(pool, giver)
                raise

        interrupted = interrupt_at(point, give_back, anywhere=True)
        waiter.join(10)
        assert not waiter.is_alive(), point
        assert got == ["c1"] and lender._taken == len(lender._idle) == 1 and not lender._waits, point
        if not interrupted:
            break
    assert point > 2
