"""Actions: what an agent wants to do next, in framework- and provider-neutral terms."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from pydantic import Field, field_validator

from clearance._model import InputModel
from clearance.errors import InvalidRequest
from clearance.pricing import Prompt, modalities_of
from clearance.units import from_step_map, from_steps, to_step_map

_WORD_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
# (lone surrogates too: json.loads gives one for a cut-off emoji, and no store can encode it)
_LABEL_RE = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,256}")

KINDS = ("model_call", "tool_call", "step", "side_effect")
RISKS = ("read", "write", "external", "payment")


# Metadata keys a model call's price was computed from (see Action.model_call).
_PRICED_KEYS = Prompt.KEYS | {"max_output_tokens"}


class Action(InputModel):
    """What the agent wants to do next.

    ``kind`` is ``model_call``, ``tool_call``, ``step``, ``side_effect`` or another lower-case word;
    ``amounts`` are the estimated amounts per unit (the worst case to hold); ``optional`` marks a step
    a policy may skip; ``risk`` is ``read``, ``write``, ``external``, ``payment`` or a user word.

    >>> email = Action("tool_call", "send_email", amounts={"emails": 1}, risk="external")
    >>> email.label, email.amounts
    ('tool_call:send_email', {'emails': Decimal('1')})
    """

    kind: str
    name: str
    amounts: dict[str, Decimal] = Field(default_factory=dict)
    optional: bool = False
    risk: str | None = None
    provider: str | None = Field(default=None, max_length=128)
    model: str | None = Field(default=None, max_length=256)
    tool: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    steps: tuple[tuple[str, int], ...] = Field(default=(), exclude=True, repr=False)
    """The estimated amounts in exact integer steps (see :mod:`clearance.units`), as the stores take them."""
    label: str = Field(default="", exclude=True, repr=False)
    """``kind:name``, as shown in decisions and the audit trail."""

    def __init__(
        self,
        kind: str,
        name: str,
        amounts: Mapping[str, Any] | None = None,
        *,
        optional: bool = False,
        risk: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        tool: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        steps = to_step_map(amounts, "action amounts")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidRequest(f"metadata must be a mapping, got {type(metadata).__name__}")
        super().__init__(
            kind=kind,
            name=name,
            amounts=from_step_map(steps),
            optional=optional,
            risk=risk,
            provider=provider,
            model=model,
            tool=tool,
            metadata=dict(metadata or {}),
            steps=tuple(steps.items()),
            label=f"{kind}:{name}",
        )

    @field_validator("kind", "risk")
    @classmethod
    def _check_word(cls, value: str | None) -> str | None:
        if value is not None and not _WORD_RE.fullmatch(value):
            raise ValueError("must be a lower-case word [a-z][a-z0-9_]{0,31}")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _LABEL_RE.fullmatch(value):
            raise ValueError("must be 1-256 printable characters (no control character, no lone surrogate)")
        return value

    @classmethod
    def model_call(
        cls,
        provider: str | None,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        *,
        name: str | None = None,
        optional: bool = False,
        risk: str | None = None,
        extra: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        service_tier: str | None = None,
        modalities: Sequence[str] = (),
    ) -> Action:
        """A model call priced at its worst case: ``usd`` for ``input_tokens`` plus
        ``max_output_tokens`` at the model's genai-prices rate, and ``tokens`` for both.

        With prompt caching, ``cache_write_tokens`` says how many of the input tokens the call may
        write to the provider's cache (its worst case: a miss), of which ``cache_write_1h_tokens``
        with a one-hour lifetime; they are priced at the model's cache-write rates (Anthropic's
        cost 1.25x and 2x its input: without them such a call is held short), and at its input rate
        where it has none. Input the provider may serve from its cache is held at the dearer of its
        input and cache-read prices (a few models' reads cost more). ``service_tier`` is the tier
        the call asks for (``"priority"``, ``"flex"``, Anthropic's ``"fast"``), priced at the model's
        variant for it where genai-prices has one (OpenAI's priority: twice the default).
        ``modalities`` names the kinds of tokens besides text the call may send or receive
        (``"audio"``, ``"image"``, ``"video"``): each input and output token is then held at the
        dearest of text and those kinds (gpt-realtime's audio output costs 4x its text). Without
        them the call is priced at the text rates, short for one that sends or asks for audio.

        An unknown model, or one priced by something other than tokens (audio hours, characters,
        pages: whisper, tts, OCR), raises :class:`InvalidRequest` unless a fallback price is configured
        (:func:`clearance.pricing.set_fallback_price`). ``extra`` adds amounts of other units;
        naming ``usd`` or ``tokens`` there is an :class:`InvalidRequest` (it replaced the worst-case
        price, and a policy re-pricing the call dropped it: count a fee in a unit of its own).
        """
        if extra is not None and not isinstance(extra, Mapping):  # (pairs replaced the price, unchecked)
            raise InvalidRequest(f"extra must be a mapping of unit to amount, got {type(extra).__name__}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidRequest(f"metadata must be a mapping, got {type(metadata).__name__}")
        if extra is not None and ("usd" in extra or "tokens" in extra):
            raise InvalidRequest(
                "Action.model_call prices usd and counts tokens itself: extra takes other units only, got "
                + ", ".join(sorted(unit for unit in extra if unit in ("usd", "tokens")))
            )
        kinds = modalities_of(modalities)
        prompt = Prompt(input_tokens, cache_write_tokens, cache_write_1h_tokens, service_tier, kinds)
        nano = prompt.nano_usd(provider, model, max_output_tokens)
        # (from_steps divides exactly: the caller's decimal context could round the price down)
        amounts: dict[str, Any] = {"usd": from_steps("usd", nano), "tokens": input_tokens + max_output_tokens}
        if extra:
            amounts.update(extra)
        # The counts the price was computed from win over the caller's metadata: policies re-price
        # from them and Grant passes them on (a caller's max_output_tokens of 32,000 on a call held
        # for 800 was handed back as the limit to send).
        meta: dict[str, Any] = {key: value for key, value in (metadata or {}).items() if key not in _PRICED_KEYS}
        meta.update(prompt.to_metadata(), max_output_tokens=max_output_tokens)
        return cls(
            "model_call",
            name or model,
            amounts,
            optional=optional,
            risk=risk,
            provider=provider,
            model=model,
            metadata=meta,
        )

    @classmethod
    def tool_call(
        cls,
        tool: str,
        amounts: Mapping[str, Any] | None = None,
        *,
        optional: bool = False,
        risk: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Action:
        """A tool call; counts one ``calls`` unless ``amounts`` say otherwise."""
        return cls(
            "tool_call",
            tool,
            amounts if amounts is not None else {"calls": 1},
            optional=optional,
            risk=risk,
            tool=tool,
            metadata=metadata,
        )
