"""Update: merge, the conductor's own momentum, Lion's sign, the trust ratio, and ``p.grad``
(docs/algorithm.md, steps 7-9)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ._accumulate import Gradients, split
from ._config import ConductorConfig
from ._distributed import distributed


class Momentum:
    """Bias-corrected EMA of the merged gradient over one flat buffer.

    ``m ← β·m + (1−β)·g``, ``m̂ = m / (1 − β^t)``; the direction is ``sign(m̂)`` in Lion mode.
    With β = 0 there is no buffer and the direction is g itself.
    """

    def __init__(
        self, numel: int, beta: float, *, use_lion: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.beta = beta
        self.use_lion = use_lion
        self.buffer = torch.zeros(numel, dtype=dtype, device=device) if beta > 0 else None

    def apply_(self, g: torch.Tensor, t: int) -> None:
        """Update the state with g (P) at non-skipped step t ≥ 1 and overwrite g with the
        direction, in place."""
        if self.buffer is not None:
            self.buffer.mul_(self.beta).add_(g, alpha=1.0 - self.beta)
            g.copy_(self.buffer).div_(1.0 - self.beta**t)
        if self.use_lion:
            g.sign_()


def apply_trust_ratio_(
    updates: list[torch.Tensor],
    params: list[torch.Tensor],
    coef: float,
    clip: float,
    eps: float,
    group: Any = None,
) -> None:
    """Rescale each parameter tensor's update to norm ``coef·‖p‖`` (LARS/LAMB), in place.

    The ratio ``coef·‖p‖/‖u‖`` is clipped at ``clip``; it is 1 where ``‖p‖`` or ``‖u‖`` is ~0.
    All norms in two fused multi-tensor kernels, no host sync. With a ``group``, ``updates``
    and ``params`` are this rank's shards of tensors sharded over it: the squared norms of the
    shards are summed over the ranks (one collective of 2·T numbers).
    """
    u_norms = torch.stack(torch._foreach_norm(updates)).float()
    p_norms = torch.stack(torch._foreach_norm([p.detach() for p in params])).float()
    p_norms = p_norms.to(u_norms.device)
    if group is not None:
        squares = torch.cat([u_norms, p_norms]).square()
        dist.all_reduce(squares, group=group)
        u_norms, p_norms = squares.sqrt().split(len(updates))
    ratio = (coef * p_norms / u_norms.clamp_min(eps)).clamp_max(clip)
    ratio = torch.where((p_norms > eps) & (u_norms > eps), ratio, torch.ones_like(ratio))
    torch._foreach_mul_(updates, list(ratio.to(updates[0].dtype).unbind()))


class Updater:
    """Writes ``p.grad`` from the gradients and their merge weights, through one flat P-sized
    buffer that the ``p.grad`` tensors are views of (when dtypes match: no copy).

    ``params``: the trainable parameters; ``config``: the :class:`ConductorConfig`
    (``momentum_beta``, ``use_lion``, ``trust_ratio_coef``, ``trust_ratio_clip``,
    ``return_raw_grad``, ``grad_dtype``, ``ddp_sync``, ``eps`` act here); ``scaler``: the
    GradScaler whose scale the written gradient carries; ``group``: the DDP process group.
    ``steps`` counts the applied (non-skipped) steps: t of the bias correction.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        config: ConductorConfig,
        *,
        scaler: torch.amp.GradScaler | None = None,
        group: Any = None,
    ) -> None:
        self.params, self.config, self.scaler, self.group = params, config, scaler, group
        self.device = params[0].device
        locals_ = [self._local(p) for p in params]
        numels, shapes = [t.numel() for t in locals_], [tuple(t.shape) for t in locals_]
        dtypes = {p.dtype for p in params}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.buffer = torch.zeros(sum(numels), dtype=dtype, device=self.device)
        self._views = split(self.buffer, numels, shapes)
        self.momentum = Momentum(
            sum(numels),
            config.momentum_beta,
            use_lion=config.use_lion,
            dtype=getattr(torch, config.grad_dtype),
            device=self.device,
        )
        self.steps = 0

    def apply(self, gradients: Gradients, weights: torch.Tensor) -> float:
        """Merge ``g = Σ_k w_k g_k``, turn it into the direction (momentum, sign, trust ratio,
        unless ``return_raw_grad``), write ``p.grad``; returns the norm of what was written."""
        cfg, update, stack = self.config, self.buffer, gradients.stack
        w = weights.tolist()
        torch.mul(stack[0], w[0], out=update)  # one fused pass over P per loss
        for j in range(1, len(w)):
            if w[j] != 0.0:
                update.add_(stack[j], alpha=w[j])
        self.steps += 1
        direction_is_g = cfg.return_raw_grad or (
            self.momentum.buffer is None and not cfg.use_lion and cfg.trust_ratio_coef is None
        )
        if not cfg.return_raw_grad:
            self.momentum.apply_(update, self.steps)
            if cfg.trust_ratio_coef is not None:
                self._trust_ratio()
        if cfg.ddp_sync == "update" and distributed(self.group):
            update.div_(dist.get_world_size(self.group))
            dist.all_reduce(update, group=self.group)
            direction_is_g = False
        if direction_is_g:
            # ‖Σ w_k g_k‖² = wᵀ·Gram·w: exact, and no second sync.
            norm = math.sqrt(max(float(weights @ gradients.gram @ weights), 0.0))
        else:
            norm = self._norm()  # a host-device sync
        if self.scaler is not None:
            # scaler.step() unscales p.grad: hand it a scaled update.
            update.mul_(self.scaler.scale(torch.ones((), device=self.device)))
        self._write()
        return norm

    def skip(self) -> None:
        """Leave the optimizer unable to change the weights: ``p.grad`` None, or non-finite
        under a GradScaler, so ``scaler.step()`` skips and ``update()`` backs off the scale."""
        if self.scaler is not None and self.scaler.is_enabled():
            self.buffer.fill_(math.inf)
            self._write()
        else:
            for p in self.params:
                p.grad = None

    def momentum_state(self) -> Any:
        """The momentum buffer for a state dict: a copy, or None without momentum."""
        buffer = self.momentum.buffer
        return None if buffer is None else buffer.clone()

    def load_momentum(self, state: Any) -> None:
        if self.momentum.buffer is not None:
            self.momentum.buffer.copy_(state)

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        """The part of a parameter this process holds: all of it (a shard under FSDP)."""
        return param

    def _trust_ratio(self) -> None:
        cfg = self.config
        apply_trust_ratio_(
            self._views, self.params, cfg.trust_ratio_coef, cfg.trust_ratio_clip, cfg.eps
        )

    def _norm(self) -> float:
        return float(torch.linalg.vector_norm(self.buffer))

    def _write(self) -> None:
        for p, view in zip(self.params, self._views, strict=True):
            p.grad = view if view.dtype == p.dtype else view.to(p.dtype)
