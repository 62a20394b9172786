"""Every way of turning K losses into ``p.grad`` behind one small interface.

Every method has the conductor's face: ``accumulate(data_provider)`` runs one optimizer step's
micro-batches (forwards, backwards and the method's one host sync), ``finish(gradients)`` turns
what was accumulated into ``p.grad`` and returns a flat ``dict[str, float]`` of statistics, and
``step`` is ``finish(accumulate(...))``; `describe` says in words how it gets its gradients. The
training loop and ``gcond bench`` never know which method runs.

``conductor`` / ``conductor-stochastic`` are :class:`gcond.GradientConductor`; ``sum`` is plain
gradient accumulation of ``Σ λ_k L_k``, the baseline every user has today; ``pcgrad``,
``upgrad``, ``mgda`` and ``cagrad`` are TorchJD's aggregators fed the conductor's per-loss
gradients, accumulated over the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..components import builtins, lookup, names
from ..errors import MethodUnavailable
from ..losses import InitialScale, log_scaled
from ..recipe import OWN_LOSS_SCALES
from .base import (
    InitialScaleMethod,
    LossFn,
    Method,
    SumMethod,
    build_conductor,
    build_sum,
    model_split,
)
from .peers import peer_unavailable
from .torchjd import CAGRAD_C, TorchJDResolver, build_torchjd, torchjd_aggregator

__all__ = [
    "CAGRAD_C",
    "METHODS",
    "SUM_BUILDERS",
    "TORCHJD_METHODS",
    "InitialScaleMethod",
    "LossFn",
    "Method",
    "MethodUnavailable",
    "SumMethod",
    "TorchJDResolver",
    "build_conductor",
    "build_method",
    "build_sum",
    "build_torchjd",
    "describe",
    "effective_loss_scale",
    "follows_ddp_sync",
    "method_unavailable",
    "model_split",
    "per_loss_backward_mode",
    "resolves",
    "torchjd_aggregator",
]

METHODS = names("method")  # registered in recipe.py, one table entry each


TORCHJD_METHODS = tuple(
    name for name, entry in builtins("method").items() if entry.build.endswith(":build_torchjd")
)


def build_method(
    conductor_cfg: Any,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    lambdas: Mapping[str, float],
    *,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    loss_scale: str = "none",
) -> Method:
    """The method a recipe's ``conductor`` section names, with every parameter it sets, fed
    the losses rescaled by ``loss_scale`` (``sum-log``, ``sum-normalized`` and ``db-mtl`` set
    their own)."""
    mode = effective_loss_scale(conductor_cfg.method, loss_scale)
    if mode == "log":
        loss_fns = {name: log_scaled(fn) for name, fn in loss_fns.items()}
    if mode != "initial":
        return _build_method(conductor_cfg, model, loss_fns, lambdas, autocast_dtype, scaler)
    scale = InitialScale(list(loss_fns))
    scaled = {name: scale.wrap(name, fn) for name, fn in loss_fns.items()}
    method = _build_method(conductor_cfg, model, scaled, lambdas, autocast_dtype, scaler)
    return InitialScaleMethod(
        method,
        scale,
        model,
        loss_fns,
        conductor_cfg.accumulation_steps,
        freeze_bn=conductor_cfg.freeze_bn,
        autocast_dtype=autocast_dtype,
    )


def effective_loss_scale(method: str, loss_scale: str) -> str:
    """The loss scale a run trains with: the method's own (the scaled sums, db-mtl), else the
    recipe's."""
    return OWN_LOSS_SCALES.get(method, loss_scale)


def _build_method(
    cfg: Any,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    lambdas: Mapping[str, float],
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> Method:
    """The registered builder of ``cfg.method`` (see the method table in ``recipe.py``)."""
    build = lookup("method", cfg.method).builder()
    return build(cfg, model, loss_fns, lambdas, autocast_dtype=autocast_dtype, scaler=scaler)


def per_loss_backward_mode(method: Any) -> str | None:
    """``batched``/``sequential``: how a full-mode conductor of K >= 2 losses gets K gradients
    from one forward; None for a method that does one backward per micro-batch."""
    if getattr(method, "accumulation", None) != "full" or len(method.loss_names) < 2:
        return None
    return method.backward_mode


def describe(method: Any) -> str | None:
    """How a full-mode conductor gets K gradients from one forward, in words (None for a method
    that does one backward per micro-batch)."""
    mode = per_loss_backward_mode(method)
    if mode is None:
        return None
    text = f"{mode} backward (per_loss_backward: {method.config.per_loss_backward}"
    timings = method.backward_timings
    if timings:
        times = ", ".join(f"{way} {1000 * t:.1f} ms" for way, t in timings.items())
        text += f"; first micro-batch: {times}"
    return text + ")"


# The builders of the methods that sum the losses (scaled or weighted their own way), one
# backward per micro-batch, synchronised like any DDP loop: nothing left to resolve.
SUM_BUILDERS = ("methods:build_sum", "methods.peers:build_scalarised")


def follows_ddp_sync(name: str) -> bool:
    """Whether method ``name`` follows ``conductor.ddp_sync`` (a conductor, a TorchJD weighting,
    DB-MTL), as opposed to a sum of the losses, by the method table."""
    return lookup("method", name).build not in SUM_BUILDERS


def resolves(method: Any) -> bool:
    """Whether a built method resolves per-loss gradients in its ``finish`` (it has the
    conductor's configuration), as opposed to a sum, whose ``finish`` has nothing left to do."""
    return getattr(method, "config", None) is not None


def method_unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here (a missing optional dependency), or None if it can."""
    if lookup("method", name).build.startswith("methods.peers:"):
        return peer_unavailable(name)
    if name not in TORCHJD_METHODS:
        return None
    try:
        torchjd_aggregator(name)
    except MethodUnavailable as exc:
        return str(exc)
    return None
