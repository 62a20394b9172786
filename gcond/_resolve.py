"""Resolution: from the K per-loss gradients' Gram matrix to K merge weights
(docs/algorithm.md, steps 3-6).

A resolver is anything with ``resolve(gradients) -> Resolved`` and a state: the conductor's own
(:class:`ConflictResolver`: zones or the smooth rule, the arbitrator, the norm cap) or a
weighting of the Gram matrix such as one of TorchJD's aggregators
(:class:`WeightingResolver`). Either way the merge that follows is ``Σ_k w_k g_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ._accumulate import Gradients
from ._arbitrator import Arbitrator
from ._config import ConductorConfig
from ._resolution import ZONES, resolve_gram


@dataclass
class Resolved:
    """Merge weights ``w`` (K, float64, on the host: the update is ``Σ_k w_k g_k``) and the
    resolver's statistics for this step."""

    weights: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Resolver(Protocol):
    """Turns one step's gradients into merge weights; its state is part of the conductor's."""

    def resolve(self, gradients: Gradients) -> Resolved: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def norm_cap_scales(norms: Sequence[float], cap: float | None) -> torch.Tensor | None:
    """Per-loss factors that bring each ‖g_k‖ down to ``cap`` (1 where it is below), or None."""
    if cap is None:
        return None
    return torch.tensor([min(1.0, cap / n) if n > 0 else 1.0 for n in norms])


class ConflictResolver:
    """The conductor's resolution: the most conflicting pair, zone by zone (or by the smooth
    rule), with the arbitrator choosing winners, on the Gram matrix alone (see
    :func:`gcond.resolve_gram`). ``loss_names`` name the statistics; of ``config`` (a
    :class:`ConductorConfig`) the resolution fields act here. Statistics: ``proj_iters``,
    ``conflicts/<zone>``, ``wins/<loss>``, ``dominance`` and ``norm_ema/<loss>``."""

    def __init__(self, loss_names: Sequence[str], config: ConductorConfig) -> None:
        self.loss_names = list(loss_names)
        self.config = config
        self.arbitrator = Arbitrator(
            len(self.loss_names),
            dominance_window=config.dominance_window,
            tie_breaking_weights=config.tie_breaking_weights,  # type: ignore[arg-type]
            norm_ema_beta=config.norm_ema_beta,
            eps=config.eps,
        )

    def resolve(self, gradients: Gradients) -> Resolved:
        norms = gradients.norms
        # Scores are set once per step, from the raw gradients (before cap and projections).
        self.arbitrator.observe(norms, gradients.prev_cosines)
        resolved = self._resolve(gradients.gram, norms, self.arbitrator.pick)
        for name, n, ema in zip(self.loss_names, norms, self.arbitrator.norm_ema, strict=True):
            resolved.stats[f"norm_ema/{name}"] = float(ema if ema is not None else n)
        return resolved

    def decide(self, gram: torch.Tensor) -> Resolved:
        """Representation mode: one micro-batch's merge weights from its Gram matrix, by the
        arbitrator as it stood at the start of the step. Nothing is recorded, so every DDP rank
        decides its micro-batches from the same state; :meth:`settle` updates it once a step.
        Strength is each norm against its EMA; stability is 0 (the representation gradients of
        two steps are of different samples: no cosine between them)."""
        norms = [math.sqrt(max(x, 0.0)) for x in gram.diagonal().tolist()]
        strength = self.arbitrator.strengths(norms)
        stability = [0.0] * len(norms)
        return self._resolve(
            gram, norms, lambda i, j: self.arbitrator.decide(i, j, strength, stability)
        )

    def settle(self, norms: Sequence[float], wins: Sequence[float]) -> None:
        """End of a representation-mode step: the norm EMAs take the step's norms, and the loss
        that won the most of the step's arbitrations (the lower index on a tie) joins the winner
        history, once; nothing joins it when no pair was arbitrated."""
        self.arbitrator.observe(norms, None)
        if max(wins, default=0.0) > 0:
            self.arbitrator.history.append(max(range(len(wins)), key=lambda k: (wins[k], -k)))

    def _resolve(
        self, gram: torch.Tensor, norms: list[float], pick: Callable[[int, int], tuple[int, bool]]
    ) -> Resolved:
        cfg, names = self.config, self.loss_names
        wins = dict.fromkeys(names, 0)
        dominance = 0

        def arbitrate(i: int, j: int) -> int:
            nonlocal dominance
            winner, by_dominance = pick(i, j)
            wins[names[winner]] += 1
            dominance += by_dominance
            return winner

        res = resolve_gram(
            gram,
            cfg.conflict_thresholds,
            max_iters=cfg.projection_max_iters,
            mode=cfg.resolution,
            arbitrate=arbitrate,
            remap_power=cfg.remap_power,
            eps=cfg.eps,
            scale=norm_cap_scales(norms, cfg.norm_cap),
        )
        stats = {"proj_iters": float(res.iterations)}
        for zone in ZONES:
            stats[f"conflicts/{zone}"] = float(res.zone_counts[zone])
        for name in names:
            stats[f"wins/{name}"] = float(wins[name])
        stats["dominance"] = float(dominance)
        return Resolved(res.merge_weights, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"arbitrator": self.arbitrator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.arbitrator.load_state_dict(state["arbitrator"])

    def norm_emas(self) -> list[float | None]:
        return list(self.arbitrator.norm_ema)

    def __repr__(self) -> str:
        return f"ConflictResolver(loss_names={self.loss_names!r}, {self.arbitrator!r})"


class WeightingResolver:
    """Merge weights from a function of the K×K Gram matrix, e.g. TorchJD's
    ``aggregator.gramian_weighting`` (PCGrad, UPGrad, MGDA, CAGrad are such weightings), fed the
    same accumulated gradients as the conductor. ``norm_cap`` caps each raw gradient's norm
    first, as in the conductor. It keeps no state."""

    def __init__(
        self, weighting: Callable[[torch.Tensor], torch.Tensor], *, norm_cap: float | None = None
    ) -> None:
        if not callable(weighting):
            raise TypeError(f"weighting must be callable, got {weighting!r}")
        self.weighting = weighting
        self.norm_cap = norm_cap

    def resolve(self, gradients: Gradients) -> Resolved:
        gram = gradients.gram
        scale = norm_cap_scales(gradients.norms, self.norm_cap)
        if scale is not None:
            gram = scale[:, None] * gram * scale[None, :]
        weights = self.weighting(gram).to("cpu", torch.float64)
        if weights.shape != (gram.shape[0],):
            raise ValueError(
                f"weighting must return {gram.shape[0]} weights, got shape {tuple(weights.shape)}"
            )
        return Resolved(weights if scale is None else weights * scale)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"WeightingResolver({self.weighting!r}, norm_cap={self.norm_cap!r})"
