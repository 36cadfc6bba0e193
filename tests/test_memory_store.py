"""Memory-only behaviour: how many period windows a budget keeps, what a pruned window answers, and
what a listing looks at."""

from __future__ import annotations

import pytest

from clearance import Authority, Budget
from clearance.ledger import HoldRequest, PlanSpec
from clearance.periods import windows_at
from clearance.stores.memory import MemoryStore

T0 = 1_798_761_600.0  # a minute boundary


def _hold(store: MemoryStore, now: float, steps: int, ttl: float = 30) -> str | None:
    _hold.count += 1  # type: ignore[attr-defined]
    request = HoldRequest(
        f"{_hold.count:020x}.t",  # type: ignore[attr-defined]
        ("t",),
        (PlanSpec((("usd", steps),), (0,)),),
        now,
        now + ttl,
        windows_at(now),
    )
    return store.hold(request).reservation_id


_hold.count = 0  # type: ignore[attr-defined]


def _windows(store: MemoryStore) -> dict[str, list[int]]:
    return store._levels["t"][("usd", "minute")].counters


def test_a_budget_is_back_to_8_windows_once_long_holds_settle() -> None:
    """Windows with a hold are kept; once they settle, the budget shrinks back to its 8 latest (it
    stayed at its high-water mark: one window pruned per window opened)."""
    store = MemoryStore()
    store.set_budget("t", "usd", "minute", 10**6, T0)
    long_holds = [_hold(store, T0 + 60 * minute, 1, ttl=10**5) for minute in range(30)]
    assert len(_windows(store)) == 30
    for minute, held in enumerate(long_holds):
        store.commit(held, None, T0 + 60 * 30 + minute)  # type: ignore[arg-type]
    for minute in range(31, 34):
        store.commit(_hold(store, T0 + 60 * minute, 1), None, T0 + 60 * minute + 1)  # type: ignore[arg-type]
    assert len(_windows(store)) <= 8


def test_a_pruned_window_newer_than_a_held_one_is_closed_not_empty() -> None:
    """A request whose clock was read in a window pruned since (a preempted thread, a clock stepped
    back) finds it closed: it was re-opened empty when an older window still held something, and
    its budget handed out again."""
    store = MemoryStore()
    store.set_budget("t", "usd", "minute", 10, T0)
    assert _hold(store, T0, 1, ttl=7200)  # minute 0 holds something all along
    spent = _hold(store, T0 + 60, 10)
    store.commit(spent, None, T0 + 61)  # type: ignore[arg-type]  # minute 1: all of it spent
    for minute in range(2, 12):
        store.commit(_hold(store, T0 + 60 * minute, 1), None, T0 + 60 * minute + 1)  # type: ignore[arg-type]
    assert windows_at(T0 + 60)[1][1] not in _windows(store)  # minute 1 is pruned
    assert _hold(store, T0 + 90, 10) is None  # denied: closed, not empty


def test_a_listing_under_a_scope_looks_at_its_tenant_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """balance() and budgets() under a scope looked at (and sorted) every tenant's budgets, holding
    the store's lock: with 100,000 budgets a balance took 100 ms and stalled every other call."""
    from clearance.stores import memory

    authority = Authority("memory://")
    for i in range(2000):
        authority.set_budget(Budget(f"tenant:t{i}", "usd", 1))
    authority.set_budget(Budget("tenant:t7/run:a", "usd", 1))
    looked: list[str] = []
    real = memory.in_subtree

    def counted(path: str, scope: str | None) -> bool:
        looked.append(path)
        return real(path, scope)

    monkeypatch.setattr(memory, "in_subtree", counted)
    assert [b.scope for b in authority.budgets("tenant:t7")] == ["tenant:t7", "tenant:t7/run:a"]
    authority.balance("tenant:t7")
    assert len(looked) <= 2


class _InterruptedOnce(tuple):  # type: ignore[type-arg]
    """Windows whose first read raises, as a signal handler's exception can at any call."""

    raised = False

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not _InterruptedOnce.raised:
            _InterruptedOnce.raised = True
            raise KeyboardInterrupt
        return super().__iter__()


def test_an_interrupt_while_the_next_minute_s_windows_are_read_leaves_no_stale_windows() -> None:
    """The store remembered the windows and their map in two steps: an exception between them left
    the next minute's windows beside the last minute's map, so every hold for that whole minute was
    counted in the windows before (a month's budget charged in the month before)."""
    store = MemoryStore()
    store._map(windows_at(T0))
    later = T0 + 40 * 86400  # the next month
    interrupted = _InterruptedOnce(windows_at(later))
    with pytest.raises(KeyboardInterrupt):
        store._map(interrupted)
    assert store._map(interrupted) == dict(windows_at(later))
