"""``GradientConductor``: accumulation → resolution → momentum → ``p.grad`` (SPEC §1.3)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import _validation as v
from ._arbitrator import Arbitrator
from ._model_io import autocast, call_model, frozen_batchnorm
from ._momentum import Momentum, apply_trust_ratio_
from ._resolution import ZONES, cosine_matrix, resolve_gram

LossFn = Callable[[Any, Any], torch.Tensor]
DataProvider = Callable[[], Any]

_STATE_FORMAT = "gcond.GradientConductor/1"
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BACKWARD_CHOICES = ("auto", "batched", "sequential", "benchmark")


class GradientConductor:
    """Replaces ``loss.backward()`` + gradient accumulation for several, possibly conflicting,
    losses. See SPEC §1 for every parameter. ``per_loss_backward`` chooses how full mode gets K
    gradients from one forward: one batched backward (``"batched"``, ``is_grads_batched``) or K
    backwards over the retained graph (``"sequential"``); both are exact and agree to rounding.
    ``"auto"`` takes the batched one and falls back to sequential for good if it raises (no
    batched backward for some op of the model). PyTorch's batched backward loops over the K rows
    in every op without a batching rule (convolution, layer-norm, GELU and attention backwards
    among them), so which way is faster depends on the model and the device; ``"benchmark"``
    times both on the first micro-batch and keeps the faster, like
    ``cudnn.benchmark``: fastest, but two runs may then differ in the last bits.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fns: Mapping[str, LossFn],
        lambdas: Mapping[str, float],
        accumulation_steps: int,
        *,
        accumulation: str = "full",
        resolution: str = "zones",
        conflict_thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        projection_max_iters: int | None = None,
        dominance_window: int = 3,
        tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
        norm_ema_beta: float = 0.95,
        norm_cap: float | None = None,
        momentum_beta: float = 0.0,
        use_lion: bool = False,
        trust_ratio_coef: float | None = None,
        trust_ratio_clip: float = 10.0,
        remap_power: float = 2.0,
        return_raw_grad: bool = False,
        freeze_bn: bool = True,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        grad_dtype: torch.dtype = torch.float32,
        ddp_sync: str = "grads",
        per_loss_backward: str = "auto",
        aggregator: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eps: float = 1e-8,
    ) -> None:
        v.check_type("model", model, nn.Module, "a torch.nn.Module")
        v.check_mapping("loss_fns", loss_fns)
        if len(loss_fns) == 0:
            raise ValueError("loss_fns must hold at least one loss, got {}")
        for name, fn in loss_fns.items():
            if not callable(fn):
                raise TypeError(f"loss_fns[{name!r}] must be callable, got {fn!r}")
        v.check_mapping("lambdas", lambdas)
        if set(lambdas) != set(loss_fns):
            raise ValueError(
                f"lambdas must have the same keys as loss_fns ({sorted(loss_fns)}), "
                f"got {sorted(lambdas)}"
            )
        for name in loss_fns:
            v.check_real(f"lambdas[{name!r}]", lambdas[name], low=0.0)
        v.check_int("accumulation_steps", accumulation_steps, low=1)
        v.check_choice("accumulation", accumulation, ("full", "stochastic"))
        if accumulation == "stochastic" and accumulation_steps < len(loss_fns):
            raise ValueError(
                f"accumulation_steps must be >= the number of losses ({len(loss_fns)}) in "
                f"stochastic mode, got {accumulation_steps}"
            )
        v.check_choice("resolution", resolution, ("zones", "smooth"))
        thresholds = v.check_real_tuple("conflict_thresholds", conflict_thresholds, 3)
        for i, c in enumerate(thresholds):
            v.check_real(f"conflict_thresholds[{i}]", c, low=-1.0, high=1.0)
        if not thresholds[0] <= thresholds[1] <= thresholds[2]:
            raise ValueError(
                "conflict_thresholds must be non-decreasing (critical <= main <= weak), "
                f"got {conflict_thresholds!r}"
            )
        v.check_int("projection_max_iters", projection_max_iters, low=0, allow_none=True)
        v.check_int("dominance_window", dominance_window, low=0)
        weights = v.check_real_tuple("tie_breaking_weights", tie_breaking_weights, 2)
        for i, w in enumerate(weights):
            v.check_real(f"tie_breaking_weights[{i}]", w, low=0.0)
        if sum(weights) <= 0:
            raise ValueError(f"tie_breaking_weights must have a positive sum, got {weights!r}")
        v.check_real("norm_ema_beta", norm_ema_beta, low=0.0, high=1.0, high_open=True)
        v.check_real("norm_cap", norm_cap, low=0.0, low_open=True, allow_none=True)
        v.check_real("momentum_beta", momentum_beta, low=0.0, high=1.0, high_open=True)
        v.check_type("use_lion", use_lion, bool, "a bool")
        if use_lion and momentum_beta <= 0:
            raise ValueError("use_lion=True needs momentum_beta > 0, got momentum_beta=0")
        v.check_real("trust_ratio_coef", trust_ratio_coef, low=0.0, low_open=True, allow_none=True)
        v.check_real("trust_ratio_clip", trust_ratio_clip, low=0.0, low_open=True)
        v.check_real("remap_power", remap_power, low=0.0, low_open=True)
        v.check_type("return_raw_grad", return_raw_grad, bool, "a bool")
        v.check_type("freeze_bn", freeze_bn, bool, "a bool")
        if autocast_dtype is not None:
            v.check_choice("autocast_dtype", autocast_dtype, _AUTOCAST_DTYPES)
        if scaler is not None and not all(
            hasattr(scaler, a) for a in ("scale", "unscale_", "step", "update")
        ):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {scaler!r}")
        v.check_choice("grad_dtype", grad_dtype, _GRAD_DTYPES)
        v.check_choice("ddp_sync", ddp_sync, ("grads", "update", "none"))
        v.check_choice("per_loss_backward", per_loss_backward, _BACKWARD_CHOICES)
        if aggregator is not None and not callable(aggregator):
            raise TypeError(f"aggregator must be callable, got {aggregator!r}")
        v.check_real("eps", eps, low=0.0, low_open=True)

        self.model = model
        # Under DDP the forwards and backwards run on the wrapped module: DDP's own all-reduce
        # never fires, and the conductor makes the one collective that ``ddp_sync`` asks for.
        self._module: nn.Module = getattr(model, "module", model) if _is_ddp(model) else model
        # The group DDP synchronises over (None: the default group).
        self._group = getattr(model, "process_group", None) if _is_ddp(model) else None
        self.loss_fns = dict(loss_fns)
        self.loss_names = list(loss_fns)
        self.lambdas = {k: float(lambdas[k]) for k in self.loss_names}
        self.accumulation_steps = accumulation_steps
        self.accumulation = accumulation
        self.resolution = resolution
        self.conflict_thresholds = thresholds
        self.projection_max_iters = projection_max_iters
        self.dominance_window = dominance_window
        self.tie_breaking_weights = weights
        self.norm_ema_beta = float(norm_ema_beta)
        self.norm_cap = norm_cap
        self.momentum_beta = float(momentum_beta)
        self.use_lion = use_lion
        self.trust_ratio_coef = trust_ratio_coef
        self.trust_ratio_clip = float(trust_ratio_clip)
        self.remap_power = float(remap_power)
        self.return_raw_grad = return_raw_grad
        self.freeze_bn = freeze_bn
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.grad_dtype = grad_dtype
        self.ddp_sync = ddp_sync
        self.per_loss_backward = per_loss_backward
        self.aggregator = aggregator
        self.eps = float(eps)

        self._params = [p for p in self._module.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError(f"model has no parameters with requires_grad=True: {type(model)}")
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(
                f"model parameters must live on one device, got {sorted(map(str, devices))}"
            )
        self.device = next(iter(devices))
        self._shapes = [tuple(p.shape) for p in self._params]
        self._numels = [p.numel() for p in self._params]
        self.num_params = sum(self._numels)
        k, numel = len(self.loss_names), self.num_params

        # Flat buffers, one per role (§1.7): two K×P stacks that swap roles each step (this
        # step's accumulators become next step's previous gradients without a copy), the
        # momentum and the P-sized update that p.grad views point into.
        self._stacks = [torch.zeros(k, numel, dtype=grad_dtype, device=self.device) for _ in "ab"]
        self._stack_views = [self._views_of(s) for s in self._stacks]
        self._current = 0
        self._fresh = [False] * k  # rows not yet written this step (step() sets them all)
        update_dtype = _common_dtype(self._params)
        self._update = torch.zeros(numel, dtype=update_dtype, device=self.device)
        self._update_views = _split(self._update, self._numels, self._shapes)
        self._momentum = Momentum(
            numel, self.momentum_beta, use_lion=use_lion, dtype=grad_dtype, device=self.device
        )
        self._loss_sums = torch.zeros(k, dtype=torch.float32, device=self.device)
        self._eye = torch.eye(k, dtype=torch.float32, device=self.device)
        self._scales = self._backward_scales()
        self.arbitrator = Arbitrator(
            k,
            dominance_window=dominance_window,
            tie_breaking_weights=weights,
            norm_ema_beta=self.norm_ema_beta,
            eps=self.eps,
        )
        self._has_prev = False
        self._prev_norms = [0.0] * k
        self._step = 0  # non-skipped steps (t in the bias correction)
        # Batched backward (True) or sequential (False); None until the first full-mode
        # micro-batch decides ("auto" tries the batched one, "benchmark" times both).
        self._batched_ok: bool | None = {
            "auto": None,
            "batched": True,
            "sequential": False,
            "benchmark": None,
        }[per_loss_backward]
        # Seconds of one micro-batch's per-loss backward each way, when "benchmark" timed them.
        self.backward_timings: dict[str, float] | None = None

    # ------------------------------------------------------------------ public API

    def step(self, data_provider: DataProvider) -> dict[str, float]:
        """Accumulate, resolve and write ``p.grad``; returns the step's statistics (SPEC §1.4)."""
        if not callable(data_provider):
            raise TypeError(f"data_provider must be callable, got {data_provider!r}")
        acc = self._stacks[self._current]
        # No zeroing pass over the K×P stack: each row's first contribution of the step copies.
        self._fresh = [True] * len(self.loss_names)
        self._loss_sums.zero_()
        with frozen_batchnorm(self._module, self.freeze_bn):
            for i in range(self.accumulation_steps):
                self._accumulate_micro_batch(data_provider, i)
        if self.ddp_sync == "grads" and _distributed(self._group):
            # One flat collective for all K accumulators (not one per parameter tensor), and a
            # K-sized one for the loss sums. Divided before the sum, so that low-precision
            # accumulators do not overflow with many ranks.
            world = dist.get_world_size(self._group)
            acc.div_(world)
            dist.all_reduce(acc, group=self._group)
            self._loss_sums.div_(world)
            dist.all_reduce(self._loss_sums, group=self._group)
        return self._finish_step(acc)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit (SPEC §1.6). Safe for ``weights_only``."""
        prev = self._stacks[1 - self._current]
        return {
            "format": _STATE_FORMAT,
            "loss_names": list(self.loss_names),
            "param_shapes": [list(s) for s in self._shapes],
            "step": self._step,
            "has_prev": self._has_prev,
            "prev_grads": prev.detach().clone() if self._has_prev else None,
            "prev_norms": torch.tensor(self._prev_norms, dtype=torch.float64),
            "momentum": None if self._momentum.buffer is None else self._momentum.buffer.clone(),
            "arbitrator": self.arbitrator.state_dict(),
            "batched_backward": self._batched_ok,
            "backward_timings": self.backward_timings,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state of other losses or parameter shapes."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a GradientConductor state (format {state.get('format')!r})")
        if list(state["loss_names"]) != self.loss_names:
            raise ValueError(
                f"conductor state is for losses {list(state['loss_names'])}, "
                f"this conductor has {self.loss_names}"
            )
        shapes = [tuple(s) for s in state["param_shapes"]]
        if shapes != self._shapes:
            diff = next(
                (i for i, (a, b) in enumerate(zip(shapes, self._shapes, strict=False)) if a != b),
                min(len(shapes), len(self._shapes)),
            )
            raise ValueError(
                f"conductor state is for other parameters: {len(shapes)} tensors saved, "
                f"{len(self._shapes)} in the model; first mismatch at parameter {diff}"
            )
        momentum = state["momentum"]
        if (momentum is None) != (self._momentum.buffer is None):
            raise ValueError("conductor state and this conductor disagree on momentum (beta > 0)")
        self._step = int(state["step"])
        self._has_prev = bool(state["has_prev"])
        self._prev_norms = [float(x) for x in state["prev_norms"].tolist()]
        if self._has_prev:
            self._stacks[1 - self._current].copy_(state["prev_grads"])
        if momentum is not None and self._momentum.buffer is not None:
            self._momentum.buffer.copy_(momentum)
        self.arbitrator.load_state_dict(state["arbitrator"])
        if self.per_loss_backward in ("auto", "benchmark"):
            self._batched_ok = state.get("batched_backward")
            self.backward_timings = state.get("backward_timings")

    @property
    def backward_mode(self) -> str:
        """How full mode gets per-loss gradients: ``batched``, ``sequential``, or
        ``per_loss_backward`` itself until the first full-mode micro-batch decides."""
        return {None: self.per_loss_backward, True: "batched", False: "sequential"}[
            self._batched_ok
        ]

    def __repr__(self) -> str:
        args = {
            "model": type(self._module).__name__,
            "loss_fns": self.loss_names,
            "lambdas": self.lambdas,
            "accumulation_steps": self.accumulation_steps,
            "accumulation": self.accumulation,
            "resolution": self.resolution,
            "conflict_thresholds": self.conflict_thresholds,
            "projection_max_iters": self.projection_max_iters,
            "dominance_window": self.dominance_window,
            "tie_breaking_weights": self.tie_breaking_weights,
            "norm_ema_beta": self.norm_ema_beta,
            "norm_cap": self.norm_cap,
            "momentum_beta": self.momentum_beta,
            "use_lion": self.use_lion,
            "trust_ratio_coef": self.trust_ratio_coef,
            "trust_ratio_clip": self.trust_ratio_clip,
            "remap_power": self.remap_power,
            "return_raw_grad": self.return_raw_grad,
            "freeze_bn": self.freeze_bn,
            "autocast_dtype": self.autocast_dtype,
            "scaler": self.scaler,
            "grad_dtype": self.grad_dtype,
            "ddp_sync": self.ddp_sync,
            "per_loss_backward": self.per_loss_backward,
            "aggregator": self.aggregator,
            "eps": self.eps,
        }
        return "GradientConductor(" + ", ".join(f"{k}={a!r}" for k, a in args.items()) + ")"

    # ------------------------------------------------------------------ accumulation

    def _accumulate_micro_batch(self, data_provider: DataProvider, index: int) -> None:
        batch = data_provider()
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"data_provider() must return (input, target), got {type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
            )
        x, target = batch
        # Stochastic mode differentiates only the loss this micro-batch serves; the others are
        # computed for the statistics alone, without recording a graph.
        served = index % len(self.loss_names) if self.accumulation == "stochastic" else None
        with autocast(self.device, self.autocast_dtype):
            output = call_model(self._module, x)
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
        elif len(self.loss_names) == 1:
            self._add_row(0, self._grads(weighted[0]))
        else:
            self._backward_full(weighted)

    def _loss(self, name: str, output: Any, target: Any) -> torch.Tensor:
        loss = self.loss_fns[name](output, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss_fns[{name!r}] must return a scalar tensor, got {shape}")
        return loss

    def _backward_scales(self) -> torch.Tensor:
        """λ_k / (micro-batches that serve loss k), so each g_k is a λ-weighted mean."""
        k, n = len(self.loss_names), self.accumulation_steps
        scales = []
        for j, name in enumerate(self.loss_names):
            served = n if self.accumulation == "full" else len(range(j, n, k))
            scales.append(self.lambdas[name] / served)
        return torch.tensor(scales, dtype=torch.float32, device=self.device)

    def _backward_full(self, weighted: torch.Tensor) -> None:
        if self._batched_ok is None and self.per_loss_backward == "benchmark":
            self._choose_backward(weighted)
        elif self._batched_ok is None:  # "auto": the batched one, unless it cannot run
            try:
                grads = self._batched_grads(weighted, retain=True)
            except RuntimeError:
                self._batched_ok = False
                self._backward_sequential(weighted, retain=False)
            else:
                self._batched_ok = True
                self._add_batched(grads)
        elif self._batched_ok:
            self._add_batched(self._batched_grads(weighted, retain=False))
        else:
            self._backward_sequential(weighted, retain=False)

    def _batched_grads(
        self, weighted: torch.Tensor, retain: bool
    ) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(
            weighted,
            self._params,
            grad_outputs=self._eye,
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain,
        )

    def _backward_sequential(
        self, weighted: torch.Tensor, retain: bool, accumulate: bool = True
    ) -> None:
        """K backwards over the retained graph (``accumulate=False`` only times them)."""
        last = len(self.loss_names) - 1
        for k in range(len(self.loss_names)):
            grads = self._grads(weighted[k], retain=retain or k < last)
            if accumulate:
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
        if self.ddp_sync != "none" and _distributed(self._group):
            # Every rank takes the same way: decided on the timings summed over the ranks.
            both = torch.tensor([timings["batched"], timings["sequential"]], device=self.device)
            dist.all_reduce(both, group=self._group)
            timings = dict(zip(("batched", "sequential"), both.tolist(), strict=True))
        self._batched_ok = timings["batched"] <= timings["sequential"]
        self.backward_timings = timings

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add_batched(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """Accumulate batched (K, *shape) gradients, row k into loss k's accumulator."""
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
        return torch.autograd.grad(loss, self._params, allow_unused=True, retain_graph=retain)

    # ------------------------------------------------------------------ resolution and write

    def _finish_step(self, acc: torch.Tensor) -> dict[str, float]:
        k = len(self.loss_names)
        prev = self._stacks[1 - self._current]
        unscale = self._inverse_loss_scale()
        if unscale is not None:
            acc.mul_(unscale)
        # The one host-device sync of the accumulation (§1.7): K×K Gram matrix, K loss sums and
        # K dot products with last step's gradients travel together.
        # Dot products rather than a K×P @ P×K GEMM or a batched GEMV: with P in the tens of
        # millions those pick slow reduction kernels (measured: ~19 ms for P = 25M on an H100),
        # while each dot is one bandwidth-bound pass.
        gram = _gram(acc)
        parts = [gram.flatten(), self._loss_sums]
        if self._has_prev:
            parts.append(torch.stack([torch.dot(acc[i], prev[i]) for i in range(k)]).float())
        host = torch.cat(parts).to("cpu", torch.float64)
        gram_h = host[: k * k].reshape(k, k)
        loss_means = (host[k * k : k * k + k] / self.accumulation_steps).tolist()
        prev_dots = host[k * k + k :].tolist() if self._has_prev else None

        # Non-finite check (§1.5): a NaN/inf anywhere in g_k makes ‖g_k‖² NaN/inf. (A finite g_k
        # whose squared norm overflows float32 counts as non-finite too.)
        # In a batched backward a NaN from one loss reaches every row (0·NaN = NaN), so a loss is
        # blamed by its own value first, and by its gradient only when every value is finite.
        norms_sq = gram_h.diagonal().tolist()
        bad = [not math.isfinite(x) for x in norms_sq]
        bad_values = [not math.isfinite(x) for x in loss_means]
        if any(bad) and any(bad_values):
            bad = bad_values
        if self.ddp_sync == "update" and _distributed(self._group):
            # Resolved locally, but every rank must skip together: one that skipped alone would
            # leave the others waiting in the all-reduce of the update.
            bad = _on_any_rank(bad, self._group, self.device)
        stats = self._base_stats(loss_means, bad)
        if any(bad):
            self._write_skipped()
            return stats

        norms = [math.sqrt(max(x, 0.0)) for x in norms_sq]
        prev_cos = None
        if prev_dots is not None:
            prev_cos = [
                d / (n * pn) if n * pn > self.eps else 0.0
                for d, n, pn in zip(prev_dots, norms, self._prev_norms, strict=True)
            ]
        self.arbitrator.observe(norms, prev_cos)
        cos = cosine_matrix(gram_h, self.eps)
        for i in range(k):
            for j in range(i + 1, k):
                stats[f"cos/{self.loss_names[i]}_vs_{self.loss_names[j]}"] = float(cos[i, j])
        stats["min_cosine_sim"] = _min_pairwise(cos, norms, self.eps)
        for name, n, ema in zip(self.loss_names, norms, self.arbitrator.norm_ema, strict=True):
            stats[f"raw_norm/{name}"] = n
            stats[f"norm_ema/{name}"] = float(ema if ema is not None else n)

        scale = None
        if self.norm_cap is not None:
            scale = torch.tensor([min(1.0, self.norm_cap / n) if n > 0 else 1.0 for n in norms])
        wins = dict.fromkeys(self.loss_names, 0)
        dominance = 0

        def arbitrate(i: int, j: int) -> int:
            nonlocal dominance
            winner, by_dominance = self.arbitrator.pick(i, j)
            wins[self.loss_names[winner]] += 1
            dominance += by_dominance
            return winner

        if self.aggregator is not None:
            return self._finish_aggregated(acc, norms, scale, stats)
        res = resolve_gram(
            gram_h,
            self.conflict_thresholds,
            max_iters=self.projection_max_iters,
            mode=self.resolution,
            arbitrate=arbitrate,
            remap_power=self.remap_power,
            eps=self.eps,
            scale=scale,
        )
        stats["proj_iters"] = float(res.iterations)
        for zone in ZONES:
            stats[f"conflicts/{zone}"] = float(res.zone_counts[zone])
        for name in self.loss_names:
            stats[f"wins/{name}"] = float(wins[name])
        stats["dominance"] = float(dominance)

        # Merge (§1.3 step 7): Σ_k resolved_k = Σ_k w_k g_k, one fused pass per loss over P.
        weights = res.merge_weights.tolist()
        update = self._update
        torch.mul(acc[0], weights[0], out=update)
        for j in range(1, k):
            if weights[j] != 0.0:
                update.add_(acc[j], alpha=weights[j])

        w = res.merge_weights
        analytic_norm = math.sqrt(max(float(w @ gram_h @ w), 0.0))
        return self._write_update(stats, norms, analytic_norm)

    def _finish_aggregated(
        self,
        acc: torch.Tensor,
        norms: list[float],
        scale: torch.Tensor | None,
        stats: dict[str, float],
    ) -> dict[str, float]:
        """``aggregator`` in place of resolution and merge (steps 5-7): e.g. a TorchJD method fed
        the same accumulated per-loss gradients."""
        stack = acc if scale is None else acc * scale.to(acc)[:, None]
        merged = self.aggregator(stack.float())
        if merged.shape != (self.num_params,):
            raise ValueError(
                f"aggregator must return a vector of {self.num_params} elements, "
                f"got shape {tuple(merged.shape)}"
            )
        self._update.copy_(merged)
        return self._write_update(stats, norms, None)

    def _write_update(
        self, stats: dict[str, float], norms: list[float], analytic_norm: float | None
    ) -> dict[str, float]:
        """Momentum, trust ratio and write-back of the merged gradient in ``self._update``
        (steps 8-10). ``analytic_norm`` is ‖g‖ when known without reading the device."""
        update = self._update
        self._step += 1
        direction_is_g = self.return_raw_grad or (
            self._momentum.buffer is None and not self.use_lion and self.trust_ratio_coef is None
        )
        if not self.return_raw_grad:
            self._momentum.apply_(update, self._step)
            if self.trust_ratio_coef is not None:
                apply_trust_ratio_(
                    self._update_views,
                    self._params,
                    self.trust_ratio_coef,
                    self.trust_ratio_clip,
                    self.eps,
                )
        if self.ddp_sync == "update" and _distributed(self._group):
            update.div_(dist.get_world_size(self._group))
            dist.all_reduce(update, group=self._group)
            direction_is_g = False
        if direction_is_g and analytic_norm is not None:
            # ‖Σ w_k g_k‖² = wᵀ·Gram·w: exact, and no second sync.
            stats["final_grad_norm"] = analytic_norm
        else:
            stats["final_grad_norm"] = float(torch.linalg.vector_norm(update))  # sync
        if self.scaler is not None:
            # scaler.step() unscales p.grad: hand it a scaled update.
            update.mul_(self.scaler.scale(torch.ones((), device=self.device)))
        self._write_grads()

        # This step's raw accumulators become next step's previous gradients (§1.3 step 10).
        self._prev_norms = norms
        self._has_prev = True
        self._current = 1 - self._current
        stats["step"] = float(self._step)
        return stats

    def _base_stats(self, loss_means: list[float], bad: list[bool]) -> dict[str, float]:
        nan = math.nan
        stats: dict[str, float] = {"final_grad_norm": nan, "min_cosine_sim": nan}
        names = self.loss_names
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                stats[f"cos/{names[i]}_vs_{names[j]}"] = nan
        stats["proj_iters"] = 0.0
        for zone in ZONES:
            stats[f"conflicts/{zone}"] = 0.0
        for name in names:
            stats[f"wins/{name}"] = 0.0
        stats["dominance"] = 0.0
        for name in names:
            stats[f"raw_norm/{name}"] = nan
            ema = self.arbitrator.norm_ema[names.index(name)]
            stats[f"norm_ema/{name}"] = nan if ema is None else float(ema)
        for name, value in zip(names, loss_means, strict=True):
            stats[f"loss/{name}"] = value
        stats["loss/total"] = sum(
            self.lambdas[n] * x for n, x in zip(names, loss_means, strict=True)
        )
        for name, b in zip(names, bad, strict=True):
            stats[f"nonfinite/{name}"] = float(b)
        stats["skipped"] = float(any(bad))
        stats["step"] = float(self._step)
        if len(names) == 1:
            stats["min_cosine_sim"] = 1.0
        return stats

    def _inverse_loss_scale(self) -> torch.Tensor | None:
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        return self.scaler.scale(torch.ones((), device=self.device)).reciprocal()

    def _write_grads(self) -> None:
        for p, view in zip(self._params, self._update_views, strict=True):
            # A view into the flat update buffer when dtypes match: no copy.
            p.grad = view if view.dtype == p.dtype else view.to(p.dtype)

    def _write_skipped(self) -> None:
        """Leave the optimizer unable to change the weights (§1.5)."""
        if self.scaler is not None and self.scaler.is_enabled():
            # Non-finite grads: scaler.step() skips the step and update() backs off the scale.
            self._update.fill_(math.inf)
            self._write_grads()
        else:
            for p in self._params:
                p.grad = None

    # ------------------------------------------------------------------ helpers

    def _views_of(self, stack: torch.Tensor) -> list[list[torch.Tensor]]:
        return [_split(stack[k], self._numels, self._shapes) for k in range(stack.shape[0])]


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _distributed(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _on_any_rank(flags: list[bool], group: Any, device: torch.device) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks: one K-sized collective and a host sync."""
    votes = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return [v > 0 for v in votes.tolist()]


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


def _gram(stack: torch.Tensor) -> torch.Tensor:
    """K×K Gram matrix of the rows of a K×P stack, in float32, from K(K+1)/2 dot products."""
    k = stack.shape[0]
    dots = {(i, j): torch.dot(stack[i], stack[j]) for i in range(k) for j in range(i, k)}
    return torch.stack(
        [torch.stack([dots[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)]
    ).float()


def _common_dtype(params: list[torch.Tensor]) -> torch.dtype:
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _split(
    flat: torch.Tensor, numels: list[int], shapes: list[tuple[int, ...]]
) -> list[torch.Tensor]:
    return [t.view(s) for t, s in zip(flat.split(numels), shapes, strict=True)]


def _min_pairwise(cos: torch.Tensor, norms: list[float], eps: float) -> float:
    k = cos.shape[0]
    values = [
        float(cos[i, j])
        for i in range(k)
        for j in range(i + 1, k)
        if norms[i] >= eps and norms[j] >= eps
    ]
    return min(values) if values else 1.0
