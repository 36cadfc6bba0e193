"""Ledger stores, chosen by URL scheme.

=================================  ==============================================================
``memory://``                      this process only (threads, asyncio tasks)
``sqlite:///path/to/ledger.db``    one machine: many processes and threads, durable (WAL)
``redis://host:port/db``           many machines (``rediss://`` for TLS); needs ``clearance[redis]``
``redis+cluster://host:port``      Redis Cluster, any node as the seed; needs ``clearance[redis]``
=================================  ==============================================================

Drivers are imported only when their store is constructed, so ``import clearance`` stays light.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

from clearance.errors import InvalidRequest
from clearance.stores.base import DEFAULT_RETENTION, Store

__all__ = ["Store", "redact_url", "store_from_url"]


def redact_url(url: str) -> str:
    """``url`` fit for messages and logs: a password in it (``redis://:secret@host``, or a
    ``password=`` option) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unreadable URL>"
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else f"{name}={value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def store_from_url(url: str) -> Store:
    """Build the store a URL names. Query parameters become options, e.g.
    ``sqlite:///ledger.db?retention=86400&audit_capacity=5000000``."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidRequest(
            f"a store URL looks like memory://, sqlite:///path.db or redis://host:port, got {redact_url(str(url))!r}"
        )
    if url != url.strip() or any(ord(c) < 32 for c in url):
        # " sqlite:///x.db" would be read as the file /x.db (urlsplit strips the scheme's spaces only)
        raise InvalidRequest(f"a store URL must not begin or end with spaces or hold control characters: {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as error:  # an unbalanced "[" in the host, say
        raise InvalidRequest(f"bad store URL {redact_url(url)!r}: {error}") from None
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query))
    if scheme == "memory":
        from clearance.stores.memory import MemoryStore

        capacity = _capacity(options, 100_000)
        values = _floats(options, "retention")
        return MemoryStore(retention=values.get("retention", DEFAULT_RETENTION), audit_capacity=capacity)
    if scheme == "sqlite":
        from clearance.stores.sqlite import DEFAULT_AUDIT_CAPACITY, SQLiteStore

        # sqlite:///ledger.db is relative, sqlite:////var/lib/ledger.db absolute (SQLAlchemy's convention)
        path = url[len("sqlite://") :].split("?", 1)[0]
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise InvalidRequest("sqlite URL needs a path: sqlite:///ledger.db or sqlite:////abs/ledger.db")
        capacity = _capacity(options, DEFAULT_AUDIT_CAPACITY)
        values = _floats(options, "retention", "busy_timeout")
        return SQLiteStore(
            path,
            retention=values.get("retention", DEFAULT_RETENTION),
            busy_timeout=values.get("busy_timeout", 5.0),
            audit_capacity=capacity,
        )
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix"):
        try:
            from clearance.stores.redis import RedisStore
        except ImportError as error:  # pragma: no cover - depends on installed extras
            raise ImportError('the Redis store needs redis-py: pip install "clearance[redis]"') from error
        return RedisStore.from_url(url)
    raise InvalidRequest(f"unknown store scheme {scheme!r} in {redact_url(url)!r}")


def _capacity(options: dict[str, str], default: int) -> int:
    """``audit_capacity`` (audit records kept), taken out of ``options``; ``default`` when not given.
    Only read as a whole number here: the store checks its range."""
    if "audit_capacity" not in options:
        return default
    text = options.pop("audit_capacity")
    if not (text.isascii() and text.isdigit()):
        raise InvalidRequest(f"store option audit_capacity must be a positive whole number, got {text!r}")
    return int(text)


def _floats(options: dict[str, str], *names: str) -> dict[str, float]:
    unknown = set(options) - set(names)
    if unknown:
        raise InvalidRequest(f"unknown store option(s): {', '.join(sorted(unknown))}")
    try:
        values = {name: float(options[name]) for name in names if name in options}
    except ValueError as error:
        raise InvalidRequest(f"bad store option: {error}") from None
    for name, value in values.items():
        if not 0 < value < float("inf"):
            raise InvalidRequest(f"store option {name} must be a positive number of seconds, got {value}")
    return values
