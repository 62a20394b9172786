"""The training loop of ``gcond train``: one recipe, one method, one run directory.

``Trainer`` builds everything a recipe names (data on the device, model, losses, method,
optimizer, schedule, logger) and runs the loop. The loop does not know which method it runs and
has no ``print``: everything reaches the user through the ``RunLogger``. One path serves fp32,
bf16 and fp16: autocast is off unless a low precision is asked for, and the GradScaler is
disabled unless fp16.
"""

from __future__ import annotations

import datetime as _dt
import math
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from gcond import autocast

from . import distributed
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_paths,
    join_shards,
    load_checkpoint,
    load_sharded,
    restore_rng_state,
    save_checkpoint,
    save_sharded,
    split_shards,
)
from .data import ImageSet
from .errors import GcondError, UsageError
from .logger import RunLogger
from .methods import build_method, effective_loss_scale, per_loss_backward_mode
from .plugins import (
    ComponentError,
    PluginRoots,
    require_roots,
    resolve_references,
    save_plugin_roots,
    saved_plugin_roots,
)
from .recipe import Recipe, RecipeError, dump_recipe_yaml, load_recipe, recipe_to_dict
from .run import build_parts
from .tasks import batch_size

RECIPE_FILE = "recipe.yaml"
BAD_IMAGES_FILE = "bad_images.txt"  # the images data.skip_bad_images left out
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class TrainingStopped(Exception):
    """The run stopped on purpose (too many skipped steps); a checkpoint was written."""


class DataProviderError(Exception):
    """The data provider raised; the message names it (the loop adds the step)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device: {name!r} asked for, but CUDA is not available here")
    return device


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[
        name
    ]


def warmup_cosine(max_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return factor


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def new_run_dir(recipe: Recipe, run_name: str | None) -> Path:
    name = run_name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(recipe.log.runs_dir) / str(recipe.name) / name
    if run_dir.exists():
        raise UsageError(
            f"run directory {run_dir} already exists: choose another --run-name, "
            f"or continue it with --resume {run_dir}"
        )
    return run_dir


class Trainer:
    """Everything one run needs, built from a recipe; ``run()`` trains to ``max_steps``."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        console: bool = True,
        datasets: tuple[ImageSet, ImageSet] | None = None,
        targets: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        """``datasets``: the train and validation sets, when the caller has loaded them;
        ``targets``: the user's components by recipe key (``plugins.resolve_references``)."""
        self.recipe = recipe
        self.run_dir = run_dir
        self.dist = distributed.context()
        sync = recipe.conductor.ddp_sync
        if self.dist.active and sync == "none" and recipe.conductor.method != "sum":
            raise UsageError(
                "conductor.ddp_sync: 'none' leaves synchronising the processes to the training "
                "loop, and gcond train does not do it; use 'grads' (the default) or 'update' "
                f"when training with {self.dist.world_size} processes"
            )
        self.device = resolve_device(recipe.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        autocast_dtype, needs_scaler = resolve_precision(recipe.precision, self.device)
        self.autocast_dtype = autocast_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_scaler)
        torch.manual_seed(recipe.seed)

        is_main = self.dist.rank == 0
        self.parts = build_parts(
            recipe,
            self.device,
            targets=targets,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            datasets=datasets,
            console=Console(stderr=True) if console and is_main else None,
        )
        self.model, self.provider = self.parts.model, self.parts.provider
        self.skipped_images = self.parts.skipped_images
        self.wrapped = distributed.wrap(self.model, self.dist, recipe.distributed.strategy)
        self.sharded = distributed.sharded(recipe.distributed.strategy)
        lambdas = {n: c.weight for n, c in recipe.losses.items()}
        self.method = build_method(
            recipe.conductor,
            self.wrapped,
            self.parts.loss_fns,
            lambdas,
            autocast_dtype=autocast_dtype,
            scaler=self.scaler if needs_scaler else None,
            loss_scale=recipe.loss_scale,
        )
        self.optimizer = build_optimizer(recipe.optimizer, self.model)
        s = recipe.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(s.max_steps, s.warmup_steps, s.min_lr_ratio)
        )
        self.step = 0
        self.consecutive_skipped = 0
        self.best: float | None = None
        self.elapsed = 0.0  # training seconds across resumes
        self.step_samples = 0  # samples in this step's micro-batches, on this rank
        self.evaluating = False  # a failure in the evaluation is reported as such
        self.logger = RunLogger(
            run_dir if is_main else None,
            recipe_to_dict(recipe),
            s.max_steps,
            console=console and is_main,
            tensorboard=recipe.log.tensorboard,
        )
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        """What rank 0 saves; a sharded run's model, optimizer and method DTensors are in
        :meth:`sharded_state` instead."""
        if self.sharded:
            method, _ = split_shards(self.method.state_dict())
            parts: dict[str, Any] = {"sharded": True, "method": method}
        else:
            parts = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(),
            }
        return {
            "step": self.step,
            **parts,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "data": self.parts.data_state(),
            "consecutive_skipped": self.consecutive_skipped,
            "best": self.best,
            "elapsed": self.elapsed,
        }

    def sharded_state(self) -> dict[str, Any]:
        """A sharded run's model, optimizer and method DTensors, keyed by name (every rank)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        _, method = split_shards(self.method.state_dict())
        return {"model": model, "optimizer": optimizer, "method": method}

    def save(self, *, best: bool = False) -> None:
        """Rank 0 writes (every rank its shards first, in a sharded run); the others wait so
        that no rank runs ahead of a checkpoint."""
        paths = checkpoint_paths(self.run_dir)
        if self.dist.rank == 0:
            paths.latest.parent.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.dist)
        # best.pt first: a run killed between the two writes resumes from the previous
        # latest.pt, re-runs this eval and rewrites best.pt. The other order would leave a
        # latest.pt that records this best and a best.pt that never receives it.
        for path in [paths.best, paths.latest] if best else [paths.latest]:
            if self.sharded:
                save_sharded(path, self.sharded_state())
            if self.dist.rank == 0:
                save_checkpoint(path, self.checkpoint_payload())
        distributed.barrier(self.dist)

    def restore(self, payload: dict[str, Any], path: Path | None = None) -> None:
        """Continue from ``payload``; a sharded one loads its shards from next to ``path``."""
        if bool(payload.get("sharded")) != self.sharded or (self.sharded and path is None):
            raise ValueError(
                "sharded (distributed.strategy: fsdp) and unsharded runs do not share "
                "checkpoints; an fsdp run resumes under torchrun (any --nproc-per-node)"
            )
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = self.sharded_state()
            load_sharded(path, state)  # type: ignore[arg-type]
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
            )
            self.method.load_state_dict(join_shards(payload["method"], state["method"]))
        else:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.method.load_state_dict(payload["method"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
        if not self.parts.load_data_state(payload["data"]):
            self.logger.warn(
                "resume: the data source has no state_dict(), so its data order restarts "
                "from the beginning (add state_dict / load_state_dict to it for an exact resume)"
            )
        self.step = int(payload["step"])
        self.consecutive_skipped = int(payload["consecutive_skipped"])
        self.best = payload["best"]
        self.elapsed = float(payload["elapsed"])

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The task's metrics over the validation batches, and its image grids if any."""
        self.model.eval()
        self.evaluating = True
        try:
            metrics, images = self.parts.task.evaluate(
                self.model,
                self.parts.data.val(),
                partial(autocast, self.device, self.autocast_dtype),
            )
            metrics = {f"eval/{k}": v for k, v in metrics.items()}
            self._check_best_metric(metrics)
        finally:
            self.model.train()
        self.evaluating = False
        return metrics, images

    def _check_best_metric(self, metrics: dict[str, float]) -> None:
        """``checkpoint.best_metric`` must be one the evaluation reports (the user's own
        evaluation is only known once it has run)."""
        cfg = self.recipe.checkpoint
        if cfg.keep_best and cfg.best_metric not in metrics:
            raise ComponentError(
                f"checkpoint.best_metric is {cfg.best_metric}, but the evaluation reports "
                f"{', '.join(metrics) or 'nothing'}; set checkpoint.best_metric to one of them "
                "(and best_mode), or checkpoint.keep_best: false"
            )

    def _improved(self, metrics: dict[str, float]) -> bool:
        cfg = self.recipe.checkpoint
        value = metrics.get(cfg.best_metric)
        if not cfg.keep_best or value is None or not math.isfinite(value):
            return False
        better = self.best is None or (
            value > self.best if cfg.best_mode == "max" else value < self.best
        )
        if better:
            self.best = value
        return better

    # ------------------------------------------------------------------ the loop

    def _next_batch(self) -> Any:
        """One micro-batch; a failure names the provider (a bare I/O error would not)."""
        try:
            batch = self.provider()
        except ComponentError:
            raise
        except Exception as exc:
            raise DataProviderError(
                f"the data provider {type(self.provider).__name__} "
                f"(data: {_component_name(self.recipe.data)}) raised {type(exc).__name__}: {exc}"
            ) from exc
        self.step_samples += batch_size(batch[0])  # reads a shape: no sync
        return batch

    def train_step(self) -> dict[str, float]:
        self.step_samples = 0
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.method.step(self._next_batch)
        if self.recipe.clip_grad_norm is not None and not stats["skipped"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad_norm)
        self.scaler.step(self.optimizer)  # a plain optimizer.step() unless fp16
        self.scaler.update()
        self.scheduler.step()
        return stats

    def run(self) -> int:
        r = self.recipe
        self.logger.start(self.step)
        if self.skipped_images:
            self._report_skipped_images()
        first_step = self.step + 1  # of this process (after a resume too)
        with _stop_on_signals(self):
            while self.step < r.schedule.max_steps:
                lr = self.optimizer.param_groups[0]["lr"]
                started = time.perf_counter()
                stats = self.train_step()
                seconds = time.perf_counter() - started
                self.elapsed += seconds
                self.step += 1
                if self.step == first_step:
                    self._log_backward_mode()
                if self.step % r.log.every == 0 or self.step == r.schedule.max_steps:
                    samples = self.step_samples * self.dist.world_size
                    self.logger.log_step(self.step, stats, lr, samples / seconds, seconds)
                # After logging: a step that stops the run is in its checkpoint, so in the metrics.
                self._count_skips(stats)
                last = self.step == r.schedule.max_steps
                best = False
                if self.step % r.eval.every == 0 or last:
                    metrics, images = self.evaluate()
                    # Rank 0's call (it writes best.pt): every rank must take the same branch.
                    best = distributed.from_rank0(partial(self._improved, metrics), self.dist)
                    self.logger.log_eval(self.step, metrics, images)
                if self.step % r.checkpoint.every == 0 or last or best:
                    self.save(best=best)
                # Decided together: a rank that stopped alone would leave the others waiting.
                if distributed.any_rank(self.stop_signal is not None, self.dist, self.device):
                    self.save()
                    name = (
                        signal.Signals(self.stop_signal).name
                        if self.stop_signal is not None
                        else "a signal to another process"
                    )
                    self.logger.warn(
                        f"stopped by {name} after step {self.step}; checkpoint written. "
                        f"Continue with: gcond train {r.name} --resume {self.run_dir}"
                    )
                    return EXIT_INTERRUPTED
        return EXIT_OK

    def _report_skipped_images(self) -> None:
        """data.skip_bad_images left images out: say how many, list them in the run directory."""
        path = self.run_dir / BAD_IMAGES_FILE
        if self.dist.rank == 0:
            path.write_text("".join(f"{line}\n" for line in self.skipped_images))
        self.logger.warn(
            f"data.skip_bad_images: {len(self.skipped_images)} unreadable images of "
            f"{self.recipe.data.root} left out; the list is in {path}"
        )

    def _log_backward_mode(self) -> None:
        """Once, after the first step: how full mode gets its per-loss gradients."""
        mode = backward_description(self.method)
        if mode is not None:
            self.logger.info(f"per-loss gradients: {mode}")

    def _count_skips(self, stats: dict[str, float]) -> None:
        if not stats["skipped"]:
            self.consecutive_skipped = 0
            return
        self.consecutive_skipped += 1
        culprits = [
            k.split("/", 1)[1] for k, v in stats.items() if k.startswith("nonfinite/") and v
        ]
        self.logger.warn(
            f"step {self.step} skipped: non-finite gradients"
            + (f" from {', '.join(culprits)}" if culprits else "")
            + f" ({self.consecutive_skipped} in a row)"
        )
        if self.consecutive_skipped >= self.recipe.max_skipped_steps:
            self.save()
            raise TrainingStopped(
                f"{self.consecutive_skipped} consecutive steps had non-finite gradients "
                f"(max_skipped_steps = {self.recipe.max_skipped_steps}); stopped at step "
                f"{self.step} with a checkpoint. Look at which loss went non-finite, then start "
                "a new run with a lower optimizer.lr, clip_grad_norm or precision: fp32 "
                "(--resume continues with the saved recipe and would fail the same way)."
            )

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "method": self.recipe.conductor.method,
            "loss_scale": effective_loss_scale(
                self.recipe.conductor.method, self.recipe.loss_scale
            ),
            "steps": self.step,
            "train_seconds": self.elapsed,
            "seconds_per_step": self.elapsed / max(self.step, 1),
            "best": {self.recipe.checkpoint.best_metric: self.best},
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "per_loss_backward": backward_description(self.method),
        }


def _component_name(section: Any) -> str:
    """How the recipe names a component: its target, or its built-in name."""
    target = getattr(section, "target", None)
    return target if target is not None else str(getattr(section, "dataset", section))


def backward_description(method: Any) -> str | None:
    """How a full-mode conductor gets K gradients from one forward, in words (None otherwise)."""
    mode = per_loss_backward_mode(method)
    if mode is None:
        return None
    text = f"{mode} backward (per_loss_backward: {method.config.per_loss_backward}"
    timings = method.backward_timings
    if timings:
        times = ", ".join(f"{way} {1000 * t:.1f} ms" for way, t in timings.items())
        text += f"; first micro-batch: {times}"
    return text + ")"


@contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second SIGINT aborts)."""

    def ask_to_stop(signum: int, frame: Any) -> None:
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum

    previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _resume_recipe(run_dir: Path, given: Recipe) -> Recipe:
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


def _differences(given: Any, saved: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain recipe dicts."""
    if isinstance(given, dict) and isinstance(saved, dict):
        keys = sorted(set(given) | set(saved))
        return [d for k in keys for d in _differences(given.get(k), saved.get(k), f"{prefix}{k}.")]
    return [] if given == saved else [prefix.rstrip(".")]


def _resume_checkpoint(run_dir: Path, recipe: Recipe) -> Path:
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
            (run_dir / "error.log").write_text(traceback.format_exc())
            logger.error(f"traceback written to {run_dir / 'error.log'}")
    finally:
        logger.close(summary)
        if code == EXIT_FAILED:
            distributed.abort(ctx, EXIT_FAILED)  # other ranks may be waiting for this one
    return code


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
        payload = None
        ignored: list[str] = []
        if resume is not None:
            run_dir = Path(resume)
            given, recipe = recipe, _resume_recipe(run_dir, recipe)
            ignored = [
                k
                for k in _differences(recipe_to_dict(given), recipe_to_dict(recipe))
                if k != "name"
            ]
            payload = load_checkpoint(_resume_checkpoint(run_dir, recipe))
            require_roots(recipe, plugins, saved_plugin_roots(run_dir), run_dir)
        targets = resolve_references(recipe, plugins)  # the user's code, from trusted roots
        # The recipe's device (of the resumed recipe, if any) picks the backend: NCCL or gloo.
        distributed.init(ctx, resolve_device(recipe.device).type, recipe.distributed.strategy)
        if resume is None:
            run_dir = distributed.from_rank0(lambda: new_run_dir(recipe, run_name), ctx)
        trainer = Trainer(recipe, run_dir, targets=targets)
        if payload is not None:
            _restore(trainer, payload, checkpoint_paths(run_dir).latest)
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
    if payload is not None:
        intro.append(f"resuming {run_dir} at step {trainer.step}")
    else:
        if ctx.rank == 0:
            run_dir.mkdir(parents=True)
            (run_dir / RECIPE_FILE).write_text(dump_recipe_yaml(recipe))
            save_plugin_roots(run_dir, plugins)
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
