"""The harness's own errors: problems the user can fix, shown as a message and exit code 2.

Every command lets a `GcondError` (a bad recipe, data, checkpoint or request) rise to the command
line, which prints it with `print_error` and exits 2, without a traceback. Any other exception is
a bug in the harness: it keeps its traceback and exits 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.text import Text

# The exit codes of every command: done, a run failed, a bad request, stopped (continue it).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


class RecipeError(GcondError):
    """A recipe that cannot be used; `errors` holds one human-readable line per problem."""

    def __init__(self, errors: list[str], source: Path | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.source = source

    def report_lines(self) -> list[str]:
        count = f"{len(self.errors)} problem" + ("s" if len(self.errors) > 1 else "")
        where = f" in {self.source}" if self.source else ""
        return [f"Recipe error{where} ({count}):", *(f"  - {line}" for line in self.errors)]


class DatasetError(GcondError):
    """A dataset cannot be loaded; the message names the recipe key to change."""


class CheckpointError(GcondError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


# Not the user's request: problems met while a run is built or trained (exit code 1).


class ComponentError(RuntimeError):
    """A user component broke its contract while the run was built or trained (exit code 1)."""


class MethodUnavailable(ValueError):
    """A method whose optional dependency is not installed; the message says what to install."""


class TrainingStopped(Exception):
    """The run stopped on purpose (too many skipped steps); a checkpoint was written."""


class DataProviderError(Exception):
    """The data provider raised; the message names it (the loop adds the step)."""
