"""``clearance policy check``: a policy document read back in plain words.

Validation alone says a file parses; an operator about to ``apply`` it wants to see what it will do
("the flagship only while 40% of every budget remains"), section by section, before any worker
picks it up.
"""

from __future__ import annotations

from rich.text import Text
from rich.tree import Tree

from clearance import PolicyDocument
from clearance.cli.tables import amount, unit_label
from clearance.policy_file import Rung


def _where(scope: str | None) -> str:
    return f" at or under {scope}" if scope else ""


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _headroom(value: float | dict[str, float]) -> str:
    if isinstance(value, dict):
        named = len(value) > 1  # "*" then stands for the levels not named
        parts = [
            f"{_percent(fraction)} of {('every other' if named else 'every') if kind == '*' else 'the ' + kind} budget"
            for kind, fraction in value.items()
            if fraction
        ]
    else:
        parts = [f"{_percent(value)} of every budget"] if value else []
    return f" (while {' and '.join(parts)} would remain)" if parts else ""


def _rung(rung: Rung) -> str:
    return rung.model + _headroom(rung.min_headroom)


def explain(document: PolicyDocument, source: str) -> Tree:
    """Every section that says something, one line per rule."""
    tree = Tree(Text.assemble((source, "bold"), f" — policy format v{document.version}"))
    if document.budgets:
        branch = tree.add(f"budgets ({len(document.budgets)}), written by apply")
        for b in document.budgets:
            period = b.period.value if b.period else None
            branch.add(f"{b.scope} {unit_label(b.unit, period)} <= {amount(b.unit, b.limit)}")
    if document.ladders:
        branch = tree.add("model ladders: a call to a rung may fall to the rungs after it")
        for ladder in document.ladders:
            who = f"{ladder.provider}: " if ladder.provider else ""
            branch.add(who + " → ".join(_rung(r) for r in ladder.rungs) + _where(ladder.scope))
    if document.output_cap is not None:
        output = document.output_cap
        tree.add(
            "output cap: when no rung fits at full length, the cheapest rung with the largest "
            f"max_output_tokens the headroom pays for, if at least {output.floor}{_where(output.scope)}"
        )
    if document.context_cap is not None:
        context = document.context_cap
        tree.add(
            f"context cap: calls whose input is >= {_percent(context.dominance)} of their price may keep "
            f"{_percent(context.keep)} of their input tokens (at least {context.floor}){_where(context.scope)}"
        )
    tools = document.tools
    if tools.toolsets or tools.calls_per_run is not None:
        branch = tree.add("tools")
        for name, members in tools.toolsets.items():
            branch.add(f"toolset {name}: {', '.join(members)}")
        if tools.calls_per_run is not None:
            branch.add(f"at most {tools.calls_per_run} tool calls per {tools.run_kind}")
    for rule in document.optional:
        level = "any budgeted level" if rule.level == "*" else f"the {rule.level} level"
        tree.add(
            f"optional steps run only while at least {_percent(rule.below)} of {level}'s budget would remain "
            f"after them, else are skipped{_where(rule.scope)}"
        )
    for risk in document.risk:
        kinds = f" for {', '.join(risk.kinds)}" if risk.kinds else ""
        counts = ", ".join(f"{amount(unit, value)} {unit}" for unit, value in risk.amounts.items())
        also = f"; each also counts {counts}" if counts else ""
        tree.add(f"risk: {', '.join(risk.allow)} allowed{kinds}{_where(risk.scope)}{also}")
    for rate in document.rate_limits:
        what = rate.kind + (f":{rate.name}" if rate.name else "")
        tree.add(f"rate limit: {rate.limit} {what} per {rate.per} at {rate.scope} (unit {rate.unit})")
    if document.shadow:
        tree.add(f"shadow mode (decide and report, never enforce): {', '.join(document.shadow)}")
    if not tree.children:
        tree.add("empty: no budgets and no rules")
    _as_text(tree)
    return tree


def _as_text(tree: Tree) -> None:
    """Labels as plain text: names from the file (a model "gpt[x]", a path "policy[prod].yaml")
    are not rich markup, and must not be read as such (a "[/]" in one crashed the command)."""
    for node in tree.children:
        if isinstance(node.label, str):
            node.label = Text(node.label)
        _as_text(node)


def unpriced(document: PolicyDocument) -> list[str]:
    """Ladder rungs this process cannot price (a typo, or a model only registered in the workers'
    code): workers skip such a rung (reason ``ladder_unpriced``), so an operator hears of it now."""
    from clearance.errors import InvalidRequest
    from clearance.pricing import price_nano_usd

    problems = []
    for ladder in document.ladders:
        # A ladder without a provider serves calls of every provider, and a call falls to the rungs
        # after its own, priced with the call's provider: one of another provider's is skipped.
        # So each rung is priced as a worker would, with the provider of every rung before it
        # (the one genai-prices prices that model under), or the ladder's own provider.
        starts: list[str | None] = []
        for rung in ladder.rungs:
            if ladder.provider is None:
                starts.append(_provider_of(rung.model))
            for provider in dict.fromkeys(starts) if ladder.provider is None else (ladder.provider,):
                try:
                    price_nano_usd(provider, rung.model, 1, 1)
                except InvalidRequest as error:
                    problems.append(str(error))
    return list(dict.fromkeys(problems))


def _provider_of(model: str) -> str | None:
    """The provider genai-prices prices ``model`` under (``None`` if it knows no such model)."""
    from genai_prices import Usage, calc_price

    try:
        return str(calc_price(Usage(input_tokens=1, output_tokens=1), model_ref=model).provider.id)
    except LookupError:
        return None
