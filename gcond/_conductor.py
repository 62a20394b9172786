"""``GradientConductor``: accumulate → resolve → update, one optimizer step at a time.

Each part is an object of its own (``accumulator``, ``resolver``, ``updater``); the conductor
checks its inputs, wires the parts, and assembles the step's statistics. The algorithm, rule by
rule, is in ``docs/algorithm.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import _validation as v
from ._accumulate import Accumulator, DataProvider, Gradients, LossFn
from ._config import ConductorConfig, config_from
from ._distributed import distributed, is_ddp, on_any_rank
from ._representation import RepresentationAccumulator
from ._resolution import ZONES, cosine_matrix
from ._resolve import ConflictResolver, Resolved, Resolver
from ._sharded import ShardedAccumulator, ShardedUpdater, pack, shard_group, unpack
from ._update import Updater

_STATE_FORMAT = "gcond.GradientConductor/1"
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
# Statistics a step between full ones cannot compute (NaN there).
_RESOLUTION_STATS = (
    "min_cosine_sim",
    "cos/",
    "proj_iters",
    "conflicts/",
    "wins/",
    "dominance",
    "raw_norm/",
    "signal_cos/",
    "noise_share/",
    "noise_scale/",
    "harm_z/",
)


class GradientConductor:
    """Replaces ``loss.backward()`` + gradient accumulation for several, possibly conflicting,
    losses: accumulates one gradient per loss over ``accumulation_steps`` micro-batches,
    resolves their conflicts, and writes the merged result to ``p.grad`` for any optimizer.

    * ``model``: the ``nn.Module``, a ``DistributedDataParallel`` wrapping one, or one sharded
      with FSDP2's ``fully_shard`` (every part then holds this rank's shard; see
      ``docs/algorithm.md``, "Sharded models").
    * ``loss_fns``: ``{name: fn(model_output, target) -> scalar tensor}``, at least one.
    * ``lambdas``: ``{name: weight}``, the same keys, finite and ≥ 0.
    * ``accumulation_steps``: micro-batches per step; overrides ``config.accumulation_steps``.
    * ``config``: a :class:`ConductorConfig` with every tuning parameter (defaults if None).
    * ``autocast_dtype``: run forwards under ``torch.autocast`` to ``torch.bfloat16`` or
      ``torch.float16``; None = no autocast.
    * ``scaler``: a ``torch.amp.GradScaler`` for fp16; ``scaler.step(optimizer)`` then unscales
      ``p.grad`` and skips steps with non-finite gradients.
    * ``resolver``: what turns the gradients into merge weights; default the conductor's own
      :class:`ConflictResolver`; e.g. a :class:`WeightingResolver` over a TorchJD weighting.
    * ``split``: ``(trunk, heads)``, for ``gradients_at="representation"`` (and only then):
      ``trunk(x) -> z``, a tensor, the representation shared by the losses (called as the model
      is: ``trunk(*x)`` for a tuple, ``trunk(**x)`` for a mapping), and ``heads(z) -> output``,
      what the loss functions receive, so that ``model(x) == heads(trunk(x))``. Their parameters
      are ``model``'s; the ones the heads reach get their exact gradients, the trunk's the merged
      one (``docs/algorithm.md``, "Gradients at the representation").
    * ``**options``: any :class:`ConductorConfig` field by name, applied on top of ``config``
      (``GradientConductor(model, fns, lambdas, 8, momentum_beta=0.9)``).

    ``step(data_provider)`` is the one call of a training loop; it is
    ``finish(accumulate(data_provider))``, and the two halves are public so they can be timed.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fns: Mapping[str, LossFn],
        lambdas: Mapping[str, float],
        accumulation_steps: int | None = None,
        *,
        config: ConductorConfig | None = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        resolver: Resolver | None = None,
        split: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
        **options: Any,
    ) -> None:
        config = config_from(config, accumulation_steps, options)
        _check_inputs(model, loss_fns, lambdas, autocast_dtype, scaler, resolver)
        _check_split(split, config)
        for problem in config.problems_with_losses(len(loss_fns)):
            raise problem.error()
        self.config = config
        self.model = model
        # Under DDP the forwards and backwards run on the wrapped module: DDP's own all-reduce
        # never fires, and the conductor makes the one collective that ``ddp_sync`` asks for.
        self._module: nn.Module = getattr(model, "module", model) if is_ddp(model) else model
        self._group = getattr(model, "process_group", None) if is_ddp(model) else None
        self.loss_fns = dict(loss_fns)
        self.loss_names = list(loss_fns)
        self.lambdas = {k: float(lambdas[k]) for k in self.loss_names}
        self.autocast_dtype, self.scaler = autocast_dtype, scaler
        params = [p for p in self._module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model has no parameters with requires_grad=True: {type(model)}")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(
                f"model parameters must live on one device, got {sorted(map(str, devices))}"
            )
        self.device = next(iter(devices))
        self._params = params
        self._shapes = [tuple(p.shape) for p in params]
        self.num_params = sum(p.numel() for p in params)
        names = [n for n, p in self._module.named_parameters() if p.requires_grad]
        # Under fully_shard: this rank's shards only, and the group they are sharded over.
        shards = shard_group(params, names)
        self.sharded = shards is not None
        if self.sharded:
            _check_sharded(config)
            self._group = shards
        self.resolver: Resolver = resolver or ConflictResolver(self.loss_names, config)
        self.split = split
        sharding = {"names": names} if self.sharded else {}
        extra: dict[str, Any] = dict(sharding)
        kind: type[Accumulator] = ShardedAccumulator if self.sharded else Accumulator
        if split is not None:
            kind = RepresentationAccumulator
            extra = {"trunk": split[0], "heads": split[1], "decide": self._decide}
        self.accumulator = kind(
            self._module,
            params,
            self.loss_fns,
            self.lambdas,
            config,
            autocast_dtype=autocast_dtype,
            scaler=scaler,
            group=self._group,
            **extra,
        )
        # The merge weights of the last full step, reused until the next (resolve_every > 1).
        self.last_weights: torch.Tensor | None = None
        self.updater = (ShardedUpdater if self.sharded else Updater)(
            params, config, scaler=scaler, group=self._group, **sharding
        )

    # ------------------------------------------------------------------ the step

    def step(self, data_provider: DataProvider) -> dict[str, float]:
        """Accumulate, resolve and write ``p.grad``; returns the step's statistics
        (``docs/algorithm.md``, "Statistics")."""
        if not callable(data_provider):
            raise TypeError(f"data_provider must be callable, got {data_provider!r}")
        return self.finish(self.accumulate(data_provider))

    def accumulate(self, data_provider: DataProvider) -> Gradients:
        """Step 1: the K per-loss gradients of this step, and what the host needs of them; on a
        step between full ones (``resolve_every`` > 1), the merged gradient alone."""
        if self.full_step_next:
            return self.accumulator.accumulate(data_provider)
        return self.accumulator.accumulate_merged(data_provider, self.last_weights)

    @property
    def full_step_next(self) -> bool:
        """Whether the next step resolves: every ``resolve_every``-th applied step (counting
        from 0, so the first one is), and any step before the first applied full one."""
        every = self.config.resolve_every
        return self.last_weights is None or self.updater.steps % every == 0

    def _decide(self, gram: torch.Tensor) -> Resolved:
        """Representation mode: one micro-batch's merge weights from its Gram matrix."""
        if isinstance(self.resolver, ConflictResolver):
            return self.resolver.decide(gram)
        # Another resolver sees each micro-batch as a step (its state, if any, moves with it).
        return self.resolver.resolve(Gradients(gram.new_zeros(0), gram, [], None))

    def finish(self, gradients: Gradients) -> dict[str, float]:
        """Steps 2-10: skip on non-finite gradients, else resolve, update and write ``p.grad``."""
        bad = gradients.nonfinite
        if self.config.ddp_sync == "update" and distributed(self._group):
            # Resolved locally, but every rank must skip together: one that skipped alone would
            # leave the others waiting in the all-reduce of the update.
            bad = on_any_rank(bad, self._group, self.device)
        stats = self._base_stats(gradients.loss_means, bad)
        if self.config.resolve_every > 1:
            stats["full_step"] = float(gradients.full)
        if any(bad):
            self.updater.skip()
            return stats
        if not gradients.full:  # between full steps: nothing per loss was computed
            for key in stats:
                if key.startswith(_RESOLUTION_STATS):
                    stats[key] = math.nan
            stats["final_grad_norm"] = self._apply_merged(gradients)
        elif gradients.merged is None:
            stats.update(self._gradient_stats(gradients))
            resolved = self.resolver.resolve(gradients)
            stats.update(resolved.stats)
            stats["final_grad_norm"] = self.updater.apply(gradients, resolved.weights)
            self.last_weights = resolved.weights
        else:  # representation mode: decided and merged during accumulation
            stats.update(self._gradient_stats(gradients))
            decided = gradients.decided
            if isinstance(self.resolver, ConflictResolver):
                wins = [decided.stats.get(f"wins/{n}", 0.0) for n in self.loss_names]
                self.resolver.settle(gradients.norms, wins, gradients.noise)
            stats.update(decided.stats)
            for name, ema in zip(self.loss_names, self._norm_emas(), strict=True):
                stats[f"norm_ema/{name}"] = math.nan if ema is None else float(ema)
            stats["final_grad_norm"] = self._apply_merged(gradients)
            self.last_weights = decided.weights
        if gradients.full:
            self.accumulator.commit(gradients.norms)
        stats["step"] = float(self.updater.steps)
        return stats

    def _apply_merged(self, gradients: Gradients) -> float:
        """Update with a gradient merged during accumulation: weight 1, Gram its squared norm."""
        square = torch.tensor([[gradients.merged_sq]], dtype=torch.float64)
        merged = Gradients(gradients.stack, square, [], None)
        return self.updater.apply(merged, torch.ones(1, dtype=torch.float64))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit. Safe for ``torch.load(weights_only=True)``.

        Under ``fully_shard`` the gradients of the last step and the momentum are DTensors, one
        per loss and parameter, over this conductor's own buffers, and the rest is one bytes
        object: save and load it with ``torch.distributed.checkpoint`` (which loads in place and
        reshards for another number of ranks), then call :meth:`load_state_dict`."""
        state = {
            "format": _STATE_FORMAT,
            "loss_names": list(self.loss_names),
            "param_shapes": [list(s) for s in self._shapes],
            "step": self.updater.steps,
            **self.accumulator.state_dict(),
            "momentum": self.updater.momentum_state(),
            **self.resolver.state_dict(),
            "gradients_at": self.config.gradients_at,
            "last_weights": None if self.last_weights is None else self.last_weights.clone(),
        }
        return pack(state) if self.sharded else state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state of other losses or parameter shapes."""
        if ("host" in state) != self.sharded:
            raise ValueError(
                "conductor state and this conductor disagree on sharding: a fully_shard model's "
                "conductor state is saved and loaded with torch.distributed.checkpoint, an "
                "unsharded one's with torch.save/torch.load"
            )
        state = unpack(dict(state))
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
        saved_at = state.get("gradients_at", "parameters")
        if saved_at != self.config.gradients_at:
            raise ValueError(
                f"conductor state was written with gradients_at={saved_at!r}, this conductor has "
                f"gradients_at={self.config.gradients_at!r}"
            )
        momentum, buffer = state["momentum"], self.updater.momentum.buffer
        if (momentum is None) != (buffer is None):
            raise ValueError("conductor state and this conductor disagree on momentum (beta > 0)")
        self.updater.steps = int(state["step"])
        self.accumulator.load_state_dict(dict(state))
        self.updater.load_momentum(momentum)
        self.resolver.load_state_dict(state)
        weights = state.get("last_weights")
        self.last_weights = None if weights is None else weights.to(torch.float64).clone()

    # ------------------------------------------------------------------ reading

    @property
    def accumulation(self) -> str:
        return self.config.accumulation

    @property
    def backward_mode(self) -> str:
        """How full mode gets per-loss gradients: ``batched``, ``sequential``, or
        ``per_loss_backward`` itself until the first full-mode micro-batch decides."""
        return self.accumulator.backward_mode

    @property
    def backward_timings(self) -> dict[str, float] | None:
        """Seconds of one micro-batch's per-loss backward each way, once ``"benchmark"`` timed
        them."""
        return self.accumulator.backward_timings

    def __repr__(self) -> str:
        args = {
            "model": type(self._module).__name__,
            "loss_fns": self.loss_names,
            "lambdas": self.lambdas,
            "config": self.config,
            "autocast_dtype": self.autocast_dtype,
            "scaler": self.scaler,
            "resolver": self.resolver,
            "split": self.split,
        }
        return "GradientConductor(" + ", ".join(f"{k}={a!r}" for k, a in args.items()) + ")"

    # ------------------------------------------------------------------ statistics

    def _base_stats(self, loss_means: list[float], bad: list[bool]) -> dict[str, float]:
        """Every key of the step's statistics, in order; NaN where a skipped step has no value."""
        nan, names = math.nan, self.loss_names
        stats: dict[str, float] = {"final_grad_norm": nan, "min_cosine_sim": nan}
        for i, j in _pairs(len(names)):
            stats[f"cos/{names[i]}_vs_{names[j]}"] = nan
        stats["proj_iters"] = 0.0
        for zone in ZONES:
            stats[f"conflicts/{zone}"] = 0.0
        for name in names:
            stats[f"wins/{name}"] = 0.0
        stats["dominance"] = 0.0
        emas = self._norm_emas()
        for name, ema in zip(names, emas, strict=True):
            stats[f"raw_norm/{name}"] = nan
            stats[f"norm_ema/{name}"] = nan if ema is None else float(ema)
        for name, value in zip(names, loss_means, strict=True):
            stats[f"loss/{name}"] = value
        stats["loss/total"] = sum(
            self.lambdas[n] * x for n, x in zip(names, loss_means, strict=True)
        )
        for name, b in zip(names, bad, strict=True):
            stats[f"nonfinite/{name}"] = float(b)
        if self.config.measures_noise:
            for key in self._noise_keys():
                stats[key] = nan
        stats["skipped"] = float(any(bad))
        stats["step"] = float(self.updater.steps)
        if len(names) == 1:
            stats["min_cosine_sim"] = 1.0
        return stats

    def _norm_emas(self) -> list[float | None]:
        if isinstance(self.resolver, ConflictResolver):
            return list(self.resolver.arbitrator.norm_ema)
        return [None] * len(self.loss_names)

    def _gradient_stats(self, gradients: Gradients) -> dict[str, float]:
        """Pairwise cosines of the raw gradients, their minimum, and the raw norms."""
        names, norms, eps = self.loss_names, gradients.norms, self.config.eps
        cos = cosine_matrix(gradients.gram, eps)
        stats = {f"cos/{names[i]}_vs_{names[j]}": float(cos[i, j]) for i, j in _pairs(len(names))}
        values = [float(cos[i, j]) for i, j in _pairs(len(names)) if min(norms[i], norms[j]) >= eps]
        stats["min_cosine_sim"] = min(values) if values else 1.0
        for name, n in zip(names, norms, strict=True):
            stats[f"raw_norm/{name}"] = n
        if gradients.noise is not None:
            stats.update(self._noise_stats(gradients))
        return stats

    def _noise_keys(self) -> list[str]:
        """The signal and noise statistics' keys; at the representation only ``harm_z/``: its
        micro-batches' gradients share no space, so they have no mean to debias."""
        names = self.loss_names
        keys = [f"harm_z/{n}" for n in names]
        if self.config.gradients_at == "parameters":
            keys += [f"signal_cos/{names[i]}_vs_{names[j]}" for i, j in _pairs(len(names))]
            keys += [f"noise_share/{n}" for n in names] + [f"noise_scale/{n}" for n in names]
        return keys

    def _noise_stats(self, gradients: Gradients) -> dict[str, float]:
        """``harm_z/``: the plain sum's harm on each loss in standard errors; with the
        parameters' gradients also the debiased cosines, each loss's noise share and noise
        scale (docs/algorithm.md, "Signal and noise")."""
        noise, names = gradients.noise, self.loss_names
        assert noise is not None
        plain = torch.ones(len(names), dtype=torch.float64)
        if self.config.gradients_at == "representation":
            return {f"harm_z/{n}": z for n, z in zip(names, noise.harm_scores(plain), strict=True)}
        gram = gradients.gram
        stats = {
            f"harm_z/{n}": z for n, z in zip(names, noise.harm_scores(plain, gram), strict=True)
        }
        signal = noise.debiased(gram)
        diag = signal.diagonal().tolist()
        for i, j in _pairs(len(names)):
            key = f"signal_cos/{names[i]}_vs_{names[j]}"
            if diag[i] > 0 and diag[j] > 0:
                stats[key] = max(-1.0, min(1.0, float(signal[i, j]) / math.sqrt(diag[i] * diag[j])))
            else:
                stats[key] = math.nan
        for name, share in zip(names, noise.noise_shares(gram), strict=True):
            stats[f"noise_share/{name}"] = share
        for name, scale in zip(names, noise.noise_scales(gram), strict=True):
            stats[f"noise_scale/{name}"] = scale
        return stats


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _check_split(split: Any, config: ConductorConfig) -> None:
    """``split=(trunk, heads)`` exactly when ``gradients_at="representation"``."""
    representation = config.gradients_at == "representation"
    if split is None and representation:
        raise ValueError(
            "gradients_at='representation' needs split=(trunk, heads): trunk(x) -> z, the "
            "representation the losses share (a tensor), and heads(z) -> the output the loss "
            "functions receive, with model(x) == heads(trunk(x))"
        )
    if split is not None and not representation:
        raise ValueError(
            "split=(trunk, heads) is for gradients_at='representation'; pass "
            "gradients_at='representation' with it, or leave split out"
        )
    if split is not None and (
        not isinstance(split, (tuple, list)) or len(split) != 2 or not all(map(callable, split))
    ):
        raise TypeError(f"split must be a pair of callables (trunk, heads), got {split!r}")


def _check_sharded(config: ConductorConfig) -> None:
    """What a ``fully_shard`` model rules out, said before the first step."""
    for name, value, default in (
        ("gradients_at", config.gradients_at, "parameters"),
        ("resolve_every", config.resolve_every, 1),
    ):
        if value != default:
            raise ValueError(
                f"{name}={value!r} is not supported under fully_shard; leave {name} at {default!r}"
            )
    if config.ddp_sync != "grads":
        raise ValueError(
            f"ddp_sync={config.ddp_sync!r} is for DistributedDataParallel; under fully_shard, "
            "FSDP's reduce-scatter averages each loss's gradient over the ranks, which is what "
            "ddp_sync='grads' (the default) does: leave ddp_sync unset"
        )
    if config.per_loss_backward == "batched":
        raise ValueError(
            "per_loss_backward='batched' cannot run under fully_shard (a batched backward does "
            "not reach FSDP's reduce-scatter); use 'sequential' or 'auto' (which takes it)"
        )


def _check_inputs(
    model: Any,
    loss_fns: Any,
    lambdas: Any,
    autocast_dtype: Any,
    scaler: Any,
    resolver: Any,
) -> None:
    """Bad values raise ``TypeError``/``ValueError`` naming the argument and the value."""
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
    if autocast_dtype is not None:
        v.check_choice("autocast_dtype", autocast_dtype, _AUTOCAST_DTYPES)
    if scaler is not None and not all(
        hasattr(scaler, a) for a in ("scale", "unscale_", "step", "update")
    ):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {scaler!r}")
    if resolver is not None and not isinstance(resolver, Resolver):
        raise TypeError(
            f"resolver must have resolve(), state_dict() and load_state_dict(), got {resolver!r}"
        )
