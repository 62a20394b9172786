"""Evaluation: what a model family is measured on, behind one small interface.

The training loop calls ``task.evaluate(model, batches, precision)`` and gets metrics (names
without the ``eval/`` prefix) and, where the family has them, image grids for TensorBoard. It
knows neither the output keys (``recon``, ``logits``) nor the targets (``image``, ``label``):
those belong to the task.

* `SummedMetrics`: the built-in data sets' tasks — per-batch sums added up on the device and
  divided by the sample count, one host sync per evaluation.
* `UserEvaluation`: the user's ``evaluate(model, batches, **args) -> {name: float}``.
* `LossEvaluation`: without one, each loss's mean over the validation batches.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gcond import call_model

from .errors import ComponentError

Precision = Callable[[], AbstractContextManager[Any]]
Images = dict[str, Tensor]


class Task(Protocol):
    """What a model family is evaluated on; the model is in eval mode, gradients off."""

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], precision: Precision
    ) -> tuple[dict[str, float], Images]: ...


class SummedMetrics:
    """``sums(output, target)`` returns per-batch sums of each metric and the sample count
    ("count") as device tensors; ``images(output, target, n)``, if given, the first batch's
    image grids."""

    def __init__(
        self,
        sums: Callable[[Any, Any], dict[str, Tensor]],
        images: Callable[[Any, Any, int], Images] | None = None,
        num_images: int = 0,
    ) -> None:
        self.sums, self.images, self.num_images = sums, images, num_images

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], precision: Precision
    ) -> tuple[dict[str, float], Images]:
        totals: dict[str, Tensor] = {}
        images: Images = {}
        for x, target in batches:
            with precision():
                output = call_model(model, x)
            for key, value in self.sums(output, target).items():
                totals[key] = totals.get(key, 0) + value
            if not images and self.images is not None and self.num_images:
                images = self.images(output, target, self.num_images)
        count = totals.pop("count")
        host = (torch.stack(list(totals.values())) / count).tolist()  # one sync per evaluation
        return dict(zip(totals, host, strict=True)), images


class UserEvaluation:
    """The user's evaluation; what it returns is checked (names and real numbers)."""

    def __init__(self, fn: Callable[..., Any], args: Mapping[str, Any], key: str) -> None:
        self.fn, self.args, self.key = fn, dict(args), key

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], precision: Precision
    ) -> tuple[dict[str, float], Images]:
        with precision():
            result = self.fn(model, batches, **self.args)
        return checked_metrics(result, self.key), {}


class LossEvaluation:
    """Each loss's mean over the validation batches (weighted by batch), as ``<loss name>``."""

    def __init__(self, loss_fns: Mapping[str, Callable[[Any, Any], Tensor]]) -> None:
        self.loss_fns = dict(loss_fns)

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], precision: Precision
    ) -> tuple[dict[str, float], Images]:
        totals: dict[str, Tensor] = {}
        weights = 0.0
        for x, target in batches:
            size = batch_size(x)
            with precision():
                output = call_model(model, x)
                for name, fn in self.loss_fns.items():
                    totals[name] = totals.get(name, 0) + fn(output, target).float() * size
            weights += size
        if not totals:
            raise ComponentError("data: val() gave no batches to evaluate on")
        host = (torch.stack(list(totals.values())) / weights).tolist()  # one sync
        return dict(zip(totals, host, strict=True)), {}


def batch_size(x: Any) -> int:
    """The leading dimension of the first tensor in a model input (1 if there is none)."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.ndim else 1
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, list | tuple) else ()
    return next((batch_size(v) for v in values if isinstance(v, Tensor)), 1)


def checked_metrics(result: Any, key: str) -> dict[str, float]:
    """A user's metrics as {name: float}; anything else is a ComponentError naming ``key``."""
    if not isinstance(result, Mapping):
        raise ComponentError(
            f"{key} returned {type(result).__name__}, expected a dict of metric name -> float"
        )
    metrics = {}
    for given, value in result.items():
        if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
            value = value.item()
        # "eval/mae" is "mae": the harness adds the prefix, a name that has it already keeps one.
        name = given.removeprefix("eval/") if isinstance(given, str) else given
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ComponentError(
                f"{key} returned the metric name {given!r}; expected names of letters, digits "
                "and '_' (they become eval/<name>; a leading eval/ is accepted)"
            )
        if name in metrics:
            raise ComponentError(
                f"{key} returned the metric {name!r} twice (as {name!r} and 'eval/{name}')"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ComponentError(
                f"{key} returned {name}={value!r} ({type(value).__name__}); expected a float"
            )
        metrics[name] = float(value)
    return metrics
