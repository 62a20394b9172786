"""Recipe schema, YAML loading with KEY=VALUE overrides, and errors that say what to fix.

A recipe is plain YAML validated into the pydantic models below. Every section forbids unknown
keys, so a typo is an error instead of a silently ignored setting. `load_recipe` collects every
problem at once (YAML syntax, bad overrides, wrong types and ranges, rules between fields) and
raises one `RecipeError` whose lines each name the full key path, the bad value and what is
expected, with the nearest valid key or choice where there is one.

Rules that involve a single field are field validators, so they are reported together with the
other errors of their section; rules between fields (`_issues`) run once the fields they read
are valid.
"""

import copy
import dataclasses
import difflib
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from gcond._config import ConductorConfig as LibraryConductorConfig

from .errors import GcondError

MAX_SIZE = 1_000_000  # sizes, widths, depths, batch sizes: anything larger is a typo
MAX_COUNT = 1_000_000_000  # steps, sample counts, intervals
RESERVED_LOSS_NAMES = ("total",)  # `loss/total` is the weighted sum in the conductor's stats
# The scale-only baselines: plain accumulation (`sum`) of the losses rescaled by `loss_scale`.
SCALED_SUMS = {"sum-log": "log", "sum-normalized": "initial"}

Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Cosine = Annotated[float, Field(ge=-1.0, le=1.0)]


class RecipeError(GcondError):
    """A recipe that cannot be used; `errors` holds one human-readable line per problem."""

    def __init__(self, errors: list[str], source: Path | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.source = source

    def report_lines(self) -> list[str]:
        count = f"{len(self.errors)} problem" + ("s" if len(self.errors) > 1 else "")
        where = f" in {self.source}" if self.source else ""
        return [f"Recipe error{where} ({count}):", *(f"  - {line}" for line in self.errors)]


class _Issue(NamedTuple):
    """A broken rule between fields: key path relative to the section that found it."""

    path: tuple[str, ...]
    value: Any
    expected: str


def _invalid(expected: str) -> PydanticCustomError:
    """The error a field validator raises; `expected` completes "got X, expected ..."."""
    return PydanticCustomError("recipe_value", "{expected}", {"expected": expected})


def _loss_name(name: str) -> str:
    """Loss names become TensorBoard tags (`loss/<name>`, `cos/<a>_vs_<b>`)."""
    if not re.fullmatch(r"\w+", name, flags=re.ASCII):
        raise _invalid("a loss name of letters, digits and '_' only")
    if name in RESERVED_LOSS_NAMES:
        raise _invalid(f"a loss name other than '{name}' (reserved for the weighted sum)")
    return name


def _device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+", device):
        raise _invalid("auto, cpu, cuda or cuda:N")
    return device


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a directory name under runs/ (recipe or run name), or None."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return "a name of letters, digits, '.', '_' and '-' only (no path separators or spaces)"
    if set(name) == {"."}:
        return "a name that is not '.' or '..'"
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def _issues(self) -> Iterator[_Issue]:
        """Rules between this section's fields; sections that have some override this."""
        return iter(())

    @model_validator(mode="after")
    def _check_issues(self) -> Self:
        issues = list(self._issues())
        if issues:
            raise PydanticCustomError("recipe_issues", "{issues}", {"issues": issues})
        return self


class AugmentConfig(_Section):
    crop_scale: tuple[
        Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]
    ] = (0.35, 1.0)  # random resized crop: area range
    crop_ratio: tuple[Positive, Positive] = (0.75, 1.3333)  # random resized crop: aspect range
    hflip: Fraction = 0.5
    vflip: Fraction = 0.0
    brightness: NonNegative = 0.0
    contrast: NonNegative = 0.0
    saturation: NonNegative = 0.0
    hue: float = Field(0.0, ge=0.0, le=0.5)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _low_high(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise _invalid("[low, high] with low <= high")
        return value


class MaskConfig(_Section):
    ratio: float = Field(0.75, ge=0.0, lt=1.0)  # fraction of patches hidden from the encoder
    patch_size: Size = 4


class LabConfig(_Section):
    """The conflict lab's dials (dataset conflict_lab); the problem is described in cli/lab.py."""

    direction: Cosine = 0.0  # cosine between what the tasks want: +1 aligned, -1 opposed
    scale: float = Field(1.0, ge=1.0, le=1e6)  # last task's loss / first task's, at the start
    input_dim: Size = 16
    output_dim: Size = 4  # per task, = the shared representation's width
    noise: NonNegative = 0.1  # training-target noise, in units of the target's std


class DataConfig(_Section):
    dataset: Literal["embedded", "cifar10", "stl10", "imagefolder", "synthetic", "conflict_lab"] = (
        "embedded"
    )
    root: str | None = None  # cifar10 / stl10 / imagefolder directory
    download: bool = False
    skip_bad_images: bool = False  # imagefolder: train without unreadable images (listed)
    image_size: int = Field(32, ge=8, le=MAX_SIZE)  # side of the square crops fed to the model
    micro_batch_size: Size = 16
    train_samples: Count = 4096  # embedded / synthetic: number of source crops
    val_samples: Count = 256  # size of the fixed validation set
    labels: Literal["none", "class", "rotation"] = "none"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    lab: LabConfig = Field(default_factory=LabConfig)  # dataset conflict_lab

    def _issues(self) -> Iterator[_Issue]:
        if self.image_size % self.mask.patch_size:
            yield _Issue(
                ("image_size",),
                self.image_size,
                f"a multiple of data.mask.patch_size ({self.mask.patch_size})",
            )
        if self.dataset == "imagefolder" and not self.root:
            yield _Issue(("root",), self.root, "the image folder's path (dataset: imagefolder)")


class ModelConfig(_Section):
    name: Literal["mae_vit", "masked_conv", "lab_mlp"]  # lab_mlp: the conflict lab's (dim, depth)
    # mae_vit
    patch_size: Size = 4
    dim: Size = 128
    depth: Size = 4
    heads: Size = 4
    mlp_ratio: Positive = 4.0
    decoder_dim: Size = 64
    decoder_depth: Size = 2
    decoder_heads: Size = 4
    # masked_conv: a torchvision classification model with a `features` trunk
    backbone: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$")] = "mobilenet_v3_small"
    # both: > 0 adds a classification head (output "logits")
    num_classes: int = Field(0, ge=0, le=MAX_SIZE)

    def _issues(self) -> Iterator[_Issue]:
        if self.name != "mae_vit":
            return
        for width, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
            n_heads = getattr(self, heads)
            if getattr(self, width) % n_heads:
                yield _Issue(
                    (width,), getattr(self, width), f"a multiple of model.{heads} ({n_heads})"
                )


class LossConfig(_Section):
    # task_mse: the conflict lab's task of the loss's name
    kind: Literal["l1", "mse", "ssim", "ms_ssim", "cross_entropy", "task_mse"]
    weight: NonNegative  # the loss's lambda
    masked_only: bool = False  # reconstruction losses: only the masked region counts
    win_size: int = Field(11, ge=3, le=MAX_SIZE)  # ssim / ms_ssim window

    @field_validator("win_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise _invalid("an odd window size")
        return value

    def _issues(self) -> Iterator[_Issue]:
        if self.kind == "cross_entropy" and self.masked_only:
            yield _Issue(("masked_only",), True, "false for a cross_entropy loss")


class _ConductorSection(_Section):
    """`method` plus every field of `gcond.ConductorConfig`, with the library's names, types and
    defaults (see `_conductor_fields`); the library checks the values, so a rule is written once.
    """

    # sum: plain accumulation; sum-log / sum-normalized: sum with loss_scale log / initial;
    # pcgrad, upgrad, mgda, cagrad: TorchJD (pip install 'gcond[torchjd]')
    method: Literal[
        "conductor",
        "conductor-stochastic",
        "sum",
        "sum-log",
        "sum-normalized",
        "pcgrad",
        "upgrad",
        "mgda",
        "cagrad",
    ] = "conductor"

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
    batch_size: Size = 64
    num_images: int = Field(8, ge=0, le=MAX_SIZE)  # images in the TensorBoard grids


class LogConfig(_Section):
    every: Count = 1  # steps between console / TensorBoard scalar writes
    tensorboard: bool = True
    runs_dir: str = Field("runs", min_length=1)


class CheckpointConfig(_Section):
    every: Count = 100  # steps between "latest" checkpoints (also at the end and on stop)
    keep_best: bool = True
    best_metric: Literal[
        "eval/l1", "eval/mse", "eval/ssim", "eval/psnr", "eval/accuracy", "eval/mean_err"
    ] = "eval/ssim"
    best_mode: Literal["max", "min"] = "max"

    def _issues(self) -> Iterator[_Issue]:
        mode = "min" if self.best_metric in ("eval/l1", "eval/mse", "eval/mean_err") else "max"
        if self.best_mode != mode:
            yield _Issue(("best_mode",), self.best_mode, f"'{mode}' for {self.best_metric}")


class Recipe(_Section):
    name: str | None = None  # load_recipe sets it to the file stem when absent
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Annotated[str, AfterValidator(_device)] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    losses: dict[Annotated[str, AfterValidator(_loss_name)], LossConfig]
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
    def _some_loss(cls, value: dict[str, LossConfig]) -> dict[str, LossConfig]:
        if not value:
            raise _invalid("at least one loss, e.g. {l1: {kind: l1, weight: 1.0}}")
        return value

    def _issues(self) -> Iterator[_Issue]:
        yield from self._model_issues()
        yield from self._label_issues()
        yield from self._loss_issues()
        yield from self._accumulation_issues()
        yield from self._lab_issues()
        method = self.conductor.method
        if method in SCALED_SUMS and self.loss_scale not in ("none", SCALED_SUMS[method]):
            yield _Issue(
                ("loss_scale",),
                self.loss_scale,
                f"'none' or '{SCALED_SUMS[method]}' with conductor.method {method} (which is "
                f"sum with loss_scale {SCALED_SUMS[method]}); for sum with loss_scale "
                f"{self.loss_scale}, use conductor.method: sum",
            )

    def _lab_issues(self) -> Iterator[_Issue]:
        """The conflict lab goes with its model, its losses and its metric, and only with them."""
        lab = self.data.dataset == "conflict_lab"
        if lab != (self.model.name == "lab_mlp"):
            yield _Issue(
                ("model", "name"),
                self.model.name,
                "lab_mlp with data.dataset conflict_lab"
                if lab
                else "mae_vit or masked_conv (lab_mlp is for data.dataset conflict_lab)",
            )
        for name, loss in self.losses.items():
            if lab != (loss.kind == "task_mse"):
                yield _Issue(
                    ("losses", name, "kind"),
                    loss.kind,
                    "task_mse with data.dataset conflict_lab (one loss per task)"
                    if lab
                    else "an image loss (task_mse is for data.dataset conflict_lab)",
                )
        if lab and self.checkpoint.best_metric != "eval/mean_err":
            yield _Issue(
                ("checkpoint", "best_metric"),
                self.checkpoint.best_metric,
                "eval/mean_err (best_mode: min) for data.dataset conflict_lab",
            )

    def _model_issues(self) -> Iterator[_Issue]:
        patch = self.data.mask.patch_size
        if self.model.name == "mae_vit" and self.model.patch_size != patch:
            yield _Issue(
                ("model", "patch_size"),
                self.model.patch_size,
                f"data.mask.patch_size ({patch}): the mask hides whole mae_vit patches",
            )

    def _label_issues(self) -> Iterator[_Issue]:
        labels = self.data.labels
        ce_losses = [name for name, loss in self.losses.items() if loss.kind == "cross_entropy"]
        if labels == "none":
            if ce_losses:
                yield _Issue(
                    ("data", "labels"),
                    labels,
                    f"'class' or 'rotation': loss '{ce_losses[0]}' is cross_entropy",
                )
            if self.checkpoint.best_metric == "eval/accuracy":
                yield _Issue(
                    ("checkpoint", "best_metric"),
                    "eval/accuracy",
                    "a reconstruction metric: data.labels is 'none', so there is no accuracy",
                )
            return
        classes = self.model.num_classes
        if labels == "rotation" and classes != 4:  # 0, 90, 180, 270 degrees
            yield _Issue(("model", "num_classes"), classes, "4 for data.labels 'rotation'")
        if labels == "class" and classes == 0:
            yield _Issue(("model", "num_classes"), classes, "the number of dataset classes")
        if not ce_losses:
            yield _Issue(
                ("losses",),
                sorted(self.losses),
                f"a cross_entropy loss to train on data.labels '{labels}'",
            )

    def _loss_issues(self) -> Iterator[_Issue]:
        weights = {name: loss.weight for name, loss in self.losses.items()}
        if not any(weights.values()):
            yield _Issue(("losses",), weights, "at least one loss with weight > 0")
        size = self.data.image_size
        for name, loss in self.losses.items():
            if loss.kind == "ssim" and loss.win_size > size:
                yield _Issue(
                    ("losses", name, "win_size"),
                    loss.win_size,
                    f"a window no larger than data.image_size ({size})",
                )
            if loss.kind == "ms_ssim" and size <= (loss.win_size - 1) * 16:
                yield _Issue(
                    ("losses", name, "win_size"),
                    loss.win_size,
                    f"(win_size - 1) * 16 < data.image_size ({size}) for ms_ssim's 5 scales; "
                    "use a smaller window, larger images or kind 'ssim'",
                )

    def _accumulation_issues(self) -> Iterator[_Issue]:
        config = self.conductor.library_config()
        for problem in config.problems_with_losses(len(self.losses)):
            yield _Issue(("conductor", *problem.path), problem.value, problem.expected)


# ---------------------------------------------------------------------------------------------
# Turning pydantic errors into lines


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "string_too_short": "a non-empty string",
    "string_pattern_mismatch": "a string matching {pattern}",
    "dict_type": "a mapping",
    "model_type": "a mapping of keys",
    "tuple_type": "a list",
    "too_long": "a list of {max_length} items",
    "greater_than": "a number > {gt}",
    "greater_than_equal": "a number >= {ge}",
    "less_than": "a number < {lt}",
    "less_than_equal": "a number <= {le}",
    "literal_error": "one of {expected}",
    "recipe_value": "{expected}",
}


def _show(value: Any) -> str:
    """A value as the user would write it in YAML, shortened."""
    text = _render(value, 81)
    return text if len(text) <= 80 else text[:77] + "..."


def _render(value: Any, budget: int) -> str:
    """YAML-like text of `value`, stopping once `budget` characters are written: YAML aliases
    can make a small file hold a list of 9**9 items (an "alias bomb")."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list | tuple):
        items, opening, closing = ((None, v) for v in value), "[", "]"
    elif isinstance(value, dict):
        items, opening, closing = iter(value.items()), "{", "}"
    else:
        return repr(value)[:budget]
    text = opening
    for i, (key, item) in enumerate(items):
        if len(text) >= budget:
            break
        text += (", " if i else "") + ("" if key is None else f"{key}: ")
        text += _render(item, budget - len(text))
    return text + closing


def _dotted(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "recipe"


def _annotation_at(path: Sequence[str | int]) -> Any:
    """The type annotation of the recipe key at `path`, or None if there is no such key."""
    node: Any = Recipe
    for part in path:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            node = field.annotation if field else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) is tuple and isinstance(part, int):
            node = get_args(node)[part]
        else:
            return None
    return node


def _unknown_key(path: tuple[str | int, ...]) -> str:
    section = _annotation_at(path[:-1])
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return "unknown key"
    valid = list(section.model_fields)
    close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return "unknown key; valid keys here: " + ", ".join(valid)


def _problem(error: Mapping[str, Any], path: tuple[str | int, ...]) -> tuple[tuple, str]:
    """(path, problem text) for one pydantic error that is not an `_Issue` bundle."""
    kind, value, ctx = error["type"], error["input"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return path, _unknown_key(path)
    if kind == "missing" and path and isinstance(path[-1], int):  # a tuple given too few items
        items = len(get_args(_annotation_at(path[:-1])))
        return path[:-1], f"got {_show(value)}, expected a list of {items} items"
    if kind == "missing":
        return path, "required key is missing"
    template = _EXPECTED.get(kind)
    expected = template.format(**ctx) if template else error["msg"]
    text = f"got {_show(value)}, expected {expected}"
    if kind == "literal_error" and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", ctx["expected"])
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        text += f"; did you mean '{close[0]}'?" if close else ""
    return path, text


def _overlap(a: tuple, b: tuple) -> bool:
    """Whether one key path lies inside the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def validation_errors(
    exc: ValidationError, overrides: Mapping[tuple[str, ...], str] | None = None
) -> list[str]:
    """One line per problem in `exc`: "<key path>: <problem>", noting which override set it."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if part != "[key]")  # dict-key errors
        if error["type"] == "recipe_issues":
            problems = [
                (loc + issue.path, f"got {_show(issue.value)}, expected {issue.expected}")
                for issue in error["ctx"]["issues"]
            ]
        else:
            problems = [_problem(error, loc)]
        for path, text in problems:
            source = next((o for key, o in (overrides or {}).items() if _overlap(key, path)), None)
            lines.append(
                f"{_dotted(path)}: {text}" + (f" (from override '{source}')" if source else "")
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Reading YAML and applying overrides


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags) that refuses duplicate keys instead of keeping the last."""


def _construct_unique_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    context = getattr(exc, "context", None)
    problem = getattr(exc, "problem", None) or str(exc)
    detail = f"invalid YAML: {context}, {problem}" if context else f"invalid YAML: {problem}"
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        detail += " (recipes are plain YAML; Python object tags are refused)"
    return detail


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: Python tags are refused
    except RecursionError:
        raise yaml.YAMLError("values nested too deeply") from None
    except ValueError as exc:  # int() of a number with thousands of digits
        raise yaml.YAMLError(str(exc).split(";")[0]) from None


def _apply_override(raw: dict, text: str) -> tuple[str, ...]:
    """Set one `a.b.c=value` override in `raw`; returns the key path. Raises ValueError."""
    key, sep, value_text = text.partition("=")
    if not sep or not re.fullmatch(r"\w+(\.\w+)*", key, flags=re.ASCII):
        raise ValueError("expected KEY=VALUE with a dotted key, e.g. optimizer.lr=3e-4")
    path = tuple(key.split("."))
    try:
        value = _parse_yaml(value_text)
    except yaml.YAMLError as exc:
        raise ValueError(f"the value is {_yaml_problem(exc)}") from None
    node = raw
    for depth, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            parent = ".".join(path[: depth + 1])
            raise ValueError(f"'{parent}' is {_show(node)}, not a mapping with keys")
    node[path[-1]] = value
    return path


def recipes_dir() -> Path:
    """The folder of bundled recipes (`recipes/` at the top of the repository)."""
    return Path(__file__).resolve().parents[1] / "recipes"


def bundled_recipes() -> list[tuple[str, str]]:
    """(file name, one-line description from the first comment line) of each bundled recipe."""
    found = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first_line = next(iter(path.read_text(encoding="utf-8").splitlines()), "")
        description = first_line.lstrip("#").strip() if first_line.startswith("#") else ""
        found.append((path.name, description))
    return found


def resolve_recipe_path(recipe: str | Path) -> Path:
    """`recipe` if it exists, else the bundled recipe of that bare name (with or without .yaml)."""
    path = Path(recipe)
    if path.exists() or path.parent != Path("."):
        return path
    bundled = recipes_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return bundled if bundled.is_file() else path


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(Path(name).stem for name, _ in bundled_recipes())
        raise RecipeError(
            [f"{path}: recipe file not found (give a path to a .yaml file or one of: {names})"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{path}: cannot read the recipe: {exc}"]) from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError([f"{where}: {_yaml_problem(exc)}"]) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else _show(raw)
        raise RecipeError([f"{path}: got {got}, expected a mapping of recipe keys"])
    return raw


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported in one RecipeError.

    `overrides` are `dotted.key=value` strings, the value parsed as YAML
    (`optimizer.betas=[0.0,0.95]`, `conductor.norm_cap=null`). `name` defaults to the file stem.
    """
    path = resolve_recipe_path(path)
    raw = _read_mapping(path)
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, overrides, source=path)


def recipe_from_dict(
    raw: Mapping[str, Any], overrides: Sequence[str] = (), source: Path | None = None
) -> Recipe:
    """Override and validate a recipe given as a (nested) dict, e.g. a built-in bench workload;
    errors as in `load_recipe`. `raw` itself is left unchanged."""
    raw = copy.deepcopy(dict(raw))
    errors, sources = [], {}
    for text in overrides:
        try:
            sources[_apply_override(raw, text)] = text
        except ValueError as exc:
            errors.append(f"override '{text}': {exc}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors += validation_errors(exc, sources)
    if errors:
        raise RecipeError(errors, source=source)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML/JSON-able data (tuples become lists)."""
    return recipe.model_dump(mode="json")


class _RecipeDumper(yaml.SafeDumper):
    """Block-style sections with flow-style lists (`betas: [0.9, 0.95]`), as recipes are written."""


_RecipeDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, True)
)


def dump_recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back to an equal recipe."""
    return yaml.dump(
        recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True
    )
