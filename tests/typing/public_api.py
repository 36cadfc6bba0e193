"""Type-checked only (``mypy tests/typing``): the public API as users write against it.

If a public name or signature changes in a way that breaks users' type checking, CI fails here.
"""

from __future__ import annotations

from decimal import Decimal

from clearance import (
    Action,
    Authority,
    Balance,
    Budget,
    Caps,
    ClearanceError,
    Decision,
    Denied,
    InvalidRequest,
    Outcome,
    Plan,
    Policy,
    PolicyDocument,
    Reservation,
    ReservationNotFound,
    Settlement,
    StoreUnavailable,
)


def sync_use(authority: Authority) -> Decimal | None:
    authority.set_budget(Budget("tenant:acme", "usd", "10", period="day"))
    action: Action = Action.model_call("openai", "gpt-4.1", 1000, 500)
    cached: Action = Action.model_call("anthropic", "claude-3-5-haiku-latest", 1000, 500, cache_write_tokens=800)
    tiered: Action = Action.model_call("openai", "gpt-5", 1000, 500, service_tier="priority")
    assert cached.amounts["usd"] > 0 and tiered.amounts["usd"] > 0
    decision: Decision = authority.reserve(action, "tenant:acme/run:r1", ttl=30.0, idempotency_key="k")
    if decision.outcome is Outcome.DENY:
        return None
    reservation: Reservation | None = decision.reservation
    assert reservation is not None
    settlement: Settlement = authority.commit(reservation, {"usd": Decimal("0.001"), "tokens": 1200})
    assert settlement.status == "committed"
    balance: Balance = authority.balance("tenant:acme")["usd"]
    plans = [Plan({"usd": 1}), Plan({"usd": "0.1"}, caps=Caps(model="gpt-4.1-mini"), min_headroom={"workflow": 0.2})]
    authority.reserve(action, "tenant:acme/run:r1", plans=plans)
    try:
        with authority.guard(action, "tenant:acme/run:r1") as grant:
            model: str | None = grant.model
            limits: tuple[int | None, int | None] = (grant.max_output_tokens, grant.max_input_tokens)
            print(model, limits)
            grant.settle({"usd": 0.002})
    except Denied as denied:
        print(denied.decision.reasons)
    except (InvalidRequest, StoreUnavailable, ReservationNotFound, ClearanceError):
        raise
    return balance.remaining


async def async_use(authority: Authority) -> int:
    action = Action.tool_call("web_search")
    decision = await authority.areserve(action, "tenant:acme/run:r1")
    if decision.reservation is not None:
        await authority.acommit(decision.reservation)
    async with authority.aguard(action, "tenant:acme/run:r1") as grant:
        grant.settle({"calls": 1})
    return await authority.asweep()


def policies() -> Authority:
    document = PolicyDocument.parse({"ladders": [{"rungs": ["gpt-4.1", "gpt-4.1-mini"]}]})
    return Authority("memory://", policy=Policy(document), policy_refresh=5.0)
