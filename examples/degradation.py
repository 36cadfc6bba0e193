"""Graceful degradation: the same calls, first as asked, then cheaper, shorter, skipped.

python examples/degradation.py
"""

from __future__ import annotations

from pathlib import Path

from clearance import Action, Authority, Budget, Policy, PolicyDocument

policy = Policy(PolicyDocument.load(Path(__file__).parent / "policies" / "default.yaml"))
authority = Authority("memory://", policy=policy)
authority.set_budget(Budget("tenant:acme/workflow:research", "usd", "0.05"))
run = "tenant:acme/workflow:research/run:r-1"

for step in range(24):
    optional = step % 4 == 3
    action = Action.model_call("openai", "gpt-4.1", 2_500 + 1_000 * step, 1_000, optional=optional)
    decision = authority.reserve(action, run)
    what = decision.outcome.value
    if decision.caps is not None:
        what += f" {decision.caps!r}"
    why = decision.reasons[-1].message if decision.reasons else ""
    print(f"step {step:2} {'(optional) ' if optional else '':11}{what:62} {why}")
    if decision.reservation is not None:
        authority.commit(decision.reservation)  # pretend every call used its whole allowance

print("workflow:", authority.balance("tenant:acme/workflow:research")["usd"])
