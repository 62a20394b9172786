"""``ConductorConfig``: every tuning parameter of the conductor, written once.

It needs nothing but the standard library (not even torch), so the harness can check a recipe
against it without loading torch.

Defaults, checks and ``repr`` live here and nowhere else: the constructor of
:class:`~gcond.GradientConductor` takes a config (its keyword arguments are mapped onto one), and
the harness derives its recipe section from these fields. What each parameter does is told in
``docs/algorithm.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ._validation import _is_number, real_problem


@dataclass(frozen=True)
class ConfigProblem:
    """One bad value: ``path`` is the field (and item index) it sits at, ``expected`` completes
    "must be ..."; a wrong type is a ``TypeError``, a wrong value a ``ValueError``."""

    path: tuple[str | int, ...]
    value: Any
    expected: str
    wrong_type: bool = False

    @property
    def key(self) -> str:
        """``conflict_thresholds[0]``-style name of the path."""
        return "".join(f"[{p}]" if isinstance(p, int) else p for p in self.path)

    def error(self) -> Exception:
        kind = TypeError if self.wrong_type else ValueError
        return kind(f"{self.key} must be {self.expected}, got {self.value!r}")


@dataclass(frozen=True)
class ConductorConfig:
    """Every tuning parameter of :class:`~gcond.GradientConductor`, with its default.

    Checked once, on construction (``TypeError``/``ValueError`` naming the parameter and the
    value); the step each one acts on is described in ``docs/algorithm.md``.

    * ``accumulation_steps``: micro-batches per optimizer step (N), ≥ 1.
    * ``accumulation``: ``"full"``, every loss on every micro-batch from one forward, or
      ``"stochastic"``, each micro-batch serves one loss in turn (costs as much as plain
      accumulation; needs N ≥ the number of losses).
    * ``resolution``: ``"zones"`` (projection by conflict zone) or ``"smooth"`` (one rule over a
      remapped angle).
    * ``conflict_thresholds``: ``(critical, main, weak)`` cosines, each in [-1, 1],
      non-decreasing.
    * ``projection_max_iters``: most resolution iterations per step; ``None`` = 2·K.
    * ``conflicts``: which conflicts are resolved: ``"all"`` (default: every pair whose cosine
      is below ``weak``), ``"harmful"`` (only while the merge of the current gradients would
      increase some loss to first order; a conflict that the plain sum survives is left alone)
      or ``"significant"`` (only while that harm, estimated without the micro-batch noise,
      exceeds ``significance`` of its standard errors; needs ``accumulation_steps`` ≥ 2).
    * ``significance``: for ``conflicts="significant"``, how many standard errors a harm must
      exceed, ≥ 0.
    * ``noise_statistics``: measure each step's signal and noise from its micro-batches
      (``signal_cos/``, ``noise_share/``, ``noise_scale/``, ``harm_z/``); on by itself with
      ``conflicts="significant"``; needs ``accumulation_steps`` ≥ 2 and full accumulation.
    * ``dominance_window``: a loss that won the last this-many arbitrations wins the next one
      outright; 0 turns the rule off.
    * ``dominance_rule``: ``"bounded"`` (default: a streak earns at most ``dominance_window``
      outright wins, then the scores decide again) or ``"sticky"`` (the original rule: outright
      wins extend the streak, so a dominant loss keeps winning while conflicts go on).
    * ``tie_breaking_weights``: ``(stability, strength)`` weights of the arbitrator's score,
      ≥ 0 with a positive sum.
    * ``norm_ema_beta``: EMA factor of each loss's gradient norm (the strength score), in [0, 1).
    * ``norm_cap``: cap on each raw per-loss gradient's norm before resolution; ``None`` = none.
    * ``norm_equalization``: ``"max"`` rescales each per-loss gradient before resolution so that
      its norm (an EMA over steps of it) equals the largest one's, as DB-MTL does; ``"off"``
      (default) leaves the norms as they are.
    * ``norm_equalization_beta``: EMA factor over steps of each loss's gradient norm that
      ``norm_equalization`` equalises, in [0, 1); 0 = this step's norms.
    * ``momentum_beta``: the conductor's own momentum, in [0, 1); 0 = off (the optimizer keeps
      its own).
    * ``use_lion``: write ``sign`` of the momentum (needs ``momentum_beta`` > 0).
    * ``trust_ratio_coef``: rescale each parameter tensor's update to this times ``‖p‖``;
      ``None`` = off.
    * ``trust_ratio_clip``: upper clip of that ratio, > 0.
    * ``remap_power``: exponent of the ``"smooth"`` rule's angle remap between main and
      critical, > 0.
    * ``return_raw_grad``: write the resolved gradient, skipping momentum and trust ratio.
    * ``freeze_bn``: BatchNorm layers in eval mode during accumulation.
    * ``grad_dtype``: storage dtype of the K per-loss accumulators and the momentum, by name
      (a ``torch.dtype`` is accepted and stored by name: ``torch.bfloat16`` → ``"bfloat16"``).
    * ``ddp_sync``: under DDP, ``"grads"`` all-reduces the accumulators before resolution,
      ``"update"`` resolves locally and averages the update, ``"none"`` does neither.
    * ``per_loss_backward``: full mode's K gradients from one forward: ``"batched"`` (one
      batched backward), ``"sequential"`` (K backwards over the retained graph), ``"auto"``
      (batched, sequential for good if it cannot run) or ``"benchmark"`` (times both on the
      first micro-batch and keeps the faster; fastest, but two runs may differ in the last bits).
    * ``eps``: guards divisions, > 0.
    * ``gradients_at``: where the per-loss gradients are taken: ``"parameters"`` (exact, K
      backwards through the whole model) or ``"representation"``, the output of the model's
      shared trunk (K backwards through the heads, one through the trunk; needs
      ``split=(trunk, heads)`` on the conductor).
    * ``resolve_every``: resolve on every R-th applied step only, ≥ 1; the steps between take
      one backward per micro-batch of the weighted sum, with the last full step's weights.
    """

    accumulation_steps: int = 1
    accumulation: Literal["full", "stochastic"] = "full"
    resolution: Literal["zones", "smooth"] = "zones"
    conflict_thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0)
    projection_max_iters: int | None = None
    conflicts: Literal["all", "harmful", "significant"] = "all"
    significance: float = 2.0
    noise_statistics: bool = False
    dominance_window: int = 3
    dominance_rule: Literal["bounded", "sticky"] = "bounded"
    tie_breaking_weights: tuple[float, float] = (0.8, 0.2)
    norm_ema_beta: float = 0.95
    norm_cap: float | None = None
    norm_equalization: Literal["off", "max"] = "off"
    norm_equalization_beta: float = 0.9
    momentum_beta: float = 0.0
    use_lion: bool = False
    trust_ratio_coef: float | None = None
    trust_ratio_clip: float = 10.0
    remap_power: float = 2.0
    return_raw_grad: bool = False
    freeze_bn: bool = True
    grad_dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    ddp_sync: Literal["grads", "update", "none"] = "grads"
    per_loss_backward: Literal["auto", "batched", "sequential", "benchmark"] = "auto"
    eps: float = 1e-8
    gradients_at: Literal["parameters", "representation"] = "parameters"
    resolve_every: int = 1

    def __post_init__(self) -> None:
        if type(self.grad_dtype).__name__ == "dtype":  # a torch.dtype, without importing torch
            object.__setattr__(self, "grad_dtype", str(self.grad_dtype).removeprefix("torch."))
        for problem in self.problems():
            raise problem.error()
        # Tuples of floats, whatever sequence of numbers was given.
        for name in ("conflict_thresholds", "tie_breaking_weights"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        for name in (
            "significance",
            "norm_ema_beta",
            "norm_equalization_beta",
            "momentum_beta",
            "trust_ratio_clip",
            "remap_power",
            "eps",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def check(cls, **values: Any) -> list[ConfigProblem]:
        """Every problem of a config with these ``values`` (the defaults for the rest), without
        raising: what a tool that reports all errors at once needs."""
        unknown = [name for name in values if name not in FIELD_NAMES]
        if unknown:
            raise TypeError(_unknown_message(unknown[0]))
        fields = {f.name: f.default for f in dataclasses.fields(cls)} | values
        draft = object.__new__(cls)  # unchecked: only read by problems()
        for name, value in fields.items():
            object.__setattr__(draft, name, value)
        return list(draft.problems())

    def problems(self) -> Iterator[ConfigProblem]:
        """Every bad value, field by field, then the rules between fields."""
        yield from _int(self, "accumulation_steps", low=1)
        for name in (
            "accumulation",
            "resolution",
            "conflicts",
            "dominance_rule",
            "norm_equalization",
            "grad_dtype",
            "ddp_sync",
            "per_loss_backward",
            "gradients_at",
        ):
            yield from _choice(self, name, _choices(name))
        yield from _reals(self, "conflict_thresholds", 3, low=-1.0, high=1.0)
        yield from _int(self, "projection_max_iters", low=0, allow_none=True)
        yield from _real(self, "significance", low=0.0)
        yield from _int(self, "dominance_window", low=0)
        yield from _reals(self, "tie_breaking_weights", 2, low=0.0)
        yield from _real(self, "norm_ema_beta", low=0.0, high=1.0, high_open=True)
        yield from _real(self, "norm_cap", low=0.0, low_open=True, allow_none=True)
        yield from _real(self, "norm_equalization_beta", low=0.0, high=1.0, high_open=True)
        yield from _real(self, "momentum_beta", low=0.0, high=1.0, high_open=True)
        yield from _real(self, "trust_ratio_coef", low=0.0, low_open=True, allow_none=True)
        yield from _real(self, "trust_ratio_clip", low=0.0, low_open=True)
        yield from _real(self, "remap_power", low=0.0, low_open=True)
        yield from _real(self, "eps", low=0.0, low_open=True)
        yield from _int(self, "resolve_every", low=1)
        for name in ("use_lion", "return_raw_grad", "freeze_bn", "noise_statistics"):
            if not isinstance(getattr(self, name), bool):
                yield ConfigProblem((name,), getattr(self, name), "a bool", wrong_type=True)
        yield from self._rules()

    def _rules(self) -> Iterator[ConfigProblem]:
        thresholds, weights = self.conflict_thresholds, self.tie_breaking_weights
        if _numbers(thresholds, 3) and not thresholds[0] <= thresholds[1] <= thresholds[2]:
            yield ConfigProblem(
                ("conflict_thresholds",),
                thresholds,
                "non-decreasing cosines (critical <= main <= weak)",
            )
        if _numbers(weights, 2) and all(w >= 0 for w in weights) and sum(weights) <= 0:
            yield ConfigProblem(
                ("tie_breaking_weights",),
                weights,
                "(stability, strength) weights with a positive sum",
            )
        if self.use_lion is True and self.momentum_beta == 0:
            yield ConfigProblem(
                ("momentum_beta",), self.momentum_beta, "a value > 0 when use_lion is on"
            )
        if self.gradients_at == "representation" and self.accumulation == "stochastic":
            yield ConfigProblem(
                ("accumulation",),
                self.accumulation,
                "'full' with gradients_at='representation' (its per-loss gradients are already "
                "cheap: K backwards through the heads, one through the trunk)",
            )
        yield from self._noise_rules()

    @property
    def measures_noise(self) -> bool:
        """Whether each step measures its signal and noise (``noise_statistics``, or
        ``conflicts="significant"``, which decides on them)."""
        return self.noise_statistics is True or self.conflicts == "significant"

    def _noise_rules(self) -> Iterator[ConfigProblem]:
        if not self.measures_noise:
            return
        what = (
            "conflicts='significant', which tells a conflict from noise by the spread of the "
            "step's micro-batches,"
            if self.conflicts == "significant"
            else "noise_statistics=True, which measures the spread of the step's micro-batches,"
        )
        if isinstance(self.accumulation_steps, int) and self.accumulation_steps < 2:
            yield ConfigProblem(
                ("accumulation_steps",),
                self.accumulation_steps,
                f"at least 2 with {what} and one micro-batch has none: set accumulation_steps "
                "to 2 or more (the same samples per step in smaller micro-batches)",
            )
        if self.accumulation == "stochastic":
            yield ConfigProblem(
                ("accumulation",),
                self.accumulation,
                f"'full' with {what} and a stochastic micro-batch serves one loss only",
            )

    def problems_with_losses(self, num_losses: int) -> Iterator[ConfigProblem]:
        """The rules that need the number of losses K (the one rule: stochastic N ≥ K)."""
        if self.accumulation == "stochastic" and self.accumulation_steps < num_losses:
            yield ConfigProblem(
                ("accumulation_steps",),
                self.accumulation_steps,
                f"at least the number of losses ({num_losses}) for stochastic accumulation, "
                "which gives each micro-batch to one loss",
            )

    def replace(self, **changes: Any) -> ConductorConfig:
        """A copy with ``changes``; an unknown name is a ``TypeError`` naming the closest one."""
        unknown = [name for name in changes if name not in FIELD_NAMES]
        if unknown:
            raise TypeError(_unknown_message(unknown[0]))
        return dataclasses.replace(self, **changes)


def _choices(name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field, read from its annotation."""
    return get_args(typing.get_type_hints(ConductorConfig)[name])


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown conductor parameter {name!r}{hint}"


def _numbers(value: Any, length: int) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == length
        and all(_is_number(v) and math.isfinite(v) for v in value)
    )


def _choice(cfg: ConductorConfig, name: str, choices: tuple[Any, ...]) -> Iterator[ConfigProblem]:
    value = getattr(cfg, name)
    if value not in choices:
        yield ConfigProblem((name,), value, "one of " + ", ".join(repr(c) for c in choices))


def _int(
    cfg: ConductorConfig, name: str, *, low: int, allow_none: bool = False
) -> Iterator[ConfigProblem]:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        yield ConfigProblem((name,), value, "an integer", wrong_type=True)
    elif value < low:
        yield ConfigProblem((name,), value, f"an integer >= {low}")


def _real(
    cfg: ConductorConfig, name: str, *, allow_none: bool = False, **bounds: Any
) -> Iterator[ConfigProblem]:
    value = getattr(cfg, name)
    if not (value is None and allow_none):
        yield from _check_real((name,), value, **bounds)


def _reals(cfg: ConductorConfig, name: str, length: int, **bounds: Any) -> Iterator[ConfigProblem]:
    value = getattr(cfg, name)
    if not isinstance(value, (tuple, list)) or len(value) != length:
        yield ConfigProblem((name,), value, f"a tuple of {length} numbers", wrong_type=True)
        return
    for i, item in enumerate(value):
        yield from _check_real((name, i), item, **bounds)


def _check_real(path: tuple[str | int, ...], value: Any, **bounds: Any) -> Iterator[ConfigProblem]:
    """A finite real number inside [low, high] (open ends where asked): see `real_problem`."""
    problem = real_problem(value, **bounds)
    if problem is None:
        return
    kind, interval = problem
    if kind == "type":
        yield ConfigProblem(path, value, "a real number", wrong_type=True)
    elif kind == "finite":
        yield ConfigProblem(path, value, "a finite number")
    else:
        yield ConfigProblem(path, value, f"a number in {interval}")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ConductorConfig))


# ---------------------------------------------------------------------------------------------
# Keyword arguments, including the original GCond's spellings (docs/algorithm.md, "Migrating")

_LEGACY = {
    "use_smooth_logic": ("resolution", {True: "smooth", False: "zones"}),
    "stochastic_accumulation": ("accumulation", {True: "stochastic", False: "full"}),
}
_warned: set[str] = set()
_DDP_SYNC_LEGACY = (
    "ddp_sync={value!r} is the original GCond's spelling, not ours: ddp_sync='grads' averages "
    "the per-loss accumulators over the ranks before resolution, so every rank resolves the same "
    "global gradients and writes the same update (no broadcast needed); ddp_sync='update' "
    "resolves on each rank and averages the final update (one gradient's worth of traffic); "
    "ddp_sync='none' leaves the ranks apart"
)


def config_from(
    config: ConductorConfig | None, accumulation_steps: int | None, options: dict[str, Any]
) -> ConductorConfig:
    """``config`` (or the defaults) with ``accumulation_steps`` and keyword ``options`` on top.

    The original GCond's ``use_smooth_logic=`` and ``stochastic_accumulation=`` are mapped onto
    ``resolution`` and ``accumulation`` with a one-time warning; its ``ddp_sync="avg"`` and
    ``"broadcast"`` are refused with what ours do instead.
    """
    if config is not None and not isinstance(config, ConductorConfig):
        raise TypeError(f"config must be a gcond.ConductorConfig, got {config!r}")
    options = dict(options)
    for old, (new, values) in _LEGACY.items():
        if old not in options:
            continue
        value = options.pop(old)
        if value not in values:
            raise TypeError(f"{old} must be a bool, got {value!r}")
        if new in options:
            raise TypeError(f"{old}= and {new}= are the same parameter: pass only {new}=")
        options[new] = values[value]
        if old not in _warned:
            _warned.add(old)
            warnings.warn(
                f"{old}={value!r} is the original GCond's spelling; write {new}={values[value]!r}",
                FutureWarning,
                stacklevel=4,
            )
    if options.get("ddp_sync") in ("avg", "broadcast"):
        raise ValueError(_DDP_SYNC_LEGACY.format(value=options["ddp_sync"]))
    if accumulation_steps is not None:
        options["accumulation_steps"] = accumulation_steps
    base = config if config is not None else ConductorConfig()
    return base.replace(**options) if options else base
