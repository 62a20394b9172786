"""Conflict resolution as pure functions over K per-loss gradients (docs/algorithm.md, step 5).

Every rule of the resolution step is linear in the gradients: a projection replaces one row of the
stack ``G`` (K×P) by a combination of two rows, a winner-takes-all zeroes a row, the norm cap
scales one. So the whole resolution is a K×K matrix ``T`` with ``resolved = T @ G``, and it can be
*decided* on the K×K Gram matrix alone: after an update of ``T`` the Gram matrix of the resolved
gradients is ``T @ gram @ T.T``. The conductor therefore reads one K×K matrix from the device, runs
this loop on the host in float64, and touches the P-sized buffers once, to merge
``Σ_k (T.T @ 1)_k g_k``. Nothing here depends on P.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._noise import MicroBatchNoise

ZONES = ("weak", "main", "critical")

# A projection leaves the pair exactly orthogonal in exact arithmetic; float64 leaves ~1e-16.
# Without this slack a pair at cos = -1e-17 would count as a new conflict below weak = 0.
COSINE_TOLERANCE = 1e-9

# Norms read from ``T @ gram @ T.T`` carry an absolute error of ~1e-8·‖G‖ once a projection has
# cancelled a gradient. A gradient below this fraction of the largest one is treated as vanished
# (as one below eps is), so rounding noise is never "resolved" with a meaningless cosine.
VANISHED_FRACTION = 1e-6

Arbitrate = Callable[[int, int], int]
"""Given a conflicting pair (i, j), return the index of the winner (i or j)."""


@dataclass
class Resolution:
    """What one resolution decided. ``transform`` maps raw to resolved gradients."""

    transform: torch.Tensor  # K×K float64: resolved = transform @ raw
    iterations: int = 0
    zone_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ZONES, 0))
    arbitrations: list[tuple[int, int]] = field(default_factory=list)  # (winner, loser)
    budget_exhausted: bool = False
    # conflicts="harmful": a conflict below weak was left alone (the plain merge harmed no loss).
    harmless: bool = False
    # conflicts="significant": a conflict below weak was left alone (no harm beyond the noise).
    insignificant: bool = False

    @property
    def merge_weights(self) -> torch.Tensor:
        """Weights w with Σ_k resolved_k = Σ_k w_k raw_k (the column sums of the transform)."""
        return self.transform.sum(dim=0)


def cosine_matrix(gram: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pairwise cosines from a Gram matrix; pairs with a norm below ``eps`` get cosine 0."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > eps * eps, gram / denom.clamp_min(eps * eps), torch.zeros_like(gram))
    return cos.clamp(-1.0, 1.0)


def zone_of(cosine: float, thresholds: tuple[float, float, float]) -> str | None:
    """The conflict zone of a cosine, or None at or above ``weak``."""
    critical, main, weak = thresholds
    if cosine >= weak - COSINE_TOLERANCE:
        return None
    if cosine >= main:
        return "weak"
    if cosine >= critical:
        return "main"
    return "critical"


def smooth_angle(
    cosine: float, thresholds: tuple[float, float, float], remap_power: float = 2.0
) -> float:
    """The effective angle α of the ``"smooth"`` rule: 0 at ``weak``, π/2 at ``main``, π at and
    below ``critical``."""
    critical, main, weak = thresholds
    if cosine <= critical:
        return math.pi
    if cosine >= main:
        t = 1.0 if weak == main else min(max((cosine - main) / (weak - main), 0.0), 1.0)
        return math.pi / 2 * (1.0 - t)
    t = (cosine - main) / (critical - main)
    return math.pi / 2 + math.pi / 2 * t**remap_power


def most_conflicting_pair(gram: torch.Tensor, eps: float) -> tuple[int, int, float] | None:
    """The pair (i, j), i < j, with the lowest cosine, skipping pairs where a norm is below eps."""
    k = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt().tolist()
    g = gram.tolist()
    best: tuple[int, int, float] | None = None
    for i in range(k):
        for j in range(i + 1, k):
            if norms[i] < eps or norms[j] < eps:
                continue
            c = max(-1.0, min(1.0, g[i][j] / (norms[i] * norms[j])))
            if best is None or c < best[2]:
                best = (i, j, c)
    return best


def _project_out(t: torch.Tensor, gram: torch.Tensor, row: int, onto: int, amount: float) -> None:
    """T[row] ← T[row] − amount · (⟨g_row, g_onto⟩/‖g_onto‖²) · T[onto], in place."""
    t[row] -= amount * gram[row, onto] / gram[onto, onto] * t[onto]


def resolve_gram(
    gram: torch.Tensor,
    thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
    *,
    max_iters: int | None = None,
    mode: str = "zones",
    arbitrate: Arbitrate | None = None,
    remap_power: float = 2.0,
    eps: float = 1e-8,
    scale: torch.Tensor | None = None,
    conflicts: str = "all",
    noise: MicroBatchNoise | None = None,
    significance: float = 2.0,
) -> Resolution:
    """Decide the resolution of K gradients from their Gram matrix (docs/algorithm.md, step 5).

    ``gram`` is K×K; ``scale`` (K) pre-scales each gradient (the norm cap). ``arbitrate`` picks
    winners; the default lets the larger gradient win, ties to the lower index. ``conflicts``:
    ``"all"`` resolves every pair below ``weak``; ``"harmful"`` stops as soon as the merge of the
    current gradients is a descent direction for every loss (see :func:`harms_a_loss`);
    ``"significant"`` stops as soon as no loss's harm exceeds ``significance`` standard errors
    of the micro-batch ``noise`` (a :class:`~gcond._noise.MicroBatchNoise` of the step whose Gram
    matrix ``gram`` is; None: nothing is significant). The projections themselves always act on
    ``gram``, the Gram matrix of the gradients that are merged.
    """
    if conflicts not in ("all", "harmful", "significant"):
        raise ValueError(f"conflicts must be 'all', 'harmful' or 'significant', got {conflicts!r}")
    gram0 = gram.detach().to("cpu", torch.float64)
    k = gram0.shape[0]
    t = torch.eye(k, dtype=torch.float64)
    if scale is not None:
        t = torch.diag(scale.detach().to("cpu", torch.float64))
    result = Resolution(transform=t)
    if k < 2:
        return result
    arbitrate = arbitrate or _larger_norm_wins(gram0)
    budget = 2 * k if max_iters is None else max_iters
    largest = float((t @ gram0 @ t.T).diagonal().clamp_min(0).max().sqrt())
    eps = max(eps, VANISHED_FRACTION * largest)
    for _ in range(budget):
        current = t @ gram0 @ t.T
        pair = most_conflicting_pair(current, eps)
        if pair is None:
            break
        i, j, c = pair
        zone = zone_of(c, thresholds)
        if zone is None:
            break
        if conflicts == "harmful" and not harms_a_loss(gram0, t.sum(dim=0)):
            result.harmless = result.iterations == 0
            break
        if conflicts == "significant" and (
            noise is None or not noise.harms_significantly(t.sum(dim=0), significance, gram0)
        ):
            result.insignificant = result.iterations == 0
            break
        result.zone_counts[zone] += 1
        result.iterations += 1
        if mode == "zones" and zone == "weak":
            # Symmetric: each projected onto the other's normal plane, both from the old values.
            old = t.clone()
            _project_out(t, current, i, j, 1.0)
            t[j] = old[j] - current[i, j] / current[i, i] * old[i]
            continue
        winner = arbitrate(i, j)
        loser = j if winner == i else i
        result.arbitrations.append((winner, loser))
        if mode == "zones":
            if zone == "main":
                _project_out(t, current, loser, winner, 1.0)
            else:
                t[loser] = 0.0
        else:
            alpha = smooth_angle(c, thresholds, remap_power)
            old = t.clone()
            _project_out(t, current, winner, loser, math.sin(alpha))
            d = current[winner, loser] / current[winner, winner]
            t[loser] = old[loser] - math.sin(min(alpha, math.pi / 2)) * d * old[winner]
    else:
        final = most_conflicting_pair(t @ gram0 @ t.T, eps)
        result.budget_exhausted = final is not None and zone_of(final[2], thresholds) is not None
    return result


def harms_a_loss(gram: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether the merge ``m = Σ_k w_k g_k`` would increase some loss to first order:
    ``⟨g_k, m⟩ = (gram @ w)_k < 0`` for a k (up to a relative tolerance, so a vanished gradient
    or rounding noise harms nothing). ``gram`` is the raw gradients' Gram matrix."""
    gram = gram.to(torch.float64)
    w = weights.to(torch.float64)
    inner = gram @ w
    merged = float(w @ inner)
    if merged <= 0.0:
        return False  # the merge vanished: it moves no loss
    norms = gram.diagonal().clamp_min(0).sqrt()
    return bool((inner < -COSINE_TOLERANCE * norms * math.sqrt(merged)).any())


def _larger_norm_wins(gram: torch.Tensor) -> Arbitrate:
    norms = gram.diagonal().tolist()
    return lambda i, j: j if norms[j] > norms[i] else i


def resolve(
    grads: torch.Tensor,
    thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
    **kwargs: object,
) -> tuple[torch.Tensor, Resolution]:
    """Resolve a K×P stack of gradients; returns the resolved stack and the decisions."""
    flat = grads.reshape(grads.shape[0], -1)
    work = flat.to(torch.float64)
    res = resolve_gram(work @ work.T, thresholds, **kwargs)  # type: ignore[arg-type]
    return (res.transform @ work).to(grads.dtype).reshape(grads.shape), res
