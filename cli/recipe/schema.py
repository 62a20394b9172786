"""The recipe itself: the conductor section (every field of the library's configuration), the
optimizer, schedule, evaluation, logging and checkpoint sections, and `Recipe` with its rules
between sections and its metrics."""

import dataclasses
import difflib
from collections.abc import Iterator
from typing import (
    Annotated,
    Any,
    Literal,
    get_type_hints,
)

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    create_model,
    field_validator,
)

from gcond._config import ConductorConfig as LibraryConductorConfig

from ..components import names
from . import method_table  # noqa: F401  (registers the methods the conductor section names)
from .components import DataSection, ImageDataConfig, LossSection, ModelSection, TargetConfig
from .fields import (
    LOG_TAKING,
    MAX_COUNT,
    MAX_SIZE,
    OWN_LOSS_SCALES,
    SCALED_SUMS,
    Beta,
    Count,
    Fraction,
    NonNegative,
    Positive,
    Size,
    _device,
    _identifier,
    _invalid,
    _Issue,
    _loss_name,
    _Section,
    _target,
    name_problem,
)


class _ConductorSection(_Section):
    """`method` plus every field of `gcond.ConductorConfig`, with the library's names, types and
    defaults (see `_conductor_fields`); the library checks the values, so a rule is written once.
    """

    method: Literal[names("method")] = "conductor"  # type: ignore[valid-type]

    def _library_values(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in LibraryConductorConfig.__dataclass_fields__}
        if self.method == "conductor-stochastic":
            values["accumulation"] = "stochastic"
        return values

    def library_config(self) -> LibraryConductorConfig:
        """The `gcond.ConductorConfig` this section sets, passed whole to the conductor."""
        return LibraryConductorConfig(**self._library_values())

    def _issues(self) -> Iterator[_Issue]:
        for problem in LibraryConductorConfig.check(**self._library_values()):
            yield _Issue(problem.path, problem.value, problem.expected)


# The recipe's own defaults where they differ from the library's.
_RECIPE_DEFAULTS = {"accumulation_steps": 8}


def _conductor_fields() -> dict[str, Any]:
    """Every `gcond.ConductorConfig` field as a recipe field: the library's annotation (capped at
    MAX_SIZE for integers: anything larger is a typo) and default."""
    hints = get_type_hints(LibraryConductorConfig)
    fields = {}
    for field in dataclasses.fields(LibraryConductorConfig):
        annotation = hints[field.name]
        if annotation in (int, int | None):
            annotation = Annotated[annotation, Field(le=MAX_SIZE)]
        fields[field.name] = (annotation, _RECIPE_DEFAULTS.get(field.name, field.default))
    return fields


ConductorConfig = create_model(
    "ConductorConfig",
    __base__=_ConductorSection,
    __doc__=_ConductorSection.__doc__,
    __module__=__name__,
    **_conductor_fields(),
)


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.05
    betas: tuple[Beta, Beta] = (0.9, 0.95)  # adamw
    eps: Positive = 1e-8  # adamw
    momentum: Beta = 0.9  # sgd
    nesterov: bool = False  # sgd

    def _issues(self) -> Iterator[_Issue]:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            yield _Issue(("nesterov",), True, "false when optimizer.momentum is 0")


class DistributedConfig(_Section):
    # How the processes of a torchrun launch share the model: ddp (each holds all of it) or
    # fsdp (FSDP2's fully_shard: each holds 1/world of the weights, gradients, optimizer and
    # conductor state; checkpoints through torch.distributed.checkpoint).
    strategy: Literal["ddp", "fsdp"] = "ddp"


class ScheduleConfig(_Section):
    max_steps: Count  # optimizer steps
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)  # linear warmup, then cosine decay
    min_lr_ratio: Fraction = 0.0  # the cosine decays to lr * min_lr_ratio

    def _issues(self) -> Iterator[_Issue]:
        if self.warmup_steps > self.max_steps:
            yield _Issue(
                ("warmup_steps",),
                self.warmup_steps,
                f"at most schedule.max_steps ({self.max_steps})",
            )


class EvalConfig(_Section):
    every: Count = 50  # optimizer steps between evaluations (and one at the end)
    batch_size: Size = 64  # built-in data sets: validation batch size
    num_images: int = Field(8, ge=0, le=MAX_SIZE)  # images in the TensorBoard grids
    # Your own evaluation, `evaluate(model, batches, **args) -> {name: float}` (see plugins.py);
    # without one, a run on your own data reports every loss on the validation batches.
    target: Annotated[str, AfterValidator(_target)] | None = None
    args: dict[Annotated[str, AfterValidator(_identifier)], Any] = Field(default_factory=dict)
    # Your metrics that are better higher (e.g. [accuracy]); the others are better lower.
    higher_is_better: list[Annotated[str, AfterValidator(_identifier)]] = Field(
        default_factory=list
    )


class LogConfig(_Section):
    every: Count = 1  # steps between console / TensorBoard scalar writes
    tensorboard: bool = True
    runs_dir: str = Field("runs", min_length=1)


class CheckpointConfig(_Section):
    every: Count = 100  # steps between "latest" checkpoints (also at the end and on stop)
    keep_best: bool = True
    # Any metric the evaluation reports (built-in data sets: checked now; your own evaluation:
    # at the first evaluation).
    best_metric: Annotated[str, StringConstraints(pattern=r"^eval/\w+$")] = "eval/ssim"
    best_mode: Literal["max", "min"] = "max"


class Recipe(_Section):
    name: str | None = None  # load_recipe sets it to the file stem when absent
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Annotated[str, AfterValidator(_device)] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    data: DataSection = Field(default_factory=lambda: ImageDataConfig())
    model: ModelSection
    losses: dict[Annotated[str, AfterValidator(_loss_name)], LossSection]
    # Every method trains on the losses rescaled: none (as they are), log (Σ λ_k log L_k) or
    # initial (Σ λ_k L_k / L_k⁽⁰⁾, L_k⁽⁰⁾ = the mean over the first optimizer step).
    loss_scale: Literal["none", "log", "initial"] = "none"
    conductor: ConductorConfig = Field(default_factory=ConductorConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig
    clip_grad_norm: Positive | None = 1.0
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    max_skipped_steps: Count = 10  # consecutive non-finite steps before the run stops

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        problem = value is not None and name_problem(value)
        if problem:
            raise _invalid(problem)
        return value

    @field_validator("losses")
    @classmethod
    def _some_loss(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise _invalid("at least one loss, e.g. {l1: {kind: l1, weight: 1.0}}")
        return value

    def _issues(self) -> Iterator[_Issue]:
        # Each component's rules that involve the rest of the recipe live on its section.
        for section in (self.data, self.model):
            if hasattr(section, "recipe_issues"):
                yield from section.recipe_issues(self)
        for name, loss in self.losses.items():
            if hasattr(loss, "recipe_issues"):
                yield from loss.recipe_issues(self, name)
        weights = {name: loss.weight for name, loss in self.losses.items()}
        if not any(weights.values()):
            yield _Issue(("losses",), weights, "at least one loss with weight > 0")
        yield from self._accumulation_issues()
        yield from self._split_issues()
        method = self.conductor.method
        if method in SCALED_SUMS and self.loss_scale not in ("none", SCALED_SUMS[method]):
            yield _Issue(
                ("loss_scale",),
                self.loss_scale,
                f"'none' or '{SCALED_SUMS[method]}' with conductor.method {method} (which is "
                f"sum with loss_scale {SCALED_SUMS[method]}); for sum with loss_scale "
                f"{self.loss_scale}, use conductor.method: sum",
            )
        own = OWN_LOSS_SCALES.get(method)
        if method not in SCALED_SUMS and own and self.loss_scale not in ("none", own):
            yield _Issue(
                ("loss_scale",),
                self.loss_scale,
                f"'none' or '{own}' with conductor.method {method} (which trains with "
                f"loss_scale {own} itself)",
            )
        if method in LOG_TAKING and self.loss_scale == "log":
            yield _Issue(
                ("loss_scale",),
                self.loss_scale,
                f"'none' or 'initial' with conductor.method {method} (which takes the log of "
                "the losses itself, and log L_k can be negative)",
            )
        yield from self._metric_issues()
        if self.eval.args and self.eval.target is None:
            yield _Issue(("eval", "args"), self.eval.args, "no args without eval.target")

    def _split_issues(self) -> Iterator[_Issue]:
        """A built-in model without trunk(x)/heads(z) cannot take gradients at the
        representation (the user's model is checked when it is built)."""
        uses_conductor = self.conductor.method not in ("sum", *SCALED_SUMS)
        if (
            uses_conductor
            and self.conductor.gradients_at == "representation"
            and not getattr(self.model, "has_split", True)
        ):
            yield _Issue(
                ("conductor", "gradients_at"),
                "representation",
                f"'parameters' with model.name {getattr(self.model, 'name', '?')}, which has no "
                "trunk(x) and heads(z) to say where its shared trunk ends (lab_mlp has them; "
                "for your own model, add trunk(x) and heads(z): README, 'Your own model')",
            )

    def metrics(self) -> dict[str, str] | None:
        """The evaluation's metrics and whether each is better high ("max") or low ("min");
        None when the user's own evaluation decides them (known at its first call)."""
        if self.eval.target is not None:
            return None
        if isinstance(self.data, TargetConfig):
            return {f"eval/{name}": "min" for name in self.losses}
        return {f"eval/{name}": mode for name, mode in self.data.metrics(self).items()}

    @property
    def user_metrics(self) -> bool:
        """Whether the evaluation is the user's (their own, or their losses on their data)."""
        return self.eval.target is not None or isinstance(self.data, TargetConfig)

    def better(self, metric: str) -> str:
        """Which way an eval metric (with or without ``eval/``) improves: "min" or "max", the
        one source every command reads. The user's own metrics improve downwards unless listed
        in ``eval.higher_is_better``; any other unknown metric (an error) downwards."""
        name = metric.removeprefix("eval/")
        if self.user_metrics:
            return "max" if name in self.eval.higher_is_better else "min"
        return (self.metrics() or {}).get(f"eval/{name}", "min")

    def _metric_issues(self) -> Iterator[_Issue]:
        metrics, cfg = self.metrics(), self.checkpoint
        if metrics is None or not cfg.keep_best:
            return
        if cfg.best_metric not in metrics:
            close = difflib.get_close_matches(cfg.best_metric, list(metrics), n=1, cutoff=0.6)
            yield _Issue(
                ("checkpoint", "best_metric"),
                cfg.best_metric,
                "a metric this run's evaluation reports: "
                + ", ".join(metrics)
                + (f"; did you mean '{close[0]}'?" if close else ""),
            )
        elif cfg.best_mode != metrics[cfg.best_metric]:
            yield _Issue(
                ("checkpoint", "best_mode"),
                cfg.best_mode,
                f"'{metrics[cfg.best_metric]}' for {cfg.best_metric}",
            )

    def _accumulation_issues(self) -> Iterator[_Issue]:
        config = self.conductor.library_config()
        for problem in config.problems_with_losses(len(self.losses)):
            yield _Issue(("conductor", *problem.path), problem.value, problem.expected)
