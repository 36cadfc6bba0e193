"""The lender of ledger-call connections (clearance.stores.lending), against a fake pool: callers
are served first come first served, a connection coming back goes to the longest waiter, nobody
waits past the lender's wait, and a failed take from the pool passes the turn on."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from clearance.stores.lending import AsyncLender, Lender


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


def _waiting(lender: Lender, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(lender._waits) < count:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_connection_coming_back_goes_to_the_longest_waiter() -> None:
    pool, lender = FakePool(), Lender(limit=1, keep=1, wait=5.0)
    first, used = lender.borrow(pool)
    assert (first, used) == ("c1", False)
    served: list[tuple[int, Any]] = []

    def wait_for_one(n: int) -> None:
        connection, used = lender.borrow(pool)
        assert used
        served.append((n, connection))
        lender.give_back(pool, connection)

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
    assert lender.borrow(pool) == ("c1", True)  # kept (keep=1)


def test_nobody_waits_past_the_wait_and_a_late_caller_leaves_the_queue() -> None:
    pool, lender = FakePool(), Lender(limit=1, keep=0, wait=0.05)
    held, _ = lender.borrow(pool)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="No connection available"):
        lender.borrow(pool)
    assert time.monotonic() - started < 2
    assert not lender._waits
    lender.give_back(pool, held)  # keep=0 and nobody waiting: back to the pool
    assert pool.released == ["c1"]
    assert lender.borrow(pool) == ("c2", False)


def test_limit_leaves_the_rest_of_the_pool_and_keep_bounds_what_is_kept() -> None:
    pool, lender = FakePool(), Lender(limit=3, keep=2, wait=0.05)
    lent = [lender.borrow(pool)[0] for _ in range(3)]
    with pytest.raises(redis.ConnectionError):
        lender.borrow(pool)  # a fourth would be the pool's last
    for connection in lent:
        lender.give_back(pool, connection)
    assert pool.released == ["c3"]  # two kept, the third back to the pool
    assert lender._taken == 2


def test_a_failed_take_from_the_pool_passes_the_turn_to_a_waiter() -> None:
    pool, lender = FakePool(), Lender(limit=1, keep=0, wait=5.0)
    pool.fail = True
    with pytest.raises(redis.ConnectionError):
        lender.borrow(pool)
    assert lender._taken == 0
    assert lender.borrow(pool) == ("c1", False)  # the slot is free again
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(lender.borrow(pool)))
    waiter.start()
    _waiting(lender, 1)
    lender._untake()  # as when the holder's own take had failed: the waiter goes to the pool itself
    waiter.join(5)
    assert got == [("c2", False)]


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
        try:
            got = await first
        except asyncio.CancelledError:  # it left: the connection went on to the next one
            pass
        else:  # (Python 3.11's wait_for returns a result that came with the cancellation)
            assert got == ("c1", True)
            assert lender.give_back(got[0]) is None
        assert await second == ("c1", True)  # either way the connection is not lost
        assert pool.made == 1

    asyncio.run(main())
