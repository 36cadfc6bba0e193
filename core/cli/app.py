"""The ``clearance`` command: run the demo, set and inspect budgets, reservations and the audit trail.

Which ledger a command talks to: ``--store URL`` (before or after the command name), else the
``CLEARANCE_STORE`` environment variable, else ``sqlite:///clearance.db`` in the current directory.
``clearance demo`` is the exception: it ignores ``CLEARANCE_STORE``, and without ``--store`` it makes a
fresh SQLite ledger in a temporary folder, so trying clearance never writes into a ledger you care about.

Exit codes: 0 fine, 1 the demo's reconciliation failed, 2 bad input (scope, unit, amount, option),
3 the store could not be reached, 141 the reader of the output went away (``| head``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clearance import AuditEvent, Authority, Budget, ClearanceError, PolicyDocument, StoreUnavailable
from clearance.cli import PIPE_CLOSED
from clearance.cli import demo as demo_workload
from clearance.cli.explain import explain, unpriced
from clearance.cli.tables import budgets_table, event_line, exact, reservations_table, unit_label

DEFAULT_STORE = "sqlite:///clearance.db"
STATUSES = ("held", "committed", "released", "expired", "all")

app = typer.Typer(
    name="clearance",
    help="Budget and action authority for AI agents: allow, degrade or deny before every action.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
budget_app = typer.Typer(help="Set and list budgets.", no_args_is_help=True)
reservations_app = typer.Typer(help="Inspect reservations (holds and how they were settled).", no_args_is_help=True)
events_app = typer.Typer(help="Read the audit trail.", no_args_is_help=True)
policy_app = typer.Typer(help="Check policy documents before applying them.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")
app.add_typer(reservations_app, name="reservations")
app.add_typer(events_app, name="events")
app.add_typer(policy_app, name="policy")

class _Console(Console):
    """rich's console, ending with exit code 141 when the reader of its output goes away
    (``| head -1``): rich's own 1 is the code of a failed demo."""

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()  # (points stdout at /dev/null, so nothing more fails at exit)
        except SystemExit:
            raise SystemExit(PIPE_CLOSED) from None


# soft_wrap: a line is never folded at 80 columns when piped (grep, logs); the terminal wraps it.
out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def _tables() -> Console:
    """Where listings go. Piped (cron, a CI log, ``| grep``) rich would assume 80 columns and cut
    cells (``$0.…``, ``…tenant:gl…``): a listing is data, so off a terminal it is printed whole."""
    return out if out.is_terminal or "COLUMNS" in os.environ else _Console(highlight=False, width=1000)


def _listing(table: Table) -> None:
    """Print a listing whole: on a terminal narrower than its rows rich would cut ids, scopes and
    amounts (``00000000017e881c9247.tenant:glo…``, ``$0.…``) and drop columns — but ids are copied
    into commands and amounts are the point. Too wide, it is printed at its own width and the
    terminal wraps the lines."""
    console = _tables()
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    if needed > console.width:
        console = _Console(highlight=False, width=needed, file=console.file)
    console.print(table)


StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="URL",
        help="memory://, sqlite:///path.db or redis://host:port/db "
        "(default: $CLEARANCE_STORE, else sqlite:///clearance.db; demo: a temporary SQLite file)",
        show_default=False,
    ),
]


def _warn_unpriced(document: PolicyDocument) -> None:
    for problem in unpriced(document):
        err.print(Text(f"warning: {problem} (workers skip that rung)", style="yellow"))


def _fail(message: str, code: int) -> typer.Exit:
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _handled() -> Iterator[None]:
    """Turn clearance's typed errors into one red line and an exit code a script can branch on."""
    try:
        yield
    except StoreUnavailable as error:
        raise _fail(f"store unavailable: {error}", 3) from None
    except ClearanceError as error:
        raise _fail(str(error), 2) from None
    except ImportError as error:
        if "pip install" not in str(error):
            raise  # a bug, not a missing store driver: keep the traceback
        raise _fail(str(error), 3) from None  # e.g. the Redis store without clearance[redis]


def _store_url(ctx: typer.Context, store: str | None, *, environment: bool = True) -> str | None:
    """The URL given on this command, else on ``clearance`` itself, else ``CLEARANCE_STORE``."""
    root = ctx.find_root().obj
    given = store if store is not None else (root if isinstance(root, str) else None)
    if given is not None:  # (an empty --store, a variable that was not set, is an error, not "none given")
        return given
    return (os.environ.get("CLEARANCE_STORE") if environment else None) or None


def _authority(ctx: typer.Context, store: str | None) -> Authority:
    url = _store_url(ctx, store)
    return Authority.from_url(DEFAULT_STORE if url is None else url)


@app.callback()
def _root(ctx: typer.Context, store: StoreOption = None) -> None:
    ctx.obj = store


@app.command()
def demo(
    ctx: typer.Context,
    store: StoreOption = None,
    seed: Annotated[int, typer.Option(help="Seeds every random choice of the simulated workload.")] = 7,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="Worker threads (default: 8; with --quick: 4).")
    ] = None,
    runs: Annotated[
        int | None, typer.Option(min=1, max=100_000, help="Agent runs (default: 240; with --quick: 40).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A ~2 s version for tests and CI.")] = False,
) -> None:
    """Simulate agents of three tenants racing for their budgets, then reconcile the ledger."""
    # Only an explicit --store: CLEARANCE_STORE may point at a real ledger the demo must not write into.
    url = _store_url(ctx, store, environment=False)
    note = ""
    folder: Path | None = None
    if url is None:
        folder = Path(tempfile.mkdtemp(prefix="clearance-demo-"))
        url = f"sqlite:///{folder / 'ledger.db'}"
        note = " (a fresh temporary ledger)"
    settings = demo_workload.settings_for(seed, workers, runs, quick)
    if folder is None:  # a ledger others may use, other demos too: tenants of this demo's own
        settings = dataclasses.replace(settings, tag=os.urandom(2).hex())
        note = f" (this demo's tenants: tenant:acme-{settings.tag}, tenant:globex-{settings.tag}, ...)"
    with _handled():
        # piped into a file or a CI log, rich would assume 80 columns and fold the table; 100 reads better
        console = out if out.is_terminal or "COLUMNS" in os.environ else _Console(highlight=False, width=100)
        result = demo_workload.run(console, url, settings, note=note)
    if folder is not None:
        out.print(Text(f"the ledger is kept for a look around: clearance --store {url} budget ls", style="dim"))
    raise typer.Exit(0 if result.ok else 3 if result.store_trouble else 1)


@budget_app.command("set", context_settings={"ignore_unknown_options": True})  # "-5": a (bad) amount, not an option
def budget_set(
    ctx: typer.Context,
    scope: Annotated[str, typer.Argument(metavar="SCOPE", help="e.g. tenant:acme/workflow:triage")],
    unit: Annotated[str, typer.Argument(metavar="UNIT", help="usd, tokens, calls or your own unit")],
    limit: Annotated[str, typer.Argument(metavar="LIMIT", help="e.g. 250 or 12.50 (exact decimal)")],
    period: Annotated[
        str | None,
        typer.Option(help="minute, hour, day, week or month (UTC windows), or lifetime (the default)."),
    ] = None,
    store: StoreOption = None,
) -> None:
    """Create or change a budget. Counters are kept: lowering a limit below what is spent denies until there is room."""
    if period == "":  # (an unset variable: not "lifetime" silently)
        raise _fail("--period needs a value: minute, hour, day, week, month or lifetime", 2)
    with _handled():
        budget = Budget(scope, unit, limit, period=period)
        with _authority(ctx, store) as authority:
            authority.set_budget(budget)
        label = unit_label(budget.unit, budget.period_key or None)
        out.print(f"budget set: {budget.scope} {label} = {exact(budget.unit, budget.limit)}")


@budget_app.command("ls")
def budget_ls(
    ctx: typer.Context,
    scope: Annotated[str | None, typer.Argument(metavar="SCOPE", help="Only budgets at or under this scope.")] = None,
    store: StoreOption = None,
) -> None:
    """List budgets with what is spent and held in their current window."""
    with _handled(), _authority(ctx, store) as authority:
        balances = authority.budgets(scope)
        if not balances:
            out.print("no budgets" + (f" at or under {scope}" if scope else ""))
            return
        _listing(budgets_table(balances))


@reservations_app.command("ls")
def reservations_ls(
    ctx: typer.Context,
    scope: Annotated[
        str | None, typer.Argument(metavar="SCOPE", help="Only reservations at or under this scope.")
    ] = None,
    status: Annotated[str, typer.Option(help=f"One of {', '.join(STATUSES)}.")] = "held",
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=100_000, help="Newest first, at most this many.")
    ] = 50,
    store: StoreOption = None,
) -> None:
    """List reservations, newest first (default: the ones still holding budget)."""
    if status not in STATUSES:
        raise _fail(f"unknown status {status!r}: expected one of {', '.join(STATUSES)}", 2)
    with _handled(), _authority(ctx, store) as authority:
        found = authority.reservations(scope, status=None if status == "all" else status, limit=limit)
        if not found:
            out.print(
                f"no {'' if status == 'all' else status + ' '}reservations" + (f" at or under {scope}" if scope else "")
            )
            return
        _listing(reservations_table(found, authority.clock()))


@app.command()
def sweep(ctx: typer.Context, store: StoreOption = None) -> None:
    """Return every expired hold to its budgets now (they also come back lazily; this tidies listings)."""
    with _handled(), _authority(ctx, store) as authority:
        expired = authority.sweep()
        out.print(f"swept: {expired} expired hold{'s' if expired != 1 else ''} returned to their budgets")


def _last_events(authority: Authority, scope: str | None, count: int) -> list[AuditEvent]:
    """The newest ``count`` events, read from the end of the trail."""
    return authority.events(limit=count, scope=scope, newest=True)


# Events read per page by ``events tail --follow``: each poll reads pages until one comes back
# short (one page per poll fell behind a ledger writing faster, and on a capped trail the events it
# had not reached were trimmed before it printed them).
_TAIL_PAGE = 1000


@events_app.command("tail")
def events_tail(
    ctx: typer.Context,
    scope: Annotated[str | None, typer.Option(help="Only events at or under this scope.")] = None,
    count: Annotated[
        int, typer.Option("--lines", "-n", min=1, max=100_000, help="How many of the newest events.")
    ] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.05, max=3600, help="Seconds between polls with --follow.")] = 1.0,
    store: StoreOption = None,
) -> None:
    """Show the newest audit events (holds, commits, releases, expiries, budget changes)."""
    with _handled(), _authority(ctx, store) as authority:
        events = _last_events(authority, scope, count)
        if not events and not follow:
            out.print("no events" + (f" at or under {scope}" if scope else ""))
        for event in events:
            out.print(Text(event_line(event)))
        if not follow:
            return
        after = events[-1].seq if events else 0
        try:
            while True:
                time.sleep(interval)
                while True:  # every page there is: one a poll fell behind a busy ledger for good
                    page = authority.events(after=after, limit=_TAIL_PAGE, scope=scope)
                    for event in page:
                        out.print(Text(event_line(event)))
                        after = event.seq
                    if len(page) < _TAIL_PAGE:
                        break
        except KeyboardInterrupt:
            return


PolicyFile = Annotated[Path, typer.Argument(metavar="FILE", help="A .yaml, .yml, .toml or .json policy document.")]


@policy_app.command("check")
def policy_check(file: PolicyFile) -> None:
    """Validate a policy document and say, rule by rule, what it will do. Touches no store."""
    with _handled():
        document = PolicyDocument.load(file)
    # Wrapped within the tree at a terminal's width; piped, a rule is one line (never cut at 80 columns).
    _tables().print(explain(document, str(file)), soft_wrap=False)
    _warn_unpriced(document)
    out.print(Text.assemble(("policy OK", "green"), ": apply it with ", ("clearance apply", "bold"), f" {file}"))


@app.command("apply")
def apply_policy(ctx: typer.Context, file: PolicyFile, store: StoreOption = None) -> None:
    """Write a policy's budgets and store it as the next version; every worker picks it up within its
    refresh interval (policy_refresh, 1 s by default)."""
    with _handled():
        document = PolicyDocument.load(file)
        with _authority(ctx, store) as authority:
            try:
                authority.store.policy_version()  # before any budget is written: all or nothing
            except NotImplementedError as error:
                raise _fail(f"{error}: nothing was applied", 2) from None
            version = authority.apply_policy(document)
    _warn_unpriced(document)
    budgets = len(document.budget_limits())  # (entries on one counter are one budget)
    written = f"{budgets} budget{'' if budgets == 1 else 's'} written"
    out.print(Text(f"applied {file} as policy version {version} ({written})"))
