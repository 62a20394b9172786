"""What the run logger writes to TensorBoard besides scalars: the custom-scalars layout, the
hyper-parameters as flat scalars, and image grids."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# Statistics groups that get one overlaid chart each in TensorBoard's custom-scalars tab. Regexes
# (not tag lists) because the per-pair / per-loss names are only known once the run is going, and
# because a regex also matches the same tags in the other runs of a compare.
CHART_GROUPS = {
    "cosine similarity (before resolution)": r"^cos/.*",
    "conflict zones (count per step)": r"^conflicts/.*",
    "arbitration wins": r"^wins/.*",
    "raw gradient norms": r"^raw_norm/.*",
    "cosine without the micro-batch noise": r"^signal_cos/.*",
    "share of each gradient that is noise": r"^noise_share/.*",
    "gradient noise scale (micro-batches)": r"^noise_scale/.*",
    "plain sum's harm per loss (standard errors)": r"^harm_z/.*",
}


def image_grid(batch: torch.Tensor) -> torch.Tensor:
    """B×3×H×W in [0, 1] (any device/dtype) -> one 3×H'×W' float grid on the CPU."""
    from torchvision.utils import make_grid

    return make_grid(batch.detach().float().cpu().clamp(0.0, 1.0), padding=1)


def custom_layout(loss_names: Iterable[str]) -> dict:
    """Custom-scalars layout: per-loss curves overlaid, one chart per statistics family.

    In a compare (several runs under one logdir) each chart overlays the same tag across runs, so
    ``loss/<name>`` puts every method's curve for that loss in one chart.
    """
    losses = {"all losses": ["Multiline", [r"^loss/.*"]]}
    for name in [*loss_names, "total"]:
        losses[f"loss/{name}"] = ["Multiline", [rf"^loss/{name}$"]]
    conductor = {title: ["Multiline", [regex]] for title, regex in CHART_GROUPS.items()}
    return {
        "losses": losses,
        "conductor": conductor,
        "eval": {"eval metrics": ["Multiline", [r"^eval/.*"]]},
    }


def flatten_hparams(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested recipe dict -> {"optimizer.lr": 0.001, ...} with scalar values.

    The hparams plugin only holds numbers, strings and bools; lists/tuples become their string
    form, None is left out (the plugin has no null).
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, name + "."))
        elif value is None:
            continue
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def numeric_leaves(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """Finite numbers of a (nested) summary dict, keyed by their '/'-joined path."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_leaves(value, name + "/"))
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            out[name] = float(value)
    return out
