"""How ledger records look on a terminal: budgets, reservations and audit events as rich tables.

Amounts are shown rounded for reading (``$0.0124``, ``12,400``); the ledger keeps them exact, and
nothing here feeds back into a decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal

from rich import box
from rich.table import Table
from rich.text import Text

from clearance import AuditEvent, Balance, Reservation


def amount(unit: str, value: Decimal) -> str:
    """A readable amount: dollars to the cent above $100 and to 1/100 cent below, trailing zeros
    dropped down to cents (``$40.00``, ``$2.535``, ``$0.0071``); other units every digit, never in
    exponent form (a ``tool.x.usd`` limit of 0.000000001 printed as ``1E-9``)."""
    if unit != "usd":
        return exact(unit, value)
    if value == 0:
        return "$0"
    places = 2 if abs(value) >= 100 else 4
    text = f"{value:,.{places}f}"
    while places > 2 and text.endswith("0"):
        text = text[:-1]
        places -= 1
    return "$" + text if value >= 0 else "-$" + text[1:]


def exact(unit: str, value: Decimal) -> str:
    """An amount as the ledger keeps it, every digit (``$0.000000001``, ``$1,250``): for echoing
    what was just written, where a rounded ``$0.00`` would hide what the ledger holds."""
    text = f"{value:,f}"
    return ("$" + text if value >= 0 else "-$" + text[1:]) if unit == "usd" else text


def amounts(values: Mapping[str, Decimal]) -> str:
    return (
        " ".join(
            f"{amount(unit, value)} {unit}" if unit != "usd" else amount(unit, value) for unit, value in values.items()
        )
        or "-"
    )


def unit_label(unit: str, period: str | None) -> str:
    return f"{unit}/{period}" if period else unit


def timestamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def clock_time(epoch: float) -> str:
    """Month-day and time: enough to place an event in a listing (the full date is in ``timestamp``)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%m-%d %H:%M:%S")


def _table(title: str) -> Table:
    """Listings are read and grepped, so rules only under the header and no boxes to cut through."""
    return Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )


def budgets_table(balances: Iterable[Balance]) -> Table:
    table = _table("budgets")
    table.add_column("scope", no_wrap=True)
    for name in ("unit", "window"):
        table.add_column(name)
    for name in ("limit", "spent", "held", "remaining"):
        table.add_column(name, justify="right")
    for b in balances:
        remaining = Text(amount(b.unit, b.remaining), style="red" if b.remaining <= 0 else "green")
        table.add_row(
            b.scope,
            unit_label(b.unit, b.period),
            b.window or "lifetime",
            amount(b.unit, b.limit),
            amount(b.unit, b.spent),
            amount(b.unit, b.held),
            remaining,
        )
    return table


def reservations_table(reservations: Iterable[Reservation], now: float) -> Table:
    table = _table("reservations")
    # ids are copied into commit/release calls, so they are never cut; the scope folds if it must
    table.add_column("id", no_wrap=True, min_width=20)
    table.add_column("status", no_wrap=True)
    table.add_column("amounts", no_wrap=True)
    table.add_column("expires", justify="right", no_wrap=True)
    table.add_column("action", overflow="fold")
    table.add_column("scope", overflow="fold")
    for r in reservations:
        left = r.expires_at - now
        expires = f"{left:.0f}s" if r.status == "held" and left >= 0 else "-"
        shown = r.committed if r.status == "committed" and r.committed is not None else r.amounts
        table.add_row(r.id, r.status, amounts(shown), expires, Text(r.label), r.scope)  # (a name is not markup)
    return table


def event_amounts(event: AuditEvent) -> str:
    return amounts(event.amounts)


def event_line(event: AuditEvent) -> str:
    """One event per line, like ``tail``: greppable, and ``--follow`` just appends."""
    rid = f" {event.reservation_id}" if event.reservation_id else ""
    detail = f" ({event.detail})" if event.detail else ""
    return f"{event.seq:>8} {timestamp(event.at)} {event.kind:<13} {event.scope}{rid} {event_amounts(event)}{detail}"
