"""The conductor under FSDP2 (``torch.distributed.fsdp.fully_shard``): every part holds this
rank's shard only (docs/algorithm.md, "Sharded models").

A model whose trainable parameters are ``DTensor`` shards over one 1-D device mesh is trained
with the same three parts as an unsharded one, through two subclasses at their seams:

* :class:`ShardedAccumulator`: the K×P stack holds each rank's ``P/world`` elements. Each loss's
  gradient comes from its own ``backward()``: FSDP's reduce-scatter hands every rank its shard
  of that loss's gradient averaged over the ranks. The Gram matrix, the loss sums and the dots
  with last step's gradients are sums of local parts: one all-reduce of K² + 2K numbers a step,
  after which every rank holds the same numbers and takes the same decisions.
* :class:`ShardedUpdater`: the merge, momentum and Lion are element-wise, so local; the trust
  ratio's per-tensor norms and the written norm are sums of squares over the ranks; ``p.grad``
  is a ``DTensor`` over the update buffer's shard.

The conductor's state is sharded the same way: per-parameter ``DTensor`` s for
``torch.distributed.checkpoint``, which reshards them when a run resumes on another number of
ranks.
"""

from __future__ import annotations

import io
import math
from typing import Any

import torch
import torch.distributed as dist

from ._accumulate import Accumulator, split
from ._update import Updater, apply_trust_ratio_

# Entries of a sharded conductor state that are DTensors; the rest travels as one bytes object.
SHARDED_KEYS = ("prev_grads", "momentum")


def shard_group(params: list[torch.Tensor], names: list[str]) -> Any:
    """The process group the trainable parameters are sharded over, or None when none is a
    ``DTensor``. Raises what the conductor does not support: a mix of sharded and unsharded
    parameters, several meshes, and placements other than FSDP2's ``Shard(0)`` on a 1-D mesh."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.tensor import DTensor, Shard

    sharded = [isinstance(p, DTensor) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        plain = [n for n, s in zip(names, sharded, strict=True) if not s]
        raise ValueError(
            f"{len(plain)} of {len(params)} trainable parameters are not sharded by fully_shard "
            f"(e.g. {plain[:3]}); the conductor needs all or none sharded. Call "
            "fully_shard(model) on the root module as well, after its submodules, so that it "
            "takes the parameters no submodule holds"
        )
    meshes = {p.device_mesh for p in params}  # type: ignore[attr-defined]
    placements = {tuple(p.placements) for p in params}  # type: ignore[attr-defined]
    mesh = next(iter(meshes))
    if len(meshes) != 1 or mesh.ndim != 1 or placements != {(Shard(0),)}:
        raise ValueError(
            "the conductor supports fully_shard over one 1-D device mesh (placements Shard(0)); "
            f"got {len(meshes)} mesh(es) of {mesh.ndim} dimension(s) and placements "
            f"{sorted(map(str, placements))}. HSDP (a 2-D mesh) and other DTensor layouts are "
            "not supported"
        )
    return mesh.get_group()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local()  # type: ignore[attr-defined]


def _as_dtensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard, shared, not copied) as a DTensor laid out like ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _by_name(
    names: list[str], locals_: list[torch.Tensor], params: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {n: _as_dtensor(t, p) for n, t, p in zip(names, locals_, params, strict=True)}


class ShardedAccumulator(Accumulator):
    """An :class:`Accumulator` of this rank's shards (see the module's docstring). ``group``:
    the process group the parameters are sharded over; ``names``: their names, the keys of the
    state dict. Full mode takes K sequential backwards (a batched one cannot reach FSDP's
    reduce-scatter); ``ddp_sync`` has no role, FSDP averages the gradients itself."""

    def __init__(self, *args: Any, names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = names
        self.batched_ok = False
        self._world = dist.get_world_size(self.group)

    _local = staticmethod(_local)

    def _synchronise(self) -> None:
        """Nothing to send: each row is already this rank's shard of the loss's mean gradient,
        and the per-micro-batch Gram matrices are partial sums, added up with the summary."""
        self._all_micro_grams = torch.stack(self._micro_grams) if self.measures_noise else None

    def _noise_unit(self) -> int:
        """FSDP's micro-batch gradient is already the mean over the ranks: one sample of the
        noise is ``world`` micro-batches of one rank."""
        return self._world

    def _over_ranks(self, summary: torch.Tensor) -> torch.Tensor:
        """Sum the local partial dot products over the ranks (the Gram matrix, the dots with
        last step's gradients, the per-micro-batch Gram matrices), and average the loss sums."""
        k = len(self.loss_names)
        summary[k * k : k * k + k] /= self._world
        dist.all_reduce(summary, group=self.group)
        return summary

    def _grads(self, loss: torch.Tensor, retain: bool = False) -> tuple[torch.Tensor | None, ...]:
        """One loss's backward; FSDP leaves this rank's shard of its averaged gradient in
        ``p.grad``, which is cleared before (FSDP would add to it) and after."""
        for p in self.params:
            p.grad = None
        loss.backward(retain_graph=retain)
        grads = tuple(None if p.grad is None else _local(p.grad) for p in self.params)
        for p in self.params:
            p.grad = None
        return grads

    def state_dict(self) -> dict[str, Any]:
        """The previous gradients as one DTensor per loss and parameter (zeros before the first
        step, so that the structure ``torch.distributed.checkpoint`` loads into is fixed)."""
        state = super().state_dict()
        rows = [split(row, self._numels, self._shapes) for row in self.prev_stack]
        state["prev_grads"] = {
            loss: _by_name(self.names, row, self.params)
            for loss, row in zip(self.loss_names, rows, strict=True)
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["prev_grads"]
        rows = [split(row, self._numels, self._shapes) for row in self.prev_stack]
        with torch.no_grad():
            for loss, row in zip(self.loss_names, rows, strict=True):
                for n, view in zip(self.names, row, strict=True):
                    view.copy_(_local(saved[loss][n]))
        super().load_state_dict({**state, "prev_grads": None, "has_prev": False})
        self.has_prev = bool(state["has_prev"])


class ShardedUpdater(Updater):
    """An :class:`Updater` of this rank's shards; ``group`` and ``names`` as in
    :class:`ShardedAccumulator`. ``p.grad`` is a DTensor over the update buffer's shard."""

    def __init__(self, *args: Any, names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = names
        self._grads = [
            _as_dtensor(v, p) if v.dtype == p.dtype else None
            for v, p in zip(self._views, self.params, strict=True)
        ]

    _local = staticmethod(_local)

    def _trust_ratio(self) -> None:
        cfg = self.config
        apply_trust_ratio_(
            self._views,
            [_local(p) for p in self.params],
            cfg.trust_ratio_coef,  # type: ignore[arg-type]
            cfg.trust_ratio_clip,
            cfg.eps,
            group=self.group,
        )

    def _norm(self) -> float:
        square = torch.linalg.vector_norm(self.buffer).square().reshape(1).float()
        dist.all_reduce(square, group=self.group)
        return math.sqrt(float(square))

    def _write(self) -> None:
        for p, view, grad in zip(self.params, self._views, self._grads, strict=True):
            p.grad = grad if grad is not None else _as_dtensor(view.to(p.dtype), p)

    def momentum_state(self) -> Any:
        """One DTensor per parameter over the momentum buffer's shard (shared, not copied)."""
        buffer = self.momentum.buffer
        if buffer is None:
            return None
        views = split(buffer, [v.numel() for v in self._views], [v.shape for v in self._views])
        return _by_name(self.names, views, self.params)

    def load_momentum(self, state: Any) -> None:
        buffer = self.momentum.buffer
        if buffer is None:
            return
        views = split(buffer, [v.numel() for v in self._views], [v.shape for v in self._views])
        with torch.no_grad():
            for n, view in zip(self.names, views, strict=True):
                view.copy_(_local(state[n]))


def pack(state: dict[str, Any]) -> dict[str, Any]:
    """A conductor state for ``torch.distributed.checkpoint``: the DTensors as they are, every
    other entry (identical on every rank, some of varying size) in one bytes object."""
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k not in SHARDED_KEYS}, buffer)
    return {"host": buffer.getvalue(), **{k: state[k] for k in SHARDED_KEYS}}


def unpack(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack`; a state without ``host`` is returned as it is."""
    if "host" not in state:
        return dict(state)
    host = torch.load(io.BytesIO(state["host"]), weights_only=True)
    return {**host, **{k: state[k] for k in SHARDED_KEYS}}
