"""Shared fixtures: every contract test runs once per store backend.

Backends: ``memory`` and ``sqlite`` always; ``redis``, ``cluster`` and ``tls`` (a ``rediss://``
server demanding client certificates) when a throwaway ``redis-server`` can be started
(tests/redis_servers.py). With ``CI=true`` a missing redis-server
fails the run instead of skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearance import Authority
from clearance.authority import _warned
from clearance.emergency import _EMERGENCY_CAPS
from clearance.testing import FakeClock

pytest_plugins = ["redis_servers"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

STORE_KINDS = ["memory", "sqlite", "redis", "cluster", "tls"]


_REDIS_FIXTURES = {"redis": "redis_url", "cluster": "redis_cluster_url", "tls": "redis_tls_url"}


def make_store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of ``kind`` for one test."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    if kind in _REDIS_FIXTURES:
        fixture = _REDIS_FIXTURES[kind]
        try:
            return str(request.getfixturevalue(fixture))
        except pytest.FixtureLookupError:
            pytest.skip(f"the {kind} store is not available in this checkout")
    raise AssertionError(kind)


@pytest.fixture(params=[pytest.param(kind, marks=getattr(pytest.mark, kind)) for kind in STORE_KINDS])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return make_store_url(request.param, request, tmp_path)


@pytest.fixture(autouse=True)
def _fresh_emergency_caps() -> None:
    """The fail-open emergency cap is per process (shared by the Authorities of one store URL and
    limits): each test starts with none, as a new process would."""
    _EMERGENCY_CAPS.clear()
    _warned.clear()  # (and logs its first store-trouble decision of each kind)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def authority(store_url: str, clock: FakeClock) -> Iterator[Authority]:
    auth = Authority(store_url, clock=clock)
    yield auth
    auth.close()
