"""What every method shares: the interface the loop and bench see, plain accumulation (``sum``
and the scaled sums), the conductor's builder, and the wrapper that trains on ``L_k / L_k⁽⁰⁾``."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from gcond import GradientConductor, autocast, call_model, frozen_batchnorm

from ..errors import UsageError
from ..losses import InitialScale

LossFn = Callable[[Any, Any], torch.Tensor]


class Method(Protocol):
    """What the training loop needs from a gradient method."""

    def accumulate(self, data_provider: Callable[[], Any]) -> Any:
        """Run one optimizer step's micro-batches; returns what `finish` needs."""
        ...

    def finish(self, gradients: Any) -> dict[str, float]:
        """Leave the gradient in ``p.grad``; returns the step's statistics."""
        ...

    def step(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        """``finish(accumulate(data_provider))``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def build_sum(
    cfg: Any,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    lambdas: Mapping[str, float],
    *,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> Method:
    """Plain accumulation (``sum``, and the scaled sums, whose losses come rescaled)."""
    return SumMethod(
        model,
        loss_fns,
        lambdas,
        cfg.accumulation_steps,
        freeze_bn=cfg.freeze_bn,
        autocast_dtype=autocast_dtype,
        scaler=scaler,
    )


def build_conductor(
    cfg: Any,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    lambdas: Mapping[str, float],
    *,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    resolver: Any = None,
) -> Method:
    """The conductor with every setting of the recipe's ``conductor`` section."""
    config = cfg.library_config()
    return GradientConductor(
        model,
        loss_fns,
        lambdas,
        config=config,
        autocast_dtype=autocast_dtype,
        scaler=scaler,
        resolver=resolver,
        split=model_split(model) if config.gradients_at == "representation" else None,
    )


def conductor_with(
    make_resolver: Callable[[Any, Mapping[str, LossFn]], Any],
) -> Callable[..., Method]:
    """A method-table builder: the conductor with the resolver ``make_resolver(cfg, loss_fns)``
    (a TorchJD weighting, DB-MTL's), sharing the conductor's accumulation, momentum and
    write-back (the conductor's own resolution settings are then unused)."""

    def build(
        cfg: Any,
        model: nn.Module,
        loss_fns: Mapping[str, LossFn],
        lambdas: Mapping[str, float],
        *,
        autocast_dtype: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
    ) -> Method:
        return build_conductor(
            cfg,
            model,
            loss_fns,
            lambdas,
            autocast_dtype=autocast_dtype,
            scaler=scaler,
            resolver=make_resolver(cfg, loss_fns),
        )

    return build


def model_split(model: nn.Module) -> tuple[Any, Any]:
    """``(model.trunk, model.heads)`` for ``conductor.gradients_at: representation``; a model
    without both is the user's to fix (exit 2)."""
    module = getattr(model, "module", model)  # under DDP, the wrapped model
    trunk, heads = getattr(module, "trunk", None), getattr(module, "heads", None)
    if not (callable(trunk) and callable(heads)):
        raise UsageError(
            f"conductor.gradients_at: representation needs the model ({type(module).__name__}) "
            "to say where its shared trunk ends: add trunk(x) and heads(z) to your model, with "
            "trunk(x) -> z (one tensor, the representation the losses share), heads(z) -> the "
            "output the losses receive, and model(x) == heads(trunk(x)); or leave "
            "conductor.gradients_at at parameters"
        )
    return trunk, heads


class SumMethod:
    """Plain gradient accumulation of ``Σ_k λ_k L_k / N`` with one backward per micro-batch.

    BatchNorm layers are treated as the conductor treats them (``freeze_bn``), so a comparison
    isolates how the gradients are combined. Under DDP the gradient is all-reduced once, on the
    last micro-batch (``no_sync`` before it), as in any DDP accumulation loop.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fns: Mapping[str, LossFn],
        lambdas: Mapping[str, float],
        accumulation_steps: int,
        *,
        freeze_bn: bool = True,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.loss_names = list(loss_fns)
        self.loss_fns = dict(loss_fns)
        self.accumulation_steps = accumulation_steps
        self.freeze_bn = freeze_bn
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.device = self._params[0].device
        self._lambdas = torch.tensor(
            [float(lambdas[n]) for n in self.loss_names], device=self.device
        )
        self._step = 0

    def step(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        return self.finish(self.accumulate(data_provider))

    def finish(self, gradients: dict[str, float]) -> dict[str, float]:
        """Nothing left to do: `accumulate` left the gradient in ``p.grad``."""
        return gradients

    def accumulate(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        """The backwards of the N micro-batches, into ``p.grad``, and the step's statistics (its
        one host sync)."""
        n = self.accumulation_steps
        sums = torch.zeros(len(self.loss_names), device=self.device)
        with frozen_batchnorm(self.model, self.freeze_bn):
            for i in range(n):
                x, target = data_provider()
                with autocast(self.device, self.autocast_dtype):
                    output = call_model(self.model, x)
                    values = torch.stack(
                        [self.loss_fns[k](output, target).float() for k in self.loss_names]
                    )
                sums += values.detach()
                total = self.objective(values) / n
                if self.scaler is not None:
                    total = self.scaler.scale(total)
                sync = i == n - 1 or not hasattr(self.model, "no_sync")
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    total.backward()
        norm = _grad_norm([p.grad for p in self._params if p.grad is not None])
        if self.scaler is not None and self.scaler.is_enabled():
            norm = norm / self.scaler.scale(torch.ones((), device=self.device))
        # The one host-device sync of the step: loss sums and the gradient norm together.
        host = torch.cat([sums / n, norm.reshape(1)]).tolist()
        means, grad_norm = host[:-1], host[-1]
        skipped = not math.isfinite(grad_norm)
        if skipped and (self.scaler is None or not self.scaler.is_enabled()):
            for p in self._params:  # nothing for the optimizer to apply
                p.grad = None
        if not skipped:
            self._step += 1
        stats = {f"loss/{k}": v for k, v in zip(self.loss_names, means, strict=True)}
        lam = self._lambdas.tolist()
        stats["loss/total"] = sum(w * v for w, v in zip(lam, means, strict=True))
        stats["final_grad_norm"] = grad_norm
        stats["skipped"] = float(skipped)
        stats["step"] = float(self._step)
        return stats

    def objective(self, values: torch.Tensor) -> torch.Tensor:
        """What one micro-batch's backward differentiates, from its K loss values: ``Σ λ_k L_k``
        (the scalarising peers in ``peers.py`` change only this)."""
        return (values * self._lambdas).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state["step"])


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖g‖ over every gradient tensor; with FSDP's DTensor shards, the squared norms of this
    rank's shards summed over the ranks (one one-number all-reduce)."""
    mesh = next((g.device_mesh for g in grads if hasattr(g, "device_mesh")), None)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local)))
    if mesh is None:
        return norm
    square = norm.square().reshape(1)
    torch.distributed.all_reduce(square, group=mesh.get_group())
    return square.sqrt()[0]


class InitialScaleMethod:
    """A method trained on ``L_k / L_k⁽⁰⁾`` (``loss_scale: initial``).

    On its first step it draws that step's micro-batches, measures every loss's mean over them
    with the initial weights (no graph; BatchNorm statistics frozen; averaged over the ranks of a
    distributed run), then hands the same micro-batches to the method, so the first step trains on
    exactly the data it was measured on and the data stream is not shifted. The references are
    kept in the state, so a resumed run divides by the same numbers. Anything else is the
    wrapped method's.
    """

    def __init__(
        self,
        method: Method,
        scale: InitialScale,
        model: nn.Module,
        raw_loss_fns: Mapping[str, LossFn],
        accumulation_steps: int,
        *,
        freeze_bn: bool,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.method, self.scale, self.model = method, scale, model
        self.raw_loss_fns = dict(raw_loss_fns)
        self.accumulation_steps = accumulation_steps
        self.freeze_bn, self.autocast_dtype = freeze_bn, autocast_dtype

    def step(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        return self.finish(self.accumulate(data_provider))

    def accumulate(self, data_provider: Callable[[], Any]) -> Any:
        if self.scale.reference is None:
            batches = [data_provider() for _ in range(self.accumulation_steps)]
            self.scale.reference = self._measure(batches)
            replay = iter(batches)
            data_provider = functools.partial(next, replay)
        return self.method.accumulate(data_provider)

    def finish(self, gradients: Any) -> dict[str, float]:
        return self.method.finish(gradients)

    @torch.no_grad()
    def _measure(self, batches: list[Any]) -> torch.Tensor:
        """Each loss's mean over ``batches`` (K-vector on the model's device, float32)."""
        device = next(self.model.parameters()).device
        total = torch.zeros(len(self.scale.names), device=device)
        with frozen_batchnorm(self.model, self.freeze_bn):
            for x, target in batches:
                with autocast(device, self.autocast_dtype):
                    output = call_model(self.model, x)
                    values = [self.raw_loss_fns[n](output, target) for n in self.scale.names]
                total += torch.stack([v.float() for v in values])
        mean = total / len(batches)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)  # SUM (gloo has no AVG)
            mean /= torch.distributed.get_world_size()
        return mean

    def state_dict(self) -> dict[str, Any]:
        reference = self.scale.reference
        return {
            "method": self.method.state_dict(),
            "loss_reference": None if reference is None else reference.detach().cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        reference = state["loss_reference"]
        device = next(self.model.parameters()).device
        self.scale.reference = None if reference is None else reference.to(device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)
