"""PNG plots for a `gcond compare` report, drawn from the runs' ``metrics.jsonl`` files.

`write_plots` writes up to four pictures into the compare directory and returns them by title,
in report order:

* ``eval_curves.png``: each eval metric over optimizer steps, per entry the mean over seeds and a
  min..max band over seeds;
* ``gradients.png``: the lowest pairwise cosine between the raw per-loss gradients and the ratio
  of the largest to the smallest raw gradient norm over steps (entries that log them only);
* ``final_per_seed.png``: each seed's final eval value per entry, with the mean over seeds;
* ``task_change.png`` (with ``single-task``): per task, each entry's change of the task's own
  metric against single-task learning, in percent (positive is worse), at the selected
  evaluation: the per-task terms whose mean is Δm.

matplotlib is imported lazily and only through its object-oriented API (`Figure` with an Agg
canvas, no ``pyplot``): no GUI backend is ever chosen, no global figure state is touched, and
importing this module stays cheap. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..run.files import METRICS_FILE, MIN_COSINE, norm_ratio, read_records
from .delta import delta_m, task_values

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["norm_ratio", "write_plots"]


EVAL_CURVES_FILE = "eval_curves.png"
GRADIENTS_FILE = "gradients.png"
FINAL_PER_SEED_FILE = "final_per_seed.png"
TASK_CHANGE_FILE = "task_change.png"

_WIDTH_IN = 10.0  # 1000 px at _DPI
_DPI = 100
_ROW_HEIGHT_IN = 3.4
_MAX_COLS = 3
# Per-step curves longer than this are smoothed with a centred moving average of about
# steps / _SMOOTH_POINTS steps (odd, at most _MAX_WINDOW).
_SMOOTH_POINTS = 60
_MAX_WINDOW = 51
_SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")

# Run records of one entry: seed -> that run's records (in file order).
_Runs = dict[int, list[dict[str, Any]]]
# A curve: sorted steps and their values.
_Curve = tuple[list[float], list[float]]


def write_plots(compare_dir: Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """Write the comparison's PNG plots into ``compare_dir``.

    Args:
        compare_dir: the compare directory; run ``<entry>/seed<seed>/metrics.jsonl`` files are
            read from it (missing runs and undecodable lines are skipped).
        summary: ``entries`` (dicts with a ``name``), ``seeds`` (ints), ``metrics`` (eval metric
            names without the ``eval/`` prefix) and optionally ``better`` ({metric: "min" or
            "max"}, shown in the axis labels).

    Returns:
        {plot title: PNG file name relative to ``compare_dir``}, in report order. A plot with
        nothing to draw is not written (no gradients plot when no entry logs cosines or norms).
    """
    compare_dir = Path(compare_dir)
    names = [str(e["name"]) for e in summary.get("entries", [])]
    seeds = [int(s) for s in summary.get("seeds", [])]
    metrics = [str(m) for m in summary.get("metrics", [])]
    better = dict(summary.get("better") or {})
    runs = {name: _load_runs(compare_dir / name, seeds) for name in names}
    colors = _entry_colors(names)

    drawn: dict[str, str] = {}
    plots = (
        ("Eval metrics over steps", EVAL_CURVES_FILE, _eval_curves_figure),
        ("Gradient conflict over steps", GRADIENTS_FILE, _gradients_figure),
        ("Final eval metrics per seed", FINAL_PER_SEED_FILE, _final_per_seed_figure),
    )
    for title, file_name, draw in plots:
        fig = draw(runs, names, seeds, metrics, better, colors)
        if fig is None:
            continue
        _save(fig, compare_dir / file_name)
        drawn[title] = file_name
    fig = _task_change_figure(summary, colors)
    if fig is not None:
        _save(fig, compare_dir / TASK_CHANGE_FILE)
        drawn["Each task against single-task learning"] = TASK_CHANGE_FILE
    return drawn


# ---------------------------------------------------------------------------------------------
# Reading


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file that have a step (see `files.read_records`)."""
    return [r for r in read_records(path) if _is_number(r.get("step"))]


def _load_runs(entry_dir: Path, seeds: Sequence[int]) -> _Runs:
    runs: _Runs = {}
    for seed in seeds:
        path = entry_dir / f"seed{seed}" / METRICS_FILE
        if path.is_file():
            runs[seed] = _read_records(path)
    return runs


def _series(records: list[dict[str, Any]], kind: str, value: Any) -> _Curve:
    """(steps, values) of the records of one kind, finite values only, in step order (a resumed
    run may log a step twice: the later record wins)."""
    by_step: dict[float, float] = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        v = value(r)
        if _is_number(v) and math.isfinite(v):
            by_step[float(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _key(name: str) -> Any:
    return lambda r: r.get(name)


# ---------------------------------------------------------------------------------------------
# Aggregation


def _smooth(curve: _Curve, window: int) -> _Curve:
    """Centred moving average (shorter at the ends); window 1 returns the curve unchanged."""
    steps, values = curve
    if window <= 1 or len(values) < 3:
        return curve
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return steps, out


def _window(curves: Sequence[_Curve]) -> int:
    """Moving-average window for per-step curves: 1 (none) for short runs."""
    longest = max((len(c[0]) for c in curves), default=0)
    if longest <= 2 * _SMOOTH_POINTS:
        return 1
    window = min(_MAX_WINDOW, longest // _SMOOTH_POINTS)
    return window if window % 2 else window + 1


def _band(curves: Sequence[_Curve]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the seeds' curves at every step any seed logged."""
    at: dict[float, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps, values, strict=True):
            at.setdefault(s, []).append(v)
    steps = sorted(at)
    return (
        steps,
        [sum(at[s]) / len(at[s]) for s in steps],
        [min(at[s]) for s in steps],
        [max(at[s]) for s in steps],
    )


# ---------------------------------------------------------------------------------------------
# Drawing


def _entry_colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _new_figure(panels: int, max_cols: int = _MAX_COLS) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(max_cols, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(
        figsize=(_WIDTH_IN, rows * _ROW_HEIGHT_IN + 1.0),
        dpi=_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _step_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def _metric_label(metric: str, better: Mapping[str, str]) -> str:
    direction = {"min": "lower is better", "max": "higher is better"}.get(better.get(metric, ""))
    return f"{metric} ({direction})" if direction else metric


def _legend(fig: Figure, handles: list[Any], labels: list[str], title: str | None = None) -> None:
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(len(labels), 5),
            title=title,
            frameon=False,
        )


def _plot_band(ax: Axes, curves: Sequence[_Curve], color: Any, label: str) -> Any:
    steps, mean, low, high = _band(curves)
    marker = "o" if len(steps) == 1 else None  # a single point draws no line
    (line,) = ax.plot(steps, mean, color=color, label=label, linewidth=1.6, marker=marker)
    if len(curves) >= 2:
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        if len(steps) == 1:
            ax.vlines(steps, low, high, color=color, alpha=0.5)
    return line


def _seed_note(seeds: Sequence[int]) -> str:
    if len(seeds) >= 2:
        return f"mean over {len(seeds)} seeds, band: min..max over seeds"
    return "1 seed"


def _eval_curves_figure(
    runs: Mapping[str, _Runs],
    names: Sequence[str],
    seeds: Sequence[int],
    metrics: Sequence[str],
    better: Mapping[str, str],
    colors: Mapping[str, Any],
) -> Figure | None:
    curves = {
        m: {
            name: [
                c
                for c in (_series(r, "eval", _key(f"eval/{m}")) for r in runs[name].values())
                if c[0]
            ]
            for name in names
        }
        for m in metrics
    }
    shown = [m for m in metrics if any(curves[m][name] for name in names)]
    if not shown:
        return None
    fig, axes = _new_figure(len(shown))
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes, shown, strict=True):
        for name in names:
            if curves[metric][name]:
                handles[name] = _plot_band(ax, curves[metric][name], colors[name], name)
        ax.set_title(metric)
        _step_axis(ax)
        ax.set_ylabel(_metric_label(metric, better))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Eval metrics over steps ({_seed_note(seeds)})")
    _legend(fig, list(handles.values()), list(handles))
    return fig


def _gradients_figure(
    runs: Mapping[str, _Runs],
    names: Sequence[str],
    seeds: Sequence[int],
    metrics: Sequence[str],
    better: Mapping[str, str],
    colors: Mapping[str, Any],
) -> Figure | None:
    cosines = {
        name: [
            c for c in (_series(r, "train", _key(MIN_COSINE)) for r in runs[name].values()) if c[0]
        ]
        for name in names
    }
    ratios = {
        name: [c for c in (_series(r, "train", norm_ratio) for r in runs[name].values()) if c[0]]
        for name in names
    }
    if not any(cosines.values()) and not any(ratios.values()):
        return None
    window = _window([c for curves in (*cosines.values(), *ratios.values()) for c in curves])
    fig, (ax_cos, ax_ratio) = _new_figure(2)
    handles: dict[str, Any] = {}
    for ax, data in ((ax_cos, cosines), (ax_ratio, ratios)):
        for name in names:
            if data[name]:
                smoothed = [_smooth(c, window) for c in data[name]]
                handles[name] = _plot_band(ax, smoothed, colors[name], name)
        _step_axis(ax)
        ax.grid(alpha=0.3)
    ax_cos.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax_cos.set_title("lowest pairwise cosine of raw gradients")
    ax_cos.set_ylabel("min cosine (< 0: conflict)")
    ax_ratio.set_title("raw gradient norm ratio")
    ax_ratio.set_ylabel("max / min raw norm (log)")
    if any(ratios.values()):
        from matplotlib.ticker import LogFormatter

        ax_ratio.set_yscale("log")
        # Plain numbers (10, 20, 1000), minor ticks labelled when the range is under a decade.
        ax_ratio.yaxis.set_major_formatter(LogFormatter())
        ax_ratio.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    smoothing = f", {window}-step moving average" if window > 1 else ""
    fig.suptitle(f"Gradient conflict over steps ({_seed_note(seeds)}{smoothing})")
    _legend(fig, list(handles.values()), list(handles))
    return fig


def _final_per_seed_figure(
    runs: Mapping[str, _Runs],
    names: Sequence[str],
    seeds: Sequence[int],
    metrics: Sequence[str],
    better: Mapping[str, str],
    colors: Mapping[str, Any],
) -> Figure | None:
    # The final value is the last eval record's, as in the report's table.
    finals: dict[str, dict[str, dict[int, float]]] = {m: {n: {} for n in names} for m in metrics}
    for name in names:
        for seed, records in runs[name].items():
            evals = [r for r in records if r.get("kind") == "eval"]
            for metric in metrics:
                last = next((r for r in reversed(evals) if f"eval/{metric}" in r), None)
                value = None if last is None else last[f"eval/{metric}"]
                if _is_number(value) and math.isfinite(value):
                    finals[metric][name][seed] = float(value)
    shown = [m for m in metrics if any(finals[m][n] for n in names)]
    if not shown:
        return None
    # Entry names label the x axis: fewer, wider panels when there are many entries.
    fig, axes = _new_figure(
        len(shown), max_cols=3 if len(names) <= 4 else 2 if len(names) <= 7 else 1
    )
    markers = {s: _SEED_MARKERS[i % len(_SEED_MARKERS)] for i, s in enumerate(seeds)}
    spread = 0.25 if len(seeds) > 1 else 0.0
    offsets = {
        s: (-spread + 2 * spread * i / (len(seeds) - 1)) if len(seeds) > 1 else 0.0
        for i, s in enumerate(seeds)
    }
    seed_handles: dict[int, Any] = {}
    for ax, metric in zip(axes, shown, strict=True):
        for x, name in enumerate(names):
            values = finals[metric][name]
            for seed, value in values.items():
                seed_handles[seed] = ax.scatter(
                    x + offsets[seed],
                    value,
                    color=colors[name],
                    marker=markers[seed],
                    s=36,
                    edgecolors="black",
                    linewidths=0.5,
                    zorder=3,
                )
            if values:
                mean = sum(values.values()) / len(values)
                ax.hlines(mean, x - 0.35, x + 0.35, color=colors[name], linewidth=2.5, zorder=2)
        ax.set_xticks(
            range(len(names)),
            names,
            rotation=25 if len(names) > 2 else 0,
            ha="right" if len(names) > 2 else "center",
            rotation_mode="anchor",
        )
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(metric)
        ax.set_ylabel(_metric_label(metric, better))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Final eval metrics per seed (markers: seeds; bar: mean over seeds)")
    ordered = [s for s in seeds if s in seed_handles]
    _legend(
        fig,
        [_grey_marker(markers[s]) for s in ordered],
        [f"seed {s}" for s in ordered],
    )
    return fig


def _grey_marker(marker: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D(
        [],
        [],
        linestyle="none",
        marker=marker,
        markerfacecolor="lightgrey",
        markeredgecolor="black",
        markersize=7,
    )


def _task_change_figure(summary: Mapping[str, Any], colors: Mapping[str, Any]) -> Figure | None:
    """Grouped bars: per task, each entry's mean signed change (%) against the single-task
    base, at the selected evaluation (None without single-task runs)."""
    delta = summary.get("delta_m") or {}
    base = (delta.get("single_task") or {}).get("selected")
    if not base:
        return None
    metrics, better = delta["metrics"], delta["better"]
    tasks = [t for t in metrics if t in base]
    names = [n for n in summary.get("runs", {}) if n in colors]
    fig, (ax,) = _new_figure(1)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        heights = []
        for task in tasks:
            own = {task: metrics[task]}
            values = [
                v
                for run in summary["runs"][name].values()
                if (v := task_values(run, own, "selected").get(task)) is not None
            ]
            mean = {task: sum(values) / len(values)} if values else {}
            change = delta_m(mean, {task: base[task]["mean"]}, better)
            heights.append(math.nan if change is None else change)
        offsets = [t + (i - (len(names) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(offsets, heights, width, color=colors[name], label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("change vs single-task, % (positive is worse)")
    ax.set_title("each task's own metric at the selected evaluation, mean over seeds")
    _legend(fig, *ax.get_legend_handles_labels())
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
