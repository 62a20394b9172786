"""Opening a run directory, new or to continue, and training the run in it to its end: the
one path ``gcond train`` and ``gcond compare`` share.

A new run gets its directory with the recipe it trains (``recipe.yaml``) and the plugin roots
it trusts; a resumed run continues with that saved recipe from its latest checkpoint, exactly
(model, optimizer, method, schedule, random streams, data order).
"""

from __future__ import annotations

import datetime as _dt
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import ImageSet
from ..errors import (
    EXIT_FAILED,
    EXIT_OK,
    CheckpointError,
    RecipeError,
    TrainingStopped,
    UsageError,
)
from ..plugins import PluginRoots, save_plugin_roots
from ..recipe import Recipe, dump_recipe_yaml, load_recipe
from . import distributed
from .checkpoint import checkpoint_paths, load_checkpoint
from .files import ERROR_LOG, FIRST_BATCH_FILE, RECIPE_FILE
from .loop import Trainer
from .parts import FirstBatchRecorder


def new_run_dir(recipe: Recipe, run_name: str | None) -> Path:
    """``<runs_dir>/<recipe>/<run name or a time stamp>``, which must not exist yet."""
    name = run_name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(recipe.log.runs_dir) / str(recipe.name) / name
    if run_dir.exists():
        raise UsageError(
            f"run directory {run_dir} already exists: choose another --run-name, "
            f"or continue it with --resume {run_dir}"
        )
    return run_dir


def saved_recipe(run_dir: Path, given: Recipe) -> Recipe:
    """The recipe a run directory trains (``--resume`` continues with it, not ``given``)."""
    saved_path = run_dir / RECIPE_FILE
    if not saved_path.is_file():
        raise UsageError(
            f"--resume {run_dir}: no {RECIPE_FILE} there; is it a gcond run directory?"
        )
    try:
        saved = load_recipe(saved_path)
    except RecipeError as exc:
        raise UsageError(f"--resume {run_dir}: its {RECIPE_FILE} is invalid:\n{exc}") from None
    saved.name = given.name if saved.name is None else saved.name
    return saved


def resume_checkpoint(run_dir: Path, recipe: Recipe) -> Path:
    """The checkpoint ``--resume`` continues from; a run stopped before its first one has none."""
    path = checkpoint_paths(run_dir).latest
    if not path.is_file():
        raise UsageError(
            f"--resume {run_dir}: no checkpoint to resume from ({path} does not exist: the run "
            f"stopped before its first checkpoint, so no work was saved). Start it again: "
            f"gcond train {recipe.name} --run-name NEW_NAME (or delete {run_dir} and reuse its "
            "name)"
        )
    return path


def open_run(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    *,
    console: bool = True,
    datasets: tuple[ImageSet, ImageSet] | None = None,
    targets: Mapping[str, Callable[..., Any]] | None = None,
    plugins: PluginRoots | None = None,
    record_first_batch: bool = False,
) -> Trainer:
    """The run in ``run_dir``, ready to train. ``resume``: continue from its latest checkpoint
    (``recipe`` is then the one saved there, `saved_recipe`); a checkpoint that does not fit is
    refused with nothing changed. Otherwise the directory is made with the recipe and the
    ``plugins`` roots in it (on rank 0), after the run was built. ``record_first_batch``: a new
    run writes its first micro-batch's checksum (``first_batch.json``)."""
    payload = load_checkpoint(resume_checkpoint(run_dir, recipe)) if resume else None
    trainer = Trainer(recipe, run_dir, console=console, datasets=datasets, targets=targets)
    if payload is not None:
        _restore(trainer, payload, checkpoint_paths(run_dir).latest)
        return trainer
    if trainer.dist.rank == 0:
        run_dir.mkdir(parents=True)
        (run_dir / RECIPE_FILE).write_text(dump_recipe_yaml(recipe))
        if plugins is not None:
            save_plugin_roots(run_dir, plugins)
    if record_first_batch:
        trainer.provider = FirstBatchRecorder(trainer.provider, run_dir / FIRST_BATCH_FILE)
    return trainer


def _restore(trainer: Trainer, payload: dict[str, Any], path: Path) -> None:
    """``trainer.restore``, with a checkpoint that does not fit the run as a CheckpointError."""
    try:
        trainer.restore(payload, path)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, KeyError):
            detail = f"it has no {exc}"
        else:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = " ".join(lines[:2]) or type(exc).__name__
            detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise CheckpointError(
            f"checkpoint {path} does not fit this run ({detail}); it was written for another "
            "recipe or is damaged. Nothing was changed."
        ) from None


def run_to_end(
    trainer: Trainer,
    *,
    intro: Sequence[str] = (),
    warnings: Sequence[str] = (),
    results: Callable[[], dict[str, Any]] | None = None,
) -> int:
    """Train to the last step, with the one error path every command shares: a stop or a failure
    is reported through the run's logger (the traceback kept in the run directory) and the
    logger closed with the summary (plus ``results()``) when the run finished. Returns the exit
    code (0 done, 1 failed, 130 stopped)."""
    logger, run_dir, ctx = trainer.logger, trainer.run_dir, trainer.dist
    code, summary = EXIT_FAILED, None
    try:
        logger.start(trainer.step)
        for line in intro:
            logger.info(line)
        for line in warnings:
            logger.warn(line)
        code = trainer.run()
        if code == EXIT_OK:
            summary = {**trainer.summary(), **(results() if results else {})}
            logger.info(f"done: {trainer.step} steps in {trainer.elapsed:.1f} s; {run_dir}")
    except (TrainingStopped, CheckpointError) as exc:
        logger.error(str(exc))
    except Exception as exc:  # a training failure: say where, keep the traceback in the run dir
        where = (
            f"the evaluation after step {trainer.step}"
            if trainer.evaluating
            else f"step {trainer.step + 1}"
        )
        message = f"training failed at {where}: {type(exc).__name__}: {exc}"
        logger.error(message)
        distributed.report_error(ctx, message)
        if ctx.rank == 0 and run_dir.exists():
            (run_dir / ERROR_LOG).write_text(traceback.format_exc())
            logger.error(f"traceback written to {run_dir / ERROR_LOG}")
    finally:
        logger.close(summary)
        if code == EXIT_FAILED:
            distributed.abort(ctx, EXIT_FAILED)  # other ranks may be waiting for this one
    return code
