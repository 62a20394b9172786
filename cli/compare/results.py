"""What a comparison found, as plain data: each run's results read from its directory
(`run_results`), and the comparison's summary (`summarize`): per entry and column mean ± std
over the seeds, each column's best, whether every entry saw the same data, and each entry's
paired verdict against every baseline. Nothing here imports torch or draws anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..recipe import Recipe
from ..run.files import SUMMARY_FILE, min_cosine, norm_ratio, read_first_batch, read_metrics
from .delta import delta_m_table
from .plan import Entry, Plan
from .verdict import Verdict, paired_verdict, sentence

# The eval metrics of the table for the built-in data sets, in its order (which way each
# improves: `Recipe.better`); the per-task errors and accuracies follow them.
SHOWN_METRICS = (
    "l1",
    "ssim",
    "psnr",
    "accuracy",
    "mean_err",
    "mean_acc",
    "val_std_mae",
    "test_std_mae",
)
TASK_ERROR = "err_"  # the conflict lab's per-task errors, eval/err_<task>
TASK_ACCURACY = "acc_"  # multidigits' per-task accuracies, eval/acc_<task>


def run_results(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """What the comparison reads from a run: final and best eval metrics, how often the losses
    conflicted, and the first micro-batch's checksum."""
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    train = [r for r in records if r.get("kind") == "train"]
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    final = {k: evals[-1].get(k) for k in keys} if evals else {}
    selected = _selected(evals, recipe)
    best = {}
    for key in keys:
        values = [r[key] for r in evals if isinstance(r.get(key), int | float)]
        pick = min if recipe.better(key) == "min" else max
        best[key] = pick(values) if values else None

    # Seconds per step as logged; the first step pays one-time costs (allocation, kernel
    # selection, the batched-backward probe), so it is left out.
    step_seconds = [r["step_s"] for r in train if isinstance(r.get("step_s"), int | float)]
    step_seconds = step_seconds[1:] if len(step_seconds) > 1 else step_seconds

    weak = recipe.conductor.conflict_thresholds[2]
    cosines = [c for r in train if (c := min_cosine(r)) is not None]
    conflict = None
    if cosines:
        conflict = {
            "steps": len(cosines),
            "share": sum(c < weak for c in cosines) / len(cosines),
            "mean_cosine": sum(cosines) / len(cosines),
            "weak": weak,
        }
    resolution = _resolution(train)
    ratios = [ratio for r in train if (ratio := norm_ratio(r)) is not None]
    scales = None
    if ratios:
        scales = {"mean_ratio": statistics.fmean(ratios), "max_ratio": max(ratios)}
    return {
        "seed": recipe.seed,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else None,
        "eval_final": final,
        "eval_best": best,
        "eval_selected": {k: selected.get(k) for k in keys},
        "selected_step": selected.get("step"),
        "conflict": conflict,
        "resolution": resolution,
        "norm_ratio": scales,
        "first_batch_sha256": read_first_batch(run_dir),
    }


def _resolution(train: list[dict]) -> dict[str, float] | None:
    """How much a conductor run resolved, over its logged steps: projections per step, the
    share of steps with any, and (``conflicts="harmful"`` / ``"significant"``) the share of
    steps whose conflict was left alone as harmless / as noise. None for a run without
    ``proj_iters`` (sum, the peers)."""
    iters = [r["proj_iters"] for r in train if _finite(r.get("proj_iters"))]
    if not iters:
        return None
    found: dict[str, float] = {
        "proj_iters": statistics.fmean(iters),
        "resolved_share": sum(i > 0 for i in iters) / len(iters),
    }
    left_alone = (("conflicts/harmless", "left_harmless"), ("conflicts/noise", "left_to_noise"))
    for key, name in left_alone:
        left = [r[key] for r in train if _finite(r.get(key))]
        if left:
            found[name] = statistics.fmean(left)
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _selected(evals: list[dict], recipe: Recipe) -> dict[str, Any]:
    """The evaluation a run would be judged by under model selection: the one at which
    ``checkpoint.best_metric`` was best (the first such), the last one if it never reported it."""
    key = recipe.checkpoint.best_metric
    scored = [r for r in evals if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    if not scored:
        return evals[-1] if evals else {}
    pick = min if recipe.better(key) == "min" else max
    return pick(scored, key=lambda r: r[key])


def task_metrics(recipe: Recipe, present: set[str]) -> dict[str, str]:
    """Each loss's own eval metric (name without ``eval/``), for Δm: what the data set declares
    (QM9, the lab, multidigits), else a metric named after the loss (the user's evaluation and
    the default one report each loss); {} when a loss has none."""
    declared = getattr(recipe.data, "task_metrics", None)
    found = declared(recipe) if declared is not None else {n: n for n in recipe.losses}
    return found if all(m in present for m in found.values()) else {}


def shown_metrics(recipe: Recipe, present: set[str]) -> dict[str, str]:
    """The metrics of the table and which way each improves: the built-in data sets' chosen
    few, or every user metric."""
    if recipe.user_metrics:
        names = sorted(present)
    else:
        names = [m for m in SHOWN_METRICS if m in present]
        names += sorted(m for m in present if m.startswith((TASK_ERROR, TASK_ACCURACY)))
    return {m: recipe.better(m) for m in names}


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    better: str | None  # "min", "max" or None (not ranked)
    fmt: Callable[[float], str]
    value: Callable[[dict], float | None]  # from one run's summary


def _get(*path: str) -> Callable[[dict], float | None]:
    def value(run: dict) -> float | None:
        node: Any = run
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        return node if isinstance(node, int | float) and math.isfinite(node) else None

    return value


def columns_for(metrics: Mapping[str, str]) -> list[Column]:
    """``metrics``: {name: "min" or "max"}, in the table's order."""
    cols = []
    for stage in ("final", "best"):
        for m, better in metrics.items():
            fmt = ("{:.2f}" if m == "psnr" else "{:.4f}").format
            value = _get(f"eval_{stage}", f"eval/{m}")
            cols.append(Column(f"{stage}/{m}", f"{stage} {m}", better, fmt, value))
    share, mean_cos = _get("conflict", "share"), _get("conflict", "mean_cosine")
    ratio, max_ratio = _get("norm_ratio", "mean_ratio"), _get("norm_ratio", "max_ratio")
    return [
        *cols,
        Column("train_seconds", "wall time s", "min", "{:.1f}".format, _get("train_seconds")),
        Column("step_seconds", "s/step", "min", "{:.3f}".format, _get("median_step_seconds")),
        Column("conflict_share", "conflict steps", None, "{:.0%}".format, share),
        Column("mean_cosine", "mean cos", None, "{:+.3f}".format, mean_cos),
        Column("norm_ratio", "norm ratio", None, "{:.1f}".format, ratio),
        Column("max_norm_ratio", "max norm ratio", None, "{:.1f}".format, max_ratio),
    ]


def _mean_std(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def summarize(
    compare_dir: Path, plan: Plan, recipes: Mapping[tuple[str, int], Recipe]
) -> dict[str, Any]:
    """The comparison as plain data: per entry and column, mean ± std over the seeds, and every
    entry's verdict against each baseline."""
    entries = plan.compared
    runs = _read_runs(compare_dir, entries, plan.seeds)
    single_task = _read_runs(compare_dir, plan.single_task_entries, plan.seeds)
    present = {k.removeprefix("eval/") for r in _all(runs) for k in r.get("eval_final", {})}
    first = recipes[entries[0].name, plan.seeds[0]]
    metrics = shown_metrics(first, present)
    columns = columns_for(metrics)
    results = _results(runs, columns)
    checksums = {
        str(s): {e.name: runs[e.name][str(s)].get("first_batch_sha256") for e in entries}
        for s in plan.seeds
    }
    warnings = _data_warnings(checksums, entries[0].name)
    verdicts = {b: _verdicts(runs, b, columns) for b in plan.baselines}
    primary = first.checkpoint.best_metric.removeprefix("eval/")
    primary = primary if primary in metrics else (next(iter(metrics)) if metrics else None)
    sentences = {b: _sentences(per, b, primary, results) for b, per in verdicts.items()}
    per_task = task_metrics(first, present)
    single_task_runs = {e.loss: single_task[e.name] for e in plan.single_task_entries}
    delta = None
    if per_task:
        delta = delta_m_table(
            runs,
            single_task_runs,
            per_task,
            {task: first.better(m) for task, m in per_task.items()},
            "sum" if "sum" in runs else plan.baseline,
        )
    return {
        "recipe": first.name,
        "source": plan.source,
        "compare_dir": str(compare_dir),
        "baseline": plan.baseline,
        "baselines": plan.baselines,
        "primary_metric": primary,
        "selection_metric": first.checkpoint.best_metric,
        "verdicts": verdicts[plan.baseline],
        "verdicts_by_baseline": verdicts,
        "sentences": [line for lines in sentences.values() for line in lines],
        "sentences_by_baseline": sentences,
        "better": dict(metrics),
        "written": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": runs[entries[0].name][str(plan.seeds[0])].get("device"),
        "torch": _torch_version(),
        "max_steps": first.schedule.max_steps,
        "log_every": first.log.every,
        "overrides": plan.overrides,
        "seeds": plan.seeds,
        "metrics": metrics,
        "entries": [
            {
                "name": e.name,
                "method": recipes[e.name, plan.seeds[0]].conductor.method,
                "variant": e.variant,
                "overrides": list(e.overrides),
            }
            for e in entries
        ],
        "columns": [
            {"key": c.key, "title": c.title, "better": c.better, "best": _best(results, c)}
            for c in columns
        ],
        "results": results,
        "data_check": {"identical": not warnings, "first_batch_sha256": checksums},
        "warnings": warnings,
        "delta_m": delta,
        "runs": runs,
        "single_task_runs": single_task_runs,
    }


def _torch_version() -> str:
    import torch  # already imported by the runs; the summary names the version they ran

    return torch.__version__


def _read_runs(compare_dir: Path, entries: list[Entry], seeds: list[int]) -> dict[str, dict]:
    """Every run's ``summary.json``, by entry and seed (as a string)."""
    return {
        e.name: {
            str(s): json.loads((compare_dir / e.name / f"seed{s}" / SUMMARY_FILE).read_text())
            for s in seeds
        }
        for e in entries
    }


def _results(runs: Mapping[str, Mapping[str, dict]], columns: list[Column]) -> dict[str, dict]:
    """Per entry and column, mean ± std over the seeds; seconds per step relative to ``sum``."""
    results: dict[str, dict[str, Any]] = {}
    for name, per_seed in runs.items():
        row = {}
        for col in columns:
            values = [col.value(r) for r in per_seed.values()]
            row[col.key] = _mean_std([v for v in values if v is not None])
        results[name] = row
    if "sum" in results and results["sum"]["step_seconds"]:
        base = results["sum"]["step_seconds"]["mean"]
        for row in results.values():
            step = row["step_seconds"]
            row["ratio_to_sum"] = {"mean": step["mean"] / base} if step and base > 0 else None
    return results


def _best(results: Mapping[str, dict], col: Column) -> str | None:
    """The entry with the column's best mean (None for an unranked column or a single entry)."""
    scored = [(r[col.key]["mean"], n) for n, r in results.items() if r.get(col.key)]
    if not col.better or len(scored) <= 1:
        return None
    return (min if col.better == "min" else max)(scored)[1]


def _data_warnings(checksums: Mapping[str, Mapping[str, Any]], reference: str) -> list[str]:
    warnings = []
    for seed, per_entry in checksums.items():
        differ = [n for n, c in per_entry.items() if c != per_entry[reference]]
        if differ:
            warnings.append(
                f"seed {seed}: {', '.join(differ)} saw a different first micro-batch than "
                f"{reference} (expected only where a variant changes data.* settings)"
            )
    return warnings


def _verdicts(
    runs: Mapping[str, Mapping[str, dict]], baseline: str, columns: list[Column]
) -> dict[str, dict[str, Any]]:
    """Every other entry's paired verdict against ``baseline``, per final metric."""
    verdicts: dict[str, dict[str, Any]] = {}
    for name in runs:
        if name == baseline:
            continue
        per_metric = {}
        for col in columns:
            if not col.key.startswith("final/"):
                continue
            ours, theirs = _per_seed(runs[name], col), _per_seed(runs[baseline], col)
            verdict = paired_verdict(ours, theirs, col.better or "max")
            if verdict is not None:
                per_metric[col.key.removeprefix("final/")] = verdict.to_dict()
        verdicts[name] = per_metric
    return verdicts


def _sentences(
    verdicts: Mapping[str, Mapping[str, Any]],
    baseline: str,
    primary: str | None,
    results: Mapping[str, dict],
) -> list[str]:
    """One sentence per entry on the primary metric against ``baseline``."""
    lines = []
    for name, per_metric in verdicts.items():
        if primary in per_metric:
            share = results[name]["conflict_share"]
            lines.append(
                sentence(
                    name,
                    baseline,
                    primary.upper() if len(primary) <= 4 else primary,
                    Verdict(**per_metric[primary]),
                    difference_format(primary),
                    share["mean"] if share else None,
                )
            )
    return lines


def _per_seed(per_seed_runs: Mapping[str, dict], col: Column) -> dict[str, float]:
    values = {seed: col.value(run) for seed, run in per_seed_runs.items()}
    return {seed: v for seed, v in values.items() if v is not None}


def _all(runs: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    return [r for per_seed in runs.values() for r in per_seed.values()]


def difference_format(metric: str) -> str:
    return "{:+.2f}" if metric == "psnr" else "{:+.4f}"


def summarize_grid(
    compare_dir: Path, plan: Plan, summaries: Mapping[str | None, Mapping[str, Any]]
) -> dict[str, Any]:
    """One row per cell: the primary metric per entry, its verdict, and how the losses relate."""
    first = next(iter(summaries.values()))
    primary = first["primary_metric"]
    cells = []
    for (label, overrides), summary in zip(plan.cells, summaries.values(), strict=True):
        results = summary["results"]
        row: dict[str, Any] = {"cell": label, "overrides": list(overrides), "entries": {}}
        for entry in summary["entries"]:
            name = entry["name"]
            cell = results[name].get(f"final/{primary}")
            verdict = summary["verdicts"].get(name, {}).get(primary)
            row["entries"][name] = {
                "final": cell,
                "verdict": verdict,
                "conflict_share": results[name].get("conflict_share"),
                "mean_cosine": results[name].get("mean_cosine"),
                "norm_ratio": results[name].get("norm_ratio"),
            }
        row["sentences"] = summary["sentences"]
        cells.append(row)
    return {
        "recipe": first["recipe"],
        "source": plan.source,
        "grid": plan.grid,
        "baseline": plan.baseline,
        "primary_metric": primary,
        "better": first["better"].get(primary),
        "seeds": plan.seeds,
        "max_steps": first["max_steps"],
        "device": first["device"],
        "torch": first["torch"],
        "written": _dt.datetime.now().isoformat(timespec="seconds"),
        "entries": [e["name"] for e in first["entries"]],
        "overrides": plan.overrides,
        "cells": cells,
    }
