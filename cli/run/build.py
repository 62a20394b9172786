"""A run, built: the recipe's parts (``parts.py``) on a device, the method over them, the
optimizer, its schedule and the fp16 scaler, and one optimizer step.

``gcond train`` and ``gcond compare`` train a `Run` to its last step (``loop.py``); ``gcond
bench`` times the same `Run.step` one step at a time. One path serves fp32, bf16 and fp16:
autocast is off unless a low precision is asked for, and the GradScaler is disabled unless fp16.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from ..errors import UsageError
from ..methods import Method, build_method
from ..recipe import Recipe
from . import distributed
from .checkpoint import (
    capture_rng_state,
    join_shards,
    load_sharded,
    restore_rng_state,
    split_shards,
)
from .parts import Parts, build_parts


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


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def warmup_cosine(max_steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
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


def _no_mark(name: str) -> None:
    pass


@dataclasses.dataclass
class Run:
    """Everything one optimizer step needs, built from a recipe (`build_run`)."""

    recipe: Recipe
    device: torch.device
    dist: distributed.DistContext
    parts: Parts
    wrapped: nn.Module  # the model as the method sees it (DDP / FSDP under torchrun)
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None

    @property
    def model(self) -> nn.Module:
        return self.parts.model

    @property
    def sharded(self) -> bool:
        return distributed.sharded(self.recipe.distributed.strategy)

    def step(
        self, provider: Callable[[], Any], mark: Callable[[str], None] = _no_mark
    ) -> dict[str, float]:
        """One optimizer step over ``provider``'s micro-batches; returns the method's statistics.
        The schedule is the caller's to advance. ``mark(name)`` is called at "accumulated" (the
        micro-batches' forwards and backwards, and the method's one host sync), "finished" (the
        gradient written to ``p.grad``) and "end" (clipped and applied), for a timer."""
        self.optimizer.zero_grad(set_to_none=True)
        gradients = self.method.accumulate(provider)
        mark("accumulated")
        stats = self.method.finish(gradients)
        mark("finished")
        if self.recipe.clip_grad_norm is not None and not stats["skipped"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad_norm)
        self.scaler.step(self.optimizer)  # a plain optimizer.step() unless fp16
        self.scaler.update()
        mark("end")
        return stats

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 saves of the run's parts; a sharded run's model, optimizer and method
        DTensors are in :meth:`sharded_state` instead."""
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
            **parts,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "data": self.parts.data_state(),
        }

    def sharded_state(self) -> dict[str, Any]:
        """A sharded run's model, optimizer and method DTensors, keyed by name (every rank)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        _, method = split_shards(self.method.state_dict())
        return {"model": model, "optimizer": optimizer, "method": method}

    def load_state_dict(self, payload: Mapping[str, Any], path: Path | None = None) -> bool:
        """Continue from ``payload``; a sharded one loads its shards from next to ``path``.
        Returns False when the data order restarts (a data source without state)."""
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
        return self.parts.load_data_state(payload["data"])


def run_device(recipe: Recipe, dist: distributed.DistContext) -> torch.device:
    """The recipe's device; under torchrun on CUDA, this rank's GPU."""
    device = resolve_device(recipe.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    return device


def build_run(
    recipe: Recipe,
    device: torch.device,
    *,
    dist: distributed.DistContext | None = None,
    targets: Mapping[str, Callable[..., Any]] | None = None,
    datasets: Any = None,
    console: Console | None = None,
    data: Any = None,
) -> Run:
    """The recipe's run on ``device``, its initial weights drawn from ``recipe.seed``.
    ``targets``: the user's callables by key (``plugins.resolve_references``); ``datasets``:
    image sets the caller already loaded; ``data``: a data source already built to share."""
    dist = dist or distributed.context()
    autocast_dtype, needs_scaler = resolve_precision(recipe.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    torch.manual_seed(recipe.seed)
    parts = build_parts(
        recipe,
        device,
        targets=targets,
        rank=dist.rank,
        world_size=dist.world_size,
        datasets=datasets,
        console=console,
        data=data,
    )
    wrapped = distributed.wrap(parts.model, dist, recipe.distributed.strategy)
    method = build_method(
        recipe.conductor,
        wrapped,
        parts.loss_fns,
        {n: c.weight for n, c in recipe.losses.items()},
        autocast_dtype=autocast_dtype,
        scaler=scaler if needs_scaler else None,
        loss_scale=recipe.loss_scale,
    )
    optimizer = build_optimizer(recipe.optimizer, parts.model)
    s = recipe.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(s.max_steps, s.warmup_steps, s.min_lr_ratio)
    )
    return Run(
        recipe, device, dist, parts, wrapped, method, optimizer, scheduler, scaler, autocast_dtype
    )
