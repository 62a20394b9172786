"""``GradientConductor``: accumulate → resolve → update, one optimizer step at a time.

Each part is an object of its own (``accumulator``, ``resolver``, ``updater``); the conductor
checks its inputs, wires the parts, and assembles the step's statistics. The algorithm, rule by
rule, is in ``docs/algorithm.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import _validation as v
from ._accumulate import Accumulator, DataProvider, Gradients, LossFn
from ._config import ConductorConfig, config_from
from ._distributed import distributed, is_ddp, on_any_rank
from ._resolution import ZONES, cosine_matrix
from ._resolve import ConflictResolver, Resolver
from ._sharded import ShardedAccumulator, ShardedUpdater, pack, shard_group, unpack
from ._update import Updater

_STATE_FORMAT = "gcond.GradientConductor/1"
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


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
        **options: Any,
    ) -> None:
        config = config_from(config, accumulation_steps, options)
        _check_inputs(model, loss_fns, lambdas, autocast_dtype, scaler, resolver)
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
        sharding = {"names": names} if self.sharded else {}
        self.accumulator = (ShardedAccumulator if self.sharded else Accumulator)(
            self._module,
            params,
            self.loss_fns,
            self.lambdas,
            config,
            autocast_dtype=autocast_dtype,
            scaler=scaler,
            group=self._group,
            **sharding,
        )
        self.resolver: Resolver = resolver or ConflictResolver(self.loss_names, config)
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
        """Step 1: the K per-loss gradients of this step, and what the host needs of them."""
        return self.accumulator.accumulate(data_provider)

    def finish(self, gradients: Gradients) -> dict[str, float]:
        """Steps 2-10: skip on non-finite gradients, else resolve, update and write ``p.grad``."""
        bad = gradients.nonfinite
        if self.config.ddp_sync == "update" and distributed(self._group):
            # Resolved locally, but every rank must skip together: one that skipped alone would
            # leave the others waiting in the all-reduce of the update.
            bad = on_any_rank(bad, self._group, self.device)
        stats = self._base_stats(gradients.loss_means, bad)
        if any(bad):
            self.updater.skip()
            return stats
        stats.update(self._gradient_stats(gradients))
        resolved = self.resolver.resolve(gradients)
        stats.update(resolved.stats)
        stats["final_grad_norm"] = self.updater.apply(gradients, resolved.weights)
        self.accumulator.commit(gradients.norms)
        stats["step"] = float(self.updater.steps)
        return stats

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
        momentum, buffer = state["momentum"], self.updater.momentum.buffer
        if (momentum is None) != (buffer is None):
            raise ValueError("conductor state and this conductor disagree on momentum (beta > 0)")
        self.updater.steps = int(state["step"])
        self.accumulator.load_state_dict(dict(state))
        self.updater.load_momentum(momentum)
        self.resolver.load_state_dict(state)

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
        return stats


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _check_sharded(config: ConductorConfig) -> None:
    """What a ``fully_shard`` model rules out, said before the first step."""
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
