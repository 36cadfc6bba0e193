"""Deny-only vs the default policy on a workload whose budget is 50% of its unconstrained demand.

    python benchmarks/degradation_bench.py [--runs 300] [--seed 7] [--share 0.5]

The same seeded workload of agent runs (priced model calls, tool calls, an optional step) is played
three times on fresh in-memory ledgers: once without any budget to measure the unconstrained demand,
then with a tenant budget of ``share`` x that demand, first deny-only (no policy: a required step
that does not fit ends its run), then with ``examples/policies/default.yaml``. A run *finishes* when
every required step was allowed, degraded or not. Target: >= 95% of runs finish, spend <= budget.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from clearance import Action, Authority, Budget, Outcome, Policy, PolicyDocument
from clearance.pricing import price_usd

POLICY = Path(__file__).resolve().parent.parent / "examples" / "policies" / "default.yaml"
TENANT = "tenant:bench"


@dataclass
class Step:
    kind: str  # model | tool | optional
    input_tokens: int = 0
    max_output_tokens: int = 0
    output_share: float = 1.0  # the share of max_output_tokens the model actually writes
    tool_usd: Decimal = Decimal(0)


@dataclass
class Run:
    scope: str
    steps: list[Step]


@dataclass
class Outcomes:
    finished: int = 0
    spend: Decimal = Decimal(0)
    denied_required: int = 0
    steps: Counter[str] = field(default_factory=Counter)


def workload(runs: int, seed: int) -> list[Run]:
    rng = random.Random(seed)
    result = []
    for n in range(runs):
        steps = [Step("model", rng.randint(2000, 6000), 800, rng.uniform(0.4, 1.0))]
        context = steps[0].input_tokens
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.6:
                steps.append(Step("tool", tool_usd=Decimal("0.005")))
            context += rng.randint(1500, 5000)
            steps.append(Step("model", context, rng.choice([600, 1000, 1200]), rng.uniform(0.3, 1.0)))
        steps.append(Step("optional", context, 500, rng.uniform(0.5, 1.0)))
        steps.append(Step("model", context + 800, 1500, rng.uniform(0.4, 1.0)))
        result.append(Run(f"{TENANT}/workflow:w{n % 3}/run:r{n}", steps))
    return result


def play(authority: Authority, runs: list[Run], concurrent: int = 8) -> Outcomes:
    """Round-robin the runs' steps, ``concurrent`` runs at a time (deterministic)."""
    out = Outcomes()
    active: list[tuple[Run, int]] = []
    pending = list(runs)
    while pending or active:
        while pending and len(active) < concurrent:
            active.append((pending.pop(0), 0))
        run, position = active.pop(0)
        step = run.steps[position]
        ok = execute(authority, run.scope, step, out)
        if not ok:
            out.denied_required += 1
            continue  # the run stops: a required step was denied
        if position + 1 < len(run.steps):
            active.append((run, position + 1))
        else:
            out.finished += 1
    return out


def execute(authority: Authority, scope: str, step: Step, out: Outcomes) -> bool:
    if step.kind == "tool":
        action = Action.tool_call("web_search", {"calls": 1, "usd": step.tool_usd})
    else:
        action = Action.model_call(
            "openai", "gpt-4.1", step.input_tokens, step.max_output_tokens, optional=step.kind == "optional"
        )
    decision = authority.reserve(action, scope)
    if decision.outcome is Outcome.DENY:
        out.steps["denied" if step.kind != "optional" else "optional denied"] += 1
        return step.kind == "optional"
    caps = decision.caps
    assert decision.reservation is not None
    if caps is not None and caps.skip_optional:
        out.steps["optional skipped"] += 1
        authority.release(decision.reservation)
        return True
    if step.kind == "tool":
        actual = {"usd": step.tool_usd, "calls": 1}
        out.steps["tool"] += 1
    else:
        model = (caps.model if caps and caps.model else None) or "gpt-4.1"
        tokens_in = step.input_tokens
        if caps and caps.max_input_tokens:
            tokens_in = min(tokens_in, caps.max_input_tokens)
        limit = caps.max_output_tokens if caps and caps.max_output_tokens else step.max_output_tokens
        tokens_out = int(limit * step.output_share)
        usd = price_usd("openai", model, tokens_in, tokens_out)
        actual = {"usd": usd, "tokens": tokens_in + tokens_out}
        if caps is None:
            out.steps["model full"] += 1
        else:
            if caps.model:
                out.steps[f"model → {caps.model}"] += 1
            if caps.max_output_tokens:
                out.steps["output capped"] += 1
            if caps.max_input_tokens:
                out.steps["context trimmed"] += 1
    settlement = authority.commit(decision.reservation, actual)
    out.spend += settlement.charged.get("usd", Decimal(0))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--share", type=float, default=0.5, help="budget as a share of unconstrained demand")
    args = parser.parse_args()
    runs = workload(args.runs, args.seed)

    demand = play(Authority("memory://"), runs).spend
    budget = (demand * Decimal(str(args.share))).quantize(Decimal("0.000001"))

    def constrained(policy: Policy | None) -> tuple[Outcomes, Authority]:
        authority = Authority("memory://", policy=policy)
        authority.set_budget(Budget(TENANT, "usd", budget))
        return play(authority, runs), authority

    deny_only, deny_authority = constrained(None)
    degraded, policy_authority = constrained(Policy(PolicyDocument.load(POLICY)))
    print(f"workload: {args.runs} runs (seed {args.seed}), {sum(len(r.steps) for r in runs)} steps")
    print(f"unconstrained demand ${demand:.4f}; tenant budget ${budget:.4f} ({args.share:.0%} of demand)")
    print(f"{'':32} {'deny-only':>16} {'default policy':>16}")

    def row(label: str, a: object, b: object) -> None:
        print(f"{label:32} {a!s:>16} {b!s:>16}")

    def finished(o: Outcomes) -> str:
        return f"{o.finished} ({o.finished / args.runs:.1%})"

    row("runs finished (all required)", finished(deny_only), finished(degraded))
    row("required steps denied", deny_only.denied_required, degraded.denied_required)
    row("spend", f"${deny_only.spend:.4f}", f"${degraded.spend:.4f}")
    row("spend / budget", f"{deny_only.spend / budget:.1%}", f"{degraded.spend / budget:.1%}")
    for authority, name in ((deny_authority, "deny-only"), (policy_authority, "policy")):
        balance = authority.balance(TENANT)["usd"]
        assert balance.spent + balance.held <= balance.limit, f"{name} overspent"
        assert balance.held == 0
    labels = sorted(set(deny_only.steps) | set(degraded.steps))
    print("how each step ran:")
    for label in labels:
        row(f"  {label}", deny_only.steps.get(label, 0), degraded.steps.get(label, 0))
    share = degraded.finished / args.runs
    ok = share >= 0.95 and degraded.spend <= budget
    print(f"target >= 95% of runs finish and spend <= budget: {'met' if ok else 'MISSED'} ({share:.1%})")


if __name__ == "__main__":
    main()
