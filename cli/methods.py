"""Every way of turning K losses into ``p.grad`` behind one small interface.

The training loop calls ``method.step(data_provider)`` and gets a flat ``dict[str, float]`` of
statistics; it never knows which method runs. ``conductor`` / ``conductor-stochastic`` are
:class:`gcond.GradientConductor`; ``sum`` is plain gradient accumulation of ``Σ λ_k L_k``, the
baseline every user has today.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from gcond import GradientConductor, call_model, frozen_batchnorm

LossFn = Callable[[Any, Any], torch.Tensor]
GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Method(Protocol):
    """What the training loop needs from a gradient method."""

    def step(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        """Run one optimizer step's micro-batches and leave the gradient in ``p.grad``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def build_method(
    conductor_cfg: Any,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    lambdas: Mapping[str, float],
    *,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> Method:
    """The method a recipe's ``conductor`` section names, with every parameter it sets."""
    cfg = conductor_cfg
    name = cfg.method
    if name == "sum":
        return SumMethod(
            model,
            loss_fns,
            lambdas,
            cfg.accumulation_steps,
            freeze_bn=cfg.freeze_bn,
            autocast_dtype=autocast_dtype,
            scaler=scaler,
        )
    if name in ("conductor", "conductor-stochastic"):
        return GradientConductor(
            model,
            loss_fns,
            lambdas,
            cfg.accumulation_steps,
            accumulation="stochastic" if name == "conductor-stochastic" else cfg.accumulation,
            resolution=cfg.resolution,
            conflict_thresholds=tuple(cfg.conflict_thresholds),
            projection_max_iters=cfg.projection_max_iters,
            dominance_window=cfg.dominance_window,
            tie_breaking_weights=tuple(cfg.tie_breaking_weights),
            norm_ema_beta=cfg.norm_ema_beta,
            norm_cap=cfg.norm_cap,
            momentum_beta=cfg.momentum_beta,
            use_lion=cfg.use_lion,
            trust_ratio_coef=cfg.trust_ratio_coef,
            trust_ratio_clip=cfg.trust_ratio_clip,
            remap_power=cfg.remap_power,
            return_raw_grad=cfg.return_raw_grad,
            freeze_bn=cfg.freeze_bn,
            autocast_dtype=autocast_dtype,
            scaler=scaler,
            grad_dtype=GRAD_DTYPES[cfg.grad_dtype],
            ddp_sync=cfg.ddp_sync,
            eps=cfg.eps,
        )
    raise ValueError(f"conductor.method: unknown method {name!r}")


class SumMethod:
    """Plain gradient accumulation of ``Σ_k λ_k L_k / N`` with one backward per micro-batch.

    BatchNorm layers are treated as the conductor treats them (``freeze_bn``), so a comparison
    isolates how the gradients are combined. Under DDP the gradient is all-reduced once, on the
    last micro-batch (``no_sync`` before it), as in any DDP accumulation loop.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fns: Mapping[str, LossFn],
        lambdas: Mapping[str, float],
        accumulation_steps: int,
        *,
        freeze_bn: bool = True,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.loss_names = list(loss_fns)
        self.loss_fns = dict(loss_fns)
        self.accumulation_steps = accumulation_steps
        self.freeze_bn = freeze_bn
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.device = self._params[0].device
        self._lambdas = torch.tensor(
            [float(lambdas[n]) for n in self.loss_names], device=self.device
        )
        self._step = 0

    def step(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        n = self.accumulation_steps
        sums = torch.zeros(len(self.loss_names), device=self.device)
        with frozen_batchnorm(self.model, self.freeze_bn):
            for i in range(n):
                x, target = data_provider()
                with torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ):
                    output = call_model(self.model, x)
                    values = torch.stack(
                        [self.loss_fns[k](output, target).float() for k in self.loss_names]
                    )
                sums += values.detach()
                total = (values * self._lambdas).sum() / n
                if self.scaler is not None:
                    total = self.scaler.scale(total)
                sync = i == n - 1 or not hasattr(self.model, "no_sync")
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    total.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.scaler is not None and self.scaler.is_enabled():
            norm = norm / self.scaler.scale(torch.ones((), device=self.device))
        # The one host-device sync of the step: loss sums and the gradient norm together.
        host = torch.cat([sums / n, norm.reshape(1)]).tolist()
        means, grad_norm = host[:-1], host[-1]
        skipped = not math.isfinite(grad_norm)
        if skipped and (self.scaler is None or not self.scaler.is_enabled()):
            for p in self._params:  # nothing for the optimizer to apply
                p.grad = None
        if not skipped:
            self._step += 1
        stats = {f"loss/{k}": v for k, v in zip(self.loss_names, means, strict=True)}
        lam = self._lambdas.tolist()
        stats["loss/total"] = sum(w * v for w, v in zip(lam, means, strict=True))
        stats["final_grad_norm"] = grad_norm
        stats["skipped"] = float(skipped)
        stats["step"] = float(self._step)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state["step"])
