"""``gcond compare``: one recipe under several methods and variants, same seeds, same data.

Every run of a comparison lives under one directory,

    runs/<recipe>/compare-<name>/<method or variant>/seed<s>/

so ``tensorboard --logdir`` on it overlays the runs; the compare directory's own events file
holds a custom-scalars layout with one chart per metric, every run's curve in it. The data
stream, the masks and the initial weights follow the seed alone, so every entry of a seed sees
the same micro-batches in the same order and runs the same number of optimizer steps; the first
micro-batch's checksum is recorded per run to show it. Results go to the console as a table and
to ``summary.json`` and ``report.md`` in the compare directory.

A comparison can be resumed like a training run: ``--resume DIR`` skips the runs that finished
(``summary.json`` present), continues an interrupted run from its latest checkpoint, and starts
the ones not started yet.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import itertools
import json
import math
import re
import shutil
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .checkpoint import latest_checkpoint, load_checkpoint
from .data import ImageSet, build_datasets
from .errors import GcondError
from .logger import METRICS_FILE, SUMMARY_FILE
from .methods import METHODS, method_unavailable
from .plots import norm_ratio, write_plots
from .plugins import (
    ComponentError,
    PluginRoots,
    require_roots,
    resolve_references,
    save_plugin_roots,
    saved_plugin_roots,
)
from .recipe import (
    ImageDataConfig,
    LabDataConfig,
    Recipe,
    RecipeError,
    TargetConfig,
    dump_recipe_yaml,
    load_recipe,
    name_problem,
    recipe_from_dict,
    recipe_to_dict,
    recipes_dir,
)
from .train import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    RECIPE_FILE,
    Trainer,
    UsageError,
    run_to_end,
)
from .verdict import Verdict, format_difference, paired_verdict, sentence

PLAN_FILE = "compare.json"
REPORT_FILE = "report.md"
FIRST_BATCH_FILE = "first_batch.json"
DEFAULT_METHODS = ("conductor", "sum")
# Eval metrics of the table, and which way is better.
EVAL_METRICS = {
    "l1": "min",
    "ssim": "max",
    "psnr": "max",
    "accuracy": "max",
    "mean_err": "min",
    "mean_acc": "max",
}
USER_FILES = ("imagefolder", "cifar10", "stl10")  # data sets read from the user's files
TASK_ERROR = "err_"  # the conflict lab's per-task errors, eval/err_<task>: lower is better
TASK_ACCURACY = "acc_"  # multidigits' per-task accuracies, eval/acc_<task>: higher is better
DEFAULT_BASELINE = "sum"
_VARIANT_FORM = (
    "NAME:KEY=VALUE,KEY=VALUE, e.g. "
    "seed-momentum:conductor.momentum_beta=0.9,optimizer.betas=[0.0,0.95]"
)


# ---------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: a method, or a named variant of the recipe."""

    name: str
    overrides: tuple[str, ...]  # applied on top of the comparison's recipe
    variant: bool


@dataclass
class Plan:
    source: str  # where the recipe came from (for the report)
    overrides: list[str]  # the comparison's own KEY=VALUE overrides, already in its recipe
    methods: list[str]
    variants: dict[str, list[str]]
    seeds: list[int]
    baseline: str = DEFAULT_BASELINE  # the entry every other is judged against
    grid: dict[str, list[str]] = field(default_factory=dict)  # recipe key -> values, crossed

    @property
    def cells(self) -> list[tuple[str | None, tuple[str, ...]]]:
        """(directory name, overrides) of every cell of the grid; one unnamed cell without."""
        if not self.grid:
            return [(None, ())]
        keys = list(self.grid)
        cells = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            label = "_".join(
                f"{k.rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values, strict=True)
            )
            cells.append((label, tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True))))
        return cells

    @property
    def entries(self) -> list[Entry]:
        methods = [Entry(m, (f"conductor.method={m}",), False) for m in self.methods]
        variants = [Entry(n, tuple(o), True) for n, o in self.variants.items()]
        return methods + variants

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "overrides": self.overrides,
            "methods": self.methods,
            "variants": self.variants,
            "seeds": self.seeds,
            "baseline": self.baseline,
            "grid": self.grid,
        }


def metric_better(metric: str, recipe: Recipe | None = None) -> str:
    """Which way an eval metric (without ``eval/``) improves: "min" or "max". The user's own
    metrics improve downwards unless listed in the recipe's ``eval.higher_is_better``."""
    if recipe is not None and _user_metrics(recipe):
        return "max" if metric in recipe.eval.higher_is_better else "min"
    if metric.startswith(TASK_ACCURACY):
        return "max"
    return EVAL_METRICS.get(metric, "min")  # the lab's err_<task> and any error-like metric


def _user_metrics(recipe: Recipe) -> bool:
    """Whether the evaluation is the user's (their own, or their losses on their data)."""
    return recipe.eval.target is not None or isinstance(recipe.data, TargetConfig)


def _shown_metrics(recipe: Recipe, present: set[str]) -> list[str]:
    """The metrics of the table: the built-in data sets' chosen few, or every user metric."""
    if _user_metrics(recipe):
        return sorted(present)
    metrics = [m for m in EVAL_METRICS if m in present]
    return metrics + sorted(m for m in present if m.startswith((TASK_ERROR, TASK_ACCURACY)))


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets and quotes: ``a=[0.0,0.95],b=1`` -> two parts."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, overrides); values may hold commas in brackets."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise UsageError(f"--variant {text!r}: expected {_VARIANT_FORM}")
    problem = name_problem(name)
    if problem:
        raise UsageError(f"--variant {text!r}: got the name {name!r}, expected {problem}")
    overrides = split_top_level(rest)
    for override in overrides:
        if "=" not in override:
            raise UsageError(
                f"--variant {text!r}: {override!r} is not KEY=VALUE; expected {_VARIANT_FORM}"
            )
    return name, overrides


def parse_variants(variants: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """Every ``--variant``, by name; names must be unique and no method's."""
    parsed = dict(parse_variant(v) for v in variants)
    if len(parsed) != len(variants):
        raise UsageError("--variant: two variants have the same name")
    clash = set(parsed) & set(methods)
    if clash:
        raise UsageError(f"--variant: the name {sorted(clash)[0]!r} is also a method; rename it")
    return parsed


def parse_grid(options: Sequence[str]) -> dict[str, list[str]]:
    """Every ``--grid KEY=V1,V2,...`` as key -> values (commas inside brackets kept)."""
    grid: dict[str, list[str]] = {}
    for text in options:
        key, sep, values = text.partition("=")
        key = key.strip()
        parts = [v for v in split_top_level(values) if v]
        if not sep or not key or not parts:
            raise UsageError(
                f"--grid {text!r}: expected KEY=V1,V2,..., e.g. data.lab.direction=0.5,0,-0.5"
            )
        if key in grid:
            raise UsageError(f"--grid: {key} is given twice; list all its values in one --grid")
        bad = [v for v in parts if name_problem(f"x{v}")]
        if bad:
            raise UsageError(
                f"--grid {key}: the value {bad[0]!r} cannot name a directory; use numbers or "
                "words of letters, digits, '.', '_' and '-'"
            )
        grid[key] = parts
    return grid


def parse_methods(text: str) -> list[str]:
    """``conductor,sum`` -> the method names, each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(
            f"--methods {text!r}: expected comma-separated methods, e.g. conductor,sum"
        )
    for name in names:
        if name not in METHODS:
            close = difflib.get_close_matches(name, METHODS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(
                f"--methods: unknown method {name!r}, expected one of {', '.join(METHODS)}{hint}"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"--methods {text!r}: a method is listed twice")
    return names


def _make_plan(
    recipe: Recipe,
    source: str,
    overrides: Sequence[str],
    methods: str | None,
    seeds: int | None,
    variants: Sequence[str],
    baseline: str | None = None,
    grid: Sequence[str] = (),
) -> Plan:
    method_names = parse_methods(methods) if methods is not None else list(DEFAULT_METHODS)
    parsed = parse_variants(variants, method_names)
    count = 1 if seeds is None else seeds
    if count < 1:
        raise UsageError(f"--seeds: got {count}, expected at least 1")
    entries = [*method_names, *parsed]
    if baseline is None:
        baseline = DEFAULT_BASELINE if DEFAULT_BASELINE in entries else entries[0]
    elif baseline not in entries:
        close = difflib.get_close_matches(baseline, entries, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(
            f"--baseline {baseline!r}: not among the compared methods and variants "
            f"({', '.join(entries)}); add it to --methods{hint}"
        )
    return Plan(
        source=source,
        overrides=list(overrides),
        methods=method_names,
        variants=parsed,
        seeds=[recipe.seed + i for i in range(count)],
        baseline=baseline,
        grid=parse_grid(grid),
    )


def _check_resume_request(
    plan: Plan,
    methods: str | None,
    seeds: int | None,
    variants: Sequence[str],
    baseline: str | None = None,
    grid: Sequence[str] = (),
) -> None:
    """On ``--resume`` the saved plan is used; options that would change it are refused."""
    differ = []
    if grid and parse_grid(grid) != plan.grid:
        differ.append("the same --grid options")
    if baseline is not None and baseline != plan.baseline:
        differ.append(f"--baseline {plan.baseline}")
    if methods is not None and parse_methods(methods) != plan.methods:
        differ.append(f"--methods {','.join(plan.methods)}")
    if seeds is not None and seeds != len(plan.seeds):
        differ.append(f"--seeds {len(plan.seeds)}")
    if variants and dict(parse_variant(v) for v in variants) != plan.variants:
        differ.append("the same --variant options")
    if differ:
        raise UsageError(
            "--resume continues the comparison as it was started; drop the options or pass "
            + ", ".join(differ)
        )


def _run_recipes(base: Recipe, plan: Plan) -> dict[tuple[str, int], Recipe]:
    """The recipe of every (entry, seed), all validated before anything runs."""
    raw = recipe_to_dict(base)
    recipes, errors = {}, []
    for entry in plan.entries:
        try:
            for seed in plan.seeds:
                recipes[entry.name, seed] = recipe_from_dict(
                    raw, [*entry.overrides, f"seed={seed}"]
                )
        except RecipeError as exc:
            errors += [f"{entry.name}: {line}" for line in exc.errors]
    if errors:
        raise RecipeError(errors)
    for entry in plan.entries:
        method = recipes[entry.name, plan.seeds[0]].conductor.method
        reason = method_unavailable(method)
        if reason:
            raise UsageError(f"{entry.name}: {reason}")
    return recipes


# ---------------------------------------------------------------------------------------------
# Running


def batch_checksum(batch: Any) -> str:
    """SHA-256 of a micro-batch: every tensor's dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()  # device-to-host copy: once per run
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            t = t.to(torch.uint8) if t.dtype == torch.bool else t
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, Mapping):
            for key in sorted(obj):
                digest.update(str(key).encode())
                feed(obj[key])
        elif isinstance(obj, list | tuple):
            for item in obj:
                feed(item)
        else:
            digest.update(repr(obj).encode())

    feed(batch)
    return digest.hexdigest()


class _FirstBatchRecorder:
    """Stands in for a run's data provider: serves every micro-batch unchanged and writes the
    checksum of the first one to the run directory. Anything else goes to the provider."""

    def __init__(self, provider: Callable[[], Any], path: Path) -> None:
        self._provider = provider
        self._path = path
        self._pending = True

    def __call__(self) -> Any:
        batch = self._provider()
        if self._pending:
            self._pending = False
            self._path.write_text(json.dumps({"sha256": batch_checksum(batch)}) + "\n")
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)


def _data_key(recipe: Recipe) -> str:
    return recipe.data.model_dump_json()


def _user_datasets(recipes: Iterable[Recipe], out: Console) -> dict[str, tuple[ImageSet, ImageSet]]:
    """The data sets read from the user's files (image folder, CIFAR-10, STL-10), loaded once
    for every run that uses them: they do not depend on the seed. Loading them before the
    comparison's directory is made means bad data is refused with nothing created."""
    loaded = {}
    for recipe in recipes:
        key = _data_key(recipe)
        files = isinstance(recipe.data, ImageDataConfig) and recipe.data.dataset in USER_FILES
        if files and key not in loaded:
            loaded[key] = build_datasets(recipe.data, recipe.seed, console=out)
    return loaded


def _user_code(recipes: Iterable[Recipe], plugins: PluginRoots) -> dict[int, dict[str, Any]]:
    """The user's components of every run (by ``id`` of its recipe), imported from the trusted
    roots and checked against their signatures; every problem of every run at once."""
    resolved, errors = {}, []
    for recipe in recipes:
        try:
            resolved[id(recipe)] = resolve_references(recipe, plugins)
        except RecipeError as exc:
            errors += [line for line in exc.errors if line not in errors]
    if errors:
        raise RecipeError(errors)
    return resolved


def _train_run(
    recipe: Recipe,
    run_dir: Path,
    *,
    console: bool,
    out: Console,
    datasets: tuple[ImageSet, ImageSet] | None = None,
    targets: Mapping[str, Callable[..., Any]] | None = None,
) -> int:
    """Train (or continue) one run of the comparison; returns its exit code."""
    payload = None
    try:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            recipe = load_recipe(run_dir / RECIPE_FILE)
            payload = load_checkpoint(checkpoint)
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # it stopped before its first checkpoint: start it over
        trainer = Trainer(recipe, run_dir, console=console, datasets=datasets, targets=targets)
    except (GcondError, ValueError) as exc:
        _error(out, f"{run_dir}: {exc}")
        return EXIT_USAGE
    except ComponentError as exc:  # the user's code broke its contract while building
        _error(out, f"{run_dir}: building the run failed: {exc}")
        return EXIT_FAILED
    if payload is not None:
        trainer.restore(payload)
    else:
        run_dir.mkdir(parents=True)
        (run_dir / RECIPE_FILE).write_text(dump_recipe_yaml(recipe))
        trainer.provider = _FirstBatchRecorder(trainer.provider, run_dir / FIRST_BATCH_FILE)
    return run_to_end(trainer, results=lambda: run_results(run_dir, recipe))


def run_results(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """What the comparison reads from a run: final and best eval metrics, how often the losses
    conflicted, and the first micro-batch's checksum."""
    records = []
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    evals = [r for r in records if r.get("kind") == "eval"]
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    final = {k: evals[-1].get(k) for k in keys} if evals else {}
    best = {}
    for key in keys:
        values = [r[key] for r in evals if isinstance(r.get(key), int | float)]
        pick = min if metric_better(key.removeprefix("eval/"), recipe) == "min" else max
        best[key] = pick(values) if values else None

    # Seconds per step as logged; the first step pays one-time costs (allocation, kernel
    # selection, the batched-backward probe), so it is left out.
    step_seconds = [
        r["step_s"]
        for r in records
        if r.get("kind") == "train" and isinstance(r.get("step_s"), int | float)
    ]
    step_seconds = step_seconds[1:] if len(step_seconds) > 1 else step_seconds

    weak = recipe.conductor.conflict_thresholds[2]
    cosines = [
        r["min_cosine_sim"]
        for r in records
        if r.get("kind") == "train" and isinstance(r.get("min_cosine_sim"), int | float)
    ]
    conflict = None
    if cosines:
        conflict = {
            "steps": len(cosines),
            "share": sum(c < weak for c in cosines) / len(cosines),
            "mean_cosine": sum(cosines) / len(cosines),
            "weak": weak,
        }
    ratios = [
        ratio for r in records if r.get("kind") == "train" and (ratio := norm_ratio(r)) is not None
    ]
    scales = None
    if ratios:
        scales = {"mean_ratio": statistics.fmean(ratios), "max_ratio": max(ratios)}
    first_batch = run_dir / FIRST_BATCH_FILE
    checksum = json.loads(first_batch.read_text())["sha256"] if first_batch.is_file() else None
    return {
        "seed": recipe.seed,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else None,
        "eval_final": final,
        "eval_best": best,
        "conflict": conflict,
        "norm_ratio": scales,
        "first_batch_sha256": checksum,
    }


def _write_layout(compare_dir: Path, base: Recipe) -> None:
    """Custom-scalars layout at the compare directory's root: one chart per metric, in which
    the regex matches that tag in every run below, so every method's curve lands in it."""
    from torch.utils.tensorboard import SummaryWriter

    def charts(tags: list[str]) -> dict[str, list]:
        return {tag: ["Multiline", [f"^{re.escape(tag)}$"]] for tag in tags}

    names = list(base.losses)
    pairs = [f"cos/{a}_vs_{b}" for i, a in enumerate(names) for b in names[i + 1 :]]
    metrics = base.metrics()
    evals = [m for m in metrics if m != "eval/mse" or _user_metrics(base)] if metrics else []
    if isinstance(base.data, LabDataConfig):
        evals = ["eval/mean_err", *(f"eval/{TASK_ERROR}{n}" for n in names)]
    layout = {
        "compare: eval": charts(evals),
        "compare: losses": charts(["loss/total", *[f"loss/{n}" for n in names]]),
        "compare: gradients": charts(["min_cosine_sim", *pairs, "final_grad_norm"]),
        "compare: speed": charts(["train/samples_per_s", "train/lr"]),
    }
    with SummaryWriter(log_dir=str(compare_dir)) as writer:
        writer.add_custom_scalars(layout)


def run_compare(
    recipe: Recipe | None,
    source: Path | None,
    *,
    overrides: Sequence[str] = (),
    methods: str | None = None,
    seeds: int | None = None,
    variants: Sequence[str] = (),
    name: str | None = None,
    resume: Path | None = None,
    quiet: bool = False,
    baseline: str | None = None,
    grid: Sequence[str] = (),
    plugins: PluginRoots | None = None,
) -> int:
    """``gcond compare``: returns the exit code (0 done, 1 a run failed, 2 bad request,
    130 stopped; the last two can be continued with ``--resume``)."""
    isatty = getattr(sys.stdout, "isatty", None)
    # Not a terminal: wide enough that the table's rows are not wrapped in a log file.
    out = Console(highlight=False, width=None if isatty and isatty() else 200)
    if resume is not None:
        compare_dir = Path(resume)
        plan, base = _load_plan(compare_dir, recipe)
        _check_resume_request(plan, methods, seeds, variants, baseline, grid)
    else:
        if recipe is None or source is None:
            raise UsageError("give a RECIPE to compare, or --resume COMPARE_DIR")
        plan = _make_plan(
            recipe, display_path(source), overrides, methods, seeds, variants, baseline, grid
        )
        base = recipe
        stamp = name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        compare_dir = Path(base.log.runs_dir) / str(base.name) / f"compare-{stamp}"
        if compare_dir.exists():
            raise UsageError(
                f"{compare_dir} already exists: choose another --name, or continue it with "
                f"--resume {compare_dir}"
            )
    cells = _cell_recipes(base, plan)
    every_run = [r for recipes in cells.values() for r in recipes.values()]
    plugins = plugins or PluginRoots.from_options()
    if resume is not None:
        require_roots(base, plugins, saved_plugin_roots(compare_dir), compare_dir)
    targets = _user_code(every_run, plugins)  # refused or broken code: before anything is made
    datasets = _user_datasets(every_run, out)  # bad data is refused before anything is made
    if resume is None:
        compare_dir.mkdir(parents=True)
        save_plugin_roots(compare_dir, plugins)
        (compare_dir / RECIPE_FILE).write_text(dump_recipe_yaml(base))
        (compare_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        for label in cells:
            cell_dir = compare_dir if label is None else compare_dir / label
            cell_dir.mkdir(exist_ok=True)
            _write_layout(cell_dir, base)

    runs = [
        (label, seed, entry) for label in cells for seed in plan.seeds for entry in plan.entries
    ]
    hint = f"continue with: gcond compare --resume {compare_dir}"
    try:
        for index, (label, seed, entry) in enumerate(runs, 1):
            cell_dir = compare_dir if label is None else compare_dir / label
            run_dir = cell_dir / entry.name / f"seed{seed}"
            where = f"{label}: " if label is not None else ""
            head = f"[{index}/{len(runs)}] {where}{entry.name}, seed {seed}"
            if (run_dir / SUMMARY_FILE).is_file():
                out.print(f"{head}: finished earlier, skipped")
                continue
            out.print(f"{head} -> {run_dir}", style="bold")
            run = cells[label][entry.name, seed]
            code = _train_run(
                run,
                run_dir,
                console=not quiet,
                out=out,
                datasets=datasets.get(_data_key(run)),
                targets=targets[id(run)],
            )
            if code != EXIT_OK:
                _error(out, f"{head} did not finish (exit code {code}); {hint}")
                return code
    except KeyboardInterrupt:
        _error(out, f"stopped; {hint}")
        return EXIT_INTERRUPTED

    summaries = {}
    for label, recipes in cells.items():
        cell_dir = compare_dir if label is None else compare_dir / label
        summaries[label] = _finish_cell(cell_dir, plan, recipes, out, label)
    if plan.grid:
        grid = summarize_grid(compare_dir, plan, summaries)
        _write_summary(compare_dir, grid)
        (compare_dir / REPORT_FILE).write_text(render_grid_report(grid))
        _print_grid(out, grid)
    out.print(
        f"written: {compare_dir / SUMMARY_FILE}, {compare_dir / REPORT_FILE}; "
        f"curves: tensorboard --logdir {compare_dir}",
        markup=False,
    )
    return EXIT_OK


def _cell_recipes(base: Recipe, plan: Plan) -> dict[str | None, dict[tuple[str, int], Recipe]]:
    """The recipe of every (entry, seed) of every cell, all validated before anything runs."""
    cells, errors = {}, []
    for label, overrides in plan.cells:
        try:
            cell_base = recipe_from_dict(recipe_to_dict(base), list(overrides)) if label else base
            cells[label] = _run_recipes(cell_base, plan)
        except RecipeError as exc:
            errors += [f"{label}: {line}" if label else line for line in exc.errors]
    if errors:
        raise RecipeError(errors)
    return cells


def _finish_cell(
    cell_dir: Path,
    plan: Plan,
    recipes: Mapping[tuple[str, int], Recipe],
    out: Console,
    label: str | None,
) -> dict[str, Any]:
    """Summary, plots and report of one cell (the whole comparison without a grid), printed."""
    summary = summarize(cell_dir, plan, recipes)
    summary["cell"] = label
    _write_summary(cell_dir, summary)  # before the plots: a failing plot loses no result
    try:
        summary["plots"] = write_plots(cell_dir, summary)
    except Exception as exc:  # the numbers stand without pictures; say why they are missing
        summary["warnings"].append(f"plots not drawn: {type(exc).__name__}: {exc}")
    _write_summary(cell_dir, summary)
    (cell_dir / REPORT_FILE).write_text(render_report(summary))
    if label is not None:
        out.print(Text(f"cell {label}", style="bold"))
    _print_table(out, summary)
    _print_verdicts(out, summary)
    for warning in summary["warnings"]:
        out.print(f"warning: {warning}", style="yellow", markup=False)
    return summary


def display_path(path: Path) -> str:
    """A recipe path for reports: a bundled recipe by name, a path under the working directory
    relative to it, anything else as it is (never this machine's absolute path to a file
    the user named relatively)."""
    resolved = path.resolve()
    if resolved.parent == recipes_dir().resolve():
        return resolved.stem
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _load_plan(compare_dir: Path, given: Recipe | None) -> tuple[Plan, Recipe]:
    plan_path, recipe_path = compare_dir / PLAN_FILE, compare_dir / RECIPE_FILE
    if not plan_path.is_file() or not recipe_path.is_file():
        raise UsageError(
            f"--resume {compare_dir}: no {PLAN_FILE} / {RECIPE_FILE} there; "
            "is it a gcond compare directory?"
        )
    data = json.loads(plan_path.read_text())
    plan = Plan(**{k: data[k] for k in ("source", "overrides", "methods", "variants", "seeds")})
    plan.baseline = data.get("baseline", DEFAULT_BASELINE)  # plans written before --baseline
    plan.grid = data.get("grid", {})
    try:
        base = load_recipe(recipe_path)
    except RecipeError as exc:
        raise UsageError(f"--resume {compare_dir}: its {RECIPE_FILE} is invalid:\n{exc}") from None
    if given is not None and recipe_to_dict(given) != recipe_to_dict(base):
        raise UsageError(
            f"--resume {compare_dir}: the recipe given differs from the one the comparison "
            f"started with (saved in {recipe_path}); pass no RECIPE to continue with that one"
        )
    return plan, base


def _error(out: Console, message: str) -> None:
    out.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Summary, report and table


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


def _columns(metrics: Mapping[str, str]) -> list[Column]:
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
    """The comparison as plain data: per entry and column, mean ± std over the seeds."""
    entries = plan.entries
    runs = {
        e.name: {
            str(s): json.loads((compare_dir / e.name / f"seed{s}" / SUMMARY_FILE).read_text())
            for s in plan.seeds
        }
        for e in entries
    }
    present = {k.removeprefix("eval/") for r in _all(runs) for k in r.get("eval_final", {})}
    base = next(iter(recipes.values()))
    metrics = {m: metric_better(m, base) for m in _shown_metrics(base, present)}
    columns = _columns(metrics)
    results: dict[str, dict[str, Any]] = {}
    for e in entries:
        row = {}
        for col in columns:
            values = [col.value(r) for r in runs[e.name].values()]
            row[col.key] = _mean_std([v for v in values if v is not None])
        results[e.name] = row
    if "sum" in results and results["sum"]["step_seconds"]:
        base = results["sum"]["step_seconds"]["mean"]
        for row in results.values():
            step = row["step_seconds"]
            row["ratio_to_sum"] = {"mean": step["mean"] / base} if step and base > 0 else None
    best = {}
    for col in columns:
        scored = [(r[col.key]["mean"], n) for n, r in results.items() if r.get(col.key)]
        if col.better and len(scored) > 1:
            best[col.key] = (min if col.better == "min" else max)(scored)[1]

    checksums = {
        str(s): {e.name: runs[e.name][str(s)].get("first_batch_sha256") for e in entries}
        for s in plan.seeds
    }
    warnings = []
    reference = entries[0].name
    for seed, per_entry in checksums.items():
        differ = [n for n, c in per_entry.items() if c != per_entry[reference]]
        if differ:
            warnings.append(
                f"seed {seed}: {', '.join(differ)} saw a different first micro-batch than "
                f"{reference} (expected only where a variant changes data.* settings)"
            )
    first = recipes[entries[0].name, plan.seeds[0]]
    baseline = plan.baseline
    final_columns = [c for c in columns if c.key.startswith("final/")]
    verdicts: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.name == baseline:
            continue
        per_metric = {}
        for col in final_columns:
            ours = _per_seed(runs[e.name], col)
            theirs = _per_seed(runs[baseline], col)
            verdict = paired_verdict(ours, theirs, col.better or "max")
            if verdict is not None:
                per_metric[col.key.removeprefix("final/")] = verdict.to_dict()
        verdicts[e.name] = per_metric
    primary = first.checkpoint.best_metric.removeprefix("eval/")
    primary = primary if primary in metrics else (metrics[0] if metrics else None)
    sentences = []
    for name, per_metric in verdicts.items():
        if primary in per_metric:
            share = results[name]["conflict_share"]
            sentences.append(
                sentence(
                    name,
                    baseline,
                    primary.upper() if len(primary) <= 4 else primary,
                    Verdict(**per_metric[primary]),
                    _difference_format(primary),
                    share["mean"] if share else None,
                )
            )
    return {
        "recipe": first.name,
        "source": plan.source,
        "compare_dir": str(compare_dir),
        "baseline": baseline,
        "primary_metric": primary,
        "verdicts": verdicts,
        "sentences": sentences,
        "better": dict(metrics),
        "written": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": runs[reference][str(plan.seeds[0])].get("device"),
        "torch": torch.__version__,
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
            {"key": c.key, "title": c.title, "better": c.better, "best": best.get(c.key)}
            for c in columns
        ],
        "results": results,
        "data_check": {"identical": not warnings, "first_batch_sha256": checksums},
        "warnings": warnings,
        "runs": runs,
    }


def _per_seed(per_seed_runs: Mapping[str, dict], col: Column) -> dict[str, float]:
    values = {seed: col.value(run) for seed, run in per_seed_runs.items()}
    return {seed: v for seed, v in values.items() if v is not None}


def _difference_format(metric: str) -> str:
    return "{:+.2f}" if metric == "psnr" else "{:+.4f}"


def _all(runs: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    return [r for per_seed in runs.values() for r in per_seed.values()]


def _cells(summary: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list, list[bool]]]]:
    """Column titles and, per entry, (label, cell texts, which cells are the column's best)."""
    cols = {c.key: c for c in _columns(summary["metrics"])}
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


def _write_summary(compare_dir: Path, summary: Mapping[str, Any]) -> None:
    (compare_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")


_LABEL_STYLE = {"better": "bold green", "worse": "bold red"}


def _verdict_cells(summary: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list]]]:
    """Titles and, per entry but the baseline, (name, [(text, label) per final metric])."""
    metrics = summary["metrics"]
    titles = [f"vs {summary['baseline']}", *(f"final {m}" for m in metrics)]
    rows = []
    for name, per_metric in summary["verdicts"].items():
        cells = []
        for metric in metrics:
            raw = per_metric.get(metric)
            if raw is None:
                cells.append(("–", ""))
                continue
            verdict = Verdict(**raw)
            text = format_difference(verdict, _difference_format(metric))
            cells.append((f"{text} {verdict.label}", verdict.label))
        rows.append((name, cells))
    return titles, rows


def _print_verdicts(out: Console, summary: Mapping[str, Any]) -> None:
    titles, rows = _verdict_cells(summary)
    if not rows:
        return
    table = Table(
        title=f"Differences to {summary['baseline']}, paired by seed (mean, 95 % interval)",
        caption="better / worse: the interval excludes 0; within noise: it contains 0",
    )
    for title in titles:
        table.add_column(title, justify="left" if title == titles[0] else "right")
    for name, cells in rows:
        table.add_row(name, *(Text(t, style=_LABEL_STYLE.get(label, "")) for t, label in cells))
    out.print(table)
    for line in summary["sentences"]:
        out.print(line, markup=False, highlight=False)


def _print_table(out: Console, summary: Mapping[str, Any]) -> None:
    titles, rows = _cells(summary)
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


def _markdown_table(titles: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(titles) + " |",
        "|" + "---|" * len(titles),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _table_lines(summary: Mapping[str, Any]) -> list[str]:
    """The results table in Markdown, each column's best in bold."""
    titles, rows = _cells(summary)
    return _markdown_table(
        titles,
        (
            [label, *(f"**{t}**" if m else t for t, m in zip(texts, marks, strict=True))]
            for label, texts, marks in rows
        ),
    )


def _verdict_lines(summary: Mapping[str, Any]) -> list[str]:
    """The verdict table in Markdown (empty when only the baseline ran)."""
    titles, rows = _verdict_cells(summary)
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
    """``report.md``: the table, what each entry changes, and whether the data matched."""
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
    verdicts = _verdict_lines(summary)
    if verdicts:
        lines += [
            "",
            f"## Does it beat `{summary['baseline']}`?",
            "",
            *(f"* {line}" for line in summary["sentences"]),
            "",
            *verdicts,
            "",
            f"Each cell: the mean over seeds of (entry − `{summary['baseline']}`) on the final "
            "evaluation, paired by seed (both saw the same data and started from the same "
            "weights), with its 95 % confidence interval (Student's t). Better / worse: the "
            "interval excludes 0; within noise: it contains 0, so these seeds show no "
            "difference; with one seed there is no interval. The norm ratio is the largest "
            "over the smallest raw per-loss gradient norm of a step: far above 1, the losses "
            "differ in scale; the lowest cosine says whether they differ in direction.",
        ]
    plots = summary.get("plots") or {}
    if plots:
        lines += ["", "## Pictures", ""]
        for title, file_name in plots.items():
            lines += [f"### {title}", "", f"![{title}]({file_name})", ""]
    check = summary["data_check"]
    lines += ["", "## Same data", ""]
    if check["identical"]:
        lines.append(
            "Every entry of a seed saw the same first micro-batch (SHA-256 of images, masks "
            "and targets): "
            + ", ".join(
                f"seed {s} `{next(iter(per.values()))[:12]}`"
                for s, per in check["first_batch_sha256"].items()
            )
            + "."
        )
    else:
        lines += [f"* {w}" for w in summary["warnings"]]
    lines += [
        "",
        "Curves: `tensorboard --logdir .` in this directory (Custom Scalars tab).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A grid of comparisons

_MARK = {"better": "▲ better", "worse": "▼ worse", "within noise": "≈", "too few seeds": "?"}


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


def _grid_rows(grid: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Overview titles and rows: per cell, the losses' relation and each entry's result."""
    primary, entries = grid["primary_metric"], grid["entries"]
    fmt = _difference_format(primary).replace("+", "")
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
    titles, rows = _grid_rows(grid)
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


def _print_grid(out: Console, grid: Mapping[str, Any]) -> None:
    titles, rows = _grid_rows(grid)
    table = Table(
        title=f"gcond compare grid: final {grid['primary_metric']} "
        f"(mark: verdict against {grid['baseline']})"
    )
    for title in titles:
        table.add_column(title.strip("`"), justify="left" if title == "cell" else "right")
    for row in rows:
        table.add_row(*(cell.strip("`") for cell in row))
    out.print(table)
