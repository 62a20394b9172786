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
from ._noise import MicroBatchNoise
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


class NormEqualizer:
    """Gradient-norm equalisation (DB-MTL's, on an EMA of the norms): per-loss factors
    ``s_k = max_j e_j / e_k`` that bring every loss's norm EMA ``e_k`` up to the largest one.

    ``e_k`` starts at loss k's first observed norm, then follows ``e_k ← β·e_k + (1−β)·‖g_k‖``;
    β = 0 equalises this step's norms exactly. A loss whose EMA is below ``eps`` keeps factor 1
    (a vanished gradient is not blown up). Its state is the K EMAs.
    """

    def __init__(self, num_losses: int, *, beta: float = 0.9, eps: float = 1e-8) -> None:
        self.num_losses = num_losses
        self.beta = beta
        self.eps = eps
        self.ema: list[float | None] = [None] * num_losses

    def scales(self, norms: Sequence[float]) -> torch.Tensor:
        """Update the EMAs with this step's raw norms; this step's factors (K, float64)."""
        self.observe(norms)
        return self.factors(norms)

    def observe(self, norms: Sequence[float]) -> None:
        """Update the EMAs with a step's raw norms."""
        beta = self.beta
        for k, norm in enumerate(norms):
            ema = self.ema[k]
            self.ema[k] = norm if ema is None else beta * ema + (1.0 - beta) * norm

    def factors(self, norms: Sequence[float]) -> torch.Tensor:
        """The factors from the EMAs as they stand (``norms`` where a loss has none yet), without
        updating them: representation mode's micro-batch decisions."""
        emas = [float(n if e is None else e) for e, n in zip(self.ema, norms, strict=True)]
        top = max(emas)
        return torch.tensor([top / e if e >= self.eps else 1.0 for e in emas], dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "norm_ema": torch.tensor([e or 0.0 for e in self.ema], dtype=torch.float64),
            "norm_ema_initialised": torch.tensor([e is not None for e in self.ema]),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        emas, flags = state["norm_ema"].tolist(), state["norm_ema_initialised"].tolist()
        if len(emas) != self.num_losses:
            raise ValueError(
                f"norm equalizer state is for {len(emas)} losses, not {self.num_losses}"
            )
        self.ema = [e if f else None for e, f in zip(emas, flags, strict=True)]

    def __repr__(self) -> str:
        return f"NormEqualizer(num_losses={self.num_losses}, beta={self.beta}, eps={self.eps})"


def _equalizer(num_losses: int, mode: str, beta: float, eps: float) -> NormEqualizer | None:
    if mode not in ("off", "max"):
        raise ValueError(f"norm_equalization must be 'off' or 'max', got {mode!r}")
    return NormEqualizer(num_losses, beta=beta, eps=eps) if mode == "max" else None


def _pre_scales(
    norms: Sequence[float], equalized: torch.Tensor | None, cap: float | None
) -> torch.Tensor | None:
    """Per-loss factors applied before resolution: norm equalisation (``equalized``, its
    factors), then the norm cap on the equalised norms; None when neither is on."""
    if equalized is None:
        return norm_cap_scales(norms, cap)
    scale = equalized
    capped = norm_cap_scales([float(s) * n for s, n in zip(scale, norms, strict=True)], cap)
    return scale if capped is None else scale * capped.to(torch.float64)


_EQUALIZER_KEY = "norm_equalizer"
_SIGNIFICANT_KEY = "significant_last_step"


class ConflictResolver:
    """The conductor's resolution: the most conflicting pair, zone by zone (or by the smooth
    rule), with the arbitrator choosing winners, on the Gram matrix alone (see
    :func:`gcond.resolve_gram`). ``loss_names`` name the statistics; of ``config`` (a
    :class:`ConductorConfig`) the resolution fields act here. Statistics: ``proj_iters``,
    ``conflicts/<zone>``, ``wins/<loss>``, ``dominance``, ``norm_ema/<loss>``, with
    ``norm_equalization`` ``norm_scale/<loss>`` (the equalisation factor applied) and with
    ``conflicts="harmful"`` ``conflicts/harmless`` (1 when a conflict was left alone), with
    ``conflicts="significant"`` ``conflicts/noise`` (1 when a conflict was left alone because
    no harm exceeded its noise)."""

    def __init__(self, loss_names: Sequence[str], config: ConductorConfig) -> None:
        self.loss_names = list(loss_names)
        self.config = config
        self.equalizer = _equalizer(
            len(self.loss_names),
            config.norm_equalization,
            config.norm_equalization_beta,
            config.eps,
        )
        # conflicts="significant" in representation mode: whether the last full step's plain
        # merge harmed some loss beyond its noise, which opens this step's resolution.
        self.significant_last_step = False
        self.arbitrator = Arbitrator(
            len(self.loss_names),
            dominance_window=config.dominance_window,
            tie_breaking_weights=config.tie_breaking_weights,  # type: ignore[arg-type]
            norm_ema_beta=config.norm_ema_beta,
            eps=config.eps,
            dominance_rule=config.dominance_rule,
        )

    def resolve(self, gradients: Gradients) -> Resolved:
        norms = gradients.norms
        # Scores are set once per step, from the raw gradients (before cap and projections).
        self.arbitrator.observe(norms, gradients.prev_cosines)
        equalized = None if self.equalizer is None else self.equalizer.scales(norms)
        resolved = self._resolve(
            gradients.gram, norms, self.arbitrator.pick, equalized, gradients.noise
        )
        for name, n, ema in zip(self.loss_names, norms, self.arbitrator.norm_ema, strict=True):
            resolved.stats[f"norm_ema/{name}"] = float(ema if ema is not None else n)
        return resolved

    def decide(self, gram: torch.Tensor) -> Resolved:
        """Representation mode: one micro-batch's merge weights from its Gram matrix, by the
        arbitrator (and the norm equaliser) as they stood at the start of the step. Nothing is
        recorded, so every DDP rank decides its micro-batches from the same state; :meth:`settle`
        updates it once a step. Strength is each norm against its EMA; stability is 0 (the
        representation gradients of two steps are of different samples: no cosine between
        them). With ``conflicts="significant"`` a micro-batch is resolved (as with ``"all"``) only
        when the last full step's plain merge harmed some loss beyond its noise
        (:meth:`settle`): one micro-batch has no spread of its own to judge by."""
        norms = [math.sqrt(max(x, 0.0)) for x in gram.diagonal().tolist()]
        strength = self.arbitrator.strengths(norms)
        stability = [0.0] * len(norms)
        equalized = None if self.equalizer is None else self.equalizer.factors(norms)
        conflicts = self.config.conflicts
        if conflicts == "significant" and self.significant_last_step:
            conflicts = "all"
        return self._resolve(
            gram,
            norms,
            lambda i, j: self.arbitrator.decide(i, j, strength, stability),
            equalized,
            None,
            conflicts,
        )

    def settle(
        self, norms: Sequence[float], wins: Sequence[float], noise: MicroBatchNoise | None = None
    ) -> None:
        """End of a representation-mode step: the norm EMAs (the arbitrator's and the norm
        equaliser's) take the step's norms, and the loss that won the most of the step's
        arbitrations (the lower index on a tie) joins the winner history, once; nothing joins it
        when no pair was arbitrated."""
        self.arbitrator.observe(norms, None)
        if self.equalizer is not None:
            self.equalizer.observe(norms)
        if max(wins, default=0.0) > 0:
            top = max(range(len(wins)), key=lambda k: (wins[k], -k))
            self.arbitrator.record(top, self.arbitrator.dominant() == top)
        if self.config.conflicts == "significant" and noise is not None:
            plain = torch.ones(len(norms), dtype=torch.float64)
            self.significant_last_step = noise.harms_significantly(plain, self.config.significance)

    def _resolve(
        self,
        gram: torch.Tensor,
        norms: list[float],
        pick: Callable[[int, int], tuple[int, bool]],
        equalized: torch.Tensor | None,
        noise: MicroBatchNoise | None = None,
        conflicts: str | None = None,
    ) -> Resolved:
        cfg, names = self.config, self.loss_names
        conflicts = cfg.conflicts if conflicts is None else conflicts
        scale = _pre_scales(norms, equalized, cfg.norm_cap)
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
            scale=scale,
            conflicts=conflicts,
            noise=noise,
            significance=cfg.significance,
        )
        stats = {"proj_iters": float(res.iterations)}
        for zone in ZONES:
            stats[f"conflicts/{zone}"] = float(res.zone_counts[zone])
        if cfg.conflicts == "harmful":
            stats["conflicts/harmless"] = float(res.harmless)
        if cfg.conflicts == "significant":
            stats["conflicts/noise"] = float(res.insignificant)
        for name in names:
            stats[f"wins/{name}"] = float(wins[name])
        stats["dominance"] = float(dominance)
        stats.update(_equalizer_stats(names, self.equalizer, scale))
        return Resolved(res.merge_weights, stats)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"arbitrator": self.arbitrator.state_dict()}
        if self.equalizer is not None:
            state[_EQUALIZER_KEY] = self.equalizer.state_dict()
        if self.config.conflicts == "significant":
            state[_SIGNIFICANT_KEY] = self.significant_last_step
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.arbitrator.load_state_dict(state["arbitrator"])
        _load_equalizer(self.equalizer, state)
        self.significant_last_step = bool(state.get(_SIGNIFICANT_KEY, False))

    def norm_emas(self) -> list[float | None]:
        return list(self.arbitrator.norm_ema)

    def __repr__(self) -> str:
        return f"ConflictResolver(loss_names={self.loss_names!r}, {self.arbitrator!r})"


def _equalizer_stats(
    names: Sequence[str], equalizer: NormEqualizer | None, scale: torch.Tensor | None
) -> dict[str, float]:
    if equalizer is None or scale is None:
        return {}
    return {f"norm_scale/{name}": float(s) for name, s in zip(names, scale.tolist(), strict=True)}


def _load_equalizer(equalizer: NormEqualizer | None, state: Mapping[str, Any]) -> None:
    """A state without the equalizer's EMAs (saved with it off, or before it existed) starts
    them afresh; a state with them, loaded with it off, is read as nothing."""
    if equalizer is not None and _EQUALIZER_KEY in state:
        equalizer.load_state_dict(state[_EQUALIZER_KEY])


class WeightingResolver:
    """Merge weights from a function of the K×K Gram matrix, e.g. TorchJD's
    ``aggregator.gramian_weighting`` (PCGrad, UPGrad, MGDA, CAGrad are such weightings), fed the
    same accumulated gradients as the conductor. ``norm_equalization`` (``"off"`` or ``"max"``,
    EMA factor ``norm_equalization_beta``) and ``norm_cap`` rescale each raw gradient first, as
    in the conductor. Its state is the equalizer's EMAs (none when it is off)."""

    def __init__(
        self,
        weighting: Callable[[torch.Tensor], torch.Tensor],
        *,
        norm_cap: float | None = None,
        norm_equalization: str = "off",
        norm_equalization_beta: float = 0.9,
        loss_names: Sequence[str] | None = None,
        eps: float = 1e-8,
    ) -> None:
        if not callable(weighting):
            raise TypeError(f"weighting must be callable, got {weighting!r}")
        if norm_equalization not in ("off", "max"):
            raise ValueError(f"norm_equalization must be 'off' or 'max', got {norm_equalization!r}")
        self.weighting = weighting
        self.norm_cap = norm_cap
        self.norm_equalization = norm_equalization
        self.norm_equalization_beta = norm_equalization_beta
        self.loss_names = None if loss_names is None else list(loss_names)
        self.eps = eps
        self.equalizer: NormEqualizer | None = None
        if self.loss_names is not None:
            self._start_equalizer(len(self.loss_names))

    def _start_equalizer(self, num_losses: int) -> None:
        if self.loss_names is None:
            self.loss_names = [str(k) for k in range(num_losses)]
        self.equalizer = _equalizer(
            num_losses, self.norm_equalization, self.norm_equalization_beta, self.eps
        )

    def resolve(self, gradients: Gradients) -> Resolved:
        gram = gradients.gram
        if self.equalizer is None and self.norm_equalization != "off":
            self._start_equalizer(gram.shape[0])  # K known from the first step's gradients
        equalized = None if self.equalizer is None else self.equalizer.scales(gradients.norms)
        scale = _pre_scales(gradients.norms, equalized, self.norm_cap)
        if scale is not None:
            gram = scale[:, None] * gram * scale[None, :]
        weights = self.weighting(gram).to("cpu", torch.float64)
        if weights.shape != (gram.shape[0],):
            raise ValueError(
                f"weighting must return {gram.shape[0]} weights, got shape {tuple(weights.shape)}"
            )
        stats = _equalizer_stats(self.loss_names or [], self.equalizer, scale)
        return Resolved(weights if scale is None else weights * scale, stats)

    def state_dict(self) -> dict[str, Any]:
        if self.equalizer is None:
            return {}
        return {_EQUALIZER_KEY: self.equalizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if _EQUALIZER_KEY in state and self.norm_equalization != "off":
            if self.equalizer is None:
                self._start_equalizer(len(state[_EQUALIZER_KEY]["norm_ema"]))
            _load_equalizer(self.equalizer, state)

    def __repr__(self) -> str:
        return (
            f"WeightingResolver({self.weighting!r}, norm_cap={self.norm_cap!r}, "
            f"norm_equalization={self.norm_equalization!r}, "
            f"norm_equalization_beta={self.norm_equalization_beta!r})"
        )
