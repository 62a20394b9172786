"""The parts of a run: the model, data, losses and evaluation a recipe names — built-in
components through the registry (``components.py``), the user's own through their targets
(``plugins.py``) — shared by ``gcond train``, ``gcond compare`` and ``gcond bench``.

Every data set, built-in or the user's, is a `DataSource`: ``train()`` gives the data provider
that the method calls once per micro-batch, ``val()`` the validation batches, and
``state_dict()`` / ``load_state_dict()`` make ``--resume`` continue the same data order.
The user's components are wrapped so that one that breaks its contract while training (a
provider that returns no ``(input, target)``, a loss that is not a scalar) raises a
`ComponentError` that names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from torch import Tensor, nn

from ..components import lookup
from ..errors import ComponentError
from ..plugins import INJECTED
from ..recipe import Recipe, TargetConfig
from ..tasks import LossEvaluation, Task, UserEvaluation

LossFn = Callable[[Any, Any], Tensor]


class DataSource(Protocol):
    """A run's data: the provider of training micro-batches and the validation batches. With
    ``state_dict()`` / ``load_state_dict()`` too (`StatefulDataSource`), resume is exact."""

    def train(self) -> Callable[[], Any]: ...

    def val(self) -> Iterable[Any]: ...


class StatefulDataSource(DataSource, Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# The contracts of the user's components (``target:`` in a recipe, see plugins.py); ``args``
# are the section's ``args``.


class ModelBuilder(Protocol):
    """``build(**args)`` -> the model. For ``conductor.gradients_at: representation`` the model
    also has ``trunk(x) -> z`` (one tensor) and ``heads(z) -> output``, with
    ``model(x) == model.heads(model.trunk(x))`` (README, "Your own model")."""

    def __call__(self, **args: Any) -> nn.Module: ...


class DataMaker(Protocol):
    """May also take ``rank`` and ``world_size`` keywords (filled in under torchrun)."""

    def __call__(self, seed: int, device: torch.device, **args: Any) -> DataSource: ...


class LossFunction(Protocol):
    def __call__(self, output: Any, target: Any, **args: Any) -> Tensor: ...


class Evaluate(Protocol):
    """Called in eval mode, gradients off; metric names become ``eval/<name>``."""

    def __call__(
        self, model: nn.Module, batches: Iterable[Any], **args: Any
    ) -> Mapping[str, float]: ...


@dataclasses.dataclass
class Parts:
    """What a recipe names, built: the method and the optimizer are built on top of these."""

    model: nn.Module
    data: Any  # a DataSource
    provider: Callable[[], Any]
    loss_fns: dict[str, LossFn]
    task: Task
    skipped_images: list[str] = dataclasses.field(default_factory=list)

    def data_state(self) -> dict[str, Any] | None:
        """The data order's state for a checkpoint; None when the data source has none."""
        state_dict = getattr(self.data, "state_dict", None)
        return state_dict() if callable(state_dict) else None

    def load_data_state(self, state: dict[str, Any] | None) -> bool:
        """Continue the data order; False when it restarts (a source without state)."""
        load = getattr(self.data, "load_state_dict", None)
        if state is None or not callable(load):
            return False
        load(state)
        return True


def build_parts(
    recipe: Recipe,
    device: torch.device,
    *,
    targets: Mapping[str, Callable[..., Any]] | None = None,
    rank: int = 0,
    world_size: int = 1,
    datasets: Any = None,
    console: Console | None = None,
    data: Any = None,
) -> Parts:
    """Build the recipe's components on ``device``. ``targets``: the user's callables by key
    (``plugins.resolve_references``); ``datasets``: image sets the caller already loaded;
    ``data``: a data source already built (`build_data`) to share."""
    targets = targets or {}
    if data is None:
        data = build_data(
            recipe,
            device,
            targets=targets,
            rank=rank,
            world_size=world_size,
            datasets=datasets,
            console=console,
        )
    model = _build_model(recipe, targets).to(device)
    loss_fns = {
        name: _build_loss(recipe, name, section, targets) for name, section in recipe.losses.items()
    }
    if recipe.eval.target is not None:
        task: Task = UserEvaluation(
            targets["eval"], recipe.eval.args, f"eval ({recipe.eval.target})"
        )
    elif isinstance(recipe.data, TargetConfig):
        task = LossEvaluation(loss_fns)
    else:
        task = data.task
    provider = data.train()
    if isinstance(recipe.data, TargetConfig):
        provider = CheckedProvider(provider, f"data ({recipe.data.target})")
    return Parts(model, data, provider, loss_fns, task, list(getattr(data, "skipped", [])))


def _build_model(recipe: Recipe, targets: Mapping[str, Callable[..., Any]]) -> nn.Module:
    section = recipe.model
    if not isinstance(section, TargetConfig):
        return lookup("model", section.name).builder()(section, recipe)
    model = targets["model"](**section.args)
    if not isinstance(model, nn.Module):
        raise ComponentError(
            f"model ({section.target}) returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def build_data(
    recipe: Recipe,
    device: torch.device,
    *,
    targets: Mapping[str, Callable[..., Any]] | None = None,
    rank: int = 0,
    world_size: int = 1,
    datasets: Any = None,
    console: Console | None = None,
) -> Any:
    """The recipe's data source (a `DataSource`), built-in or the user's."""
    section = recipe.data
    if not isinstance(section, TargetConfig):
        build = lookup("data", section.dataset).builder()
        return build(
            section,
            recipe,
            device=device,
            rank=rank,
            world_size=world_size,
            datasets=datasets,
            console=console,
        )
    make = (targets or {})["data"]
    accepted = _keywords(make)  # the harness's keywords (INJECTED) the function declares
    kwargs = {k: v for k, v in {"rank": rank, "world_size": world_size}.items() if k in accepted}
    source = make(recipe.seed, device, **section.args, **kwargs)
    for method in ("train", "val"):
        if not callable(getattr(source, method, None)):
            raise ComponentError(
                f"data ({section.target}) returned {type(source).__name__}, which has no "
                f"{method}() method; expected an object with train() (the data provider) and "
                "val() (the validation batches)"
            )
    return source


def _keywords(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(INJECTED["data"])
    return {p.name for p in params}


def _build_loss(
    recipe: Recipe, name: str, section: Any, targets: Mapping[str, Callable[..., Any]]
) -> LossFn:
    if not isinstance(section, TargetConfig):
        return lookup("loss", section.kind).builder()(name, section, recipe)
    return CheckedLoss(targets[f"losses.{name}"], section.args, f"losses.{name} ({section.target})")


class CheckedProvider:
    """The user's data provider; a micro-batch that is not ``(input, target)`` is refused."""

    def __init__(self, provider: Callable[[], Any], key: str) -> None:
        self.provider, self.key = provider, key

    def __call__(self) -> Any:
        batch = self.provider()
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            got = f"a {type(batch).__name__}"
            if isinstance(batch, tuple | list):
                got += f" of {len(batch)} items"
            raise ComponentError(
                f"{self.key}: the provider returned {got}, expected one micro-batch (input, target)"
            )
        return batch


class CheckedLoss:
    """The user's loss with its ``args``; a result that is not a scalar float tensor is refused
    (reading its shape and dtype does not wait for the device)."""

    def __init__(self, fn: Callable[..., Any], args: Mapping[str, Any], key: str) -> None:
        self.fn, self.args, self.key = fn, dict(args), key

    def __call__(self, output: Any, target: Any) -> Tensor:
        value = self.fn(output, target, **self.args)
        if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
            got = (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else f"a {type(value).__name__}"
            )
            raise ComponentError(
                f"{self.key} returned {got}, expected a scalar floating-point tensor "
                "(reduce it, e.g. with .mean())"
            )
        return value


def batch_checksum(batch: Any) -> str:
    """SHA-256 of a micro-batch: every tensor's dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()  # device-to-host copy: once per run
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            t = t.to(torch.uint8) if t.dtype == torch.bool else t
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, Mapping):
            for key in sorted(obj):
                digest.update(str(key).encode())
                feed(obj[key])
        elif isinstance(obj, list | tuple):
            for item in obj:
                feed(item)
        else:
            digest.update(repr(obj).encode())

    feed(batch)
    return digest.hexdigest()


class FirstBatchRecorder:
    """Stands in for a run's data provider: serves every micro-batch unchanged and writes the
    checksum of the first one to ``path``. Anything else goes to the provider."""

    def __init__(self, provider: Callable[[], Any], path: Path) -> None:
        self._provider = provider
        self._path = path
        self._pending = True

    def __call__(self) -> Any:
        batch = self._provider()
        if self._pending:
            self._pending = False
            self._path.write_text(json.dumps({"sha256": batch_checksum(batch)}) + "\n")
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)
