"""How ledger records look on a terminal: budgets, reservations and audit events as rich tables.

Amounts are shown rounded for reading (``$0.0124``, ``12,400``); the ledger keeps them exact, and
nothing here feeds back into a decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal

from rich.table import Table
from rich.text import Text

from clearance import AuditEvent, Balance, Reservation
from clearance.units import from_steps


def amount(unit: str, value: Decimal) -> str:
    """A readable amount: dollars keep the digits that matter at their size, other units are counts."""
    if unit == "usd":
        size = abs(value)
        if size >= 100:
            return f"${value:,.2f}"
        if size >= 1:
            return f"${value:,.3f}"
        if value == 0:
            return "$0"
        return f"${value:.4f}"
    return f"{value:,}"


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


def budgets_table(balances: Iterable[Balance]) -> Table:
    table = Table(title="budgets", title_justify="left")
    for name in ("scope", "unit", "window"):
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
    table = Table(title="reservations", title_justify="left")
    table.add_column("id", no_wrap=True)  # ids are for copying into commit/release calls: never wrapped
    for name in ("scope", "action", "status", "amounts", "created (UTC)"):
        table.add_column(name)
    table.add_column("expires in", justify="right")
    for r in reservations:
        left = r.expires_at - now
        expires = f"{left:.0f}s" if r.status == "held" and left >= 0 else "-"
        shown = r.committed if r.status == "committed" and r.committed is not None else r.amounts
        table.add_row(r.id, r.scope, r.label, r.status, amounts(shown), timestamp(r.created_at), expires)
    return table


def event_amounts(event: AuditEvent) -> str:
    return amounts({unit: from_steps(unit, steps) for unit, steps in event.amounts})


def events_table(events: Iterable[AuditEvent]) -> Table:
    table = Table(title="audit events", title_justify="left")
    table.add_column("seq", justify="right")
    for name in ("at (UTC)", "kind", "scope", "reservation", "amounts", "detail"):
        table.add_column(name)
    for e in events:
        table.add_row(str(e.seq), timestamp(e.at), e.kind, e.scope, e.reservation_id or "-", event_amounts(e), e.detail)
    return table


def event_line(event: AuditEvent) -> str:
    """One event per line, for ``--follow`` where a table would have to be redrawn."""
    rid = f" {event.reservation_id}" if event.reservation_id else ""
    detail = f" ({event.detail})" if event.detail else ""
    return f"{event.seq:>8} {timestamp(event.at)} {event.kind:<13} {event.scope}{rid} {event_amounts(event)}{detail}"
