"""Scopes: hierarchical ``kind:name`` paths such as ``tenant:acme/workflow:triage/run:r-81f``.

A scope names where an action happens; every prefix of it is a *level* that may carry budgets.
The grammar is strict on purpose: a name can never contain ``/``, ``:``, ``{``, ``}``, whitespace
or control characters, so no name can change how a store key or a path is routed or parsed
(ledger contract point 6). Parsing is cached, because the same few scopes recur on the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from clearance.errors import InvalidRequest

MAX_SEGMENTS = 16
_SEGMENT_RE = re.compile(r"([a-z][a-z0-9_-]{0,31}):([A-Za-z0-9_.@+-]{1,128})")
_MAX_PATH = MAX_SEGMENTS * (32 + 1 + 128 + 1)


@dataclass(frozen=True, slots=True)
class Scope:
    """A parsed, validated scope path.

    ``chain`` lists every level from the root to the scope itself, e.g.
    ``("tenant:acme", "tenant:acme/app:support", "tenant:acme/app:support/run:r1")``.
    """

    path: str
    segments: tuple[tuple[str, str], ...]
    chain: tuple[str, ...]

    @property
    def root(self) -> str:
        """The first level (normally the tenant); all of a tenant's ledger lives under it."""
        return self.chain[0]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.segments)

    def level_of(self, kind: str) -> int | None:
        """Index in ``chain`` of the deepest level of this kind, or ``None``."""
        for index in range(len(self.segments) - 1, -1, -1):
            if self.segments[index][0] == kind:
                return index
        return None

    def child(self, kind: str, name: str) -> Scope:
        """This scope extended by one segment: ``Scope.parse("tenant:a").child("run", "r1")``."""
        return parse_scope(f"{self.path}/{kind}:{name}")

    def is_within(self, other: Scope | str) -> bool:
        """True when ``other`` is this scope or one of its ancestors."""
        other_path = other.path if isinstance(other, Scope) else parse_scope(other).path
        return other_path in self.chain

    @staticmethod
    def parse(value: str | Scope) -> Scope:
        return parse_scope(value)

    @staticmethod
    def of(**segments: str) -> Scope:
        """Build a scope from keyword segments, in order: ``Scope.of(tenant="acme", run="r1")``."""
        return parse_scope("/".join(f"{kind}:{name}" for kind, name in segments.items()))

    def __str__(self) -> str:
        return self.path


def parse_scope(value: str | Scope) -> Scope:
    """Parse and validate a scope; raise :class:`InvalidRequest` for anything off-grammar."""
    if type(value) is str:  # the usual call: a path (parsed once, cached)
        return _parse(value)
    if isinstance(value, Scope):
        # re-parsed (cached), never trusted: a hand-built Scope could carry a chain its path does not
        return _parse(value.path) if isinstance(value.path, str) else _parse(str(value.path))
    if not isinstance(value, str):
        raise InvalidRequest(f"a scope must be a string like 'tenant:acme/run:r1', got {type(value).__name__}")
    return _parse(value)


@lru_cache(maxsize=65536)
def _parse(path: str) -> Scope:
    if not path or len(path) > _MAX_PATH:
        raise InvalidRequest(f"invalid scope {path[:80]!r}: empty or too long")
    parts = path.split("/")
    if len(parts) > MAX_SEGMENTS:
        raise InvalidRequest(f"invalid scope {path[:80]!r}: at most {MAX_SEGMENTS} segments")
    segments: list[tuple[str, str]] = []
    chain: list[str] = []
    for part in parts:
        match = _SEGMENT_RE.fullmatch(part)
        if match is None:
            raise InvalidRequest(
                f"invalid scope segment {part[:80]!r} in {path[:120]!r}: expected kind:name with kind "
                "[a-z][a-z0-9_-]{0,31} and name [A-Za-z0-9_.@+-]{1,128}"
            )
        segments.append((match.group(1), match.group(2)))
        chain.append(part if not chain else f"{chain[-1]}/{part}")
    return Scope(path=path, segments=tuple(segments), chain=tuple(chain))
