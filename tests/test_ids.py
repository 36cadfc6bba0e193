"""Reservation ids: random from the OS's CSPRNG, drawn 4 KiB at a time, never repeated across
threads or across a fork."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from unittest import mock

import pytest

from clearance import Action, Authority, Budget
from clearance import ids as ids_module
from clearance.ids import random_id


def test_ids_are_hex_and_distinct_and_drawn_in_batches() -> None:
    ids_module._ids.clear()  # (what earlier tests left over would change the count of draws)
    with mock.patch("clearance.ids.os.urandom", wraps=os.urandom) as urandom:
        ids = [random_id() for _ in range(2000)]
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == 2000
    assert urandom.call_count == 5  # 409 ids of 10 bytes per draw
    assert {call.args[0] for call in urandom.call_args_list} == {4090}


def test_threads_never_share_ids() -> None:
    found: list[list[str]] = []
    start = threading.Barrier(8)

    def draw() -> None:
        start.wait()
        found.append([random_id() for _ in range(3000)])

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in found for i in ids]
    assert len(every) == 24_000 and len(set(every)) == 24_000


def _child_ids(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([random_id() for _ in range(5)])


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    random_id()  # ids are now waiting in the list the child would inherit
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_child_ids, args=(queue,))
    child.start()
    theirs = queue.get(timeout=30)
    child.join(timeout=30)
    ours = [random_id() for _ in range(5)]
    assert not set(ours) & set(theirs)


def test_reservations_take_their_ids_from_the_batch() -> None:
    authority = Authority()
    authority.set_budget(Budget("tenant:i", "calls", 100))
    with mock.patch("clearance.ids.os.urandom", wraps=os.urandom) as urandom:
        rids = [authority.reserve(Action("step", "s", {"calls": 1}), "tenant:i").reservation for _ in range(50)]
    assert urandom.call_count <= 1
    assert len({r.id for r in rids if r is not None}) == 50
