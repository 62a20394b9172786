"""The conductor's own momentum, Lion-style sign updates and the trust ratio (SPEC §1.3 step 8)."""

from __future__ import annotations

import torch


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
) -> None:
    """Rescale each parameter tensor's update to norm ``coef·‖p‖`` (LARS/LAMB), in place.

    The ratio ``coef·‖p‖/‖u‖`` is clipped at ``clip``; it is 1 where ``‖p‖`` or ``‖u‖`` is ~0.
    All norms in two fused multi-tensor kernels, no host sync.
    """
    u_norms = torch.stack(torch._foreach_norm(updates)).float()
    p_norms = torch.stack(torch._foreach_norm([p.detach() for p in params])).float()
    p_norms = p_norms.to(u_norms.device)
    ratio = (coef * p_norms / u_norms.clamp_min(eps)).clamp_max(clip)
    ratio = torch.where((p_norms > eps) & (u_norms > eps), ratio, torch.ones_like(ratio))
    torch._foreach_mul_(updates, list(ratio.to(updates[0].dtype).unbind()))
