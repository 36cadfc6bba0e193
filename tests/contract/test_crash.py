"""A process killed mid-operation loses nothing committed and leaves no half-applied reservation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest

from clearance import Authority, Budget

WORKER = textwrap.dedent(
    """
    import sys
    from clearance import Action, Authority
    authority = Authority(sys.argv[1])
    action = Action("step", "s", {"usd": "0.01", "calls": 1})
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        decision = authority.reserve(action, f"tenant:crash/run:r{n % 7}", ttl=3600)
        if decision.reservation is None:
            continue
        if n % 3 == 0:
            authority.release(decision.reservation)
        else:
            authority.commit(decision.reservation, {"usd": "0.004"})
    """
)


@pytest.mark.sqlite
@pytest.mark.slow
def test_sigkill_mid_operation_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    authority = Authority(url)
    authority.set_budget(Budget("tenant:crash", "usd", 1_000_000))
    authority.set_budget(Budget("tenant:crash", "calls", 1_000_000))
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, url], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    for worker in workers:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
    # Kill them mid-stream once they have done real work (a loaded machine may need longer than 1 s).
    deadline = time.monotonic() + 30
    time.sleep(0.5)
    while len(authority.events(limit=300, scope="tenant:crash")) < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        assert worker.stdout is not None
        worker.stdout.close()
    records = authority.store.reservations(None, None, 10**7, authority.clock())
    assert len(records) > 100, "the workers did not get going"
    held = [r for r in records if r.status == "held"]
    committed = [r for r in records if r.status == "committed"]
    usd = authority.balance("tenant:crash")["usd"]
    calls = authority.balance("tenant:crash")["calls"]
    # Every hold on the books belongs to a held reservation, and every spend to a committed one.
    assert usd.held * 10**9 == sum(dict(r.amounts)["usd"] for r in held)
    assert calls.held == sum(dict(r.amounts)["calls"] for r in held)
    assert usd.spent * 10**9 == sum(dict(r.committed or ())["usd"] for r in committed)
    assert calls.spent == sum(dict(r.committed or ())["calls"] for r in committed)
    assert usd.spent == Decimal("0.004") * len(committed)
    # The audit trail agrees with the ledger: one hold event per reservation, one commit per commit.
    events = authority.events(limit=100_000, scope="tenant:crash")
    assert sum(e.kind == "hold" for e in events) == len(records)
    assert sum(e.kind == "commit" for e in events) == len(committed)
    authority.close()
