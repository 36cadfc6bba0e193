"""Quickstart: budgets on two levels, a guarded model call, a denial that explains itself.

python examples/quickstart.py
"""

from __future__ import annotations

from clearance import Action, Authority, Budget, Denied

authority = Authority("memory://")
authority.set_budget(Budget("tenant:acme", "usd", "1.00", period="day"))
authority.set_budget(Budget("tenant:acme/workflow:triage", "usd", "0.02"))
run = "tenant:acme/workflow:triage/run:r-81f"

# The worst case of this call (3,200 input tokens, up to 800 output) is held before it runs...
action = Action.model_call("openai", "gpt-4.1", input_tokens=3_200, max_output_tokens=800)
with authority.guard(action, run) as grant:
    print("decision:", grant.decision.outcome.value, "| held:", grant.decision.reservation.amounts)  # type: ignore[union-attr]
    # ... call the model here; then settle what it really cost (the rest of the hold is freed).
    grant.settle({"usd": "0.0081", "tokens": 3_650})

print("workflow:", authority.balance("tenant:acme/workflow:triage")["usd"])

# A second, bigger call no longer fits the workflow budget: nothing runs, the reasons say why.
try:
    with authority.guard(Action.model_call("openai", "gpt-4.1", 6_000, 1_000), run):
        raise AssertionError("not reached")
except Denied as denied:
    for reason in denied.decision.reasons:
        print("denied:", reason.code, "-", reason.message)
