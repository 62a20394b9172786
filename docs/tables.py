"""The README's measured tables, built from the ``summary.json`` files committed under ``docs/``.

Several comparisons of one recipe (run with the same seeds, so runs of one seed share data and
initial weights) are read as one: each entry's final metric per seed, paired by seed against
each baseline with the harness's own verdict (``gcond_cli.compare.verdict``), and, where a bench
JSON is given, each entry's step time × ``sum`` from ``gcond bench``.

    python docs/tables.py entries --metric mean_acc --baselines sum,sum-log \\
        [--bench docs/bench/x.json] docs/quality/multidigits/*/summary.json
    python docs/tables.py grid --metric mean_err --baselines sum,sum-log \\
        [--bench docs/bench/x.json] [--entries ...] docs/quality/conflict_lab/*/summary.json
    python docs/tables.py cells --metric mean_err --baselines sum,conductor \\
        [--entries sum,conductor,...] docs/quality/conflict_lab/*/summary.json
    python docs/tables.py deltam --baselines sum,sum-log [--stage final] \\
        [--published docs/quality/qm9/published.json] [--bench ...] docs/quality/qm9/summary.json

    python docs/tables.py resolution [--entries ...] docs/quality/*/significant/summary.json

``grid`` is the same data turned around: one row per entry, one column per cell (mean and the
marks), and, with ``--bench``, the entry's step time × ``sum``.

``python docs/tables.py refresh README.md`` remakes every table of the file that follows a line
``<!-- tables: ARGS -->`` (ARGS as above, globs relative to the repository root); the tests check
that each such table is what its command prints.

``resolution`` shows, per setting (a summary, or a grid cell) and conductor entry, how often a
conflict was below ``weak``, how often it was resolved, the projections per step and the share
of steps left alone as noise (``conflicts="significant"``), means over the seeds' logged steps.

``cells`` and ``grid`` read the summaries of one grid cell (the same overrides, e.g.
``data.lab.direction`` and ``data.lab.scale``) as one comparison, so several comparisons of the
same cells and seeds join into one; ``--entries`` picks the entries and their order.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from gcond_cli.compare.delta import delta_m_table
from gcond_cli.compare.verdict import BETTER, NOISE, WORSE, paired_verdict

MARKS = {BETTER: "▲", WORSE: "▼", NOISE: "≈"}
ROOT = Path(__file__).resolve().parent.parent


def load(paths: list[Path], metric: str) -> tuple[dict[str, dict[int, float]], str, dict]:
    """``{entry: {seed: final metric}}`` over every summary (the first one that has an entry
    gives it), the metric's direction, and each entry's median seconds per step."""
    values: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}
    better = "min"
    for path in paths:
        summary = json.loads(path.read_text())
        better = summary["metrics"].get(metric, better)
        for entry, result in summary["results"].items():
            if entry in values:
                continue
            finals = result[f"final/{metric}"]["values"]
            values[entry] = dict(zip(summary["seeds"], finals, strict=True))
            seconds[entry] = result.get("step_seconds", {}).get("mean", float("nan"))
    return values, better, seconds


def bench_ratios(path: Path | None) -> dict[str, float]:
    """Each method's (or variant's) mean step time × sum's, from a ``gcond bench`` JSON."""
    if path is None:
        return {}
    report = json.loads(path.read_text())
    results = report["methods"]
    base = results["sum"].get("step_ms_mean") or results["sum"]["step_ms"]
    return {
        name: (r.get("step_ms_mean") or r["step_ms"]) / base
        for name, r in results.items()
        if r.get("step_ms") is not None
    }


def mark(entry: dict[int, float], baseline: dict[int, float], better: str) -> str:
    verdict = paired_verdict(entry, baseline, better)
    if verdict is None:
        return "–"
    return f"{MARKS.get(verdict.label, '?')} {verdict.mean:+.3f}"


def spread(values: dict[Any, float], form: str = "{:.4f}") -> str:
    numbers = list(values.values())
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return f"{form.format(statistics.fmean(numbers))} ± {form.format(std).lstrip('+')}"


def entries_table(args: argparse.Namespace) -> str:
    """One row per entry. One metric: its value, a column per baseline, the costs. Several
    (``--metric a,b``): a column per metric holding the value and the marks against each
    baseline, then the costs."""
    metrics = args.metric.split(",")
    loaded = [load(args.summaries, metric) for metric in metrics]
    values, better, seconds = loaded[0]
    ratios = bench_ratios(args.bench)
    cost_as = _cost_as(args)
    baselines = [b for b in args.baselines.split(",") if b in values]
    costs_head = ["s/step (compare)", *(["step × sum (bench)"] if ratios else [])]
    if len(metrics) == 1:
        head = [
            "entry",
            f"final {args.metric} ({'higher' if better == 'max' else 'lower'} is better)",
            *[f"vs {b}" for b in baselines],
            *costs_head,
        ]
    else:
        directions = [
            f"{m} ({'↑' if b == 'max' else '↓'})"
            for m, (_, b, _) in zip(metrics, loaded, strict=True)
        ]
        head = ["entry", *directions, *costs_head]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in values:
        if len(metrics) == 1:
            marks = [
                "–" if entry == b else mark(values[entry], values[b], better) for b in baselines
            ]
            texts = [spread(values[entry]), *marks]
        else:
            texts = [
                f"{spread(v[entry])} {_marks(v, entry, baselines, b)}".strip() for v, b, _ in loaded
            ]
        costs = [f"{seconds[entry]:.3f}"]
        if ratios:  # a variant that changes the workload (loss_scale) is no bench variant
            costs.append(_cost(entry, ratios, cost_as))
        lines.append(f"| `{entry}` | " + " | ".join([*texts, *costs]) + " |")
    return "\n".join(lines)


def by_cell(paths: list[Path], metric: str) -> tuple[dict[str, dict], str]:
    """``{cell: {entry: {seed: final}}}``, the summaries of one cell (same overrides) joined."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(_cell_name(path), []).append(path)
    cells, better = {}, "min"
    for name, group in groups.items():
        cells[name], better, _ = load(group, metric)
    return cells, better


def _marks(values: dict, entry: str, baselines: list[str], better: str) -> str:
    return " / ".join(
        mark(values[entry], values[b], better) for b in baselines if b != entry and b in values
    )


def cells_table(args: argparse.Namespace) -> str:
    """One row per grid cell, one column per entry."""
    baselines = args.baselines.split(",")
    cells, better = by_cell(args.summaries, args.metric)
    entries = args.entries.split(",") if args.entries else list(next(iter(cells.values())))
    rows = []
    for name, values in cells.items():
        texts = [
            f"{spread(values[e])} {_marks(values, e, baselines, better)}" if e in values else "–"
            for e in entries
        ]
        rows.append(f"| {name} | " + " | ".join(texts) + " |")
    head = ["cell", *entries]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])


def grid_table(args: argparse.Namespace) -> str:
    """One row per entry, one column per cell: the mean over seeds and the marks."""
    baselines = args.baselines.split(",")
    cells, better = by_cell(args.summaries, args.metric)
    ratios = bench_ratios(args.bench)
    cost_as = _cost_as(args)
    entries = (
        args.entries.split(",")
        if args.entries
        else list(dict.fromkeys(e for values in cells.values() for e in values))
    )
    head = ["entry", *cells, *(["step × sum (bench)"] if ratios else [])]
    rows = []
    for entry in entries:
        texts = []
        for values in cells.values():
            if entry not in values:
                texts.append("–")
                continue
            mean = statistics.fmean(values[entry].values())
            texts.append(f"{mean:.3f} {_marks(values, entry, baselines, better)}".strip())
        if ratios:
            texts.append(_cost(entry, ratios, cost_as))
        rows.append(f"| `{entry}` | " + " | ".join(texts) + " |")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])


def deltam_table(args: argparse.Namespace) -> str:
    """One row per entry: Δm% against single-task learning (``single-task`` runs in the
    summaries) at ``--stage``, the marks against each baseline (paired by seed), the costs,
    and the published Δm% of ``--published`` (a JSON of tables by name) beside them."""
    runs: dict[str, dict] = {}
    single: dict[str, dict] = {}
    metrics: dict[str, str] = {}
    better: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for path in args.summaries:
        summary = json.loads(path.read_text())
        delta = summary["delta_m"]
        metrics, better = delta["metrics"], delta["better"]
        for entry, per_seed in summary["runs"].items():
            runs.setdefault(entry, per_seed)
            seconds.setdefault(entry, summary["results"][entry]["step_seconds"]["mean"])
        for task, per_seed in summary.get("single_task_runs", {}).items():
            single.setdefault(task, per_seed)
    stages = args.stage.split(",")

    def delta_rows(baseline: str | None) -> dict[str, dict]:
        return delta_m_table(runs, single, metrics, better, baseline)["entries"]

    rows = delta_rows(None)
    baselines = [b for b in args.baselines.split(",") if b in rows]
    paired = {b: delta_rows(b) for b in baselines}
    published = json.loads(args.published.read_text()) if args.published else {}
    names, tables = published.get("names", {}), published.get("tables", {})
    ratios = bench_ratios(args.bench)
    cost_as = _cost_as(args)
    head = [
        "entry",
        *[f"Δm% vs STL ({stage})" for stage in stages],
        *[f"vs {b} ({stages[0]})" for b in baselines],
        "s/step (compare)",
        *(["step × sum (bench)"] if ratios else []),
        *tables,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry, row in rows.items():
        texts = []
        for stage in stages:
            stl = row[stage].get("vs_single_task")
            texts.append(spread(stl["values"], "{:+.1f}") if stl else "–")
        for b in baselines:
            if verdict := (paired[b][entry][stages[0]].get(f"vs_{b}") or {}).get("verdict"):
                texts.append(f"{MARKS.get(verdict['label'], '?')} {verdict['mean']:+.1f}")
            else:
                texts.append("–")
        texts.append(f"{seconds[entry]:.3f}" if entry in seconds else "–")
        if ratios:
            texts.append(_cost(entry, ratios, cost_as))
        paper = names.get(entry)
        texts += [f"{t[paper]:.1f}" if paper in t else "–" for t in tables.values()]
        label = f"`{entry}`" + (f" ({paper})" if paper else "")
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def resolution_table(args: argparse.Namespace) -> str:
    """One row per setting and conductor entry: how much it resolved and what it left to noise
    (the runs' ``conflict`` and ``resolution`` records, means over seeds)."""
    wanted = args.entries.split(",") if args.entries else None
    head = [
        "setting",
        "entry",
        "steps with a conflict",
        "steps resolved",
        "projections / step",
        "steps left to noise",
        "conflicts judged noise",
    ]
    rows = []
    for path in args.summaries:
        summary = json.loads(path.read_text())
        setting = f"{summary['recipe']} {_cell_name(path)}".strip()
        setting = summary["recipe"] if _cell_name(path) == path.parent.name else setting
        for entry, per_seed in summary["runs"].items():
            if wanted is not None and entry not in wanted:
                continue
            found = [r for r in per_seed.values() if r.get("resolution") and r.get("conflict")]
            if not found:
                continue
            conflict = statistics.fmean(r["conflict"]["share"] for r in found)
            resolved = statistics.fmean(r["resolution"]["resolved_share"] for r in found)
            iters = statistics.fmean(r["resolution"]["proj_iters"] for r in found)
            noise = [r["resolution"].get("left_to_noise") for r in found]
            left = statistics.fmean(noise) if None not in noise else None
            texts = [
                f"{conflict:.0%}",
                f"{resolved:.0%}",
                f"{iters:.2f}",
                "–" if left is None else f"{left:.0%}",
                "–" if left is None or conflict == 0 else f"{left / conflict:.0%}",
            ]
            rows.append(f"| {setting} | `{entry}` | " + " | ".join(texts) + " |")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])


def _cost_as(args: argparse.Namespace) -> dict[str, str]:
    """``--cost-as ENTRY=BENCH_ENTRY,...`` as a mapping."""
    return dict(pair.split("=") for pair in args.cost_as.split(",")) if args.cost_as else {}


def _cost(entry: str, ratios: dict[str, float], cost_as: dict[str, str]) -> str:
    """The entry's bench ratio; for an entry the bench did not run, that of the bench entry
    ``--cost-as`` names (the same work per step), marked with a *."""
    if entry in ratios:
        return f"{ratios[entry]:.2f}×"
    if cost_as.get(entry) in ratios:
        return f"{ratios[cost_as[entry]]:.2f}×*"
    return "–"


def _cell_name(path: Path) -> str:
    summary: dict[str, Any] = json.loads(path.read_text())
    overrides = []
    for override in summary.get("overrides", []):
        key, _, value = override.partition("=")
        overrides.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(overrides) or path.parent.name


MARKED = re.compile(r"<!-- tables: (.*?) -->\n((?:\|.*\n)*)")


def table(argv: list[str]) -> str:
    """The table that ``python docs/tables.py ARGV...`` prints, run from the repository root
    (globs in ARGV expanded)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=["entries", "cells", "grid", "deltam", "resolution"])
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--metric", help="entries, cells, grid: the final metric compared")
    parser.add_argument("--baselines", default="sum")
    parser.add_argument("--bench", type=Path)
    parser.add_argument("--entries", help="cells, grid: the entries, in order (default: all)")
    parser.add_argument(
        "--stage",
        default="selected",
        help="deltam: selected, final or both (selected,final); the marks use the first",
    )
    parser.add_argument("--published", type=Path, help="deltam: published Δm%% tables (JSON)")
    parser.add_argument(
        "--cost-as",
        help="ENTRY=BENCH_ENTRY,... an entry costs what that bench entry costs (marked *)",
    )
    args = parser.parse_args(_expanded(argv))
    if args.layout not in ("deltam", "resolution") and not args.metric:
        parser.error(f"{args.layout} needs --metric")
    tables = {
        "entries": entries_table,
        "cells": cells_table,
        "grid": grid_table,
        "deltam": deltam_table,
        "resolution": resolution_table,
    }
    return tables[args.layout](args)


def _expanded(argv: list[str]) -> list[str]:
    words: list[str] = []
    for word in argv:
        matches = sorted(glob.glob(word)) if "*" in word else []
        if matches:
            words.extend(matches)
        else:
            words.append(word)
    return words


def refresh(path: Path) -> int:
    """Rewrite every table of ``path`` that follows a ``<!-- tables: ARGS -->`` line with what
    ``python docs/tables.py ARGS`` prints now; the number of tables."""
    text = path.read_text()
    count = 0

    def redo(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"<!-- tables: {match[1]} -->\n{table(shlex.split(match[1]))}\n"

    path.write_text(MARKED.sub(redo, text))
    return count


def main() -> None:
    if sys.argv[1:2] == ["refresh"]:
        paths = [Path(name).resolve() for name in sys.argv[2:]]
        os.chdir(ROOT)
        for path in paths:
            print(f"{path.name}: {refresh(path)} tables")
        return
    os.chdir(ROOT)
    print(table(sys.argv[1:]))


if __name__ == "__main__":
    main()
