"""The ``clearance`` command line (typer + rich, imported only here)."""

from __future__ import annotations


def main() -> None:
    from clearance.cli.app import app

    app()
