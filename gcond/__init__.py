"""gcond: gradient conflict resolution over accumulated per-loss gradients.

:class:`GradientConductor` replaces ``loss.backward()`` + gradient accumulation. It is three
parts, each usable and testable alone: accumulation (:class:`Accumulator`, handing on
:class:`Gradients`), resolution (a :class:`Resolver`: the conductor's :class:`ConflictResolver`
or a :class:`WeightingResolver` of the Gram matrix) and update (:class:`Updater`). Every tuning
parameter is a field of :class:`ConductorConfig`. The resolution math is pure functions over the
K×K Gram matrix (:func:`resolve_gram`). The algorithm is described in ``docs/algorithm.md``.

This folder imports only ``torch`` and the standard library, so it can be copied into another
project on its own. Names are loaded on first use: ``ConductorConfig`` alone does not load torch,
so a tool can check a configuration quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._accumulate import Accumulator, Gradients
    from ._arbitrator import Arbitrator
    from ._conductor import GradientConductor
    from ._config import ConductorConfig, ConfigProblem
    from ._model_io import autocast, call_model, frozen_batchnorm
    from ._resolution import (
        Resolution,
        cosine_matrix,
        harms_a_loss,
        most_conflicting_pair,
        resolve,
        resolve_gram,
        smooth_angle,
        zone_of,
    )
    from ._resolve import (
        ConflictResolver,
        NormEqualizer,
        Resolved,
        Resolver,
        WeightingResolver,
        norm_cap_scales,
    )
    from ._update import Momentum, Updater, apply_trust_ratio_

_HOMES = {
    "Accumulator": "_accumulate",
    "Gradients": "_accumulate",
    "Arbitrator": "_arbitrator",
    "GradientConductor": "_conductor",
    "ConductorConfig": "_config",
    "ConfigProblem": "_config",
    "autocast": "_model_io",
    "call_model": "_model_io",
    "frozen_batchnorm": "_model_io",
    "Resolution": "_resolution",
    "cosine_matrix": "_resolution",
    "harms_a_loss": "_resolution",
    "most_conflicting_pair": "_resolution",
    "resolve": "_resolution",
    "resolve_gram": "_resolution",
    "smooth_angle": "_resolution",
    "zone_of": "_resolution",
    "ConflictResolver": "_resolve",
    "Resolved": "_resolve",
    "Resolver": "_resolve",
    "WeightingResolver": "_resolve",
    "norm_cap_scales": "_resolve",
    "NormEqualizer": "_resolve",
    "Momentum": "_update",
    "Updater": "_update",
    "apply_trust_ratio_": "_update",
}
__all__ = [
    "Accumulator",
    "Arbitrator",
    "ConductorConfig",
    "ConfigProblem",
    "ConflictResolver",
    "GradientConductor",
    "Gradients",
    "Momentum",
    "NormEqualizer",
    "Resolution",
    "Resolved",
    "Resolver",
    "Updater",
    "WeightingResolver",
    "apply_trust_ratio_",
    "autocast",
    "call_model",
    "cosine_matrix",
    "frozen_batchnorm",
    "harms_a_loss",
    "most_conflicting_pair",
    "norm_cap_scales",
    "resolve",
    "resolve_gram",
    "smooth_angle",
    "zone_of",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gcond' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
