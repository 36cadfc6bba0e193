"""The examples are real programs: each must run to completion, offline."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs(example: Path) -> None:
    done = subprocess.run([sys.executable, str(example)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


DOCUMENTED = ["clearance", "clearance.action", "clearance.authority", "clearance.budget", "clearance.plan",
              "clearance.testing"]  # fmt: skip


@pytest.mark.parametrize("module", DOCUMENTED)
def test_docstring_examples_run_as_shown(module: str) -> None:
    """The ``>>>`` examples in the public names' docstrings are what those calls answer."""
    found = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert found.attempted > 0
    assert found.failed == 0
