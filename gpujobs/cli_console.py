"""The console that CLI commands print their tables to."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Wide enough for any row, so that piped output is never cut to rich's default of 80 columns.
PIPED_WIDTH = 1000


def console() -> Console:
    """Return a console for this call: the terminal's width, COLUMNS, or no limit in a pipe.

    It is made at call time, so that COLUMNS set after import applies.
    """
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPED_WIDTH)
