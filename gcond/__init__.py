"""gcond: gradient conflict resolution over accumulated per-loss gradients.

The public surface is small: :class:`GradientConductor` (the conductor that replaces
``loss.backward()`` + gradient accumulation), the pure resolution functions it is built on, and
the :class:`Arbitrator`. This folder imports only ``torch`` and the standard library, so it can be
copied into another project on its own.
"""

from ._arbitrator import Arbitrator
from ._conductor import GradientConductor
from ._model_io import autocast, call_model, frozen_batchnorm
from ._resolution import (
    Resolution,
    cosine_matrix,
    most_conflicting_pair,
    resolve,
    resolve_gram,
    smooth_angle,
    zone_of,
)

__all__ = [
    "Arbitrator",
    "GradientConductor",
    "Resolution",
    "autocast",
    "call_model",
    "cosine_matrix",
    "frozen_batchnorm",
    "most_conflicting_pair",
    "resolve",
    "resolve_gram",
    "smooth_angle",
    "zone_of",
]

__version__ = "0.1.0"
