"""What ``gcond bench`` measures: the named workloads, the recipe of a request (its data made
synthetic), ``--losses K`` and ``--variant`` entries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UsageError
from ..methods import method_unavailable
from ..options import parse_variants
from ..recipe import (
    ImageDataConfig,
    LabDataConfig,
    Recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

DATA_POOL = 2  # distinct micro-batches cycled through (kept small: they count in the memory)


def _workload(name: str, size: int, batch: int, patch: int, model: dict, n: int = 8) -> dict:
    return {
        "name": name,
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "image_size": size,
            "micro_batch_size": batch,
            "mask": {"ratio": 0.75, "patch_size": patch},
        },
        "model": model,
        "losses": {  # as in the bundled MAE recipe and the seed: L1 + SSIM, 0.85 / 0.15
            "l1": {"kind": "l1", "weight": 0.85},
            "ssim": {"kind": "ssim", "weight": 0.15, "win_size": 11 if size >= 11 else 7},
        },
        "conductor": {"accumulation_steps": n},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "schedule": {"max_steps": 1},
    }


VIT_S = {
    "name": "mae_vit",
    "patch_size": 16,
    "dim": 384,
    "depth": 12,
    "heads": 6,
    "decoder_dim": 256,
    "decoder_depth": 4,
    "decoder_heads": 8,
}


TINY_VIT = {
    "name": "mae_vit",
    "patch_size": 4,
    "dim": 32,
    "depth": 1,
    "heads": 2,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


WORKLOADS: dict[str, dict] = {
    "vit_mae_224": _workload("vit_mae_224", 224, 32, 16, VIT_S),
    "conv_mobilenet_128": _workload(
        "conv_mobilenet_128", 128, 64, 16, {"name": "masked_conv", "backbone": "mobilenet_v3_small"}
    ),
    "conv_convnext_128": _workload(
        "conv_convnext_128", 128, 32, 16, {"name": "masked_conv", "backbone": "convnext_tiny"}
    ),
    "tiny": _workload("tiny", 16, 4, 4, TINY_VIT, n=2),
    # K cheap heads on a shared MLP trunk that is most of the compute (the conflict lab's model):
    # for the cost per step against K (``--losses K``) of full mode, stochastic accumulation,
    # conductor.gradients_at=representation and conductor.resolve_every=R.
    "heads": {
        "name": "heads",
        "seed": 0,
        "device": "cpu",
        "data": {
            "dataset": "conflict_lab",
            "micro_batch_size": 256,
            "val_samples": 1,
            "lab": {"direction": -0.5, "input_dim": 256, "output_dim": 16},
        },
        "model": {"name": "lab_mlp", "dim": 1024, "depth": 4},
        "losses": {
            "t1": {"kind": "task_mse", "weight": 0.5},
            "t2": {"kind": "task_mse", "weight": 0.5},
        },
        "conductor": {"accumulation_steps": 4},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"max_steps": 1, "warmup_steps": 0},
        "checkpoint": {"best_metric": "eval/mean_err", "best_mode": "min"},
    },
}


def bench_losses(count: int, image_size: int) -> dict[str, dict]:
    """K losses for ``--losses K``: l1, ssim, mse, then the same restricted to the masked region,
    and so on; equal weights."""
    kinds, losses = ("l1", "ssim", "mse"), {}
    for i in range(count):
        kind, round_ = kinds[i % 3], i // 3
        spec: dict[str, Any] = {"kind": kind, "weight": 1.0 / count, "masked_only": round_ % 2 == 1}
        if kind == "ssim":
            spec["win_size"] = 11 if image_size >= 11 else 7
        losses[kind if round_ == 0 else f"{kind}_{round_ + 1}"] = spec
    return losses


def bench_recipe(
    recipe: str | None,
    overrides: Sequence[str],
    *,
    workload: str | None,
    accumulation_steps: int | None = None,
    losses: int | None = None,
    dim: int | None = None,
    depth: int | None = None,
) -> Recipe:
    """The recipe or workload with the command's settings, its data made synthetic."""
    if recipe is not None and workload is not None:
        raise UsageError("give a RECIPE or --workload, not both")
    if recipe is not None:
        raw = recipe_to_dict(load_recipe(recipe))
    else:
        if workload is None:
            workload = "vit_mae_224" if torch.cuda.is_available() else "tiny"
        if workload not in WORKLOADS:
            raise UsageError(
                f"--workload: unknown workload {workload!r}, expected one of {', '.join(WORKLOADS)}"
            )
        raw = WORKLOADS[workload]
    options = [f"conductor.accumulation_steps={accumulation_steps}"] if accumulation_steps else []
    options += [f"model.dim={dim}"] if dim else []
    options += [f"model.depth={depth}"] if depth else []
    resolved = recipe_from_dict(raw, [*overrides, *options])
    data = resolved.data
    if isinstance(data, LabDataConfig) and losses:  # K tasks of the lab, one head each
        tasks = {f"t{k + 1}": {"kind": "task_mse", "weight": 1.0 / losses} for k in range(losses)}
        return recipe_from_dict(recipe_to_dict(resolved), ["losses=" + json.dumps(tasks)])
    if not isinstance(data, ImageDataConfig):  # the user's data: measured as it is
        if losses:
            raise UsageError("--losses: only for recipes on an image data set or the lab")
        return resolved
    synthetic = [
        "data.dataset=synthetic",
        "data.download=false",
        f"data.train_samples={data.micro_batch_size * DATA_POOL}",
        "data.val_samples=1",
    ]
    if losses:
        synthetic.append("losses=" + json.dumps(bench_losses(losses, data.image_size)))
    return recipe_from_dict(recipe_to_dict(resolved), synthetic)


VARIANT_KEYS = ("conductor.", "optimizer.", "clip_grad_norm", "precision")


def bench_variants(
    recipe: Recipe, variants: Sequence[str], methods: list[str]
) -> dict[str, tuple[Recipe, list[str]]]:
    """``--variant NAME:KEY=VALUE,...``: the recipe with those overrides, measured beside the
    methods (e.g. ``seq:conductor.per_loss_backward=sequential``). Model and data stay the
    workload's, so only the settings of how a step is taken may change."""
    out = {}
    for name, overrides in parse_variants(variants, methods).items():
        for override in overrides:
            if not override.strip().startswith(VARIANT_KEYS):
                raise UsageError(
                    f"--variant {name}: {override!r} changes the workload; a bench variant may "
                    "set conductor.*, optimizer.*, clip_grad_norm or precision"
                )
        variant = recipe_from_dict(recipe_to_dict(recipe), overrides)
        reason = method_unavailable(variant.conductor.method)
        if reason:
            raise UsageError(reason)
        out[name] = (variant, overrides)
    return out


def with_method(recipe: Recipe, method: str) -> Recipe:
    return recipe.model_copy(
        update={"conductor": recipe.conductor.model_copy(update={"method": method})}
    )
