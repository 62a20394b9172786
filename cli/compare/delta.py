"""Δm, the multi-task literature's one number: the mean relative change of every task's metric
against a base, in percent, signed so that positive is worse,

    Δm = 100 / K · Σ_k s_k (M_k − B_k) / B_k,   s_k = +1 if lower M_k is better, −1 if higher.

Two bases: single-task learning (B_k: the mean over seeds of the ``single-task/<loss>`` run of
task k), as the papers report it, and ``sum`` paired by seed (B_k: the same seed's ``sum``
run). Each is computed per seed and per stage — ``selected``, the evaluation at which the
run's ``checkpoint.best_metric`` (on the validation data) was best, and ``final``, the last
one — and given as mean ± std with a 95 % interval. Plain data in, plain data out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from .verdict import paired_verdict

STAGES = ("selected", "final")


def delta_m(
    values: Mapping[str, float], base: Mapping[str, float], better: Mapping[str, str]
) -> float | None:
    """Δm (%) of one run's per-task ``values`` against ``base`` (both {task: metric}); None
    when a task is missing or a base is 0 or not finite."""
    terms = []
    for task, reference in base.items():
        value = values.get(task)
        if value is None or not (math.isfinite(value) and math.isfinite(reference) and reference):
            return None
        sign = 1.0 if better[task] == "min" else -1.0
        terms.append(sign * (value - reference) / abs(reference))
    return 100.0 * statistics.fmean(terms) if terms else None


def task_values(run: Mapping[str, Any], metrics: Mapping[str, str], stage: str) -> dict[str, float]:
    """{task: value} of one run's summary at ``stage`` (``metrics``: {task: metric name})."""
    evals = run.get(f"eval_{stage}") or {}
    found = {}
    for task, metric in metrics.items():
        value = evals.get(f"eval/{metric}")
        if isinstance(value, int | float):
            found[task] = float(value)
    return found


def _interval(per_seed: Mapping[str, float]) -> dict[str, Any] | None:
    """Mean, std and 95 % interval of per-seed Δm; the label says better / worse than 0."""
    if not per_seed:
        return None
    verdict = paired_verdict(per_seed, dict.fromkeys(per_seed, 0.0), "min")
    values = list(per_seed.values())
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": per_seed,
        "verdict": verdict.to_dict() if verdict else None,
    }


def single_task_base(
    runs: Mapping[str, Mapping[str, dict]], metrics: Mapping[str, str], stage: str
) -> dict[str, dict[str, Any]]:
    """Per task, its single-task run's metric at ``stage``: per seed and the mean."""
    base = {}
    for task in metrics:
        per_seed = runs.get(task, {})
        values = {
            seed: v
            for seed, run in per_seed.items()
            if (v := task_values(run, {task: metrics[task]}, stage).get(task)) is not None
        }
        if values:
            base[task] = {"mean": statistics.fmean(values.values()), "values": values}
    return base


def delta_m_table(
    runs: Mapping[str, Mapping[str, dict]],
    single_task: Mapping[str, Mapping[str, dict]],
    metrics: Mapping[str, str],
    better: Mapping[str, str],
    baseline: str | None,
) -> dict[str, Any]:
    """Every entry's Δm against single-task learning (when its runs are there) and against
    ``baseline`` (paired by seed), per stage. ``runs``: {entry: {seed: run summary}};
    ``single_task``: {task: {seed: run summary}}; ``metrics``: {task: metric name}."""
    table: dict[str, Any] = {
        "metrics": dict(metrics),
        "better": dict(better),
        "baseline": baseline,
        "single_task": {},
        "entries": {},
    }
    bases = {}
    if single_task:
        for stage in STAGES:
            bases[stage] = single_task_base(single_task, metrics, stage)
            table["single_task"][stage] = bases[stage]
    rows: dict[str, dict[str, Any]] = {name: {} for name in runs}
    if single_task:
        rows["single-task"] = {}
    for stage in STAGES:
        per_entry = {
            name: {seed: task_values(run, metrics, stage) for seed, run in per_seed.items()}
            for name, per_seed in runs.items()
        }
        if single_task:  # the single-task runs of a seed, as one entry (task k from run k)
            seeds = {seed for per in single_task.values() for seed in per}
            per_entry["single-task"] = {
                seed: {
                    task: v
                    for task in metrics
                    if (run := single_task.get(task, {}).get(seed)) is not None
                    and (v := task_values(run, {task: metrics[task]}, stage).get(task)) is not None
                }
                for seed in sorted(seeds)
            }
        base = bases.get(stage)
        stl_means = {task: b["mean"] for task, b in base.items()} if base else None
        for name, per_seed in per_entry.items():
            row = rows[name].setdefault(stage, {})
            if stl_means and len(stl_means) == len(metrics):
                same = dict.fromkeys(per_seed, stl_means)
                row["vs_single_task"] = _interval(_per_seed(per_seed, same, better))
            if baseline in per_entry and name != baseline:
                row[f"vs_{baseline}"] = _interval(_per_seed(per_seed, per_entry[baseline], better))
    table["entries"] = rows
    return table


def _per_seed(
    per_seed: Mapping[str, Mapping[str, float]],
    bases: Mapping[str, Mapping[str, float]],
    better: Mapping[str, str],
) -> dict[str, float]:
    """{seed: Δm} of an entry's per-seed task values against each seed's base."""
    found = {}
    for seed, values in per_seed.items():
        base = bases.get(seed)
        if base and len(values) == len(base):
            value = delta_m(values, base, better)
            if value is not None:
                found[seed] = value
    return found
