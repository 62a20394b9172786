"""A comparison's summary (``results.py``) as tables: the cells every view shares, and the
Markdown ``report.md`` of a comparison and of a grid of comparisons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .delta import STAGES
from .results import columns_for, difference_format
from .verdict import Verdict, format_difference


def table_cells(summary: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list, list[bool]]]]:
    """Column titles and, per entry, (label, cell texts, which cells are the column's best)."""
    cols = {c.key: c for c in columns_for(summary["metrics"])}
    meta = {c["key"]: c for c in summary["columns"]}
    titles = ["method", *(c.title for c in cols.values())]
    titles.insert(titles.index("s/step") + 1, "× sum")
    titles.append("data")
    checks = summary["data_check"]["first_batch_sha256"]
    reference = summary["entries"][0]["name"]
    rows = []
    for entry in summary["entries"]:
        name = entry["name"]
        result = summary["results"][name]
        texts, marks = [], []
        for key, col in cols.items():
            cell = result.get(key)
            if cell is None:
                texts.append("–")
            else:
                text = col.fmt(cell["mean"])
                if len(summary["seeds"]) > 1:
                    text += " ± " + col.fmt(cell["std"]).lstrip("+")
                texts.append(text)
            marks.append(meta[key]["best"] == name)
            if key == "step_seconds":
                ratio = result.get("ratio_to_sum")
                texts.append(f"{ratio['mean']:.2f}×" if ratio else "–")
                marks.append(False)
        same = all(per[name] == per[reference] for per in checks.values())
        texts.append("same" if same else "DIFFERS")
        marks.append(False)
        label = f"{name} ({entry['method']})" if entry["variant"] else name
        rows.append((label, texts, marks))
    return titles, rows


def baselines(summary: Mapping[str, Any]) -> list[str]:
    """The summary's baselines (one in summaries written before several were allowed)."""
    return list(summary.get("baselines") or [summary["baseline"]])


def verdict_cells(
    summary: Mapping[str, Any], baseline: str
) -> tuple[list[str], list[tuple[str, list]]]:
    """Titles and, per entry but ``baseline``, (name, [(text, label) per final metric])."""
    metrics = summary["metrics"]
    by_baseline = summary.get("verdicts_by_baseline") or {summary["baseline"]: summary["verdicts"]}
    titles = [f"vs {baseline}", *(f"final {m}" for m in metrics)]
    rows = []
    for name, per_metric in by_baseline[baseline].items():
        cells = []
        for metric in metrics:
            raw = per_metric.get(metric)
            if raw is None:
                cells.append(("–", ""))
                continue
            verdict = Verdict(**raw)
            text = format_difference(verdict, difference_format(metric))
            cells.append((f"{text} {verdict.label}", verdict.label))
        rows.append((name, cells))
    return titles, rows


def sentences(summary: Mapping[str, Any], baseline: str) -> list[str]:
    """The verdict sentences against ``baseline``."""
    by_baseline = summary.get("sentences_by_baseline") or {
        summary["baseline"]: summary["sentences"]
    }
    return list(by_baseline.get(baseline, []))


def delta_cells(summary: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Titles and, per entry, Δm cells: against single-task learning (when it ran) and the
    baseline, at the selected and the final evaluation; ([], []) without per-task metrics."""
    delta = summary.get("delta_m")
    if not delta:
        return [], []
    bases = ["vs_single_task"] if delta["single_task"] else []
    if delta["baseline"]:
        bases.append(f"vs_{delta['baseline']}")
    names = {"vs_single_task": "STL"}
    titles = ["entry"] + [
        f"Δm% vs {names.get(b, b.removeprefix('vs_'))} ({stage})" for b in bases for stage in STAGES
    ]
    rows = []
    for name, per_stage in delta["entries"].items():
        cells = []
        for base in bases:
            for stage in STAGES:
                cell = per_stage.get(stage, {}).get(base)
                if cell is None:
                    cells.append("–" if base != "vs_single_task" or name != "single-task" else "0")
                    continue
                text = f"{cell['mean']:+.1f}"
                if len(cell["values"]) > 1:
                    text += f" ± {cell['std']:.1f}"
                label = (cell.get("verdict") or {}).get("label")
                cells.append(text + (f" {_MARK[label]}" if label in ("better", "worse") else ""))
        rows.append((name, cells))
    return titles, rows


def _delta_lines(summary: Mapping[str, Any]) -> list[str]:
    """The Δm section of ``report.md`` (empty without per-task metrics)."""
    titles, rows = delta_cells(summary)
    if not rows:
        return []
    delta = summary["delta_m"]
    metrics = ", ".join(f"`{m}`" for m in delta["metrics"].values())
    lines = [
        "",
        "## Δm: all tasks in one number",
        "",
        *_markdown_table(titles, ([f"`{n}`", *cells] for n, cells in rows)),
        "",
        "Δm% = 100/K · Σ_k ±(M_k − B_k)/B_k over the K tasks' own metrics "
        f"({metrics}), signed so that positive is worse; mean ± std over seeds, ▲ / ▼ where "
        "the 95 % interval excludes 0. Selected: the evaluation at which "
        f"`{summary.get('selection_metric', 'checkpoint.best_metric')}` was best; final: the last.",
    ]
    if delta["single_task"]:
        lines.append(
            "STL: single-task learning, one run per loss on that loss alone (plain sum, same "
            "model, steps and micro-batches); its base B_k is the mean over seeds of task k's "
            "run, as the papers report it."
        )
    if delta["baseline"]:
        lines.append(
            f"vs {delta['baseline']}: paired by seed, B_k from the same seed's "
            f"`{delta['baseline']}` run."
        )
    return lines


def _markdown_table(titles: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(titles) + " |",
        "|" + "---|" * len(titles),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _table_lines(summary: Mapping[str, Any]) -> list[str]:
    """The results table in Markdown, each column's best in bold."""
    titles, rows = table_cells(summary)
    return _markdown_table(
        titles,
        (
            [label, *(f"**{t}**" if m else t for t, m in zip(texts, marks, strict=True))]
            for label, texts, marks in rows
        ),
    )


def _verdict_lines(summary: Mapping[str, Any], baseline: str) -> list[str]:
    """The verdict table against ``baseline`` in Markdown (empty when only it ran)."""
    titles, rows = verdict_cells(summary, baseline)
    if not rows:
        return []
    return _markdown_table(titles, ([f"`{n}`", *(t for t, _ in cells)] for n, cells in rows))


def _report_head(title: str, scope: str, info: Mapping[str, Any]) -> list[str]:
    """A report's title, what ran (recipe, steps, seeds, device) and the common overrides."""
    lines = [
        f"# {title}",
        "",
        f"Recipe `{info['source']}`{scope}, {info['max_steps']} optimizer steps per run, "
        f"seeds {', '.join(map(str, info['seeds']))}; device {info['device']}, "
        f"torch {info['torch']}; written {info['written']}.",
    ]
    if info["overrides"]:
        lines.append("Overrides for every run: " + " ".join(f"`{o}`" for o in info["overrides"]))
    return lines


def _directions(better: Mapping[str, str]) -> str:
    """ "l1, mse: lower is better; ssim: higher" for the metrics of a report."""
    low = [m for m, way in better.items() if way == "min"]
    high = [m for m, way in better.items() if way == "max"]
    parts = [f"{', '.join(low)}: lower is better"] if low else []
    parts += [f"{', '.join(high)}: higher" + ("" if low else " is better")] if high else []
    return "; ".join(parts)


def render_report(summary: Mapping[str, Any]) -> str:
    """``report.md``: the table, what each entry changes, the verdicts against each baseline,
    and whether the data matched."""
    seeds = summary["seeds"]
    lines = _report_head(f"gcond compare: {summary['recipe']}", "", summary)
    if summary.get("cell"):
        lines.append(f"Grid cell `{summary['cell']}`.")
    lines += ["", *_table_lines(summary)]
    every = summary["log_every"]
    lines += [
        "",
        ("Mean ± std over the seeds; " if len(seeds) > 1 else "")
        + f"best value per column in bold ({_directions(summary['better'])}). "
        "Final: the last evaluation; best: the best evaluation of the run. Wall time: seconds "
        "spent in training steps (evaluation excluded); s/step: median seconds per optimizer "
        "step (the first step, which pays one-time costs, left out); × sum: relative to `sum`. "
        "Conflict steps: share of "
        + ("" if every == 1 else f"logged (every {every}) ")
        + "steps whose lowest cosine between the raw per-loss gradients was below `weak`; "
        "mean cos: the mean of that lowest cosine.",
        "",
        "## Entries",
        "",
    ]
    for entry in summary["entries"]:
        if entry["variant"]:
            changes = ", ".join(f"`{o}`" for o in entry["overrides"])
            lines.append(f"* `{entry['name']}`: variant, method `{entry['method']}`, {changes}")
        else:
            lines.append(f"* `{entry['name']}`: method `{entry['method']}`")
    lines += _delta_lines(summary)
    for baseline in baselines(summary):
        lines += _verdict_section(summary, baseline)
    plots = summary.get("plots") or {}
    if plots:
        lines += ["", "## Pictures", ""]
        for title, file_name in plots.items():
            lines += [f"### {title}", "", f"![{title}]({file_name})", ""]
    lines += ["", "## Same data", "", *_data_lines(summary)]
    lines += [
        "",
        "Curves: `tensorboard --logdir .` in this directory (Custom Scalars tab).",
        "",
    ]
    return "\n".join(lines)


def _verdict_section(summary: Mapping[str, Any], baseline: str) -> list[str]:
    """ "Does it beat the baseline?": sentences, the verdict table and how to read it."""
    verdicts = _verdict_lines(summary, baseline)
    if not verdicts:
        return []
    return [
        "",
        f"## Does it beat `{baseline}`?",
        "",
        *(f"* {line}" for line in sentences(summary, baseline)),
        "",
        *verdicts,
        "",
        f"Each cell: the mean over seeds of (entry − `{baseline}`) on the final "
        "evaluation, paired by seed (both saw the same data and started from the same "
        "weights), with its 95 % confidence interval (Student's t). Better / worse: the "
        "interval excludes 0; within noise: it contains 0, so these seeds show no "
        "difference; with one seed there is no interval. The norm ratio is the largest "
        "over the smallest raw per-loss gradient norm of a step: far above 1, the losses "
        "differ in scale; the lowest cosine says whether they differ in direction.",
    ]


def _data_lines(summary: Mapping[str, Any]) -> list[str]:
    """Whether every entry of a seed saw the same first micro-batch."""
    check = summary["data_check"]
    if not check["identical"]:
        return [f"* {w}" for w in summary["warnings"]]
    return [
        "Every entry of a seed saw the same first micro-batch (SHA-256 of images, masks "
        "and targets): "
        + ", ".join(
            f"seed {s} `{next(iter(per.values()))[:12]}`"
            for s, per in check["first_batch_sha256"].items()
        )
        + "."
    ]


_MARK = {"better": "▲ better", "worse": "▼ worse", "within noise": "≈", "too few seeds": "?"}


def grid_rows(grid: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Overview titles and rows: per cell, the losses' relation and each entry's result."""
    primary, entries = grid["primary_metric"], grid["entries"]
    fmt = difference_format(primary).replace("+", "")
    titles = ["cell", "conflict steps", "mean cos", "norm ratio", *entries]
    rows = []
    for cell in grid["cells"]:
        # How the raw per-loss gradients relate: read from the first entry that computes them.
        measured = next(
            (e for e in cell["entries"].values() if e["conflict_share"] is not None), None
        )
        row = [f"`{cell['cell']}`"]
        for key, form in (
            ("conflict_share", "{:.0%}"),
            ("mean_cosine", "{:+.2f}"),
            ("norm_ratio", "{:.1f}"),
        ):
            value = measured and measured[key]
            row.append(form.format(value["mean"]) if value else "–")
        for name in entries:
            result = cell["entries"][name]
            final, verdict = result["final"], result["verdict"]
            text = "–" if final is None else fmt.format(final["mean"])
            if final is not None and len(grid["seeds"]) > 1:
                text += " ± " + fmt.format(final["std"])
            if verdict is not None:
                text += f" {_MARK.get(verdict['label'], verdict['label'])}"
            row.append(text)
        rows.append(row)
    return titles, rows


def render_grid_report(grid: Mapping[str, Any]) -> str:
    """The grid's ``report.md``: an overview table, then each cell's tables (in its folder)."""
    primary, baseline = grid["primary_metric"], grid["baseline"]
    direction = "lower" if grid["better"] == "min" else "higher"
    keys = ", ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in grid["grid"].items())
    titles, rows = grid_rows(grid)
    lines = _report_head(f"gcond compare grid: {grid['recipe']}", f" over {keys}", grid)
    lines += [
        "",
        f"Final `{primary}` ({direction} is better), mean ± std over seeds; the mark is the "
        f"verdict against `{baseline}`, paired by seed with a 95 % interval: ▲ better, ▼ worse, "
        "≈ within noise. Conflict steps, mean cos and norm ratio describe the raw per-loss "
        "gradients (of the first method that computes them): the share of steps whose lowest "
        "cosine was below the weak threshold, the mean lowest cosine, and the mean ratio of "
        "the largest to the smallest per-loss gradient norm.",
        "",
        *_markdown_table(titles, rows),
        "",
    ]
    for cell in grid["cells"]:
        lines += [f"## `{cell['cell']}`", "", *(f"* {s}" for s in cell["sentences"]), ""]
        lines.append(f"Tables and plots: [{cell['cell']}/report.md]({cell['cell']}/report.md)")
        lines.append("")
    return "\n".join(lines)
