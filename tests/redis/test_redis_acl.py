"""The least-privilege ACL user that docs/redis.md recommends, run as written against real servers:
every Authority call and the CLI's read commands must work with exactly those permissions."""

from __future__ import annotations

import re
import shlex
from decimal import Decimal
from pathlib import Path

import pytest
import redis as redis_py
import redis.cluster

from clearance import Action, Authority, Budget, StoreUnavailable
from clearance.policy_file import PolicyDocument
from clearance.stores.redis import RedisStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis.md"


def documented_acl(cluster: bool) -> list[str]:
    """The ``ACL SETUSER`` arguments from docs/redis.md (plus the cluster extras it names)."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"ACL SETUSER (.*?)\n\s*```", text, re.S)
    assert block is not None, "docs/redis.md lost its ACL SETUSER example"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    if cluster:
        extras = re.search(r"On a cluster add `([^`]*)`", text)
        assert extras is not None, "docs/redis.md lost the cluster ACL extras"
        words += extras.group(1).split()
    return words


def _exercise(authority: Authority) -> None:
    authority.set_budget(Budget("tenant:acl", "usd", 10))
    decision = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:acl/run:1", ttl=0.01)
    assert decision.allowed, decision.reasons
    kept = authority.reserve(Action("step", "s", {"usd": 2}), "tenant:acl/run:1", idempotency_key="k")
    assert kept.reservation is not None
    authority.extend(kept.reservation, 60)
    assert authority.reservation(kept.reservation).status == "held"
    assert kept.reservation.id in [r.id for r in authority.reservations("tenant:acl")]
    authority.commit(kept.reservation, {"usd": 1})
    assert authority.sweep() >= 0
    assert authority.balance("tenant:acl")["usd"].spent == 1
    assert authority.budgets()
    assert authority.events(limit=5, newest=True) and authority.events(limit=5)
    released = authority.reserve(Action("step", "s", {"usd": 1}), "tenant:acl/run:2")
    assert released.reservation is not None
    authority.release(released.reservation)
    document = PolicyDocument.parse({"budgets": [{"scope": "tenant:acl", "unit": "calls", "limit": 5}]})
    assert authority.apply_policy(document) >= 1
    assert authority.reserve(Action("step", "s", {"usd": 1}), "tenant:acl/run:3").allowed
    assert authority.remove_budget("tenant:acl", "calls")


def test_the_documented_acl_user_can_do_everything(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    prefix = store.key_prefix
    raw = redis_py.Redis.from_url(store.url)
    words = [("~" + prefix + "*") if w == "~clearance:*" else w for w in documented_acl(cluster=False)]
    user = f"acl{prefix.rstrip(':')}"
    raw.execute_command("ACL", "SETUSER", user, *words[1:])
    try:
        url = store.url.replace("redis://", f"redis://{user}:s3cret@", 1) + f"?key_prefix={prefix}"
        authority = Authority(url)
        _exercise(authority)
        authority.close()
    finally:
        raw.execute_command("ACL", "DELUSER", user)
        raw.close()
        store.close()


def test_the_documented_acl_user_can_use_another_database_with_the_documented_extra(redis_url: str) -> None:
    """``redis://…/4``: redis-py selects the database on every connection, which the base user may not."""
    store = RedisStore.from_url(redis_url)
    prefix = store.key_prefix
    raw = redis_py.Redis.from_url(store.url)
    extra = re.search(r"database other than 0 \(`[^`]*`\) add `([^`]*)`", DOC.read_text(encoding="utf-8"))
    assert extra is not None, "docs/redis.md lost the extra for a database other than 0"
    words = [("~" + prefix + "*") if w == "~clearance:*" else w for w in documented_acl(cluster=False)]
    user = f"acldb{prefix.rstrip(':')}"
    raw.execute_command("ACL", "SETUSER", user, *words[1:], *extra.group(1).split())
    try:
        base = store.url.replace("redis://", f"redis://{user}:s3cret@", 1).rsplit("/", 1)[0]
        authority = Authority(f"{base}/4?key_prefix={prefix}")
        _exercise(authority)
        authority.close()
    finally:
        raw.execute_command("ACL", "DELUSER", user)
        raw.close()
        store.close()


def test_the_documented_acl_user_can_do_everything_on_a_cluster(redis_cluster_url: str) -> None:
    store = RedisStore.from_url(redis_cluster_url)
    prefix = store.key_prefix
    raw = redis.cluster.RedisCluster.from_url(store.url.replace("redis+cluster://", "redis://"))
    words = [("~" + prefix + "*") if w == "~clearance:*" else w for w in documented_acl(cluster=True)]
    user = f"acl{prefix.rstrip(':')}"
    primaries = raw.get_primaries()
    for node in primaries:
        raw.get_redis_connection(node).execute_command("ACL", "SETUSER", user, *words[1:])
    try:
        host_port = store.url.split("://", 1)[1].split("/")[0].split("?")[0]
        authority = Authority(f"redis+cluster://{user}:s3cret@{host_port}?key_prefix={prefix}")
        _exercise(authority)
        authority.close()
    finally:
        for node in primaries:
            raw.get_redis_connection(node).execute_command("ACL", "DELUSER", user)
        raw.close()
        store.close()


@pytest.mark.parametrize("missing", ["+xadd", "+time", "+@sortedset"])
def test_a_user_missing_a_permission_changes_nothing(redis_url: str, missing: str) -> None:
    """Redis keeps a script's writes when a later command is refused, and the audit (XADD, TIME)
    comes last: a user lacking one permission had a denied reserve's hold written all the same
    (the budget stayed taken until its TTL), and a commit or release that raised applied without
    its audit event. A process's first call on a tenant now checks every permission first."""
    store = RedisStore.from_url(redis_url)
    prefix = store.key_prefix
    raw = redis_py.Redis.from_url(store.url)
    words = [("~" + prefix + "*") if w == "~clearance:*" else w for w in documented_acl(cluster=False)]
    if missing == "+@sortedset":
        words = [w for w in words if w != missing] + ["+zscore"]  # some of the family only
    else:
        words.remove(missing)
    user = f"acllack{prefix.rstrip(':')}"
    raw.execute_command("ACL", "SETUSER", user, *words[1:])
    good = Authority(redis_url)
    try:
        good.set_budget(Budget("tenant:lack", "usd", 5))
        lacking = Authority(store.url.replace("redis://", f"redis://{user}:s3cret@", 1) + f"?key_prefix={prefix}")
        step = Action("step", "s", {"usd": 1})
        for _ in range(3):
            denied = lacking.reserve(step, "tenant:lack")
            assert [r.code for r in denied.reasons] == ["store_unavailable"]
            assert "may not run" in denied.reasons[0].message
        assert good.balance("tenant:lack")["usd"].held == 0
        assert good.reservations("tenant:lack") == []
        held = good.reserve(step, "tenant:lack").reservation
        assert held is not None
        with pytest.raises(StoreUnavailable, match="may not run"):
            lacking.commit(held, {"usd": "0.5"})
        with pytest.raises(StoreUnavailable, match="may not run"):
            lacking.release(held)
        assert good.reservation(held).status == "held"
        balance = good.balance("tenant:lack")["usd"]
        assert (balance.spent, balance.held) == (Decimal(0), Decimal(1))
        assert [e.kind for e in good.events(scope="tenant:lack")] == ["budget_set", "hold"]
        lacking.close()
    finally:
        good.close()
        raw.execute_command("ACL", "DELUSER", user)
        raw.close()
        store.close()
