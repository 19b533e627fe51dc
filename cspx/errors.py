"""Errors at any stage: user-facing errors, and the command-line wrapper that turns them into one
line and exit code 2."""
from __future__ import annotations

import sys
import traceback
from typing import Callable, Optional, Sequence

EXIT_USAGE = 2


class CspxError(Exception):
    """Bad input from the user (a file, key or value). Printed as one line; exit code 2."""


def last_line(text: str) -> str:
    """The last non-empty line of a child process's stderr: its one-line error."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_cli(main: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)`; a CspxError becomes `error: <message>` on stderr and exit code 2.

    `--verbose` anywhere in argv keeps the traceback, for bug reports.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        return int(main(argv) or 0)
    except CspxError as e:
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USAGE
