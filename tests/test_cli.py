"""The ``clearance`` command line, driven through typer's CliRunner against real stores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clearance import Action, Authority, Budget
from clearance.cli.app import app

runner = CliRunner(env={"COLUMNS": "200"})  # rich wraps at 80 columns when not on a terminal


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(autouse=True)
def _no_store_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the default ledger is ./clearance.db: keep it inside the test's folder, never the checkout
    monkeypatch.delenv("CLEARANCE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)


def _reconciled(output: str) -> bool:
    return "reconciliation: OK" in output and "FAILED" not in output


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=getattr(pytest.mark, k)) for k in ("memory", "sqlite", "redis")]
)
def test_demo_quick_reconciles(kind: str, ledger: str, request: pytest.FixtureRequest) -> None:
    urls = {"memory": "memory://", "sqlite": ledger}
    url = urls[kind] if kind in urls else str(request.getfixturevalue("redis_url"))
    result = runner.invoke(app, ["demo", "--quick", "--store", url, "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert _reconciled(result.output)
    assert "tenant:acme" in result.output
    assert "denied" in result.output


def test_demo_budgets_bind_and_degrade(ledger: str) -> None:
    result = runner.invoke(app, ["--store", ledger, "demo", "--quick"])
    assert result.exit_code == 0, result.output
    with Authority(ledger) as authority:
        balances = authority.budgets()
        assert balances
        for b in balances:
            assert b.spent + b.held <= b.limit
            assert b.held == 0
        # some budget ran (nearly) dry, and the ladder degraded some calls
        assert any(b.remaining * 10 < b.limit for b in balances if not b.scope.rpartition("/")[2].startswith("run:"))
        assert authority.events(limit=10)
    decisions = next(line for line in result.output.splitlines() if line.startswith("decisions"))
    assert " 0 degraded" not in decisions
    assert " 0 denied" not in decisions


def test_demo_twice_on_one_ledger_still_reconciles(ledger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = runner.invoke(app, ["demo", "--quick", "--runs", "200", "--store", ledger])
    second = runner.invoke(app, ["--store", ledger, "demo", "--quick", "--runs", "20"])
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert _reconciled(second.output)
    assert ledger in second.output


def test_two_demos_at_once_on_one_ledger_both_reconcile(tmp_path: Path) -> None:
    """Each demo on a shared ledger (--store) has tenants of its own: two at once used to count each
    other's spend and both "fail" with exit 1, the code that reports a ledger bug. Expired holds
    of other tenants no longer skew its count of crashed workers' holds either."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with Authority(url) as other:  # another tenant's holds, expiring during the demos
        other.set_budget(Budget("tenant:other", "calls", 10))
        for _ in range(5):
            other.reserve(Action("tool_call", "x", {"calls": 1}), "tenant:other", ttl=0.5)
    command = [sys.executable, "-c", "from clearance.cli import main; main()", "demo", "--quick", "--store", url]
    demos = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [demo.communicate(timeout=120)[0] for demo in demos]
    for demo, output in zip(demos, outputs, strict=True):
        assert demo.returncode == 0, output
        assert _reconciled(output)
        assert "this demo's tenants: tenant:acme-" in output


def test_demo_reconciliation_catches_a_ledger_that_charges_other_amounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconciliation compares the ledger with what the workers sent, not with the ledger's own
    answer: a store charging half of every commit used to reconcile "OK"."""
    from clearance.stores.memory import MemoryStore

    honest = MemoryStore.commit

    def halved(self, reservation_id, actual, now):  # type: ignore[no-untyped-def]
        half = None if actual is None else tuple((unit, steps // 2) for unit, steps in actual)
        return honest(self, reservation_id, half, now)

    monkeypatch.setattr(MemoryStore, "commit", halved)
    result = runner.invoke(app, ["demo", "--quick", "--runs", "20", "--store", "memory://"])
    assert result.exit_code == 1, result.output
    assert "reconciliation: FAILED" in result.output and "the ledger charged" in result.output


def test_demo_default_store_is_a_fresh_temporary_ledger(ledger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEARANCE_STORE", ledger)  # may be a real ledger: the demo never writes into it
    result = runner.invoke(app, ["demo", "--quick", "--runs", "8", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert _reconciled(result.output)
    assert "a fresh temporary ledger" in result.output
    assert not Path("clearance.db").exists()


def test_budget_set_and_ls_round_trip(ledger: str) -> None:
    result = runner.invoke(app, ["budget", "set", "tenant:acme", "usd", "250", "--period", "day", "--store", ledger])
    assert result.exit_code == 0, result.output
    assert "tenant:acme usd/day = $250\n" in result.output
    tiny = runner.invoke(app, ["budget", "set", "tenant:tiny", "usd", "0.000000001", "--store", ledger])
    assert "tenant:tiny usd = $0.000000001" in tiny.output  # the echo is exact, not "$0.00"
    assert (
        runner.invoke(app, ["--store", ledger, "budget", "set", "tenant:acme/workflow:triage", "calls", "40"]).exit_code
        == 0
    )

    listing = runner.invoke(app, ["--store", ledger, "budget", "ls"])
    assert listing.exit_code == 0, listing.output
    assert "tenant:acme" in listing.output
    assert "$250.00" in listing.output
    assert "usd/day" in listing.output
    assert "calls" in listing.output

    under = runner.invoke(app, ["--store", ledger, "budget", "ls", "tenant:acme/workflow:triage"])
    assert under.exit_code == 0
    assert "$250.00" not in under.output
    assert "40" in under.output

    with Authority(ledger) as authority:
        assert authority.balance("tenant:acme")["usd"].limit == 250


def test_budget_ls_empty_and_default_store_in_current_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["budget", "ls"])
    assert result.exit_code == 0, result.output
    assert "no budgets" in result.output
    assert (tmp_path / "clearance.db").exists()


def test_store_from_environment(monkeypatch: pytest.MonkeyPatch, ledger: str) -> None:
    monkeypatch.setenv("CLEARANCE_STORE", ledger)
    assert runner.invoke(app, ["budget", "set", "tenant:env", "tokens", "1000"]).exit_code == 0
    with Authority(ledger) as authority:
        assert authority.balance("tenant:env")["tokens"].limit == 1000


def test_reservations_ls_and_sweep(ledger: str) -> None:
    with Authority(ledger) as authority:
        authority.set_budget(Budget("tenant:acme", "calls", 10))
        kept = authority.reserve(Action.tool_call("search"), "tenant:acme/run:r1", ttl=600)
        brief = authority.reserve(Action.tool_call("fetch"), "tenant:acme/run:r2", ttl=0.05)
        assert kept.reservation is not None
        assert brief.reservation is not None
    time.sleep(0.1)

    held = runner.invoke(app, ["--store", ledger, "reservations", "ls", "tenant:acme"])
    assert held.exit_code == 0, held.output
    assert kept.reservation.id in held.output
    assert "tool_call:search" in held.output

    swept = runner.invoke(app, ["--store", ledger, "sweep"])
    assert swept.exit_code == 0, swept.output
    assert swept.output.startswith("swept: ")

    expired = runner.invoke(app, ["--store", ledger, "reservations", "ls", "--status", "expired"])
    assert expired.exit_code == 0
    assert brief.reservation.id in expired.output
    everything = runner.invoke(app, ["--store", ledger, "reservations", "ls", "--status", "all", "-n", "5"])
    assert kept.reservation.id in everything.output
    assert brief.reservation.id in everything.output

    nothing = runner.invoke(app, ["--store", ledger, "reservations", "ls", "tenant:other"])
    assert nothing.exit_code == 0
    assert "no held reservations" in nothing.output


def test_events_tail(ledger: str) -> None:
    with Authority(ledger) as authority:
        authority.set_budget(Budget("tenant:acme", "usd", 5))
        authority.set_budget(Budget("tenant:globex", "usd", 5))
        for n in range(30):
            decision = authority.reserve(Action("tool_call", "t", {"usd": "0.01"}), f"tenant:acme/run:r{n}")
            assert decision.reservation is not None
            authority.commit(decision.reservation, {"usd": "0.005"})
    result = runner.invoke(app, ["--store", ledger, "events", "tail", "-n", "5"])
    assert result.exit_code == 0, result.output
    assert "commit" in result.output
    assert "budget_set" not in result.output  # only the newest five
    scoped = runner.invoke(app, ["--store", ledger, "events", "tail", "--scope", "tenant:globex"])
    assert scoped.exit_code == 0
    assert "budget_set" in scoped.output
    assert "tenant:acme" not in scoped.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["budget", "set", "tenant acme", "usd", "10"], "scope"),
        (["budget", "set", "tenant:acme", "US$", "10"], "unit"),
        (["budget", "set", "--", "tenant:acme", "usd", "-5"], "negative"),
        (["budget", "set", "tenant:acme", "usd", "-5"], "negative"),  # not taken for an option
        (["budget", "set", "tenant:acme", "usd", "ten"], "not a number"),
        (["budget", "set", "tenant:acme", "usd", "10", "--period", "fortnight"], "period"),
        (["budget", "ls", "tenant:a/b"], "scope"),
        (["reservations", "ls", "--status", "lost"], "status"),
        (["events", "tail", "--scope", "x:{y}"], "scope"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, ledger: str) -> None:
    result = runner.invoke(app, ["--store", ledger, *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_bad_store_url_exits_2() -> None:
    result = runner.invoke(app, ["--store", "postgres://nowhere", "budget", "ls"])
    assert result.exit_code == 2
    assert "unknown store scheme" in result.output


def test_an_empty_store_url_is_an_error_not_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--store "$TYPO"`` (an empty value) used to write into CLEARANCE_STORE or ./clearance.db."""
    monkeypatch.chdir(tmp_path)
    for args in (["--store", "", "budget", "set", "tenant:a", "usd", "1"], ["budget", "ls", "--store", ""]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "a store URL looks like" in result.output
    assert runner.invoke(app, ["demo", "--quick", "--store", ""]).exit_code == 2
    assert not (tmp_path / "clearance.db").exists()


def test_unreachable_store_exits_3(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'folder' / 'ledger.db'}"
    result = runner.invoke(app, ["--store", url, "budget", "ls"])
    assert result.exit_code == 3, result.output
    assert result.output.startswith("error: store unavailable")
    assert len(result.output.strip().splitlines()) == 1


def test_events_tail_follow_prints_new_events_until_ctrl_c(ledger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Authority(ledger) as authority:
        authority.set_budget(Budget("tenant:early", "usd", 1))
        polls: list[float] = []

        def poll(seconds: float) -> None:
            polls.append(seconds)
            if len(polls) == 1:
                authority.set_budget(Budget("tenant:late", "usd", 2))
                return
            raise KeyboardInterrupt

        monkeypatch.setattr("clearance.cli.app.time.sleep", poll)
        result = runner.invoke(app, ["--store", ledger, "events", "tail", "--follow", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert polls == [0.1, 0.1]
    lines = result.output.splitlines()
    assert "tenant:early" in lines[0]
    assert "tenant:late" in lines[1]


def test_events_tail_follow_keeps_up_with_more_events_than_a_page_per_poll(
    ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One page (1,000 events) a poll fell behind a ledger writing faster, for good; on a capped
    trail the events it had not reached were trimmed before it printed them."""
    with Authority(ledger) as authority:
        polls: list[float] = []

        def poll(seconds: float) -> None:
            polls.append(seconds)
            if len(polls) == 1:
                for n in range(2_500):
                    authority.set_budget(Budget(f"tenant:t{n}", "usd", 1))
                return
            raise KeyboardInterrupt

        monkeypatch.setattr("clearance.cli.app.time.sleep", poll)
        result = runner.invoke(app, ["--store", ledger, "events", "tail", "--follow", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if "budget_set" in line]
    assert len(printed) == 2_500 and "tenant:t2499" in printed[-1]  # all of them, at the first poll


POLICY = """
budgets:
  - {scope: "tenant:acme", unit: usd, limit: 500, period: month}
ladders:
  - provider: openai
    rungs:
      - {model: gpt-4.1, min_headroom: {workflow: 0.25}}
      - gpt-4.1-mini
optional: [{level: workflow, below: 0.2}]
rate_limits: [{scope: "tenant:acme", kind: tool_call, limit: 60, per: minute}]
"""


def test_policy_check_explains_without_touching_a_store(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "tenant:acme usd/month <= $500.00" in result.output
    assert "gpt-4.1 (while 25% of the workflow budget would remain) → gpt-4.1-mini" in result.output
    assert "optional steps run only while at least 20% of the workflow level's budget would remain" in result.output
    assert "rate limit: 60 tool_call per minute at tenant:acme" in result.output
    assert "policy OK" in result.output
    assert not (tmp_path / "clearance.db").exists()


def test_policy_check_piped_off_a_terminal_prints_every_rule_whole() -> None:
    """Piped and without COLUMNS, the rule tree used to be cut at 80 columns (the rest of a ladder
    lost); a terminal wraps it within the tree instead (tested: a narrow COLUMNS)."""
    policy = str(Path(__file__).resolve().parent.parent / "examples" / "policies" / "default.yaml")
    ladder = "openai: gpt-4.1 (while 40% of every budget would remain) → gpt-4.1-mini (while 5% of every budget"
    piped = CliRunner(env={"COLUMNS": None}).invoke(app, ["policy", "check", policy])
    assert piped.exit_code == 0, piped.output
    assert ladder + " would remain) → gpt-4.1-nano" in piped.output
    narrow = CliRunner(env={"COLUMNS": "60"}).invoke(app, ["policy", "check", policy])
    assert narrow.exit_code == 0, narrow.output
    tree = [line for line in narrow.output.splitlines() if line[:1] in "│├└ "]
    assert tree and max(map(len, tree)) <= 60 and "gpt-4.1-nano" in narrow.output


def test_policy_check_rejects_a_malformed_document(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("budgets:\n  - {scope: 'tenant:acme', unit: usd, limit: -1}\n", encoding="utf-8")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    broken = tmp_path / "broken.yaml"
    broken.write_text("budgets:\n  - {scope: 'tenant:acme', unit: usd\n", encoding="utf-8")
    unparsable = runner.invoke(app, ["policy", "check", str(broken)])
    assert unparsable.exit_code == 2
    assert unparsable.output.count("\n") == 1 and "(line 3, column 1)" in unparsable.output  # one line
    missing = runner.invoke(app, ["policy", "check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert "cannot read policy file" in missing.output


def test_apply_writes_budgets_and_a_policy_version(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    result = runner.invoke(app, ["--store", "memory://", "apply", str(path)])
    assert result.exit_code == 0, result.output
    assert "as policy version 1 (2 budgets written)" in result.output


def test_listings_piped_off_a_terminal_are_printed_whole(ledger: str) -> None:
    """Off a terminal (cron, CI logs, | grep) and without COLUMNS, rich would cut cells to fit 80
    columns; listings are data, so every cell must come out whole."""
    piped = CliRunner(env={"COLUMNS": None})
    long_scope = "tenant:globex-international/workspace:emea-operations/app:support-desk/workflow:refunds"
    with Authority(ledger) as authority:
        authority.set_budget(Budget(long_scope, "usd", "9007199.254740991"))
        authority.set_budget(Budget(long_scope, "tokens", 9_007_199_254_740_991))
        held = authority.reserve(Action.tool_call("search"), f"{long_scope}/run:r1", ttl=600)
        assert held.reservation is not None
    budgets = piped.invoke(app, ["--store", ledger, "budget", "ls"])
    assert budgets.exit_code == 0, budgets.output
    assert long_scope in budgets.output and "…" not in budgets.output
    assert "9,007,199,254,740,991" in budgets.output
    listing = piped.invoke(app, ["--store", ledger, "reservations", "ls"])
    assert listing.exit_code == 0, listing.output
    assert held.reservation.id in listing.output and "…" not in listing.output


def test_names_with_brackets_are_printed_as_they_are(tmp_path: Path, ledger: str) -> None:
    """File names and action names are data, not rich markup: a "[/]" in one crashed the command
    (after apply had stored the policy), a "[prod]" vanished from the output."""
    folder = tmp_path / "q["
    folder.mkdir()
    policy = folder / "]x[prod].yaml"
    policy.write_text("ladders:\n  - provider: openai\n    rungs: [gpt-4.1, gpt-4.1-mini]\n")
    checked = runner.invoke(app, ["policy", "check", str(policy)])
    assert checked.exit_code == 0, checked.output
    assert checked.output.count(str(policy)) == 2
    applied = runner.invoke(app, ["--store", ledger, "apply", str(policy)])
    assert applied.exit_code == 0, applied.output
    assert str(policy) in applied.output
    with Authority(ledger) as authority:
        authority.set_budget(Budget("tenant:acme", "usd", 10))
        authority.reserve(Action("tool_call", "fetch[/][prod]", {"usd": 1}), "tenant:acme/run:r1", ttl=600)
    listing = runner.invoke(app, ["--store", ledger, "reservations", "ls"])
    assert listing.exit_code == 0, listing.output
    assert "tool_call:fetch[/][prod]" in listing.output


def test_a_ladder_rung_that_cannot_be_priced_is_a_warning(tmp_path: Path) -> None:
    """A typo in a rung ("gpt-4.1-mnii") used to pass the check, then fail every reserve on the
    ladder; workers now skip the rung (ladder_unpriced), and check says so."""
    policy = tmp_path / "typo.yaml"
    policy.write_text("ladders:\n  - provider: openai\n    rungs: [gpt-4.1, gpt-4.1-mnii, gpt-4.1-nano]\n")
    result = runner.invoke(app, ["policy", "check", str(policy)])
    assert result.exit_code == 0, result.output
    assert "warning: no price known for model 'gpt-4.1-mnii'" in result.output


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("redis://[::1/0", "bad store URL"),
        (" sqlite:///rel.db", "must not begin or end with spaces"),
        ("sqlite:///rel.db ", "must not begin or end with spaces"),
        ("redis://:s3cret@localhost:1/0?socket_timout=1", "redis://:***@localhost:1/0"),
        ("redis+cluster://127.0.0.1:1/3", "'redis+cluster://127.0.0.1:1/3': Argument 'db' must be 0"),
        ("redis+cluster://", "requires at least one node"),
    ],
)
def test_bad_store_urls_are_one_line_and_never_show_a_password(store: str, message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["--store", store, "budget", "ls"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("rel.db*"))


def test_a_policy_file_that_is_not_text_exits_2(tmp_path: Path) -> None:
    policy = tmp_path / "binary.yaml"
    policy.write_bytes(b"\xff\xfe\x00")
    result = runner.invoke(app, ["policy", "check", str(policy)])
    assert result.exit_code == 2, result.output
    assert "not UTF-8 text" in result.output


def test_another_applications_database_is_refused_untouched(tmp_path: Path) -> None:
    """Opening a file as a ledger switches it to WAL for good: a database that is not a ledger is
    refused before anything in it changes."""
    import sqlite3

    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    before = path.read_bytes()
    result = runner.invoke(app, ["--store", f"sqlite:///{path}", "budget", "ls"])
    assert result.exit_code == 3, result.output
    assert "not a clearance ledger" in result.output
    assert path.read_bytes() == before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_piped_lines_are_not_folded_at_80_columns(ledger: str) -> None:
    piped = CliRunner(env={"COLUMNS": None})
    scope = "tenant:globex-international/workspace:emea-operations/app:support-desk/workflow:refunds"
    result = piped.invoke(app, ["--store", ledger, "budget", "set", scope, "usd", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"budget set: {scope} usd = $5"


def test_listings_on_a_narrow_terminal_are_printed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an 80- or 60-column terminal rich cut reservation ids and amounts (``…tenant:glo…``,
    ``$0.…``) and dropped columns: a listing is printed at its own width, the terminal wraps it."""
    import io

    from clearance.cli import app as cli
    from clearance.cli.tables import budgets_table

    screen = io.StringIO()
    narrow = cli._Console(width=60, file=screen, force_terminal=True, color_system=None, highlight=False)
    monkeypatch.setattr(cli, "out", narrow)
    with Authority() as authority:
        authority.set_budget(Budget("tenant:globex/workflow:review/run:r-0001", "usd", "0.125"))
        cli._listing(budgets_table(authority.budgets()))
    text = screen.getvalue()
    assert "tenant:globex/workflow:review/run:r-0001" in text and "$0.125" in text and "…" not in text


def _cli_process(*args: str, **options: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", "from clearance.cli import main; main()", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)  # type: ignore[call-overload]


def test_output_closed_early_exits_141_not_the_demos_1(tmp_path: Path) -> None:
    """``clearance demo | head -1``: rich (and click) exit 1 on a broken pipe, the code that
    reports a failed reconciliation; a script under pipefail took it for a ledger bug."""
    demo = _cli_process("demo", "--quick", "--store", f"sqlite:///{tmp_path / 'ledger.db'}")
    assert demo.stdout is not None
    demo.stdout.readline()
    demo.stdout.close()  # the reader goes away
    demo.wait(timeout=120)
    assert demo.stderr is not None
    with demo.stderr:
        assert demo.returncode == 141, demo.stderr.read()


def test_a_terminal_without_unicode_gets_the_report_not_a_traceback(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    demo = _cli_process(
        "demo", "--quick", "--store", f"sqlite:///{tmp_path / 'ledger.db'}", env=environment, encoding="latin-1"
    )
    output, errors = demo.communicate(timeout=120)
    assert demo.returncode == 0, errors
    assert "reconciliation: OK ?" in output and "Traceback" not in errors


@pytest.mark.parametrize("path", [":memory:", "file:ledger.db"])
def test_a_sqlite_ledger_must_be_a_file(path: str) -> None:
    """Each thread's connection would open a database of its own: `budget set` said "set" and kept
    nothing, and the demo "failed" its reconciliation."""
    result = runner.invoke(app, ["--store", f"sqlite:///{path}", "budget", "set", "tenant:a", "usd", "1"])
    assert result.exit_code == 2 and "use memory://" in result.output


def test_a_short_file_that_is_no_database_is_refused_untouched(tmp_path: Path) -> None:
    """SQLite takes a file shorter than a page for an empty database: a 1-byte file became a ledger."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"x")
    result = runner.invoke(app, ["--store", f"sqlite:///{path}", "budget", "ls"])
    assert result.exit_code == 3 and "not a SQLite database" in result.output
    assert path.read_bytes() == b"x"


def test_budget_periods_on_the_command_line(ledger: str) -> None:
    lifetime = runner.invoke(app, ["--store", ledger, "budget", "set", "tenant:a", "usd", "5", "--period", "lifetime"])
    assert lifetime.exit_code == 0, lifetime.output
    empty = runner.invoke(app, ["--store", ledger, "budget", "set", "tenant:b", "usd", "5", "--period", ""])
    assert empty.exit_code == 2 and "--period needs a value" in empty.output  # (an unset variable)
    wrong = runner.invoke(app, ["--store", ledger, "budget", "set", "tenant:c", "usd", "5", "--period", "fortnight"])
    assert wrong.exit_code == 2 and "or lifetime" in wrong.output and "None" not in wrong.output.split("or lifetime")[0]
    with Authority(ledger) as authority:
        assert [(b.scope, b.period) for b in authority.budgets()] == [("tenant:a", None)]


def test_small_amounts_of_other_units_are_listed_with_every_digit(ledger: str) -> None:
    """``budget ls`` printed a ``tool.x.usd`` limit of 0.000000001 as ``1E-9``."""
    made = runner.invoke(app, ["--store", ledger, "budget", "set", "tenant:a", "tool.search.usd", "0.000000001"])
    assert made.exit_code == 0, made.output
    listed = runner.invoke(app, ["--store", ledger, "budget", "ls"])
    assert listed.exit_code == 0, listed.output
    assert "0.000000001" in listed.output and "E-" not in listed.output
