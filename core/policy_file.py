"""The policy document: budgets, model ladders, thresholds, tool, risk and rate rules — as data.

A policy is a YAML or TOML file validated by pydantic. ``clearance apply FILE`` writes its budgets
into the store and stores the document itself as a new version; every Authority on that store picks
the new version up on its next decision after its refresh interval (default 1 s), no redeploy.

.. code-block:: yaml

    budgets:
      - {scope: "tenant:acme", unit: usd, limit: 500, period: month}
      - {scope: "tenant:acme", unit: tool.web_search.calls, limit: 1000, period: day}
    ladders:
      - provider: openai
        rungs:
          - {model: gpt-4.1, min_headroom: {workflow: 0.25}}   # the flagship only while 25% remains
          - gpt-4.1-mini
          - gpt-4.1-nano
    output_cap: {floor: 128}
    context_cap: {dominance: 0.6, keep: 0.5, floor: 2000}
    tools: {calls_per_run: 20, toolsets: {search: [web_search, news_search]}}
    optional: [{level: workflow, below: 0.2}]
    risk: [{scope: "tenant:acme", allow: [write, external], amounts: {emails: 1}}]
    rate_limits: [{scope: "tenant:acme", kind: tool_call, limit: 60, per: minute}]
    shadow: ["tenant:globex"]

Ladders, caps, optional steps and risk rules may carry ``scope``: they then apply only at or below
that scope. A rate limit names its scope; ``tools`` apply everywhere.
"""

from __future__ import annotations

import json
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clearance._model import InvalidModel
from clearance.errors import InvalidRequest
from clearance.periods import Period
from clearance.plan import no_boolean_fractions
from clearance.scope import parse_scope
from clearance.units import MAX_AMOUNT, check_unit, plain_token, to_steps

_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # a scope kind (see clearance.scope)
_PRINTABLE = r"^[^\x00-\x1f\x7f\ud800-\udfff]+$"  # a name printed on one line of `policy check`, UTF-8
_WORD = re.compile(r"[a-z][a-z0-9_]{0,31}")  # an action's risk class or kind (see clearance.action)


def _no_bool(value: Any) -> Any:
    """A count (a rate limit's ``limit``, ``calls_per_run``): ``true`` is no number of calls."""
    if isinstance(value, bool):
        raise ValueError("a whole number is needed, not a boolean")
    return value


def _as_written_problems(document: PolicyDocument) -> list[str]:
    """What a document written today must not say, though a stored one (applied by an earlier
    version, read back by every worker) still reads: a worker refusing it would fail closed on every
    call until the policy was fixed. A scope kind outside the scope grammar makes a rule that never
    applies, and so does a risk class or action kind no action can carry (``Write``); a control
    character breaks the one-line rules of ``policy check``; a count past ``MAX_AMOUNT`` no store
    can hold."""

    def kind(where: str, value: str, star: bool = False) -> None:
        if not ((star and value == "*") or _KIND.fullmatch(value)):
            grammar = "[a-z][a-z0-9_-]{0,31}" + (", or *" if star else "")
            problems.append(f"{where}: {value!r} is not a scope kind ({grammar})")

    def printable(where: str, value: str | None) -> None:
        if value is not None and not re.fullmatch(_PRINTABLE, value):
            problems.append(f"{where}: {value!r} has a control character or a lone surrogate (not UTF-8)")

    def count(where: str, value: int | None) -> None:
        if value is not None and value > MAX_AMOUNT:
            problems.append(f"{where}: {value} is past the largest supported amount ({MAX_AMOUNT})")

    def word(where: str, value: str) -> None:
        if not _WORD.fullmatch(value):  # (what Action takes for a risk or a kind)
            problems.append(f"{where}: {value!r} is not a word [a-z][a-z0-9_]{{0,31}}: no action carries it")

    problems: list[str] = []
    for i, ladder in enumerate(document.ladders):
        printable(f"ladders.{i}.provider", ladder.provider)
        for j, rung in enumerate(ladder.rungs):
            printable(f"ladders.{i}.rungs.{j}.model", rung.model)
            for name in rung.min_headroom if isinstance(rung.min_headroom, dict) else ():
                kind(f"ladders.{i}.rungs.{j}.min_headroom", name, star=True)
    for i, rule in enumerate(document.optional):
        kind(f"optional.{i}.level", rule.level, star=True)
    kind("tools.run_kind", document.tools.run_kind)
    for toolset, tools in document.tools.toolsets.items():
        printable("tools.toolsets", toolset)
        for tool in tools:
            printable(f"tools.toolsets.{toolset}", tool)
    for i, risk in enumerate(document.risk):
        for risk_class in risk.allow:
            word(f"risk.{i}.allow", risk_class)
        for action_kind in risk.kinds or ():
            word(f"risk.{i}.kinds", action_kind)
    count("tools.calls_per_run", document.tools.calls_per_run)
    for i, rate in enumerate(document.rate_limits):
        count(f"rate_limits.{i}.limit", rate.limit)
        printable(f"rate_limits.{i}.name", rate.name)
    return problems

FORMAT_VERSION = 1
KNOWN_RISKS = ("read", "write", "external", "payment")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Scoped(_Rule):
    scope: str | None = None
    """The rule applies at or below this scope; everywhere when omitted."""

    @field_validator("scope")
    @classmethod
    def _check_scope(cls, value: str | None) -> str | None:
        return None if value is None else parse_scope(value).path


def _no_bool_fraction(value: Any) -> Any:
    """A fraction (``keep``, ``below``, ``dominance``): ``true`` (YAML's ``yes``, ``on``) would be
    read as 1.0 — every optional step always skipped, no input ever trimmed."""
    if isinstance(value, bool):
        raise ValueError("a fraction between 0 and 1 is needed, not a boolean")
    return value


def _fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a fraction between 0 and 1")
    return value


class BudgetEntry(_Rule):
    """A budget the policy writes into the store when applied."""

    scope: str
    unit: str
    limit: Decimal
    period: Period | None = None

    @model_validator(mode="after")
    def _check(self) -> BudgetEntry:
        parse_scope(self.scope)
        check_unit(self.unit)
        to_steps(self.unit, self.limit)
        return self


class Rung(_Rule):
    """One model of a ladder, with the headroom it demands (``{kind: fraction}`` or a fraction)."""

    model: str = Field(min_length=1, max_length=256)
    min_headroom: float | dict[str, float] = 0.0

    @field_validator("min_headroom", mode="before")
    @classmethod
    def _no_bools(cls, value: object) -> object:
        """(A stored document never has one: it is stored as validated.)"""
        return no_boolean_fractions(value)

    @field_validator("min_headroom")
    @classmethod
    def _check_headroom(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        for fraction in value.values() if isinstance(value, dict) else (value,):
            _fraction(fraction)
        return value


class Ladder(_Scoped):
    """Models from best to cheapest; a call to any rung may fall to the rungs after it."""

    provider: str | None = Field(default=None, min_length=1, max_length=128)
    rungs: list[Rung] = Field(min_length=1, max_length=16)
    """At most 16 (a reserve's plans). With a context cap's plan or an optional step's skip on top,
    past 16 plans the cheapest rungs but the last plan are dropped (see Policy.propose)."""

    @field_validator("rungs", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": rung} if isinstance(rung, str) else rung for rung in value]
        return value


class OutputCap(_Scoped):
    """When no rung fits at full length: the largest ``max_output_tokens`` the headroom pays for,
    on the cheapest rung, if at least ``floor``."""

    floor: int = Field(default=64, ge=1)

    _count = field_validator("floor", mode="before")(classmethod(lambda cls, v: _no_bool(v)))


class ContextCap(_Scoped):
    """For calls whose input is at least ``dominance`` of their price: a rung that keeps only
    ``keep`` of the input tokens (never fewer than ``floor``), so adapters trim history."""

    dominance: float = 0.6
    keep: float = 0.5
    floor: int = Field(default=1000, ge=1)

    _fractions = field_validator("dominance", "keep")(classmethod(lambda cls, v: _fraction(v)))
    _not_bools = field_validator("dominance", "keep", mode="before")(classmethod(lambda cls, v: _no_bool_fraction(v)))
    _count = field_validator("floor", mode="before")(classmethod(lambda cls, v: _no_bool(v)))


class Tools(_Rule):
    """Tool rules. A tool call of tool ``t`` in toolset ``s`` also counts its amounts in the units
    ``tool.t.<unit>`` and ``toolset.s.<unit>``, so a budget on those units caps that tool or
    toolset; once one is exhausted, model calls get ``Caps.disabled_tools``. ``calls_per_run``
    counts ``tool_calls`` on every run scope (created on first use)."""

    toolsets: dict[str, list[str]] = Field(default_factory=dict)
    calls_per_run: int | None = Field(default=None, ge=0)
    run_kind: str = "run"

    _count = field_validator("calls_per_run", mode="before")(classmethod(lambda cls, v: _no_bool(v)))


class OptionalSteps(_Scoped):
    """Below ``below`` headroom at the ``level`` scope kind (``"*"``: at any budgeted level),
    optional actions are skipped."""

    level: str
    below: float

    _below = field_validator("below")(classmethod(lambda cls, v: _fraction(v)))
    _not_bool = field_validator("below", mode="before")(classmethod(lambda cls, v: _no_bool_fraction(v)))


class RiskRule(_Scoped):
    """Risk classes allowed at a scope, and what each such action also counts (e.g. ``emails: 1``)."""

    allow: list[str] = Field(min_length=1)
    amounts: dict[str, Decimal] = Field(default_factory=dict)
    kinds: list[str] | None = None
    """Only actions of these kinds; all kinds when omitted."""

    @model_validator(mode="after")
    def _check(self) -> RiskRule:
        for unit, amount in self.amounts.items():
            to_steps(check_unit(unit), amount)
        return self


class RateLimit(_Rule):
    """At most ``limit`` actions of ``kind`` (optionally of one ``name``) per ``per`` window at
    ``scope``, enforced in the same atomic step as the budgets (unit ``rate.<kind>``)."""

    scope: str
    kind: str
    name: str | None = None
    limit: int = Field(ge=0)
    per: Literal["minute", "hour", "day", "week", "month"] = "minute"

    _count = field_validator("limit", mode="before")(classmethod(lambda cls, v: _no_bool(v)))

    @field_validator("scope")
    @classmethod
    def _check_scope(cls, value: str) -> str:
        return parse_scope(value).path

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", value):
            raise ValueError("an action kind is a lower-case word [a-z][a-z0-9_]{0,31}")
        return value

    @property
    def unit(self) -> str:
        """``rate.<kind>``, or ``rate.<kind>.<name>`` with the name as a unit token (see
        :func:`clearance.units.name_token`), cut to keep the unit within 64 characters as every
        version did: an applied policy's rate budgets are named so (unlike tool units, which were
        cut at 40 and so never matched a budget written with a long name, they always matched)."""
        if self.name is None:
            return f"rate.{self.kind}"
        token = plain_token(self.name)[: 64 - len(self.kind) - 6]
        return f"rate.{self.kind}.{token}"


def _one_line(error: Exception) -> str:
    """A parse error on one line: YAML's messages quote the offending text over several lines,
    with a caret; the problem and its line and column say as much."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if isinstance(problem, str) and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if a key comes twice: the last one silently won (a second
    ``budgets:`` list dropped the first), where TOML refuses the same document."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key {key!r} is given twice")
        found[key] = value
    return found


_loader: Any = None


def _unique_keys_loader() -> Any:
    """yaml's SafeLoader, refusing a mapping key given twice (see :func:`_unique_keys`)."""
    global _loader  # noqa: PLW0603 - built once, on first use (yaml is imported only then)
    if _loader is None:
        import yaml

        merge = "tag:yaml.org,2002:merge"

        class UniqueKeys(yaml.SafeLoader):
            """Every mapping is flattened (its merge keys, ``<<: *anchor``, resolved) before it is
            built — sometimes early, when another mapping merges it: its own keys are checked then,
            once, before merged ones join them (those a key of its own may override, by design)."""

            def __init__(self, stream: Any) -> None:
                super().__init__(stream)
                self.checked: set[int] = set()

            def flatten_mapping(self, node: Any) -> None:
                if id(node) not in self.checked:
                    self.checked.add(id(node))
                    seen = set()
                    for key_node, _ in node.value:
                        if key_node.tag == merge:
                            continue
                        key = self.construct_object(key_node)
                        if key in seen:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"the key {key!r} is given twice", key_node.start_mark
                            )
                        seen.add(key)
                super().flatten_mapping(node)

        _loader = UniqueKeys
    return _loader


class PolicyDocument(_Rule):
    """A whole policy. See the module docstring for an example."""

    version: Literal[1] = 1
    budgets: list[BudgetEntry] = Field(default_factory=list)
    ladders: list[Ladder] = Field(default_factory=list)
    output_cap: OutputCap | None = None
    context_cap: ContextCap | None = None
    tools: Tools = Field(default_factory=Tools)
    optional: list[OptionalSteps] = Field(default_factory=list)
    risk: list[RiskRule] = Field(default_factory=list)
    rate_limits: list[RateLimit] = Field(default_factory=list)
    shadow: list[str] = Field(default_factory=list)
    """Scopes in shadow mode: decisions are computed and reported, never enforced."""

    @field_validator("shadow")
    @classmethod
    def _check_shadow(cls, value: list[str]) -> list[str]:
        return [parse_scope(scope).path for scope in value]

    @classmethod
    def parse(cls, data: Any, *, stored: bool = False) -> PolicyDocument:
        """Validate a mapping (from YAML, TOML or JSON); raise :class:`InvalidRequest` if malformed.
        ``stored``: a document read back from a store, which an earlier version may have written:
        checked as that version did (see ``_as_written_problems``)."""
        try:
            document = cls.model_validate(data)
        except ValidationError as error:
            raise InvalidModel("policy", error) from None
        if not stored:
            document.check_as_written()
        return document

    @classmethod
    def load(cls, path: str | Path) -> PolicyDocument:
        """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` policy file."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as error:
            raise InvalidRequest(f"cannot read policy file {file}: {error}") from None
        except UnicodeDecodeError as error:
            raise InvalidRequest(f"policy file {file} is not UTF-8 text: {error}") from None
        return cls.loads(text, file.suffix.lower().lstrip(".") or "yaml")

    @classmethod
    def loads(cls, text: str, fmt: str = "yaml", *, stored: bool = False) -> PolicyDocument:
        try:
            if fmt == "toml":
                data: Any = tomllib.loads(text)  # (TOML refuses a key given twice itself)
            elif fmt == "json":
                data = json.loads(text, object_pairs_hook=_unique_keys)
            else:
                import yaml

                data = yaml.load(text, Loader=_unique_keys_loader())  # (a SafeLoader)
        except Exception as error:  # yaml, toml and json all have their own error types
            raise InvalidRequest(f"policy is not valid {fmt}: {_one_line(error)}") from None
        if data is None:
            data = {}
        return cls.parse(data, stored=stored)

    def check_as_written(self) -> None:
        """Raise :class:`InvalidRequest` for what a document written today must not say (see
        ``_as_written_problems``): ``parse``/``load`` check it; a document built in Python is
        checked when it is applied or given to an Authority."""
        problems = _as_written_problems(self)
        if problems:
            raise InvalidRequest("invalid policy: " + "; ".join(problems))

    def budget_limits(self) -> dict[tuple[str, str, str | None], Decimal]:
        """The budgets the document writes, ``(scope, unit, period) -> limit``. Entries on one
        counter (two budgets, two rate limits, a budget on a rate limit's unit) all bind, so the
        tightest is the budget (written one after another, the last would win)."""
        limits: dict[tuple[str, str, str | None], Decimal] = {}
        entries = [(e.scope, e.unit, None if e.period is None else e.period.value, e.limit) for e in self.budgets]
        entries += [(rate.scope, rate.unit, rate.per, Decimal(rate.limit)) for rate in self.rate_limits]
        for scope, unit, period, limit in entries:
            key = (scope, unit, period)
            limits[key] = min(limit, limits.get(key, limit))
        return limits

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=True)
