"""Instructions per reserve+commit lifecycle on the embedded stores, counted by valgrind's callgrind,
each beside the same count for the bare baselines of ``core_bench.py``.

    python benchmarks/instructions_bench.py [--stores memory,sqlite] [--depths 1,3,6] [--lifecycles 2000]

Wall-clock time on this shared 2-core machine moves by 2x between runs and between hosts; the
number of instructions a lifecycle executes does not (to within a fraction of a percent), so this
is the way to tell whether a change made the hot path cheaper. Each figure is
(instructions for warm-up + ``--lifecycles`` lifecycles - instructions for the warm-up alone)
/ ``--lifecycles``: start-up and imports cancel out. User-space instructions only: the system calls
of the SQLite store (its WAL writes, its locks) are not counted, so for SQLite this shows the
Python and SQL work, not the I/O. Needs ``valgrind`` (Debian: ``apt install valgrind``); a run
takes a few minutes (callgrind runs Python about 50x slower).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARM_UP = 300


def run_child(store: str, depth: int, kind: str, count: int) -> None:
    """In the child: build the workload (untimed), then run ``count`` lifecycles."""
    sys.path.insert(0, str(HERE))
    from core_bench import authority_lifecycle, bare_memory, bare_sqlite

    folder = Path(tempfile.mkdtemp(prefix="clearance-instructions-"))
    lifecycle: Callable[[], None]
    if kind == "ours":
        url = "memory://" if store == "memory" else f"sqlite:///{folder / 'ledger.db'}"
        lifecycle, close = authority_lifecycle(url, depth)
    elif store == "memory":
        lifecycle, close = bare_memory(depth)
    else:
        lifecycle, close = bare_sqlite(folder / "bare.db", depth)
    for _ in range(count):
        lifecycle()
    close()
    shutil.rmtree(folder, ignore_errors=True)


def instructions(store: str, depth: int, kind: str, count: int) -> int:
    """Instructions callgrind counts for a child running ``count`` lifecycles (start-up included)."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, str(Path(__file__).resolve()), "--child", store, str(depth), kind, str(count),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"Collected\s*:\s*(\d+)", finished.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{finished.stderr[-2000:]}")
    return int(found.group(1))


def per_lifecycle(store: str, depth: int, kind: str, lifecycles: int) -> float:
    return (instructions(store, depth, kind, WARM_UP + lifecycles) - instructions(store, depth, kind, WARM_UP)) / (
        lifecycles
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="memory,sqlite", help="comma-separated: memory, sqlite")
    parser.add_argument("--depths", default="1,3,6", help="comma-separated scope depths")
    parser.add_argument("--lifecycles", type=int, default=2000, help="lifecycles counted per figure")
    parser.add_argument("--child", nargs=4, metavar=("STORE", "DEPTH", "KIND", "COUNT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        store, depth, kind, count = options.child
        run_child(store, int(depth), kind, int(count))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt install valgrind)")
    print("clearance instructions per reserve+commit lifecycle (callgrind, user space)")
    print("a usd budget on every level of the scope; bare = core_bench.py's baselines")
    print(f"{'store':<7} {'depth':>5} {'ours':>12} {'bare':>12} {'bare/ours':>10}")
    for store in options.stores.split(","):
        for depth in (int(d) for d in options.depths.split(",")):
            ours = per_lifecycle(store, depth, "ours", options.lifecycles)
            bare = per_lifecycle(store, depth, "bare", options.lifecycles)
            print(f"{store:<7} {depth:>5} {ours:>12,.0f} {bare:>12,.0f} {bare / ours:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
