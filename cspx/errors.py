"""Errors at any stage: user-facing errors, and the command-line wrapper that turns them into one
line and an exit status: 2 for bad input (`CspxError`), 1 for a run that cannot go on
(`RunFailure`)."""
from __future__ import annotations

import sys
import traceback
from typing import Callable, Optional, Sequence

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CspxError(Exception):
    """Bad input from the user (a file, key or value). Printed as one line; exit code 2."""


class RunFailure(Exception):
    """A run that cannot go on although its input was fine: training diverged, its checkpoints
    cannot be written. Printed as one line saying what happened and what to do; exit code 1.
    Not a CspxError, so no handler of bad input swallows it."""


def last_line(text: str) -> str:
    """The last non-empty line of a child process's stderr: its one-line error."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_cli(main: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)`; a CspxError becomes `error: <message>` on stderr and exit code 2, a
    RunFailure the same line and exit code 1.

    `--verbose` anywhere in argv keeps the traceback, for bug reports.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        return int(main(argv) or 0)
    except (CspxError, RunFailure) as e:
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USAGE if isinstance(e, CspxError) else EXIT_FAILURE
