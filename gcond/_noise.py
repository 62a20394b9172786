"""Signal and noise of the per-loss gradients, read off the step's micro-batches
(docs/algorithm.md, "Signal and noise").

Write ``h_{k,n}`` for loss k's gradient (``λ_k ∇L_k``) on micro-batch n, n = 1..N; the step's
gradient ``g_k`` is their mean, and ``gram`` (K×K) the Gram matrix of the means. During
accumulation each micro-batch's own K×K Gram matrix ``H_n = [⟨h_{i,n}, h_{j,n}⟩]`` is kept (K×K
numbers per micro-batch, no P-sized buffer). From those N matrices and ``gram``:

* the **debiased Gram** ``N/(N−1) · (gram − Σ_n H_n / N²)``: the mean of the cross terms
  ``⟨h_{i,n}, h_{j,m}⟩`` over the N(N−1) pairs n ≠ m, an unbiased estimate of the inner products
  of the true (expected) gradients, while ``gram`` itself is biased up by the noise;
* each loss's **noise** ``tr Σ_k = (Σ_n ‖h_{k,n}‖² − N‖g_k‖²)/(N−1)``, the unbiased variance of a
  micro-batch gradient, and its **gradient noise scale** ``tr Σ_k / ‖μ_k‖²`` (McCandlish et al.
  2018's B_simple, in micro-batches): the number of micro-batches above which loss k's mean
  gradient is mostly signal;
* the **harm** of a merge ``m = Σ_j w_j g_j`` on loss k, ``⟨μ_k, m⟩`` estimated from the debiased
  Gram, with a standard error from the spread of the per-micro-batch harms ``(H_n w)_k`` over
  the micro-batches: ``sd_n / √N``.

Nothing here depends on P, and nothing touches the device: the conductor reads the N matrices
in the step's one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

# A harm within this fraction of ‖g_k‖·‖m‖ of zero is rounding, not harm (as in harms_a_loss).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MicroBatchNoise:
    """The step's per-micro-batch Gram matrices ``grams`` (M×K×K, float64, on the host, in the
    units of ``h``: each micro-batch's gradients as if it were the whole step), M ≥ 2 micro-batches
    over all ranks. ``unit``: micro-batches of one rank per sample (``world`` under FSDP, whose
    micro-batch gradients are already averaged over the ranks; 1 otherwise), so that
    :meth:`noise_scales` counts micro-batches of one rank.

    The methods that take ``gram`` (the Gram matrix of the step's mean gradients) accept any;
    the step's is remembered, so that the resolution loop asks for it again at no cost."""

    grams: torch.Tensor
    unit: int = 1

    @property
    def count(self) -> int:
        return int(self.grams.shape[0])

    @cached_property
    def total(self) -> torch.Tensor:
        """``Σ_n H_n`` (K×K)."""
        return self.grams.sum(dim=0)

    def debiased(self, gram: torch.Tensor) -> torch.Tensor:
        """The unbiased estimate of the true gradients' Gram matrix: the cross-term mean."""
        cached = self.__dict__.get("_debiased")
        if cached is not None and cached[0] is gram:
            return cached[1]
        n = self.count
        value = (gram.to(torch.float64) - self.total / (n * n)) * (n / (n - 1))
        self.__dict__["_debiased"] = (gram, value)
        return value

    def noise_traces(self, gram: torch.Tensor) -> torch.Tensor:
        """``tr Σ_k`` (K): the variance of one micro-batch's gradient of loss k."""
        n = self.count
        return (self.total.diagonal() - n * gram.to(torch.float64).diagonal()) / (n - 1)

    def noise_scales(self, gram: torch.Tensor) -> list[float]:
        """``tr Σ_k / ‖μ_k‖²`` per loss, in micro-batches of one rank; ``inf`` where the signal
        estimate is not positive (the gradient is all noise)."""
        signal = self.debiased(gram).diagonal().tolist()
        noise = self.noise_traces(gram).tolist()
        return [
            max(v, 0.0) / s * self.unit if s > 0 else math.inf
            for v, s in zip(noise, signal, strict=True)
        ]

    def noise_shares(self, gram: torch.Tensor) -> list[float]:
        """The share of ``‖g_k‖²`` that is noise, ``tr Σ_k / (N‖g_k‖²)`` (NaN for a zero
        gradient): 0 when every micro-batch agrees, about 1 for pure noise."""
        n = self.count
        squares = gram.to(torch.float64).diagonal().tolist()
        noise = self.noise_traces(gram).tolist()
        return [v / (n * q) if q > 0 else math.nan for v, q in zip(noise, squares, strict=True)]

    def harms(self, weights: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        """``⟨μ_k, m⟩`` per loss for the merge weights ``w``: from the debiased Gram when
        ``gram`` is given, else the mean per-micro-batch harm (representation mode, where
        micro-batches share no space)."""
        w = weights.to(torch.float64)
        if gram is None:
            return self.total @ w / self.count
        return self.debiased(gram) @ w

    def harm_errors(self, weights: torch.Tensor) -> torch.Tensor:
        """The standard error of each loss's harm: ``sd_n((H_n w)_k) / √N``."""
        per_batch = self.grams @ weights.to(torch.float64)  # M×K: (H_n w)_k
        n = self.count
        return (per_batch.var(dim=0, correction=1) / n).clamp_min(0.0).sqrt()

    def harm_scores(self, weights: torch.Tensor, gram: torch.Tensor | None = None) -> list[float]:
        """Each loss's harm in standard errors (``harms / harm_errors``): below ``−z`` the merge
        harms it significantly at ``significance = z``; ±inf when the noise is zero."""
        harms = self.harms(weights, gram).tolist()
        errors = self.harm_errors(weights).tolist()
        return [
            h / e if e > 0 else (math.copysign(math.inf, h) if h != 0 else 0.0)
            for h, e in zip(harms, errors, strict=True)
        ]

    def harms_significantly(
        self, weights: torch.Tensor, significance: float, gram: torch.Tensor | None = None
    ) -> bool:
        """Whether the merge lowers some loss's expected decrease below zero by more than
        ``significance`` standard errors (and by more than rounding)."""
        harms = self.harms(weights, gram)
        errors = self.harm_errors(weights)
        base = self.debiased(gram) if gram is not None else self.total / self.count
        w = weights.to(torch.float64)
        scale = base.diagonal().abs().sqrt() * math.sqrt(abs(float(w @ base @ w)))
        return bool((harms < -significance * errors - _TOLERANCE * scale).any())
