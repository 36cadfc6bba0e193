"""Policies: turn an action into an ordered list of plans, best first — graceful degradation.

The store then holds, atomically, the first plan that fits every budget on the scope chain, so
the degradation is computed from live budget pressure in the same step as the hold: a flagship
model while the workflow has room, its mini when the flagship's soft threshold is crossed, a
trimmed context or a shorter answer when only that fits, an optional step skipped below a
threshold — and a denial only when nothing fits or a rule forbids the action.

Built-in rules come from a :class:`~clearance.policy_file.PolicyDocument`; Python callables
(``rules=[...]``) can adjust any proposal for users who need code::

    def no_flagship_on_weekends(action, scope, proposal):
        if is_weekend() and proposal.plans:
            proposal.plans = proposal.plans[1:] or proposal.plans
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from clearance.action import Action
from clearance.decision import Reason
from clearance.errors import InvalidRequest
from clearance.ledger import AccountState
from clearance.plan import MAX_PLANS, Caps, Plan, ppm_of
from clearance.policy_file import KNOWN_RISKS, Ladder, PolicyDocument, Rung
from clearance.pricing import Prompt
from clearance.scope import Scope
from clearance.units import MAX_UNIT_LENGTH, name_token, to_steps

logger = logging.getLogger("clearance")
_warned_unpriced: set[str] = set()


def _warn_unpriced(model: str, error: InvalidRequest) -> None:
    """Once per model and process: the log is read by people, each decision also says so."""
    if model not in _warned_unpriced:
        _warned_unpriced.add(model)
        logger.warning("clearance: a policy ladder rung cannot be priced and is skipped: %s", error)


PolicyRule = Callable[[Action, Scope, "Proposal"], None]
"""A code rule: may change ``proposal.plans``, set ``proposal.deny``, add ``proposal.notes``."""


@dataclass(slots=True)
class OutputRetry:
    """What is needed to offer "the longest answer the headroom pays for" after a denial."""

    provider: str | None
    model: str
    requested_model: str | None
    prompt: Prompt
    max_output_tokens: int
    floor: int
    fixed: dict[str, int]  # every other unit the call holds
    trimmed_input: bool = False  # the prompt already reflects a context cap
    min_headroom: float | dict[str, float] = 0.0  # the cheapest rung's soft threshold still applies


@dataclass(slots=True)
class Proposal:
    """A policy's answer before the store decides: plans (``None`` = the action as requested)."""

    plans: list[Plan] | None = None
    deny: Reason | None = None
    notes: list[Reason] = field(default_factory=list)
    probes: tuple[str, ...] = ()
    shadow: bool = False
    templates: list[tuple[str, str, str, int]] = field(default_factory=list)  # budgets to create on first use
    output_retry: OutputRetry | None = None
    run_scope: str | None = None


def _within(scope: Scope, prefix: str | None) -> bool:
    return prefix is None or prefix in scope.chain


class Policy:
    """Rules that turn actions into plans. ``Policy()`` with no document changes nothing."""

    def __init__(
        self, document: PolicyDocument | None = None, *, rules: Sequence[PolicyRule] = (), version: int = 0
    ) -> None:
        self.document = document or PolicyDocument()
        self.rules = tuple(rules)
        self.version = version
        doc = self.document
        self._known_risks = set(KNOWN_RISKS).union(*(rule.allow for rule in doc.risk))
        self._toolsets_of: dict[str, list[str]] = {}
        self._tools_by_token: dict[str, set[str]] = {}  # a unit's token -> the tool names it stands for
        for toolset, tools in doc.tools.toolsets.items():
            for tool in tools:
                self._toolsets_of.setdefault(tool, []).append(toolset)
                self._tools_by_token.setdefault(name_token(tool), set()).add(tool)
        tool_units = {b.unit for b in doc.budgets if b.unit.startswith(("tool.", "toolset."))}
        if doc.tools.calls_per_run is not None:
            tool_units.add("tool_calls")
        # A model call is told of every exhausted tool and toolset budget on its chain, however it
        # was set (this document, set_budget, the CLI, a newer policy that left it out): probed
        # by prefix, not by the units this document names.
        self._tool_probes = ("tool.*", "toolset.*", *(("tool_calls",) if "tool_calls" in tool_units else ()))
        self._empty = not (
            doc.ladders
            or doc.output_cap
            or doc.context_cap
            or doc.tools.toolsets
            or doc.tools.calls_per_run is not None
            or doc.optional
            or doc.risk
            or doc.rate_limits
            or doc.shadow
            or tool_units
            or self.rules
        )

    @classmethod
    def from_file(cls, path: str, *, rules: Sequence[PolicyRule] = ()) -> Policy:
        return cls(PolicyDocument.load(path), rules=rules)

    @property
    def empty(self) -> bool:
        """True when this policy can change nothing (the Authority then skips it)."""
        return self._empty

    # --- the proposal ------------------------------------------------------------------------
    def propose(self, action: Action, scope: Scope) -> Proposal:
        proposal = Proposal(shadow=any(prefix in scope.chain for prefix in self.document.shadow))
        extra: dict[str, int] = {}
        if not self._risk(action, scope, proposal, extra):
            self._run_rules(action, scope, proposal)
            return proposal
        self._rates(action, scope, extra)
        self._tools(action, scope, proposal, extra)
        plans = self._model_plans(action, scope, proposal, extra)
        if plans is None and extra:
            plans = [Plan.of_steps(_add(dict(action.steps), extra))]
        plans = self._optional(action, scope, plans, proposal)
        if plans is not None and len(plans) > MAX_PLANS:
            # A 15- or 16-rung ladder with a context cap's plan or an optional step's skip: the
            # best rungs and the last plan (the skip, or the cheapest) stay, within a reserve's 16.
            plans = [*plans[: MAX_PLANS - 1], plans[-1]]
        proposal.plans = plans
        if action.kind == "model_call":
            proposal.probes = self._tool_probes
            tools = self.document.tools
            run = scope.level_of(tools.run_kind)
            proposal.run_scope = scope.chain[run] if run is not None else None
            if run is not None and tools.calls_per_run is not None:
                # The run's budget is read for max_tool_calls: a run that only makes model calls
                # is in use too, and must keep its count (see Store.ensure_budget).
                proposal.templates.append((scope.chain[run], "tool_calls", "", tools.calls_per_run))
        self._run_rules(action, scope, proposal)
        return proposal

    def _run_rules(self, action: Action, scope: Scope, proposal: Proposal) -> None:
        for rule in self.rules:
            rule(action, scope, proposal)

    def _risk(self, action: Action, scope: Scope, proposal: Proposal, extra: dict[str, int]) -> bool:
        risk = action.risk
        if risk is None or risk == "read":
            return True
        for rule in self.document.risk:
            if risk in rule.allow and _within(scope, rule.scope) and (rule.kinds is None or action.kind in rule.kinds):
                for unit, amount in rule.amounts.items():
                    extra[unit] = extra.get(unit, 0) + to_steps(unit, amount)
                where = rule.scope or "every scope"
                proposal.notes.append(
                    Reason("risk_allowed", f"risk {risk!r} allowed at {where}", scope.path, rule=f"risk:{risk}")
                )
                return True
        if risk not in self._known_risks:
            message = f"unknown risk class {risk!r}: denied until a rule allows it"
            proposal.deny = Reason("risk_unknown", message, scope.path, rule=f"risk:{risk}")
        else:
            message = f"actions of risk {risk!r} need an explicit allow rule covering {scope.path}"
            proposal.deny = Reason("risk_not_allowed", message, scope.path, rule=f"risk:{risk}")
        return False

    def _rates(self, action: Action, scope: Scope, extra: dict[str, int]) -> None:
        for rate in self.document.rate_limits:
            if rate.kind == action.kind and rate.scope in scope.chain and rate.name in (None, action.name):
                extra[rate.unit] = 1  # one action counts once, however many limits share its unit

    def _tools(self, action: Action, scope: Scope, proposal: Proposal, extra: dict[str, int]) -> None:
        if action.kind != "tool_call":
            return
        tool = action.tool or action.name
        for unit, steps in action.steps:
            extra[tool_unit("tool", tool, unit)] = steps
            for toolset in self._toolsets_of.get(tool, ()):
                extra[tool_unit("toolset", toolset, unit)] = steps
        tools = self.document.tools
        if tools.calls_per_run is not None:
            run = scope.level_of(tools.run_kind)
            if run is not None:
                proposal.templates.append((scope.chain[run], "tool_calls", "", tools.calls_per_run))
                extra["tool_calls"] = extra.get("tool_calls", 0) + 1

    def _ladder(self, action: Action, scope: Scope) -> tuple[Ladder, int] | None:
        for ladder in self.document.ladders:
            if ladder.provider not in (None, action.provider) or not _within(scope, ladder.scope):
                continue
            for index, rung in enumerate(ladder.rungs):
                if rung.model == action.model:
                    return ladder, index
        return None

    def _model_plans(
        self, action: Action, scope: Scope, proposal: Proposal, extra: dict[str, int]
    ) -> list[Plan] | None:
        if action.kind != "model_call" or action.model is None:
            return None
        prompt = Prompt.of_metadata(action.metadata)
        output_tokens = action.metadata.get("max_output_tokens")
        if prompt is None or type(output_tokens) is not int:
            return None  # not built by Action.model_call: nothing to re-price
        input_tokens = prompt.tokens
        found = self._ladder(action, scope)
        rungs: list[Rung] = found[0].rungs[found[1] :] if found else [Rung(model=action.model)]
        provider = action.provider
        others = {unit: steps for unit, steps in action.steps if unit not in ("usd", "tokens")}
        others = _add(others, extra)

        plans: list[Plan] = []
        priced: list[Rung] = []
        for index, rung in enumerate(rungs):
            caps = None if rung.model == action.model else _model_caps(rung.model)
            rule = f"ladder:{rung.model}" if found else None
            try:
                steps = _call_amounts(prompt, provider, rung.model, output_tokens, others)
                if index == 0:  # the call as asked (rungs start at its model)
                    # An Action built by hand with the metadata may hold more than its tokens cost
                    # (a fee it knows of): what it holds beyond that price comes on top of every
                    # plan's — re-priced, a 5 USD worst case was held as 0.01.
                    beyond = {
                        unit: held - (steps[unit] - others.get(unit, 0))
                        for unit, held in action.steps
                        if unit in ("usd", "tokens") and held > steps[unit] - others.get(unit, 0)
                    }
                    if beyond:
                        others = _add(others, beyond)
                        steps = _add(steps, beyond)
            except InvalidRequest as error:
                if rung.model == action.model:
                    raise
                # A rung this process cannot price (a typo in the policy, a model registered on other
                # workers only): skipped, said so, not every call on the ladder failing.
                _warn_unpriced(rung.model, error)
                proposal.notes.append(Reason("ladder_unpriced", f"rung skipped: {error}", scope.path, rule=rule))
                continue
            priced.append(rung)
            plans.append(Plan.of_steps(steps, caps, rung.min_headroom, rule))
        rungs = priced
        cheapest = rungs[-1].model
        changed_model = None if cheapest == action.model else cheapest
        kept_input = prompt
        context = self.document.context_cap
        if context is not None and _within(scope, context.scope) and input_tokens > context.floor:
            full = prompt.nano_usd(provider, action.model, output_tokens)
            input_only = prompt.nano_usd(provider, action.model, 0)
            if full and input_only / full >= context.dominance:
                kept = max(context.floor, int(input_tokens * context.keep))
                if kept < input_tokens:
                    caps = Caps(model=changed_model, max_input_tokens=kept)
                    kept_input = prompt.cut_to(kept)
                    steps = _call_amounts(kept_input, provider, cheapest, output_tokens, others)
                    plans.append(Plan.of_steps(steps, caps, rungs[-1].min_headroom, rule="context_cap"))
        output = self.document.output_cap
        if output is not None and _within(scope, output.scope) and output_tokens > output.floor:
            proposal.output_retry = OutputRetry(
                provider,
                cheapest,
                action.model,
                kept_input,
                output_tokens,
                output.floor,
                others,
                trimmed_input=kept_input.tokens < input_tokens,
                min_headroom=rungs[-1].min_headroom,
            )
        if len(plans) == 1 and not found and not extra:
            return None if plans[0].caps is None and not plans[0].min_headroom else plans
        return plans

    def _optional(
        self, action: Action, scope: Scope, plans: list[Plan] | None, proposal: Proposal
    ) -> list[Plan] | None:
        if not action.optional:
            return plans
        thresholds: dict[str, float] = {}
        for rule in self.document.optional:  # every rule that applies binds: the strictest per level
            if _within(scope, rule.scope) and (rule.level == "*" or scope.level_of(rule.level) is not None):
                thresholds[rule.level] = max(rule.below, thresholds.get(rule.level, 0.0))
        if not thresholds:
            return plans
        base = plans if plans is not None else [Plan.of_steps(dict(action.steps))]
        guarded = [_with_headroom(plan, thresholds) for plan in base]
        skip = Plan({}, caps=Caps(skip_optional=True), rule="optional:skip")
        return [*guarded, skip]

    # --- after the store decided -------------------------------------------------------------
    def tool_caps(self, accounts: Iterable[AccountState], run_scope: str | None) -> Caps | None:
        """``disabled_tools`` for every tool or toolset whose budget is exhausted on the chain, and
        ``max_tool_calls=0`` once the run's tool calls are used up."""
        disabled: set[str] = set()
        no_more_calls = False
        for account in accounts:
            unit = account.unit
            exhausted = account.remaining < 1
            if not exhausted:
                continue
            if unit == "tool_calls":
                no_more_calls = no_more_calls or account.scope == run_scope
            elif unit.startswith("tool."):
                token = unit.split(".")[1]
                disabled.update(self._tools_by_token.get(token, (token,)))
            elif unit.startswith("toolset."):
                token = unit.split(".")[1]
                for toolset, tools in self.document.tools.toolsets.items():
                    if name_token(toolset) == token:
                        disabled.update(tools)
        if not disabled and not no_more_calls:
            return None
        return Caps(disabled_tools=tuple(sorted(disabled)), max_tool_calls=0 if no_more_calls else None)

    @staticmethod
    def output_cap_for(retry: OutputRetry, held: dict[str, int]) -> Plan | None:
        """The output-cap plan that holds exactly ``held``, if there is one (idempotent retries)."""
        tokens_out = held.get("tokens", 0) - retry.prompt.tokens
        if not retry.floor <= tokens_out < retry.max_output_tokens:
            return None
        plan = _output_plan(retry, tokens_out)
        return plan if dict(plan.steps) == held else None

    @staticmethod
    def output_cap_plan(retry: OutputRetry, accounts: Sequence[AccountState]) -> Plan | None:
        """The longest answer every budget on the chain still pays for, if at least the floor. Only
        budgets of the units the plan holds count, as in the store: accounts reported for a unit
        the plan does not hold (a tool budget probed for the tool caps) do not stop it."""
        held = {"usd", "tokens", *retry.fixed}
        keep = [(a, _required(retry.min_headroom, a)) for a in accounts if a.unit in held]

        def fits(tokens_out: int) -> bool:
            need = _call_amounts(retry.prompt, retry.provider, retry.model, tokens_out, retry.fixed)
            return all(need.get(a.unit, 0) <= a.remaining - required for a, required in keep)

        low, high = retry.floor, retry.max_output_tokens - 1
        if high < low or not fits(low):
            return None
        while low < high:  # the largest fitting length, by bisection (cost grows with length)
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return _output_plan(retry, low)


def _output_plan(retry: OutputRetry, tokens_out: int) -> Plan:
    steps = _call_amounts(retry.prompt, retry.provider, retry.model, tokens_out, retry.fixed)
    model = None if retry.model == retry.requested_model else retry.model
    trimmed = retry.prompt.tokens if retry.trimmed_input else None
    caps = Caps(model=model, max_output_tokens=tokens_out, max_input_tokens=trimmed)
    return Plan.of_steps(steps, caps, retry.min_headroom, rule="output_cap")


def _required(headroom: float | dict[str, float], account: AccountState) -> int:
    """What a soft threshold asks to keep of ``account`` (steps), as the store computes it."""
    if isinstance(headroom, dict):
        kind = account.scope.rsplit("/", 1)[-1].split(":", 1)[0]
        fraction = headroom.get(kind, headroom.get("*", 0.0))
    else:
        fraction = headroom
    ppm = ppm_of(fraction)
    return -(-account.limit * ppm // 1_000_000) if ppm else 0


@lru_cache(maxsize=256)
def _model_caps(model: str) -> Caps:
    """A ladder rung's caps (immutable: one per model, not one per call)."""
    return Caps(model=model)


def _call_amounts(
    prompt: Prompt, provider: str | None, model: str, output_tokens: int, others: dict[str, int]
) -> dict[str, int]:
    """A model call's amounts with this input: its price and tokens, plus what rules add (a risk
    class's ``usd`` comes on top of the price, never instead of it)."""
    usd = prompt.nano_usd(provider, model, output_tokens)
    return _add({"usd": usd, "tokens": prompt.tokens + output_tokens}, others)


def _add(base: dict[str, int], extra: dict[str, int]) -> dict[str, int]:
    merged = dict(base)
    for unit, steps in extra.items():
        merged[unit] = merged.get(unit, 0) + steps
    return merged


def _with_headroom(plan: Plan, thresholds: dict[str, float]) -> Plan:
    """``plan`` demanding, at every level, the larger of its own threshold and the optional rule's."""

    def as_map(value: float | dict[str, float]) -> dict[str, float]:
        return dict(value) if isinstance(value, dict) else ({"*": value} if value else {})

    own, extra = as_map(plan.min_headroom), as_map(thresholds)
    # A plan's own map names a level's threshold or falls back to "*"; the optional rules all bind,
    # so a level's is the largest of its own rule's and the "*" rule's.
    merged = {
        kind: max(own.get(kind, own.get("*", 0.0)), extra.get(kind, 0.0), extra.get("*", 0.0))
        for kind in set(own) | set(extra)
    }
    return Plan.of_steps(dict(plan.steps), plan.caps, merged, plan.rule)


def tool_unit(prefix: str, name: str, unit: str) -> str:
    """The unit a tool's (``prefix="tool"``) or toolset's amounts are also counted in:
    ``<prefix>.<name token>.<unit>`` (see :func:`clearance.units.name_token`)."""
    counted = f"{prefix}.{name_token(name)}.{unit}"
    if len(counted) > MAX_UNIT_LENGTH:
        raise InvalidRequest(f"unit {unit!r} is too long to be counted per tool ({counted!r})")
    return counted
