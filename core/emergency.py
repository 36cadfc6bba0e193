"""The emergency cap: what a process may spend, per unit, while its store is unreachable and it
fails open (``Authority(fail_open=..., emergency_limits=...)``). It lives in the process, not in
the store, so it bounds each process on its own: the store cannot be asked."""

from __future__ import annotations

import heapq
import os
import threading
from dataclasses import replace

from clearance.decision import Reservation, Settlement
from clearance.errors import ReservationClosed, ReservationNotFound
from clearance.ledger import Amounts, commit_flags, merge_actual


class EmergencyCap:
    """What this process may spend, per unit, while the store is unreachable (fail open).

    Local reservations behave like ledger ones on a small scale: they expire after their TTL (their
    hold returns to the cap), can be extended and looked up, a reserve retried with its idempotency
    key answers with the same reservation, a repeated commit or release is a replay, and an id this
    process never issued is :class:`ReservationNotFound`. An action none of whose units has an
    emergency limit is not bounded by the cap, so it is refused (:meth:`take`)."""

    _REMEMBERED = 10_000  # settled reservations kept (the most recent): the local "retention"

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.used: dict[str, int] = dict.fromkeys(limits, 0)
        self.holds: dict[str, Reservation] = {}  # held local reservations (this class's own copies)
        self.settled: dict[str, Reservation] = {}  # the most recent settled ones
        # (tenant, idempotency key) -> id, for every held or remembered keyed reservation: a key is
        # forgotten with its reservation, never while it is held.
        self.keys: dict[tuple[str, str], str] = {}
        self.key_of: dict[str, tuple[str, str]] = {}
        # (expires_at, id) of held ones, earliest first: expiry looks at what is due alone (a scan of
        # every hold on every call cost 85 ms a reserve with 50,000 held through an outage).
        self.expiry: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def start_afresh(self) -> None:
        """Nothing used, held or remembered, and a new lock (see ``_start_afresh``)."""
        self.lock = threading.Lock()
        self.used = dict.fromkeys(self.limits, 0)
        self.holds.clear()
        self.settled.clear()
        self.keys.clear()
        self.key_of.clear()
        self.expiry.clear()

    # Interrupts. An exception can arrive at any call or loop turn of these methods (a signal
    # handler's: a step timeout, Ctrl-C). A change made in steps with calls between them was left
    # half done: a hold popped and never given back, cap used with no hold to give it back, a hold
    # with no expiry entry (never expiring) — each leaking the cap for the rest of the process. So
    # each change is worked out first (new ``used`` dicts, entries, flags: an interrupt there changes
    # nothing), then made by statements with no call between them; extra expiry entries are pushed
    # before (harmless: an entry whose hold is gone or has another time is skipped), and remembered
    # settled reservations are evicted before (an interrupted eviction forgets one early: harmless).

    def _used_with(self, steps: Amounts, sign: int, used: dict[str, int] | None = None) -> dict[str, int]:
        """``used`` (this cap's, else the one given) with ``steps`` added (``sign`` 1) or given back
        (-1): a new dict, for one assignment."""
        used = dict(self.used if used is None else used)
        for unit, amount in steps:
            if unit in self.limits:
                used[unit] += sign * amount
        return used

    def _make_room(self, rid: str) -> None:
        """Evict the oldest remembered reservation if ``rid`` is about to be remembered and there is
        no room (never ``rid`` itself: settled again, a late commit, it stays)."""
        if rid not in self.settled and len(self.settled) >= self._REMEMBERED:
            forgotten = next(iter(self.settled))
            key = self.key_of.get(forgotten)
            del self.settled[forgotten]
            if key is not None:
                del self.key_of[forgotten]
                self.keys.pop(key, None)

    def _expire(self, now: float) -> None:
        expiry = self.expiry
        while expiry and expiry[0][0] <= now:
            rid = expiry[0][1]
            reservation = self.holds.get(rid)
            if reservation is not None and reservation.expires_at <= now:  # (else settled, or extended)
                used = self._used_with(reservation.steps, -1)
                self._make_room(rid)
                # (no call from here to the pop: see above; popped after, so an interrupt before it
                # leaves the entry, skipped next time — the hold is gone)
                del self.holds[rid]
                reservation.status = "expired"
                self.settled[rid] = reservation
                self.used = used
            heapq.heappop(expiry)

    def _due(self, expires_at: float, rid: str) -> None:
        """Queue an expiry entry (before the hold it is for takes that time: see above), after
        dropping, now and then, the entries of settled holds (the new one, not yet its hold's time,
        would be dropped with them: that hold never expired)."""
        if len(self.expiry) > 4 * len(self.holds) + 1024:
            kept = [(at, r) for at, r in self.expiry if (held := self.holds.get(r)) and held.expires_at == at]
            heapq.heapify(kept)
            self.expiry = kept
        heapq.heappush(self.expiry, (expires_at, rid))

    def take(self, reservation: Reservation, now: float, key: tuple[str, str] | None) -> str | Reservation | None:
        """Hold the reservation's steps against the cap. Returns None when held; the unit that does
        not fit (or, when no unit of the action has an emergency limit, its first unit); or, when
        ``key`` already made a local reservation (a concurrent retry got here first), a copy of that
        one — checked under the same lock as the hold, so a key never holds twice."""
        steps = reservation.steps
        with self.lock:
            self._expire(now)
            if key is not None:
                rid = self.keys.get(key)
                existing = None if rid is None else self._find(rid)
                if existing is not None:
                    return replace(existing)
            spending = [unit for unit, amount in steps if amount > 0]
            if spending and not any(unit in self.limits for unit in spending):
                return spending[0]
            for unit, amount in steps:
                if unit in self.limits and self.used[unit] + amount > self.limits[unit]:
                    return unit
            used = self._used_with(steps, 1)
            held = replace(reservation)
            rid = held.id
            self._due(held.expires_at, rid)
            # (no call from here on: see above)
            self.holds[rid] = held
            if key is not None:
                self.keys[key] = rid
                self.key_of[rid] = key
            self.used = used
            return None

    def _settled_one(self, rid: str) -> Reservation:
        """A remembered settled reservation (not held), else :class:`ReservationNotFound`."""
        done = self.settled.get(rid)
        if done is None:
            raise ReservationNotFound(rid)
        return done

    def _find(self, rid: str) -> Reservation | None:
        return self.holds.get(rid) or self.settled.get(rid)

    def find(self, key: tuple[str, str], now: float) -> Reservation | None:
        """The local reservation an idempotency key made, if this process still remembers it."""
        with self.lock:
            self._expire(now)
            rid = self.keys.get(key)
            found = None if rid is None else self._find(rid)
            return None if found is None else replace(found)

    def get(self, rid: str, now: float) -> Reservation:
        with self.lock:
            self._expire(now)
            found = self._find(rid)
            if found is None:
                raise ReservationNotFound(rid)
            return replace(found)

    def extend(self, rid: str, expires_at: float, now: float) -> Reservation:
        with self.lock:
            self._expire(now)
            held = self.holds.get(rid)
            if held is None:
                raise ReservationClosed(rid, self._settled_one(rid).status)
            if expires_at > held.expires_at:  # (never shortened, as in the ledger)
                self._due(expires_at, rid)  # (first: a hold at a time with no entry never expired)
                held.expires_at = expires_at
            return replace(held)

    def settle(self, rid: str, actual: Amounts | None, commit: bool, now: float) -> Settlement:
        with self.lock:
            self._expire(now)
            held = self.holds.get(rid)
            if held is None:
                done = self._settled_one(rid)
                if done.status == "committed" or not commit:
                    return Settlement(rid, done.status, done.committed_steps or (), done.flags, replayed=True)
                # Reality wins, as in the ledger: a commit after release or expiry is charged (what was
                # held came back then), flagged after_release / late.
                reservation, prior, used = done, done.status, self.used
            else:
                reservation, prior, used = held, "held", self._used_with(held.steps, -1)
            if not commit:
                self._make_room(rid)
                # (no call from here on: see above)
                del self.holds[rid]  # (held: a release of a settled one replayed above)
                reservation.status = "released"
                self.settled[rid] = reservation
                self.used = used
                return Settlement(rid, "released")
            steps = reservation.steps
            charged = steps if actual is None else merge_actual(steps, actual)
            flags = tuple(commit_flags(prior, steps, charged))
            used = self._used_with(charged, 1, used)  # (the hold given back, the charge added)
            self._make_room(rid)
            # (no call from here on: see above)
            if held is not None:
                del self.holds[rid]
            reservation.status, reservation.committed_steps, reservation.flags = "committed", charged, flags
            self.settled[rid] = reservation
            self.used = used
            return Settlement(rid, "committed", charged, flags)


# The emergency cap is per process: Authorities of one store (by URL) and the same limits share
# one. Each with its own — an Authority built per request, or one per framework adapter — would
# multiply what failing open may spend. A forked child starts them afresh (it is another process).
_EMERGENCY_CAPS: dict[tuple[str, tuple[tuple[str, int], ...]], EmergencyCap] = {}
_EMERGENCY_CAPS_LOCK = threading.Lock()


def emergency_cap_for(url: str, limits: dict[str, int]) -> EmergencyCap:
    key = (url, tuple(sorted(limits.items())))
    with _EMERGENCY_CAPS_LOCK:
        cap = _EMERGENCY_CAPS.get(key)
        if cap is None:
            cap = _EMERGENCY_CAPS[key] = EmergencyCap(limits)
        return cap


def _start_afresh() -> None:
    """In a forked child: every cap starts empty — the child is another process — but stays the
    one its store's Authorities share, those made before the fork included (they hold it too)."""
    global _EMERGENCY_CAPS_LOCK  # noqa: PLW0603 - a fresh lock in a forked child (one held at fork stays held)
    _EMERGENCY_CAPS_LOCK = threading.Lock()
    for cap in _EMERGENCY_CAPS.values():
        cap.start_afresh()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_start_afresh)
