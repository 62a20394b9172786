"""``gcond train``: one recipe, one method, one run directory (new, or continued with
``--resume``), trained to its last step (``run/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import EXIT_FAILED, ComponentError, GcondError, UsageError
from .plugins import PluginRoots, require_roots, resolve_references, saved_plugin_roots
from .recipe import Recipe, dump_recipe_yaml, recipe_to_dict
from .run import distributed
from .run.build import resolve_device
from .run.files import RECIPE_FILE
from .run.open import new_run_dir, open_run, resume_checkpoint, run_to_end, saved_recipe


def run_train(
    recipe: Recipe,
    *,
    recipe_path: Path,
    run_name: str | None,
    resume: Path | None,
    plugins: PluginRoots | None = None,
) -> int:
    """``gcond train``: returns the exit code (0 done, 1 failed, 130 stopped); a bad recipe, data
    set, checkpoint or request raises a `GcondError` (exit code 2) before anything is written."""
    ctx = distributed.context()
    plugins = plugins or PluginRoots.from_options()
    try:
        ignored: list[str] = []
        if resume is not None:
            run_dir = Path(resume)
            given, recipe = recipe, saved_recipe(run_dir, recipe)
            ignored = [
                k
                for k in _differences(recipe_to_dict(given), recipe_to_dict(recipe))
                if k != "name"
            ]
            resume_checkpoint(run_dir, recipe)
            require_roots(recipe, plugins, saved_plugin_roots(run_dir), run_dir)
        targets = resolve_references(recipe, plugins)  # the user's code, from trusted roots
        # The recipe's device (of the resumed recipe, if any) picks the backend: NCCL or gloo.
        distributed.init(ctx, resolve_device(recipe.device).type, recipe.distributed.strategy)
        if resume is None:
            run_dir = distributed.from_rank0(lambda: new_run_dir(recipe, run_name), ctx)
        trainer = open_run(recipe, run_dir, resume is not None, targets=targets, plugins=plugins)
    except GcondError:  # bad recipe, data, checkpoint or request: the command line reports it
        distributed.shutdown(ctx)
        raise
    except ComponentError as exc:  # the user's code broke its contract while the run was built
        distributed.shutdown(ctx)
        Console(stderr=True, highlight=False).print(
            f"error: building the run failed: {exc}", style="bold red", soft_wrap=True
        )
        return EXIT_FAILED
    except ValueError as exc:  # settings the builders refuse (e.g. a method that cannot run)
        distributed.shutdown(ctx)
        raise UsageError(str(exc)) from None
    intro = [f"recipe {recipe_path}:\n{dump_recipe_yaml(recipe)}"]
    if resume is not None:
        intro.append(f"resuming {run_dir} at step {trainer.step}")
    else:
        intro.append(f"run directory: {run_dir}")
    warnings = []
    if ignored:
        warnings.append(
            f"--resume continues with the run's saved {RECIPE_FILE}; these settings of the "
            f"command line differ and are ignored: {', '.join(ignored)}"
        )
    try:
        code = run_to_end(trainer, intro=intro, warnings=warnings)
    finally:
        distributed.shutdown(ctx)
    return code


def _differences(given: Any, saved: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain recipe dicts."""
    if isinstance(given, dict) and isinstance(saved, dict):
        keys = sorted(set(given) | set(saved))
        return [d for k in keys for d in _differences(given.get(k), saved.get(k), f"{prefix}{k}.")]
    return [] if given == saved else [prefix.rstrip(".")]
