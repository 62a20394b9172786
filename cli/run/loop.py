"""The training loop of a run: one recipe, one method, one run directory, trained to
``schedule.max_steps`` with evaluations, checkpoints and a stop on SIGINT / SIGTERM.

`Trainer` builds the `Run` (``build.py``) and runs the loop. The loop does not know which method
it runs and has no ``print``: everything reaches the user through the ``RunLogger``.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gcond import autocast

from ..data import ImageSet
from ..errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    ComponentError,
    DataProviderError,
    TrainingStopped,
    UsageError,
)
from ..methods import describe, effective_loss_scale, follows_ddp_sync
from ..recipe import Recipe, recipe_to_dict
from ..tasks import batch_size
from . import checkpoint, distributed
from .build import build_run, run_device
from .checkpoint import checkpoint_paths
from .files import BAD_IMAGES_FILE, nonfinite_losses
from .logger import RunLogger


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
        if (
            self.dist.active
            and recipe.conductor.ddp_sync == "none"
            and follows_ddp_sync(recipe.conductor.method)
        ):
            raise UsageError(
                "conductor.ddp_sync: 'none' leaves synchronising the processes to the training "
                "loop, and gcond train does not do it; use 'grads' (the default) or 'update' "
                f"when training with {self.dist.world_size} processes"
            )
        self.device = run_device(recipe, self.dist)
        is_main = self.dist.rank == 0
        self.built = build_run(
            recipe,
            self.device,
            dist=self.dist,
            targets=targets,
            datasets=datasets,
            console=Console(stderr=True) if console and is_main else None,
        )
        self.parts = self.built.parts
        self.provider = self.parts.provider
        self.step = 0
        self.consecutive_skipped = 0
        self.best: float | None = None
        self.elapsed = 0.0  # training seconds across resumes
        self.step_samples = 0  # samples in this step's micro-batches, on this rank
        self.evaluating = False  # a failure in the evaluation is reported as such
        self.logger = RunLogger(
            run_dir if is_main else None,
            recipe_to_dict(recipe),
            recipe.schedule.max_steps,
            console=console and is_main,
            tensorboard=recipe.log.tensorboard,
        )
        self.stop_signal: int | None = None

    # The run's parts, by the names the loop and its callers use.
    model = property(lambda self: self.built.model)
    method = property(lambda self: self.built.method)
    optimizer = property(lambda self: self.built.optimizer)
    scheduler = property(lambda self: self.built.scheduler)
    scaler = property(lambda self: self.built.scaler)
    autocast_dtype = property(lambda self: self.built.autocast_dtype)
    skipped_images = property(lambda self: self.parts.skipped_images)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        """What rank 0 saves: the run's parts (`Run.state_dict`) and the loop's counters."""
        return {
            "step": self.step,
            **self.built.state_dict(),
            "consecutive_skipped": self.consecutive_skipped,
            "best": self.best,
            "elapsed": self.elapsed,
        }

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
            if self.built.sharded:
                checkpoint.save_sharded(path, self.built.sharded_state())
            if self.dist.rank == 0:
                checkpoint.save_checkpoint(path, self.checkpoint_payload())
        distributed.barrier(self.dist)

    def restore(self, payload: dict[str, Any], path: Path | None = None) -> None:
        """Continue from ``payload``; a sharded one loads its shards from next to ``path``."""
        if not self.built.load_state_dict(payload, path):
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
        stats = self.built.step(self._next_batch)
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
        mode = describe(self.method)
        if mode is not None:
            self.logger.info(f"per-loss gradients: {mode}")

    def _count_skips(self, stats: dict[str, float]) -> None:
        if not stats["skipped"]:
            self.consecutive_skipped = 0
            return
        self.consecutive_skipped += 1
        culprits = nonfinite_losses(stats)
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
            "per_loss_backward": describe(self.method),
        }


def _component_name(section: Any) -> str:
    """How the recipe names a component: its target, or its built-in name."""
    target = getattr(section, "target", None)
    return target if target is not None else str(getattr(section, "dataset", section))


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
