"""Accumulation: one gradient per loss over the step's micro-batches (docs/algorithm.md, step 1).

The K per-loss gradients live in one flat K×P stack (row k = g_k), so the Gram matrix is K(K+1)/2
dot products and every later pass over them is one fused operation over P elements. Two stacks
swap roles each step: this step's gradients become the next step's previous ones without a copy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ._config import ConductorConfig
from ._distributed import distributed, mean_over_ranks_, summed_over_ranks
from ._model_io import (
    REENTRANT_MESSAGE,
    autocast,
    call_model,
    frozen_batchnorm,
    is_reentrant_checkpoint_error,
    reentrant_checkpoint_check,
)
from ._noise import MicroBatchNoise

if TYPE_CHECKING:
    from ._resolve import Resolved

LossFn = Callable[[Any, Any], torch.Tensor]
DataProvider = Callable[[], Any]


@dataclass
class Gradients:
    """What accumulation hands on to resolution and update.

    ``stack`` (K×P, on the device, unscaled) holds g_1..g_K; the rest was read from the device in
    one transfer: their Gram matrix (K×K, float64, on the host), each loss's mean value over the
    step, and cos(g_k, g_k of the previous step) (None on the first step).

    When the merge already happened during accumulation (representation mode, and the steps
    between full ones with ``resolve_every`` > 1), ``merged`` is the P-sized ``Σ_k w_k g_k``,
    ``merged_sq`` its squared norm, and ``stack`` is ``merged`` as a 1×P view. ``gram`` is then
    the Gram matrix of the step's representation gradients (None on a step between full ones,
    which computes no per-loss gradient), and ``decided`` the merge weights (mean over the
    micro-batches) with the resolution's statistics summed over them.

    ``noise`` (when the config measures it): the step's per-micro-batch Gram matrices, over all
    ranks, from which its signal and noise are estimated.
    """

    stack: torch.Tensor
    gram: torch.Tensor | None
    loss_means: list[float]
    prev_cosines: list[float] | None
    merged: torch.Tensor | None = None
    merged_sq: float = math.nan
    decided: Resolved | None = None
    noise: MicroBatchNoise | None = None

    @property
    def full(self) -> bool:
        """Whether this step computed per-loss gradients (a full step)."""
        return self.gram is not None

    @property
    def norms(self) -> list[float]:
        """‖g_k‖ from the Gram matrix's diagonal (NaN on a step between full ones)."""
        if self.gram is None:
            return [math.nan] * len(self.loss_means)
        return [math.sqrt(max(x, 0.0)) for x in self.gram.diagonal().tolist()]

    @property
    def nonfinite(self) -> list[bool]:
        """Which losses have a NaN/inf gradient (or one whose squared norm overflows).

        In a batched backward a NaN from one loss reaches every row (0·NaN = NaN), so a loss is
        blamed by its own value first, and by its gradient only when every value is finite. A
        merged gradient that is not finite when nothing else is blames every loss.
        """
        bad_values = [not math.isfinite(x) for x in self.loss_means]
        merged_bad = self.merged is not None and not math.isfinite(self.merged_sq)
        if self.gram is None:
            bad = [merged_bad] * len(bad_values)
        else:
            bad = [not math.isfinite(x) for x in self.gram.diagonal().tolist()]
            if merged_bad and not any(bad):
                bad = [True] * len(bad_values)
        return bad_values if any(bad) and any(bad_values) else bad


class Accumulator:
    """Fills the K×P stack over one step's micro-batches: full or stochastic, batched or
    sequential per-loss backward, under autocast and a GradScaler when given, and synchronises
    the accumulators over DDP ranks when ``config.ddp_sync == "grads"``.

    * ``module``: the model to run (the module a DDP wrapper holds: DDP's own all-reduce never
      fires, the one collective is ours); ``params``: its trainable parameters, on one device.
    * ``loss_fns``, ``lambdas``: ``{name: fn(output, target) -> scalar}`` and ``{name: λ}``.
    * ``config``: the :class:`ConductorConfig` (``accumulation_steps``, ``accumulation``,
      ``per_loss_backward``, ``freeze_bn``, ``grad_dtype``, ``ddp_sync``, ``eps`` act here).
    * ``autocast_dtype``, ``scaler``: as in :class:`GradientConductor`.
    * ``group``: the process group of the DDP wrapper (None: the default group).
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[torch.Tensor],
        loss_fns: dict[str, LossFn],
        lambdas: dict[str, float],
        config: ConductorConfig,
        *,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        group: Any = None,
    ) -> None:
        self.module, self.params, self.config = module, params, config
        self.loss_fns, self.loss_names = loss_fns, list(loss_fns)
        self.autocast_dtype, self.scaler, self.group = autocast_dtype, scaler, group
        self.device = params[0].device
        self._shapes = [tuple(self._local(p).shape) for p in params]
        self._numels = [self._local(p).numel() for p in params]
        k, numel = len(self.loss_names), sum(self._numels)
        self._stacks = self._allocate(k, numel, getattr(torch, config.grad_dtype))
        self._stack_views = [
            [split(row, self._numels, self._shapes) for row in s] for s in self._stacks
        ]
        self._current = 0
        self._fresh = [False] * k  # rows not yet written this step
        self._loss_sums = torch.zeros(k, dtype=torch.float32, device=self.device)
        self._eye = torch.eye(k, dtype=torch.float32, device=self.device)
        self._scales = self._backward_scales(lambdas)
        # λ_k / N: each loss on every micro-batch (steps between full ones).
        self._mean_scales = torch.tensor(
            [lambdas[n] / config.accumulation_steps for n in self.loss_names],
            dtype=torch.float32,
            device=self.device,
        )
        self.has_prev = False
        self.prev_norms = [0.0] * k
        # Batched backward (True) or sequential (False); None until the first full-mode
        # micro-batch decides ("auto" tries the batched one, "benchmark" times both).
        self.batched_ok: bool | None = {"batched": True, "sequential": False}.get(
            config.per_loss_backward
        )
        # Seconds of one micro-batch's per-loss backward each way, when "benchmark" timed them.
        self.backward_timings: dict[str, float] | None = None
        # This step's per-micro-batch K×K Gram matrices (as accumulated: scaled, λ/N units), kept
        # when the config measures the noise; after synchronisation those of every rank.
        self.measures_noise = config.measures_noise
        self._micro_grams: list[torch.Tensor] = []
        self._all_micro_grams: torch.Tensor | None = None
        self._forward_checked = False  # the first forward is watched for reentrant checkpoints

    # ------------------------------------------------------------------ public

    @property
    def stack(self) -> torch.Tensor:
        """This step's K×P accumulators."""
        return self._stacks[self._current]

    @property
    def prev_stack(self) -> torch.Tensor:
        """The previous step's raw K×P gradients (meaningful once ``has_prev``)."""
        return self._stacks[1 - self._current]

    @property
    def backward_mode(self) -> str:
        """``batched``, ``sequential``, or ``per_loss_backward`` itself until decided."""
        return {None: self.config.per_loss_backward, True: "batched", False: "sequential"}[
            self.batched_ok
        ]

    def accumulate(self, data_provider: DataProvider) -> Gradients:
        """Run the step's N micro-batches into the stack, synchronise it over DDP ranks if asked,
        and read what resolution needs from the device (:meth:`summarize`)."""
        self._fresh = [True] * len(self.loss_names)  # no zeroing pass: first writes copy
        self._loss_sums.zero_()
        self._micro_grams = []
        with frozen_batchnorm(self.module, self.config.freeze_bn), refusing_reentrant():
            for i in range(self.config.accumulation_steps):
                self._micro_batch(data_provider, i)
        self._synchronise()
        return self.summarize()

    def summarize(self) -> Gradients:
        """Unscale the stack (GradScaler) and read its Gram matrix, the loss means and the dots
        with last step's gradients in one transfer: the one host-device sync of the step."""
        acc, prev, k = self.stack, self.prev_stack, len(self.loss_names)
        micro = self._all_micro_grams if self.measures_noise else None
        if self.scaler is not None and self.scaler.is_enabled():
            inverse = self.scaler.scale(torch.ones((), device=self.device)).reciprocal()
            acc.mul_(inverse)
            micro = None if micro is None else micro * inverse.square()
        # Dot products rather than a K×P @ P×K GEMM or a batched GEMV: with P in the tens of
        # millions those pick slow reduction kernels (measured: ~19 ms for P = 25M on an H100),
        # while each dot is one bandwidth-bound pass.
        parts = [gram_of(acc).flatten(), self._loss_sums]
        if self.has_prev:
            parts.append(torch.stack([torch.dot(acc[i], prev[i]) for i in range(k)]).float())
        if micro is not None:
            parts.append(micro.flatten().float())
        host = self._over_ranks(torch.cat(parts)).to("cpu", torch.float64)  # sync
        gram = host[: k * k].reshape(k, k)
        means = (host[k * k : k * k + k] / self.config.accumulation_steps).tolist()
        prev_cosines = None
        if self.has_prev:
            norms = [math.sqrt(max(x, 0.0)) for x in gram.diagonal().tolist()]
            eps = self.config.eps
            dots = host[k * k + k : k * k + 2 * k].tolist()
            prev_cosines = [
                d / (n * pn) if n * pn > eps else 0.0
                for d, n, pn in zip(dots, norms, self.prev_norms, strict=True)
            ]
        noise = None
        if micro is not None:
            tail = host[host.numel() - micro.numel() :].reshape(micro.shape)
            noise = self._noise_of(tail)
        return Gradients(acc, gram, means, prev_cosines, noise=noise)

    def _noise_of(self, micro_grams: torch.Tensor) -> MicroBatchNoise:
        """The step's noise from its per-micro-batch Gram matrices as accumulated (each gradient
        carries λ/N): scaled by N² to the units of a micro-batch's own gradient."""
        n = self.config.accumulation_steps
        return MicroBatchNoise(micro_grams * (n * n), unit=self._noise_unit())

    def _noise_unit(self) -> int:
        """Micro-batches of one rank per sample of the noise estimate: here, one."""
        return 1

    def _note_micro_gram(self, grads: Iterable[torch.Tensor | None]) -> None:
        """Keep one micro-batch's K×K Gram matrix from its batched (K, *shape) per-parameter
        gradients (None: a parameter no loss reached): one K×numel product per parameter."""
        k = len(self.loss_names)
        gram = torch.zeros(k, k, dtype=torch.float32, device=self.device)
        for g in grads:
            if g is not None:
                flat = g.reshape(k, -1).float()
                gram.addmm_(flat, flat.T)
        self._micro_grams.append(gram)

    def accumulate_merged(self, data_provider: DataProvider, weights: torch.Tensor) -> Gradients:
        """A step between full ones (``resolve_every`` > 1): one backward per micro-batch of
        ``Σ_k w_k λ_k L_k / N`` with the last full step's merge ``weights`` (K), into one P-sized
        row; per-loss gradients are not computed. The row is this step's stack's first, free
        until the next full step (the previous gradients stay in the other stack)."""
        row = self.stack[0]
        row.zero_()
        self._loss_sums.zero_()
        merge = weights.to(self.device, torch.float32) * self._mean_scales
        with frozen_batchnorm(self.module, self.config.freeze_bn):
            for _ in range(self.config.accumulation_steps):
                self._merged_micro_batch(data_provider, merge)
        return self.summarize_merged(None)

    def summarize_merged(self, decided: Any) -> Gradients:
        """Unscale the merged row, average it over the DDP ranks when ``ddp_sync="grads"``, and
        read its squared norm and the loss means in one transfer; ``decided`` (representation
        mode: the step's Gram matrix, its decisions and its noise) goes along."""
        row = self.stack[0]
        if self.scaler is not None and self.scaler.is_enabled():
            row.mul_(self.scaler.scale(torch.ones((), device=self.device)).reciprocal())
        if self.config.ddp_sync == "grads" and distributed(self.group):
            mean_over_ranks_(row, self.group)
            mean_over_ranks_(self._loss_sums, self.group)
        square = torch.dot(row, row).float().reshape(1)
        host = torch.cat([self._loss_sums, square]).to("cpu", torch.float64).tolist()  # sync
        means = [x / self.config.accumulation_steps for x in host[:-1]]
        gram, resolved, noise = (None, None, None) if decided is None else decided
        return Gradients(row[None], gram, means, None, row, host[-1], resolved, noise)

    def _merged_micro_batch(self, data_provider: DataProvider, merge: torch.Tensor) -> None:
        x, target = self._batch(data_provider)
        with autocast(self.device, self.autocast_dtype):
            output = call_model(self.module, x)
            values = torch.stack([self._loss(n, output, target).float() for n in self.loss_names])
        self._loss_sums += values.detach()
        total = (values * merge).sum()
        if self.scaler is not None:
            total = self.scaler.scale(total)
        self._add_into_row(self._grads(total))

    def _add_into_row(self, grads: Sequence[torch.Tensor | None]) -> None:
        """``row 0 += grads`` (None: a parameter this backward did not reach)."""
        views = self._stack_views[self._current][0]
        _foreach_into([(v, g) for v, g in zip(views, grads, strict=True) if g is not None], False)

    def commit(self, norms: list[float]) -> None:
        """The step was applied: its raw gradients become the next step's previous ones."""
        self.prev_norms = norms
        self.has_prev = True
        self._current = 1 - self._current

    def state_dict(self) -> dict[str, Any]:
        return {
            "has_prev": self.has_prev,
            "prev_grads": self.prev_stack.detach().clone() if self.has_prev else None,
            "prev_norms": torch.tensor(self.prev_norms, dtype=torch.float64),
            "batched_backward": self.batched_ok,
            "backward_timings": self.backward_timings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.has_prev = bool(state["has_prev"])
        self.prev_norms = [float(x) for x in state["prev_norms"].tolist()]
        if self.has_prev:
            self.prev_stack.copy_(state["prev_grads"])
        if self.config.per_loss_backward in ("auto", "benchmark"):
            self.batched_ok = state.get("batched_backward")
            self.backward_timings = state.get("backward_timings")

    # ------------------------------------------------------------------ seams for sharding

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        """The part of a parameter this process holds: all of it (a shard under FSDP)."""
        return param

    def _allocate(self, k: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """This step's and the previous step's K×P stacks."""
        return [torch.zeros(k, numel, dtype=dtype, device=self.device) for _ in "ab"]

    def _synchronise(self) -> None:
        """Under DDP with ``ddp_sync="grads"``: one flat collective for all K accumulators, and
        a small one for the loss sums and (when the noise is measured) every rank's
        per-micro-batch Gram matrices, each rank writing its own slots of a zero buffer."""
        micro = torch.stack(self._micro_grams) if self.measures_noise else None
        if self.config.ddp_sync == "grads" and distributed(self.group):
            mean_over_ranks_(self.stack, self.group)
            world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            k = len(self.loss_names)
            small = [self._loss_sums / world]
            if micro is not None:
                slots = micro.new_zeros(world, *micro.shape)
                slots[rank] = micro
                small.append(slots.flatten())
            summed = torch.cat(small)
            dist.all_reduce(summed, group=self.group)
            self._loss_sums.copy_(summed[:k])
            if micro is not None:
                micro = summed[k:].reshape(-1, k, k)
        self._all_micro_grams = micro

    def _over_ranks(self, summary: torch.Tensor) -> torch.Tensor:
        """The step's summary (Gram matrix, loss sums, dots with last step) as every rank must
        see it; here it already is."""
        return summary

    # ------------------------------------------------------------------ one micro-batch

    @staticmethod
    def _batch(data_provider: DataProvider) -> tuple[Any, Any]:
        batch = data_provider()
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"data_provider() must return (input, target), got {type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
            )
        return batch[0], batch[1]

    def _micro_batch(self, data_provider: DataProvider, index: int) -> None:
        x, target = self._batch(data_provider)
        k = len(self.loss_names)
        # Stochastic mode differentiates only the loss this micro-batch serves; the others are
        # computed for the statistics alone, without recording a graph.
        served = index % k if self.config.accumulation == "stochastic" else None
        with autocast(self.device, self.autocast_dtype), self._watched_forward():
            output = call_model(self.module, x)
            losses = []
            for j, name in enumerate(self.loss_names):
                with torch.set_grad_enabled(served is None or served == j):
                    losses.append(self._loss(name, output, target))
        values = torch.stack([loss.float() for loss in losses])  # (K,)
        self._loss_sums += values.detach()
        weighted = values * self._scales
        if self.scaler is not None:
            weighted = self.scaler.scale(weighted)
        if served is not None:
            self._add_row(served, self._grads(weighted[served]))
        elif k == 1:
            grads = self._grads(weighted[0])
            if self.measures_noise:
                self._note_micro_gram([None if g is None else g[None] for g in grads])
            self._add_row(0, grads)
        else:
            self._backward_full(weighted)

    def _watched_forward(self) -> Any:
        """The first forward of the accumulator, watched for reentrant checkpoints."""
        active, self._forward_checked = not self._forward_checked, True
        return reentrant_checkpoint_check(active)

    def _loss(self, name: str, output: Any, target: Any) -> torch.Tensor:
        loss = self.loss_fns[name](output, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss_fns[{name!r}] must return a scalar tensor, got {shape}")
        return loss

    def _backward_scales(self, lambdas: dict[str, float]) -> torch.Tensor:
        """λ_k / (micro-batches that serve loss k), so each g_k is a λ-weighted mean."""
        k, n = len(self.loss_names), self.config.accumulation_steps
        scales = []
        for j, name in enumerate(self.loss_names):
            served = n if self.config.accumulation == "full" else len(range(j, n, k))
            scales.append(lambdas[name] / served)
        return torch.tensor(scales, dtype=torch.float32, device=self.device)

    def _backward_full(self, weighted: torch.Tensor) -> None:
        if self.batched_ok is None and self.config.per_loss_backward == "benchmark":
            self._choose_backward(weighted)
        elif self.batched_ok is None:  # "auto": the batched one, unless it cannot run
            try:
                grads = self._batched_grads(weighted, retain=True)
            except RuntimeError:
                self.batched_ok = False
                self._backward_sequential(weighted, retain=False)
            else:
                self.batched_ok = True
                self._add_batched(grads)
        elif self.batched_ok:
            self._add_batched(self._batched_grads(weighted, retain=False))
        else:
            self._backward_sequential(weighted, retain=False)

    def _batched_grads(
        self, weighted: torch.Tensor, retain: bool
    ) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(
            weighted,
            self.params,
            grad_outputs=self._eye,
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain,
        )

    def _backward_sequential(
        self, weighted: torch.Tensor, retain: bool, accumulate: bool = True
    ) -> None:
        """K backwards over the retained graph (``accumulate=False`` only times them). When the
        noise is measured, the micro-batch's K gradients are held until its Gram matrix is taken
        (a transient K×P, as the batched backward holds)."""
        last = len(self.loss_names) - 1
        held = []
        for k in range(len(self.loss_names)):
            grads = self._grads(weighted[k], retain=retain or k < last)
            if accumulate and self.measures_noise:
                held.append(grads)
            elif accumulate:
                self._add_row(k, grads)
        if held:
            self._note_micro_gram(_stacked(held))
            for k, grads in enumerate(held):
                self._add_row(k, grads)

    def _choose_backward(self, weighted: torch.Tensor) -> None:
        """``per_loss_backward="benchmark"``, first full-mode micro-batch: time both ways on its
        graph, twice each (the first run of each pays one-time costs), and keep the faster for
        good. This micro-batch is accumulated once."""
        timings: dict[str, float] = {}
        try:
            times = []
            for attempt in range(2):
                start = self._clock()
                grads = self._batched_grads(weighted, retain=True)
                times.append(self._clock() - start)
                if attempt == 0:
                    self._add_batched(grads)
                del grads
            timings["batched"] = min(times)
            accumulated = True
        except RuntimeError:  # no batched backward for this model at all
            timings["batched"] = math.inf
            accumulated = False
        times = []
        for attempt in range(2):
            keep = attempt == 0 and not accumulated
            start = self._clock()
            self._backward_sequential(weighted, retain=attempt == 0, accumulate=keep)
            times.append(self._clock() - start)
        timings["sequential"] = min(times)
        if self.config.ddp_sync != "none" and distributed(self.group):
            # Every rank takes the same way: decided on the timings summed over the ranks.
            both = summed_over_ranks(
                [timings["batched"], timings["sequential"]], self.group, self.device
            )
            timings = dict(zip(("batched", "sequential"), both, strict=True))
        self.batched_ok = timings["batched"] <= timings["sequential"]
        self.backward_timings = timings

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add_batched(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """Accumulate batched (K, *shape) gradients, row k into loss k's accumulator."""
        if self.measures_noise:
            self._note_micro_gram(grads)
        for k in range(len(self.loss_names)):
            self._add_row(k, [None if g is None else g[k] for g in grads])

    def _add_row(self, k: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Accumulate one loss's gradients into its row of the stack. The row's first
        contribution of a step is copied (and zeros where a parameter got no gradient), which
        spares zeroing the K×P stack and one read of it each step."""
        views = self._stack_views[self._current][k]
        pairs = [(v, g) for v, g in zip(views, grads, strict=True) if g is not None]
        if self._fresh[k]:
            self._fresh[k] = False
            missing = [v for v, g in zip(views, grads, strict=True) if g is None]
            if missing:
                torch._foreach_zero_(missing)
            _foreach_into(pairs, copy=True)
        else:
            _foreach_into(pairs, copy=False)

    def _grads(self, loss: torch.Tensor, retain: bool = False) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(loss, self.params, allow_unused=True, retain_graph=retain)


def _foreach_into(pairs: list[tuple[torch.Tensor, torch.Tensor]], copy: bool) -> None:
    """``dst = src`` or ``dst += src`` for every pair. Contiguous pairs go to one multi-tensor
    kernel, the rest apart: a single strided tensor sends a whole foreach list down its slow
    path (one kernel per tensor)."""
    if not pairs:
        return
    dtype = pairs[0][0].dtype
    dense: list[tuple[torch.Tensor, torch.Tensor]] = []
    strided: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pair in pairs:
        (dense if pair[1].is_contiguous() else strided).append(pair)
    for group in (dense, strided):
        if group:
            dst, src = [d for d, _ in group], [s.to(dtype) for _, s in group]
            if copy:
                torch._foreach_copy_(dst, src)
            else:
                torch._foreach_add_(dst, src)


@contextlib.contextmanager
def refusing_reentrant() -> Iterator[None]:
    """torch's own error for ``autograd.grad`` through a reentrant checkpoint, as the
    conductor's: a ``ValueError`` that says what to pass instead."""
    try:
        yield
    except RuntimeError as exc:
        if is_reentrant_checkpoint_error(exc):
            raise ValueError(
                REENTRANT_MESSAGE.format(where="", why="torch cannot take autograd.grad through it")
            ) from exc
        raise


def _stacked(rows: list[tuple[torch.Tensor | None, ...]]) -> Iterator[torch.Tensor | None]:
    """K per-loss gradient tuples as one (K, *shape) tensor per parameter, one parameter at a
    time (None where no loss reached it, zeros where some did not)."""
    for per_loss in zip(*rows, strict=True):
        reached = next((g for g in per_loss if g is not None), None)
        if reached is None:
            yield None
        else:
            yield torch.stack([torch.zeros_like(reached) if g is None else g for g in per_loss])


def gram_of(stack: torch.Tensor) -> torch.Tensor:
    """K×K Gram matrix of the rows of a K×P stack, in float32, from K(K+1)/2 dot products."""
    k = stack.shape[0]
    dots = {(i, j): torch.dot(stack[i], stack[j]) for i in range(k) for j in range(i, k)}
    return torch.stack(
        [torch.stack([dots[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)]
    ).float()


def split(
    flat: torch.Tensor, numels: list[int], shapes: list[tuple[int, ...]]
) -> list[torch.Tensor]:
    """Views of a flat buffer shaped like the parameters."""
    return [t.view(s) for t, s in zip(flat.split(numels), shapes, strict=True)]
