"""TorchJD's aggregators (``pcgrad``, ``upgrad``, ``mgda``, ``cagrad``, ``alignedmtl``, ``imtlg``,
``dualproj``) as the conductor's resolver: their weighting of the Gram matrix of the conductor's
accumulated per-loss gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gcond import WeightingResolver

from ..errors import MethodUnavailable
from .base import LossFn, conductor_with

CAGRAD_C = 0.4  # the CAGrad paper's multi-task setting


def _torchjd_resolver(cfg: Any, loss_fns: Mapping[str, LossFn]) -> TorchJDResolver:
    return TorchJDResolver(
        torchjd_aggregator(cfg.method),
        norm_cap=cfg.norm_cap,
        norm_equalization=cfg.norm_equalization,
        norm_equalization_beta=cfg.norm_equalization_beta,
        loss_names=list(loss_fns),
    )


def torchjd_aggregator(name: str) -> Any:
    """TorchJD's aggregator for ``name`` (one of :data:`TORCHJD_METHODS`), or MethodUnavailable
    naming the package to install."""
    try:
        from torchjd import aggregation
    except ImportError:
        raise MethodUnavailable(
            f"method {name!r} needs TorchJD: pip install 'gcond[torchjd]'"
        ) from None
    builders = {
        "pcgrad": aggregation.PCGrad,
        "upgrad": aggregation.UPGrad,
        "mgda": aggregation.MGDA,
        "cagrad": lambda: aggregation.CAGrad(c=CAGRAD_C),
        "alignedmtl": aggregation.AlignedMTL,
        "imtlg": aggregation.IMTLG,
        "dualproj": aggregation.DualProj,
    }
    try:
        return builders[name]()
    except ImportError as exc:  # the aggregator's own solver extra (quadprog, cvxpy)
        raise MethodUnavailable(f"method {name!r} is not available here: {exc}") from None


class TorchJDResolver(WeightingResolver):
    """A TorchJD aggregator's weighting of the Gram matrix as the conductor's resolver (the
    merge ``Σ_k w_k g_k`` that follows is TorchJD's combination).

    It draws from its own CPU random stream (PCGrad shuffles the losses), seeded from the
    process's torch seed, so the run's global stream, and everything else that draws from it,
    stays as it is under the other methods; the stream is part of the conductor's state.
    """

    def __init__(self, aggregator: Any, **options: Any) -> None:
        super().__init__(self._weigh, **options)
        self.aggregator = aggregator
        self.rng_state = torch.Generator().manual_seed(torch.initial_seed()).get_state()

    def _weigh(self, gram: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            weights = self.aggregator.gramian_weighting(gram)
            self.rng_state = torch.get_rng_state()
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "aggregator_rng": self.rng_state.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng_state = state["aggregator_rng"].clone()

    def __repr__(self) -> str:
        return f"TorchJDResolver({self.aggregator!r}, norm_cap={self.norm_cap!r})"


# A TorchJD aggregator as the conductor's resolver.
build_torchjd = conductor_with(_torchjd_resolver)
