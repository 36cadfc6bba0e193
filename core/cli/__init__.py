"""The ``clearance`` command line (typer + rich, imported only here)."""

from __future__ import annotations

import sys

PIPE_CLOSED = 141
"""Exit code when the reader of our output went away (``clearance events tail | head -1``): the
shell's own code for a command ended by SIGPIPE, so a script under ``pipefail`` never takes it
for a failed demo (1) or bad input (2)."""


def _tolerate_encoding() -> None:
    """Our output has a few characters beyond ASCII (``·``, ``—``, ``→``): on a terminal or pipe
    whose encoding lacks them (``PYTHONIOENCODING=latin-1``, an old Windows console) they print as
    ``?`` instead of ending the command with a ``UnicodeEncodeError`` after its work was done."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        reconfigure = getattr(stream, "reconfigure", None)
        if encoding != "utf8" and reconfigure is not None:
            reconfigure(errors="replace")


def main() -> None:
    from clearance.cli.app import app

    _tolerate_encoding()
    try:
        app()
    except SystemExit as done:
        # On a closed pipe click quiets stdout (its PacifyFlushWrapper) and exits with 1.
        if done.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            raise SystemExit(PIPE_CLOSED) from None
        raise
