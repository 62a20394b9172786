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
import json
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from ..data import ImageSet, build_datasets
from ..errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ComponentError,
    GcondError,
    RecipeError,
    UsageError,
)
from ..plugins import (
    PluginRoots,
    require_roots,
    resolve_references,
    save_plugin_roots,
    saved_plugin_roots,
)
from ..recipe import ImageDataConfig, LabDataConfig, Recipe, dump_recipe_yaml
from ..run.checkpoint import latest_checkpoint
from ..run.files import MIN_COSINE, RECIPE_FILE, SUMMARY_FILE
from ..run.open import open_run, run_to_end, saved_recipe
from .console import print_delta, print_error, print_grid, print_table, print_verdicts
from .plan import (
    PLAN_FILE,
    Plan,
    cell_recipes,
    check_resume_request,
    display_path,
    load_plan,
    make_plan,
)
from .plots import write_plots
from .report import render_grid_report, render_report
from .results import TASK_ERROR, run_results, summarize, summarize_grid

REPORT_FILE = "report.md"
USER_FILES = ("imagefolder", "cifar10", "stl10")  # data sets read from the user's files


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
    130 stopped; the last two can be continued with ``--resume``). ``baseline``: one or more
    entries, comma-separated, every other entry is judged against."""
    isatty = getattr(sys.stdout, "isatty", None)
    # Not a terminal: wide enough that the table's rows are not wrapped in a log file.
    out = Console(highlight=False, width=None if isatty and isatty() else 200)
    if resume is not None:
        compare_dir = Path(resume)
        plan, base = load_plan(compare_dir, recipe)
        check_resume_request(plan, methods, seeds, variants, baseline, grid)
    else:
        if recipe is None or source is None:
            raise UsageError("give a RECIPE to compare, or --resume COMPARE_DIR")
        plan = make_plan(
            recipe, display_path(source), overrides, methods, seeds, variants, baseline, grid
        )
        base = recipe
        compare_dir = _new_compare_dir(base, name)
    cells = cell_recipes(base, plan)
    every_run = [r for recipes in cells.values() for r in recipes.values()]
    plugins = plugins or PluginRoots.from_options()
    if resume is not None:
        require_roots(base, plugins, saved_plugin_roots(compare_dir), compare_dir)
    targets = _user_code(every_run, plugins)  # refused or broken code: before anything is made
    datasets = _user_datasets(every_run, out)  # bad data is refused before anything is made
    if resume is None:
        _make_compare_dir(compare_dir, base, plan, plugins)
    code = _run_all(compare_dir, plan, cells, out, quiet, datasets, targets)
    if code != EXIT_OK:
        return code
    summaries = {}
    for label, recipes in cells.items():
        cell_dir = compare_dir if label is None else compare_dir / label
        summaries[label] = _finish_cell(cell_dir, plan, recipes, out, label)
    if plan.grid:
        grid_summary = summarize_grid(compare_dir, plan, summaries)
        _write_summary(compare_dir, grid_summary)
        (compare_dir / REPORT_FILE).write_text(render_grid_report(grid_summary))
        print_grid(out, grid_summary)
    out.print(
        f"written: {compare_dir / SUMMARY_FILE}, {compare_dir / REPORT_FILE}; "
        f"curves: tensorboard --logdir {compare_dir}",
        markup=False,
    )
    return EXIT_OK


def _new_compare_dir(base: Recipe, name: str | None) -> Path:
    stamp = name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    compare_dir = Path(base.log.runs_dir) / str(base.name) / f"compare-{stamp}"
    if compare_dir.exists():
        raise UsageError(
            f"{compare_dir} already exists: choose another --name, or continue it with "
            f"--resume {compare_dir}"
        )
    return compare_dir


def _make_compare_dir(compare_dir: Path, base: Recipe, plan: Plan, plugins: PluginRoots) -> None:
    """The compare directory with its recipe, plan, plugin roots and TensorBoard layouts."""
    compare_dir.mkdir(parents=True)
    save_plugin_roots(compare_dir, plugins)
    (compare_dir / RECIPE_FILE).write_text(dump_recipe_yaml(base))
    (compare_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    for label, _ in plan.cells:
        cell_dir = compare_dir if label is None else compare_dir / label
        cell_dir.mkdir(exist_ok=True)
        _write_layout(cell_dir, base)


def _run_all(
    compare_dir: Path,
    plan: Plan,
    cells: Mapping[str | None, Mapping[tuple[str, int], Recipe]],
    out: Console,
    quiet: bool,
    datasets: Mapping[str, tuple[ImageSet, ImageSet]],
    targets: Mapping[int, dict[str, Any]],
) -> int:
    """Every run not finished yet, one after the other; the exit code of the first that did
    not finish, or 0."""
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
                print_error(out, f"{head} did not finish (exit code {code}); {hint}")
                return code
    except KeyboardInterrupt:
        print_error(out, f"stopped; {hint}")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _train_run(
    recipe: Recipe,
    run_dir: Path,
    *,
    console: bool,
    out: Console,
    datasets: tuple[ImageSet, ImageSet] | None = None,
    targets: Mapping[str, Any] | None = None,
) -> int:
    """Train (or continue) one run of the comparison; returns its exit code."""
    try:
        resume = latest_checkpoint(run_dir) is not None
        if resume:
            recipe = saved_recipe(run_dir, recipe)
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # it stopped before its first checkpoint: start it over
        trainer = open_run(
            recipe,
            run_dir,
            resume,
            console=console,
            datasets=datasets,
            targets=targets,
            record_first_batch=True,
        )
    except (GcondError, ValueError) as exc:
        print_error(out, f"{run_dir}: {exc}")
        return EXIT_USAGE
    except ComponentError as exc:  # the user's code broke its contract while building
        print_error(out, f"{run_dir}: building the run failed: {exc}")
        return EXIT_FAILED
    return run_to_end(trainer, results=lambda: run_results(run_dir, recipe))


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


def _write_layout(compare_dir: Path, base: Recipe) -> None:
    """Custom-scalars layout at the compare directory's root: one chart per metric, in which
    the regex matches that tag in every run below, so every method's curve lands in it."""
    from torch.utils.tensorboard import SummaryWriter

    def charts(tags: list[str]) -> dict[str, list]:
        return {tag: ["Multiline", [f"^{re.escape(tag)}$"]] for tag in tags}

    names = list(base.losses)
    pairs = [f"cos/{a}_vs_{b}" for i, a in enumerate(names) for b in names[i + 1 :]]
    metrics = base.metrics()
    evals = [m for m in metrics if m != "eval/mse" or base.user_metrics] if metrics else []
    if isinstance(base.data, LabDataConfig):
        evals = ["eval/mean_err", *(f"eval/{TASK_ERROR}{n}" for n in names)]
    layout = {
        "compare: eval": charts(evals),
        "compare: losses": charts(["loss/total", *[f"loss/{n}" for n in names]]),
        "compare: gradients": charts([MIN_COSINE, *pairs, "final_grad_norm"]),
        "compare: speed": charts(["train/samples_per_s", "train/lr"]),
    }
    with SummaryWriter(log_dir=str(compare_dir)) as writer:
        writer.add_custom_scalars(layout)


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
    # A grid cell's summary says which values made it: the comparison's overrides, then the cell's.
    summary["overrides"] = [*plan.overrides, *dict(plan.cells).get(label, ())]
    _write_summary(cell_dir, summary)  # before the plots: a failing plot loses no result
    try:
        summary["plots"] = write_plots(cell_dir, summary)
    except Exception as exc:  # the numbers stand without pictures; say why they are missing
        summary["warnings"].append(f"plots not drawn: {type(exc).__name__}: {exc}")
    _write_summary(cell_dir, summary)
    (cell_dir / REPORT_FILE).write_text(render_report(summary))
    if label is not None:
        out.print(Text(f"cell {label}", style="bold"))
    print_table(out, summary)
    print_delta(out, summary)
    print_verdicts(out, summary)
    for warning in summary["warnings"]:
        out.print(f"warning: {warning}", style="yellow", markup=False)
    return summary


def _write_summary(compare_dir: Path, summary: Mapping[str, Any]) -> None:
    (compare_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
