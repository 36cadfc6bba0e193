"""``clearance demo``: a simulated multi-tenant agent workload against a real ledger.

Three tenants run agent workflows on concurrent worker threads. Each run is a sequence of model
calls priced by genai-prices, tool calls and optional steps. The workers pass no plans: the demo
policy (:data:`DEMO_POLICY`, the same rules a ``clearance apply`` file holds) turns every call into
its ladder — requested model while a quarter of the run's and workflow's dollars would remain, then
the cheaper model, then the longest answer the headroom still pays for; optional steps only while
half the run's dollars would remain — so the budgets visibly allow, degrade and deny. Actual usage
is at or below the estimate; some actions fail (released), some workers "crash" mid-action (their
holds expire and are swept).

The point is the last line: after the run the demo reconciles what the workers say they committed
with what the ledger says was spent, budget by budget, and checks ``spent + held <= limit`` in every
snapshot it took while the workers were racing. Anything else is a bug, and the demo exits 1.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from clearance import (
    Action,
    Authority,
    Balance,
    Budget,
    Decision,
    Outcome,
    Policy,
    PolicyDocument,
    Reservation,
    StoreUnavailable,
)
from clearance.cli.tables import amount, unit_label
from clearance.periods import ALL_PERIODS, windows_at
from clearance.stores import redact_url
from clearance.units import from_steps, to_steps

Key = tuple[str, str, str, str]  # (scope, unit, period, window) of one budget's current window


# --- the workload -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ladder:
    """The models a workflow's calls may fall back to when its budgets run short."""

    provider: str
    model: str
    cheaper: str


@dataclass(frozen=True)
class Step:
    kind: Literal["model", "tool", "optional"]
    name: str
    input_tokens: tuple[int, int] = (0, 0)  # drawn uniformly per run
    max_output_tokens: int = 0
    tool_usd: str = "0"  # what a paid tool costs per call


@dataclass(frozen=True)
class Workflow:
    tenant: str
    name: str
    ladder: Ladder
    steps: tuple[Step, ...]
    run_usd: str  # each run's own budget
    share: float  # of all runs

    @property
    def scope(self) -> str:
        return f"tenant:{self.tenant}/workflow:{self.name}"


_GPT = Ladder("openai", "gpt-4.1", "gpt-4.1-mini")
_CLAUDE = Ladder("anthropic", "claude-sonnet-4-5", "claude-haiku-4-5")

DEMO_POLICY = PolicyDocument.parse(
    {
        "ladders": [
            {
                "provider": ladder.provider,
                # the premium model only while a quarter of the run's and the workflow's dollars would remain
                "rungs": [{"model": ladder.model, "min_headroom": {"run": 0.25, "workflow": 0.25}}, ladder.cheaper],
            }
            for ladder in (_GPT, _CLAUDE)
        ],
        "output_cap": {"floor": 200},
        # an optional step takes what it needs only while half of the run's dollars would remain
        "optional": [{"level": "run", "below": 0.5}],
    }
)

WORKFLOWS: tuple[Workflow, ...] = (
    Workflow(
        "acme",
        "triage",
        _GPT,
        (
            Step("model", "classify", (1200, 2500), 300),
            Step("tool", "kb_search"),
            Step("model", "draft_reply", (3000, 6000), 900),
            Step("optional", "self_critique", (2000, 4000), 400),
            Step("tool", "send_email"),
        ),
        run_usd="0.025",
        share=0.30,
    ),
    Workflow(
        "acme",
        "research",
        _CLAUDE,
        (
            Step("model", "plan", (1500, 3000), 500),
            Step("tool", "web_search", tool_usd="0.005"),
            Step("tool", "web_search", tool_usd="0.005"),
            Step("model", "read_sources", (8000, 15000), 1200),
            Step("optional", "fact_check", (4000, 8000), 500),
            Step("model", "write_brief", (4000, 8000), 1500),
        ),
        run_usd="0.10",
        share=0.20,
    ),
    Workflow(
        "globex",
        "review",
        _CLAUDE,
        (
            Step("tool", "git_diff"),
            Step("model", "review", (8000, 18000), 1500),
            Step("tool", "ci_run", tool_usd="0.01"),
            Step("optional", "style_nits", (4000, 9000), 600),
            Step("tool", "post_comment"),
        ),
        run_usd="0.09",
        share=0.28,
    ),
    Workflow(
        "initech",
        "reports",
        _GPT,
        (
            Step("tool", "sql_query"),
            Step("model", "analyze", (4000, 9000), 1200),
            Step("tool", "render_chart"),
            Step("model", "write_report", (3000, 6000), 1500),
            Step("optional", "polish", (3000, 5000), 600),
        ),
        run_usd="0.045",
        share=0.22,
    ),
)


def _budgets(runs: int, tag: str = "") -> list[Budget]:
    """Limits scale with the number of runs, from what a run of each workflow costs on average, so
    they bind in ``--quick`` and full runs alike: initech's daily dollars run out early, globex's CI
    calls and acme's daily dollars near the end, and acme's workflows degrade to cheaper models first."""

    def expected(workflow: str, per_run: float, factor: float) -> str:
        share = next(w.share for w in WORKFLOWS if w.name == workflow)
        return f"{max(per_run * share * runs * factor, 0.05):.2f}"

    research, triage = expected("research", 0.053, 1.0), expected("triage", 0.009, 1.0)
    globex_runs = next(w.share for w in WORKFLOWS if w.tenant == "globex") * runs
    budgets = [
        Budget("tenant:acme", "usd", f"{(float(research) + float(triage)) * 0.8:.2f}", period="day"),
        Budget("tenant:acme", "tokens", max(runs * 12_000, 20_000)),
        Budget("tenant:acme/workflow:research", "usd", research),
        Budget("tenant:acme/workflow:triage", "usd", triage),
        Budget("tenant:globex", "usd", expected("review", 0.042, 1.2)),
        Budget("tenant:globex/workflow:review", "calls", max(int(globex_runs * 2.2), 4)),
        Budget("tenant:initech", "usd", expected("reports", 0.021, 0.65), period="day"),
        Budget("tenant:initech/workflow:reports", "usd", expected("reports", 0.021, 1.5)),
    ]
    return [Budget(_tagged(b.scope, tag), b.unit, b.limit, period=b.period) for b in budgets]


# --- what the workers record ---------------------------------------------------------------------------
@dataclass
class Counts:
    allowed: int = 0
    degraded: int = 0
    denied: int = 0


@dataclass
class Tally:
    """Shared by the workers (under ``lock``): what they saw and what they committed."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    decisions: Counts = field(default_factory=Counts)
    by_budget: dict[tuple[str, str], Counts] = field(default_factory=lambda: defaultdict(Counts))
    denied_by: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    committed: dict[Key, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    commits: int = 0
    committed_usd: Decimal = Decimal(0)
    releases: int = 0
    crashed: int = 0
    crashed_ids: list[str] = field(default_factory=list)
    crash_expiry: float = 0.0
    retries: int = 0
    runs_done: int = 0
    runs_halted: int = 0
    caps_seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)
    store_trouble: bool = False  # a worker stopped by StoreUnavailable (not a ledger bug: exit 3)

    def decided(self, decision: Decision, units: list[str]) -> None:
        with self.lock:
            counts = self.decisions
            if decision.outcome is Outcome.ALLOW:
                counts.allowed += 1
            elif decision.outcome is Outcome.ALLOW_WITH_CAPS:
                counts.degraded += 1
            else:
                counts.denied += 1
            for prefix in _prefixes(decision.scope):
                for unit in units:
                    c = self.by_budget[(prefix, unit)]
                    if decision.outcome is Outcome.ALLOW:
                        c.allowed += 1
                    elif decision.outcome is Outcome.ALLOW_WITH_CAPS:
                        c.degraded += 1
            if decision.outcome is Outcome.DENY:
                binding = decision.binding  # the budget that stopped the last rung of the ladder
                if binding is not None and binding.scope and binding.unit:
                    self.denied_by[(binding.scope, binding.unit, binding.period or "")] += 1
            elif decision.caps is not None:
                caps = decision.caps
                if caps.skip_optional:
                    self.caps_seen["optional step skipped"] += 1
                elif caps.max_output_tokens is not None:
                    self.caps_seen["cheaper model, shorter output" if caps.model else "shorter output"] += 1
                elif caps.model is not None:
                    self.caps_seen["cheaper model"] += 1

    def settled(self, reservation: Reservation, charged: dict[str, Decimal]) -> None:
        windows = dict(windows_at(reservation.created_at))
        with self.lock:
            self.commits += 1
            self.committed_usd += charged.get("usd", Decimal(0))
            for prefix in _prefixes(reservation.scope):
                for unit, value in charged.items():
                    for period in ALL_PERIODS:
                        self.committed[(prefix, unit, period, windows[period])] += value


def _prefixes(scope: str) -> Iterator[str]:
    parts = scope.split("/")
    for depth in range(1, len(parts) + 1):
        yield "/".join(parts[:depth])


# --- one agent run --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSettings:
    seed: int = 7
    workers: int = 8
    runs: int = 240
    latency: float = 1.0  # scales the simulated model/tool latency
    ttl: float = 30.0  # a hold outlives any simulated action by far, so no honest commit is ever late
    crash_ttl: float = 1.0  # a crashed worker's hold comes back this fast (the demo has no time to wait 30 s)
    tag: str = ""  # on a ledger given with --store: this demo's tenants are tenant:acme-<tag>, ...


def _tagged(scope: str, tag: str) -> str:
    """``scope`` under this demo's own tenant: ``tenant:acme/...`` -> ``tenant:acme-<tag>/...``. On a
    shared ledger (``--store``) demos, one after another or at the same time, then never count each
    other's spend, and each reconciles against exactly what its own workers did."""
    if not tag:
        return scope
    root, slash, rest = scope.partition("/")
    return f"{root}-{tag}{slash}{rest}"


def _request(step: Step, ladder: Ladder, rng: random.Random) -> Action:
    """The action a step asks for; the demo policy turns it into its plan ladder."""
    if step.kind == "tool":
        amounts: dict[str, str | int] = {"calls": 1}
        if step.tool_usd != "0":
            amounts["usd"] = step.tool_usd
        return Action.tool_call(step.name, amounts)
    input_tokens = rng.randint(*step.input_tokens)
    optional = step.kind == "optional"
    model = ladder.cheaper if optional else ladder.model  # optional steps already ask for the cheaper model
    return Action.model_call(
        ladder.provider, model, input_tokens, step.max_output_tokens, name=step.name, optional=optional
    )


def _agent_run(
    authority: Authority,
    tally: Tally,
    settings: DemoSettings,
    workflow: Workflow,
    run_id: tuple[str, int],
    stop: threading.Event,
) -> None:
    batch, index = run_id
    rng = random.Random(settings.seed * 1_000_003 + index)
    # the batch keeps a second demo on the same ledger from replaying the first one's idempotency keys
    run_scope = f"{_tagged(workflow.scope, settings.tag)}/run:{batch}-{index:04d}"
    authority.set_budget(Budget(run_scope, "usd", workflow.run_usd))
    halted = False
    # one run in 25 loses its worker mid-action, at a step drawn like everything else
    crash_at = rng.randrange(len(workflow.steps)) if index % 25 == 13 else -1
    for number, step in enumerate(workflow.steps):
        if stop.is_set():
            return
        action = _request(step, workflow.ladder, rng)
        crash = number == crash_at
        key = f"{run_scope}/step-{number}"
        decision = authority.reserve(
            action, run_scope, ttl=settings.crash_ttl if crash else settings.ttl, idempotency_key=key
        )
        if decision.allowed and rng.random() < 0.05:
            # a client timeout: the retry with the same idempotency key must get the same hold back
            retry = authority.reserve(action, run_scope, ttl=settings.ttl, idempotency_key=key)
            with tally.lock:
                tally.retries += 1
                if (
                    retry.reservation is None
                    or decision.reservation is None
                    or retry.reservation.id != decision.reservation.id
                ):
                    tally.errors.append(f"retry of {key} got a different reservation")
        tally.decided(decision, list(action.amounts))
        reservation = decision.reservation
        if reservation is None:
            if step.kind == "optional":
                continue
            halted = True
            break
        if decision.caps is not None and decision.caps.skip_optional:
            authority.release(reservation)
            continue
        time.sleep(rng.uniform(0.02, 0.06 if step.kind != "tool" else 0.02) * settings.latency)
        if crash:
            with tally.lock:
                tally.crashed += 1
                tally.crashed_ids.append(reservation.id)
                tally.crash_expiry = max(tally.crash_expiry, reservation.expires_at)
            return  # the worker died mid-action: nobody commits or releases; the hold expires
        if rng.random() < 0.04:
            authority.release(reservation)  # the call failed before it cost anything
            with tally.lock:
                tally.releases += 1
            continue
        held = reservation.amounts
        fraction = Decimal(rng.randint(35, 100)) / 100  # real usage is at or below the worst case
        # usd and tokens come in under the worst case; counted units (calls, tool.*.calls, rate.*) as held
        actual = {unit: (value * fraction if unit in ("usd", "tokens") else value) for unit, value in held.items()}
        actual = {unit: (value.to_integral_value() if unit != "usd" else value) for unit, value in actual.items()}
        # in the ledger's own steps (usd: nano-dollars, rounded up as the ledger would), so the tally
        # can hold the ledger to exactly what was sent
        actual = {unit: from_steps(unit, to_steps(unit, value)) for unit, value in actual.items()}
        settlement = authority.commit(reservation, actual)
        if settlement.charged != actual:
            with tally.lock:
                tally.errors.append(f"{reservation.id}: committed {actual}, the ledger charged {settlement.charged}")
        tally.settled(reservation, actual)  # what the worker committed, not the ledger's own answer
    with tally.lock:
        if halted:
            tally.runs_halted += 1
        else:
            tally.runs_done += 1


# --- the whole demo ------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    ok: bool
    problems: list[str]
    budgets: int
    snapshots: int
    store_trouble: bool = False


def _schedule(settings: DemoSettings) -> list[Workflow]:
    rng = random.Random(settings.seed)
    return rng.choices(WORKFLOWS, weights=[w.share for w in WORKFLOWS], k=settings.runs)


def run(console: Console, url: str, settings: DemoSettings, *, note: str = "") -> DemoResult:
    """Run the workload on the store at ``url`` and print the report; the result says whether the
    ledger reconciled."""
    authority = Authority.from_url(url, policy=Policy(DEMO_POLICY))
    try:
        return _run_demo(console, authority, url, settings, note)
    finally:
        authority.close()


def _run_demo(console: Console, authority: Authority, url: str, settings: DemoSettings, note: str) -> DemoResult:
    console.print(
        f"[bold]clearance demo[/] · seed {settings.seed} · {settings.workers} worker threads · "
        f"{settings.runs} agent runs"
    )
    console.print(Text(f"store {redact_url(url)}{note}", style="cyan"), soft_wrap=True)
    for budget in _budgets(settings.runs, settings.tag):
        authority.set_budget(budget)
    # A ledger given with --store may hold earlier demos: reconcile against what this one adds.
    start = {_key(b): b.spent for b in _demo_budgets(authority, settings.tag)}
    tally = Tally()
    race = _race(console, authority, url, settings, tally, start)

    # Crashed workers never settle: wait until their holds have expired, then sweep them back.
    wait = tally.crash_expiry - time.time()
    if wait > 0:
        time.sleep(wait + 0.05)
    authority.sweep()
    final = _demo_budgets(authority, settings.tag)
    race.snapshots += 1
    race.violations.extend(_over_limit(final, start))
    problems = tally.errors + race.violations + _mismatches(final, start, tally) + _not_back(authority, tally)

    console.print(_scope_table(final, tally))
    _summary(console, tally, settings, race.elapsed)
    ok = not problems
    if ok:
        console.print(
            f"[bold green]reconciliation: OK[/] — spent + held <= limit for all {len(final)} budgets in "
            f"{race.snapshots} snapshots,\n{'':21}"
            "and each budget's spent grew by exactly the actuals its workers committed"
        )
    else:
        console.print(f"[bold red]reconciliation: FAILED[/] — {len(problems)} problem(s):")
        for problem in problems[:20]:
            console.print(f"  [red]{problem}[/]")
    return DemoResult(ok, problems, len(final), race.snapshots, tally.store_trouble)


@dataclass
class Race:
    elapsed: float = 0.0
    snapshots: int = 0
    violations: list[str] = field(default_factory=list)


def _race(
    console: Console, authority: Authority, url: str, settings: DemoSettings, tally: Tally, start: dict[Key, Decimal]
) -> Race:
    """Run every agent run on the worker threads; meanwhile show progress and snapshot every budget."""
    batch = os.urandom(2).hex()
    queue = list(enumerate(_schedule(settings)))
    queue.reverse()
    queue_lock = threading.Lock()
    stop = threading.Event()
    # A memory:// store lives in this process only, so the workers must share it; any other store is
    # opened once per worker, as separate processes and machines would.
    shared = authority.store if url.startswith("memory:") else None

    def worker() -> None:
        own = (
            Authority(shared, policy=authority.current_policy())
            if shared is not None
            else Authority.from_url(url, policy=authority.current_policy())
        )
        try:
            while not stop.is_set():
                with queue_lock:
                    if not queue:
                        return
                    index, workflow = queue.pop()
                _agent_run(own, tally, settings, workflow, (batch, index), stop)
        except Exception as error:  # surfaced in the report, never a silent thread death
            with tally.lock:
                tally.errors.append(f"worker failed: {type(error).__name__}: {error}")
                tally.store_trouble = tally.store_trouble or isinstance(error, StoreUnavailable)
            stop.set()
        finally:
            if shared is None:
                own.close()

    threads = [threading.Thread(target=worker, name=f"agent-worker-{n}", daemon=True) for n in range(settings.workers)]
    race = Race()
    began = time.perf_counter()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task("agent runs", total=settings.runs, counts="")
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                race.snapshots += 1
                race.violations.extend(_over_limit(_demo_budgets(authority, settings.tag), start))
                with tally.lock:
                    done = tally.runs_done + tally.runs_halted + tally.crashed
                    d = tally.decisions
                    counts = f"[green]{d.allowed} allowed[/] [yellow]{d.degraded} degraded[/] [red]{d.denied} denied[/]"
                progress.update(task, completed=done, counts=counts)
                time.sleep(0.1)
            progress.update(task, completed=settings.runs)
    finally:
        stop.set()  # on Ctrl-C: let each worker finish its current step, then stop
        for thread in threads:
            thread.join()
    race.elapsed = time.perf_counter() - began
    return race


def _mismatches(final: list[Balance], start: dict[Key, Decimal], tally: Tally) -> list[str]:
    """Each budget's spent must have grown by exactly what the workers committed under it, and no
    hold may outlive the workers."""
    problems: list[str] = []
    for balance in final:
        key = _key(balance)
        ledger = balance.spent - start.get(key, Decimal(0))
        recorded = tally.committed.get(key, Decimal(0))
        if ledger != recorded:
            problems.append(
                f"{balance.scope} {unit_label(balance.unit, balance.period)}: "
                f"ledger spent {ledger}, workers committed {recorded}"
            )
        if balance.held != 0:
            problems.append(f"{balance.scope} {balance.unit}: {balance.held} still held after every worker finished")
    return problems


def _not_back(authority: Authority, tally: Tally) -> list[str]:
    """Every hold a crashed worker left must have come back by now (expired: lazily, or by the sweep)."""
    problems = []
    for rid in tally.crashed_ids:
        status = authority.reservation(rid).status
        if status != "expired":
            problems.append(f"the hold {rid} of a crashed worker is {status}, not expired")
    return problems


def _summary(console: Console, tally: Tally, settings: DemoSettings, elapsed: float) -> None:
    d = tally.decisions
    crashed = tally.crashed
    console.print(
        f"runs       {settings.runs} in {elapsed:.1f} s: {tally.runs_done} finished, "
        f"{tally.runs_halted} stopped by a budget, {crashed} lost their worker"
    )
    console.print(
        f"decisions  {d.allowed + d.degraded + d.denied}: {d.allowed} allowed, {d.degraded} degraded, {d.denied} denied"
    )
    if tally.caps_seen:
        ranked = sorted(tally.caps_seen.items(), key=lambda kv: -kv[1])
        console.print("degraded   " + " · ".join(f"{n} {what}" for what, n in ranked))
    console.print(
        f"settled    {tally.commits} commits ({amount('usd', tally.committed_usd)} actual) · "
        f"{tally.releases} released after failed calls"
    )
    console.print(f"retried    {tally.retries} reserves retried with their idempotency key: same hold, never two")
    console.print(
        f"expired    {crashed} hold{'' if crashed == 1 else 's'} left by crashed workers came back after "
        "their TTL (lazily, or by the final sweep)"
    )
    binding = sorted(tally.denied_by.items(), key=lambda kv: -kv[1])[:3]
    if binding:
        stops = (f"{scope} {unit_label(unit, period or None)} ({n})" for (scope, unit, period), n in binding)
        console.print("denied by  " + f"\n{'':11}".join(stops))


def _demo_budgets(authority: Authority, tag: str = "") -> list[Balance]:
    """The demo tenants' budgets only: a ledger given with --store may hold other tenants, whose
    state (say, overage from a late commit) is none of the demo's business."""
    tenants = sorted({_tagged(f"tenant:{w.tenant}", tag) for w in WORKFLOWS})
    return [b for tenant in tenants for b in authority.budgets(tenant)]


def _key(balance: Balance) -> Key:
    return (balance.scope, balance.unit, balance.period or "", balance.window)


def _over_limit(balances: list[Balance], start: dict[Key, Decimal]) -> list[str]:
    """Budgets past their limit. An earlier demo on the same ledger (``--store``) may have spent more
    than this one's limit already: such a budget denies everything, and must not go past that."""
    return [
        f"{b.scope} {unit_label(b.unit, b.period)}: spent {b.spent} + held {b.held} > limit {b.limit}"
        for b in balances
        if b.spent + b.held > max(b.limit, start.get(_key(b), Decimal(0)))
    ]


def _scope_table(balances: list[Balance], tally: Tally) -> Table:
    """One row per tenant and workflow budget; the hundreds of run budgets folded into one row per workflow."""
    table = Table(
        box=box.SIMPLE_HEAD,
        title="budgets after the run",
        title_justify="left",
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    # the scope names are the point of the table: on a narrow terminal the headers wrap, not the names
    table.add_column("scope", no_wrap=True)
    table.add_column("unit")
    for name in ("limit", "spent", "held", "allowed", "degraded", "denied"):
        table.add_column(name, justify="right")
    runs: dict[tuple[str, str], list[Balance]] = defaultdict(list)
    others: list[Balance] = []
    for b in balances:
        parent, _, last = b.scope.rpartition("/")
        if last.startswith("run:"):
            runs[(parent, b.unit)].append(b)
        else:
            others.append(b)
    rows: list[tuple[str, Balance | None, str, str]] = []
    for n, b in enumerate(others):
        rows.append((b.scope, b, b.unit, unit_label(b.unit, b.period)))
        if n + 1 < len(others) and others[n + 1].scope == b.scope:
            continue
        # after a scope's last budget, its runs folded into one row per unit
        rows.extend((f"{b.scope}/run:*", None, unit, unit) for parent, unit in runs if parent == b.scope)
    for scope, balance, unit, label in rows:
        depth = scope.count("/")
        name = scope.rpartition("/")[2]
        if balance is not None:
            limit, spent, held = balance.limit, balance.spent, balance.held
            counts = tally.by_budget.get((scope, unit), Counts())
            denied = tally.denied_by.get((scope, unit, balance.period or ""), 0)
            shown = name
        else:
            group = runs[(scope.rpartition("/")[0], unit)]
            limit = sum((b.limit for b in group), Decimal(0))
            spent = sum((b.spent for b in group), Decimal(0))
            held = sum((b.held for b in group), Decimal(0))
            counts = Counts()
            for b in group:
                c = tally.by_budget.get((b.scope, unit), Counts())
                counts.allowed += c.allowed
                counts.degraded += c.degraded
            denied = sum(tally.denied_by.get((b.scope, unit, ""), 0) for b in group)
            shown = f"run:* ({len(group)} runs)"
        indent = "  " * depth
        table.add_row(
            Text(indent + shown, style="bold" if depth == 0 else ""),
            label,
            amount(unit, limit),
            amount(unit, spent),
            amount(unit, held),
            str(counts.allowed),
            Text(str(counts.degraded), style="yellow" if counts.degraded else ""),
            Text(str(denied), style="red" if denied else ""),
        )
    table.caption = "allowed, degraded: decisions this budget checked · denied: decisions it stopped"
    return table


def settings_for(seed: int, workers: int | None, runs: int | None, quick: bool) -> DemoSettings:
    """``--quick`` is for tests and CI: fewer, faster runs and holds that expire within a second."""
    if quick:
        return DemoSettings(seed=seed, workers=workers or 4, runs=runs or 40, latency=0.1, crash_ttl=0.3)
    return DemoSettings(seed=seed, workers=workers or 8, runs=runs or 240)
