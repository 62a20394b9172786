"""A comparison on the console: its table, the verdicts against each baseline, a grid's
overview, and errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .report import baselines, delta_cells, grid_rows, sentences, table_cells, verdict_cells

_LABEL_STYLE = {"better": "bold green", "worse": "bold red"}


def print_table(out: Console, summary: Mapping[str, Any]) -> None:
    titles, rows = table_cells(summary)
    seeds = len(summary["seeds"])
    table = Table(
        title=f"gcond compare: {summary['recipe']}, {seeds} seed{'s' if seeds > 1 else ''}, "
        f"{summary['max_steps']} steps" + (" (mean ± std over seeds)" if seeds > 1 else ""),
        caption="best value per column in bold green; conflict steps: min raw cosine < weak",
    )
    for title in titles:
        table.add_column(title, justify="left" if title == "method" else "right")
    for label, texts, marks in rows:
        cells = [Text(label)] + [
            Text(t, style="bold green" if m else "") for t, m in zip(texts, marks, strict=True)
        ]
        table.add_row(*cells)
    out.print(table)


def print_verdicts(out: Console, summary: Mapping[str, Any]) -> None:
    """One table per baseline, then its sentences."""
    for baseline in baselines(summary):
        titles, rows = verdict_cells(summary, baseline)
        if not rows:
            continue
        table = Table(
            title=f"Differences to {baseline}, paired by seed (mean, 95 % interval)",
            caption="better / worse: the interval excludes 0; within noise: it contains 0",
        )
        for title in titles:
            table.add_column(title, justify="left" if title == titles[0] else "right")
        for name, row in rows:
            table.add_row(name, *(Text(t, style=_LABEL_STYLE.get(label, "")) for t, label in row))
        out.print(table)
        for line in sentences(summary, baseline):
            out.print(line, markup=False, highlight=False)


def print_delta(out: Console, summary: Mapping[str, Any]) -> None:
    """The Δm table (nothing without per-task metrics)."""
    titles, rows = delta_cells(summary)
    if not rows:
        return
    table = Table(
        title="Δm%: mean relative change over every task's metric (positive is worse)",
        caption="STL: single-task learning; ▲ / ▼: the 95 % interval excludes 0",
    )
    for title in titles:
        table.add_column(title, justify="left" if title == titles[0] else "right")
    for name, cells in rows:
        table.add_row(name, *cells)
    out.print(table)


def print_grid(out: Console, grid: Mapping[str, Any]) -> None:
    titles, rows = grid_rows(grid)
    table = Table(
        title=f"gcond compare grid: final {grid['primary_metric']} "
        f"(mark: verdict against {grid['baseline']})"
    )
    for title in titles:
        table.add_column(title.strip("`"), justify="left" if title == "cell" else "right")
    for row in rows:
        table.add_row(*(cell.strip("`") for cell in row))
    out.print(table)


def print_error(out: Console, message: str) -> None:
    out.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
