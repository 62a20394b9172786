"""Representation mode: per-loss gradients at the shared representation, not the parameters
(docs/algorithm.md, "Gradients at the representation").

The model is split in two callables, ``trunk(x) -> z`` and ``heads(z) -> output``. Per
micro-batch: one forward of the trunk; the heads run on ``z`` detached, so the K losses'
gradients with respect to ``z`` cost K backwards through the heads only (one batched backward
when it can run); the micro-batch's merge weights are decided on their K×K Gram matrix; then ONE
backward through the trunk carries ``Σ_k w_k ∂(λ_k L_k / N)/∂z``. The parameters the heads reach
get ``Σ_k`` of their exact per-loss gradients. Only a P-sized buffer is kept: no K×P stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ._accumulate import Accumulator, DataProvider, Gradients, refusing_reentrant
from ._distributed import distributed
from ._model_io import autocast, call_model, frozen_batchnorm
from ._noise import MicroBatchNoise

Decide = Callable[[torch.Tensor], Any]
"""One micro-batch's K×K Gram matrix (float64, host) -> a ``Resolved`` (merge weights)."""


class RepresentationAccumulator(Accumulator):
    """An :class:`Accumulator` that merges during accumulation (see the module's docstring).

    ``trunk``, ``heads``: the model's split; ``decide``: the resolver's decision for one
    micro-batch's Gram matrix, scaled as if the micro-batch were the whole step (so the norm cap
    reads each loss's own gradient, whatever N). Its one P-sized row is both the step's merged
    gradient and, on a step between full ones, what :meth:`accumulate_merged` fills.
    """

    def __init__(
        self,
        *args: Any,
        trunk: Callable[..., Any],
        heads: Callable[..., Any],
        decide: Decide,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.trunk, self.heads, self.decide = trunk, heads, decide

    def _allocate(self, k: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """One P-sized row: the merged gradient."""
        return [torch.zeros(1, numel, dtype=dtype, device=self.device)]

    @property
    def prev_stack(self) -> torch.Tensor:
        """No previous per-loss gradients are kept: the row itself (never read as such)."""
        return self._stacks[0]

    def commit(self, norms: list[float]) -> None:
        self.prev_norms = norms

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "has_prev": False, "prev_grads": None}

    # ------------------------------------------------------------------ the full step

    def accumulate(self, data_provider: DataProvider) -> Gradients:
        k = len(self.loss_names)
        self.stack[0].zero_()
        self._loss_sums.zero_()
        self._gram_sum = torch.zeros(k, k, dtype=torch.float64)
        self._weight_sum = torch.zeros(k, dtype=torch.float64)
        self._counts: dict[str, float] = {}
        self._micro_grams = []
        with frozen_batchnorm(self.module, self.config.freeze_bn), refusing_reentrant():
            for _ in range(self.config.accumulation_steps):
                self._micro_batch_at_representation(data_provider)
        return self.summarize_merged(self._step_decisions())

    def _forward(self, x: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z = trunk(x)``, the heads on ``z`` detached, the K loss values (float32)."""
        with autocast(self.device, self.autocast_dtype), self._watched_forward():
            z = call_model(self.trunk, x)
            if not isinstance(z, torch.Tensor):
                raise TypeError(
                    "trunk(x) must return one tensor (the shared representation z that "
                    f"heads(z) takes), got {type(z).__name__}"
                )
            cut = z.detach().requires_grad_(True)
            output = self.heads(cut)
            values = torch.stack([self._loss(n, output, target).float() for n in self.loss_names])
        return z, cut, values

    def _micro_batch_at_representation(self, data_provider: DataProvider) -> None:
        x, target = self._batch(data_provider)
        z, cut, values = self._forward(x, target)
        self._loss_sums += values.detach()
        weighted = values * self._scales
        if self.scaler is not None:
            weighted = self.scaler.scale(weighted)
        reps = self._representation_grads(weighted, cut)  # (K, *z.shape)
        self._add_into_row(self._grads(weighted.sum()))  # the heads' exact gradients
        flat = reps.reshape(len(self.loss_names), -1).to(torch.float64)
        gram = flat @ flat.T
        if self.scaler is not None and self.scaler.is_enabled():
            inverse = self.scaler.scale(torch.ones((), device=self.device)).reciprocal()
            gram = gram * inverse.double().square()
        gram = gram.cpu()  # a host-device sync per micro-batch: the weights come before the trunk
        self._gram_sum += gram
        if self.measures_noise:
            self._micro_grams.append(gram)
        n = self.config.accumulation_steps
        if torch.isfinite(gram).all():
            resolved = self.decide(gram * (n * n))
            weights = resolved.weights.to(torch.float64)
            for key, value in resolved.stats.items():
                self._counts[key] = self._counts.get(key, 0.0) + value
        else:  # the step will be skipped; any weights do
            weights = torch.ones(len(self.loss_names), dtype=torch.float64)
        self._weight_sum += weights
        merged = torch.tensordot(weights.to(self.device, reps.dtype), reps, dims=1)
        self._trunk_backward(z, merged)

    def _trunk_backward(self, z: torch.Tensor, grad_z: torch.Tensor) -> None:
        """One backward through the trunk, added to the row (nothing when z has no graph: an
        identity trunk)."""
        if z.requires_grad:
            self._add_into_row(
                torch.autograd.grad(z, self.params, grad_outputs=grad_z, allow_unused=True)
            )

    def _representation_grads(self, weighted: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """``∂ weighted_k / ∂z`` for every k: one batched backward through the heads, or K
        sequential ones when it cannot run (``per_loss_backward`` as in full mode; "benchmark"
        acts as "auto" here). The heads' graph is kept for their parameters' backward."""
        if self.batched_ok is not False:
            try:
                (grads,) = torch.autograd.grad(
                    weighted,
                    cut,
                    grad_outputs=self._eye,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            except RuntimeError:
                if self.batched_ok:
                    raise
                self.batched_ok = False
            else:
                self.batched_ok = True
                return grads if grads is not None else cut.new_zeros((len(weighted), *cut.shape))
        rows = []
        for k in range(len(weighted)):
            (grad,) = torch.autograd.grad(weighted[k], cut, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(cut) if grad is None else grad)
        return torch.stack(rows)

    def _step_decisions(self) -> tuple[torch.Tensor, Any, MicroBatchNoise | None]:
        """The step's Gram matrix (the sum of its micro-batches': the Gram matrix of the step's
        stacked representation gradients), the mean merge weights, the summed statistics and
        (when measured) the noise of the micro-batches' representation gradients, the same on
        every rank under ``ddp_sync="grads"`` (one small all-reduce, in which each rank writes
        its per-micro-batch Gram matrices into its own slots)."""
        from ._resolve import Resolved

        k, keys = len(self.loss_names), list(self._counts)
        micro = torch.stack(self._micro_grams) if self.measures_noise else None
        parts = [
            self._gram_sum.flatten(),
            self._weight_sum,
            torch.tensor([self._counts[key] for key in keys], dtype=torch.float64),
        ]
        count = self.config.accumulation_steps
        world = 1
        if self.config.ddp_sync == "grads" and distributed(self.group):
            world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            if micro is not None:
                slots = micro.new_zeros(world, *micro.shape)
                slots[rank] = micro
                parts.append(slots.flatten())
            # Per rank each g_k carries 1/N, over the ranks 1/(N·world): the Gram matrix of the
            # stacked gradients is summed, scaled by 1/world² (one process that saw every
            # micro-batch gets the same numbers).
            summary = torch.cat(parts).to(self.device)
            summary[: k * k] /= world * world
            dist.all_reduce(summary, group=self.group)
            host, count = summary.cpu(), count * world
        else:
            host = torch.cat(parts if micro is None else [*parts, micro.flatten()])
        gram = host[: k * k].reshape(k, k)
        weights = host[k * k : k * k + k] / count
        stats = dict(zip(keys, host[k * k + k : k * k + k + len(keys)].tolist(), strict=True))
        for key in stats:  # counts are summed over the micro-batches, factors averaged
            if key.startswith("norm_scale/"):
                stats[key] /= count
        noise = None
        if micro is not None:
            tail = host[k * k + k + len(keys) :].reshape(count, k, k)
            noise = self._noise_of(tail)
        return gram, Resolved(weights, stats), noise

    # ------------------------------------------------------------------ steps between full ones

    def _merged_micro_batch(self, data_provider: DataProvider, merge: torch.Tensor) -> None:
        """The heads' exact gradients, and one backward through the trunk of the weighted
        representation gradient: the cost of plain accumulation plus one pass over the heads."""
        x, target = self._batch(data_provider)
        z, cut, values = self._forward(x, target)
        self._loss_sums += values.detach()
        total, merged = (values * self._scales).sum(), (values * merge).sum()
        if self.scaler is not None:
            total, merged = self.scaler.scale(total), self.scaler.scale(merged)
        (grad_z,) = torch.autograd.grad(merged, cut, retain_graph=True, allow_unused=True)
        self._add_into_row(self._grads(total))
        if grad_z is not None:
            self._trunk_backward(z, grad_z)
