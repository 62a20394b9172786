"""The harness's own errors: problems the user can fix, shown as a message and exit code 2.

Every command lets a `GcondError` (a bad recipe, data, checkpoint or request) rise to the command
line, which prints it with `print_error` and exits 2, without a traceback. Any other exception is
a bug in the harness: it keeps its traceback and exits 1.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.text import Text

EXIT_USAGE = 2


class GcondError(Exception):
    """A problem with what the user asked for or pointed at; the message says what to do."""

    def report_lines(self) -> list[str]:
        """The lines `print_error` shows: a headline, then details."""
        first, *rest = str(self).splitlines() or [""]
        return [f"error: {first}", *rest]


def print_error(error: GcondError, console: Console | None = None) -> None:
    """Show `error` on stderr (first line in bold red); lines are never re-wrapped, so the paths
    in them stay whole."""
    console = console or Console(stderr=True, highlight=False)
    headline, *details = error.report_lines()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun every rank reports
        headline = f"[rank {os.environ.get('RANK', '?')}] {headline}"
    console.print(Text(headline, style="bold red"), soft_wrap=True)
    for line in details:
        console.print(Text(line), soft_wrap=True)


class UsageError(GcondError):
    """A problem with the user's request (exit code 2), not with training."""
