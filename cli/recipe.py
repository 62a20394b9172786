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
from typing import (
    Annotated,
    Any,
    Literal,
    NamedTuple,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from gcond._config import ConductorConfig as LibraryConductorConfig

from .components import CHOICE_KEY, builtin, builtins, names, register
from .errors import RecipeError
from .plugins import Target

MAX_SIZE = 1_000_000  # sizes, widths, depths, batch sizes: anything larger is a typo
MAX_COUNT = 1_000_000_000  # steps, sample counts, intervals
RESERVED_LOSS_NAMES = ("total",)  # `loss/total` is the weighted sum in the conductor's stats
# The scale-only baselines: plain accumulation (`sum`) of the losses rescaled by `loss_scale`.
SCALED_SUMS = {"sum-log": "log", "sum-normalized": "initial"}
IMAGE_DATASETS = ("embedded", "faces", "cifar10", "stl10", "imagefolder", "synthetic")
# A reference to the user's code: "package.module:attr.path" or "path/file.py:attr.path".
TARGET_PATTERN = r"[^:\s][^:]*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"

Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Cosine = Annotated[float, Field(ge=-1.0, le=1.0)]


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


def _target(target: str) -> str:
    if not re.fullmatch(TARGET_PATTERN, target, flags=re.ASCII):
        raise _invalid(
            "'package.module:function' or 'file.py:function' (a file relative to the recipe)"
        )
    return target


def _identifier(name: str) -> str:
    if not name.isidentifier():
        raise _invalid("a keyword argument name (letters, digits and '_')")
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


class TargetConfig(_Section):
    """Your own code: ``target`` is ``"package.module:function"`` (an importable module) or
    ``"file.py:function"`` (a file, relative to the recipe file), called with ``args`` as
    keyword arguments. It is imported only from a root given with ``--plugin`` (or a package
    that declares a ``gcond.plugins`` entry point); see ``plugins.py`` for the contracts."""

    target: Annotated[str, AfterValidator(_target)]
    args: dict[Annotated[str, AfterValidator(_identifier)], Any] = Field(default_factory=dict)


class TargetLoss(TargetConfig):
    """Your own loss: ``fn(output, target, **args) -> scalar tensor``, with its lambda."""

    weight: NonNegative  # the loss's lambda


@builtin("data", *IMAGE_DATASETS, build="data:build_image_data")
class ImageDataConfig(_Section):
    """Images on the device with random resized crops, flips, jitter and a patch mask."""

    dataset: Literal[IMAGE_DATASETS] = "embedded"  # type: ignore[valid-type]
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

    def _issues(self) -> Iterator[_Issue]:
        if self.image_size % self.mask.patch_size:
            yield _Issue(
                ("image_size",),
                self.image_size,
                f"a multiple of data.mask.patch_size ({self.mask.patch_size})",
            )
        if self.dataset == "imagefolder" and not self.root:
            yield _Issue(("root",), self.root, "the image folder's path (dataset: imagefolder)")

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        yield from _label_issues(recipe, self)

    def metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Reconstruction metrics, and the accuracy of a classification head."""
        metrics = {"l1": "min", "mse": "min", "ssim": "max", "psnr": "max"}
        if self.labels != "none" and getattr(recipe.model, "num_classes", 0):
            metrics["accuracy"] = "max"
        return metrics


@builtin("data", "conflict_lab", build="lab:build_lab_data")
class LabDataConfig(_Section):
    """The conflict lab: synthetic tasks on a shared input, direction and scale as dials."""

    dataset: Literal["conflict_lab"]
    micro_batch_size: Size = 16
    val_samples: Count = 256  # size of the fixed validation set
    lab: LabConfig = Field(default_factory=LabConfig)

    def metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Each task's relative error (`err_<task>`) and their mean."""
        return {**{f"err_{name}": "min" for name in recipe.losses}, "mean_err": "min"}

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        """The conflict lab goes with its model and its losses."""
        if not isinstance(recipe.model, LabModelConfig):
            yield _Issue(
                ("model",), _choice_of(recipe.model), "lab_mlp with data.dataset conflict_lab"
            )
        for name, loss in recipe.losses.items():
            if not isinstance(loss, TaskLossConfig):
                yield _Issue(
                    ("losses", name),
                    _choice_of(loss),
                    "kind task_mse with data.dataset conflict_lab (one loss per task)",
                )


def _label_issues(recipe: "Recipe", data: "ImageDataConfig") -> Iterator[_Issue]:
    """Labels, the classification head and a cross_entropy loss go together."""
    labels = data.labels
    ce_losses = [
        name for name, loss in recipe.losses.items() if isinstance(loss, CrossEntropyConfig)
    ]
    if labels == "none":
        if ce_losses:
            yield _Issue(
                ("data", "labels"),
                labels,
                f"'class' or 'rotation': loss '{ce_losses[0]}' is cross_entropy",
            )
        return
    classes = getattr(recipe.model, "num_classes", None)
    if classes is None:  # the user's model: its outputs are its own business
        return
    if labels == "rotation" and classes != 4:  # 0, 90, 180, 270 degrees
        yield _Issue(("model", "num_classes"), classes, "4 for data.labels 'rotation'")
    if labels == "class" and classes == 0:
        yield _Issue(("model", "num_classes"), classes, "the number of dataset classes")
    if not ce_losses:
        yield _Issue(
            ("losses",),
            sorted(recipe.losses),
            f"a cross_entropy loss to train on data.labels '{labels}'",
        )


class _ImageModel(_Section):
    """Models of the image data sets: `(images, patch_mask)` in, `{"recon", "logits"}` out."""

    num_classes: int = Field(0, ge=0, le=MAX_SIZE)  # > 0 adds a classification head ("logits")

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        if not isinstance(recipe.data, ImageDataConfig):
            yield _Issue(
                ("model", "name"),
                getattr(self, "name", None),
                f"a model for data.dataset {_choice_of(recipe.data)} (this one needs one of the "
                f"image data sets: {', '.join(IMAGE_DATASETS)})",
            )


@builtin("model", "mae_vit", build="models:build_mae_vit")
class MaeVitConfig(_ImageModel):
    """A ViT masked autoencoder; reconstruction, and classification with num_classes > 0."""

    name: Literal["mae_vit"]
    patch_size: Size = 4
    dim: Size = 128
    depth: Size = 4
    heads: Size = 4
    mlp_ratio: Positive = 4.0
    decoder_dim: Size = 64
    decoder_depth: Size = 2
    decoder_heads: Size = 4

    def _issues(self) -> Iterator[_Issue]:
        for width, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
            n_heads = getattr(self, heads)
            if getattr(self, width) % n_heads:
                yield _Issue(
                    (width,), getattr(self, width), f"a multiple of model.{heads} ({n_heads})"
                )

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        yield from super().recipe_issues(recipe)
        if isinstance(recipe.data, ImageDataConfig):
            patch = recipe.data.mask.patch_size
            if self.patch_size != patch:
                yield _Issue(
                    ("model", "patch_size"),
                    self.patch_size,
                    f"data.mask.patch_size ({patch}): the mask hides whole mae_vit patches",
                )


@builtin("model", "masked_conv", build="models:build_masked_conv")
class MaskedConvConfig(_ImageModel):
    """A torchvision convolutional trunk (`features`) with a light upsampling decoder."""

    name: Literal["masked_conv"]
    backbone: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$")] = "mobilenet_v3_small"
    decoder_dim: Size = 64


@builtin("model", "lab_mlp", build="lab:build_lab_mlp")
class LabModelConfig(_Section):
    """The conflict lab's model: a shared MLP trunk and one linear head per task."""

    name: Literal["lab_mlp"]
    dim: Size = 128  # trunk width
    depth: Size = 4  # trunk hidden layers

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        if not isinstance(recipe.data, LabDataConfig):
            yield _Issue(
                ("model", "name"),
                "lab_mlp",
                "a model other than lab_mlp (it is for data.dataset conflict_lab)",
            )


class _ImageLoss(_Section):
    weight: NonNegative  # the loss's lambda

    def recipe_issues(self, recipe: "Recipe", name: str) -> Iterator[_Issue]:
        if not isinstance(recipe.data, ImageDataConfig):
            yield _Issue(
                ("losses", name, "kind"),
                getattr(self, "kind", None),
                "a loss for data.dataset "
                f"{_choice_of(recipe.data)} (image losses need an image data set)",
            )


@builtin("loss", "l1", "mse", build="losses:build_pixel_loss")
class PixelLossConfig(_ImageLoss):
    """Mean absolute (l1) or squared (mse) error of the reconstruction."""

    kind: Literal["l1", "mse"]
    masked_only: bool = False  # only the masked region counts


@builtin("loss", "ssim", "ms_ssim", build="losses:build_ssim_loss")
class SsimLossConfig(_ImageLoss):
    """1 - SSIM (or multi-scale SSIM) of the reconstruction."""

    kind: Literal["ssim", "ms_ssim"]
    masked_only: bool = False  # only the masked region counts
    win_size: int = Field(11, ge=3, le=MAX_SIZE)  # Gaussian window

    @field_validator("win_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise _invalid("an odd window size")
        return value

    def recipe_issues(self, recipe: "Recipe", name: str) -> Iterator[_Issue]:
        yield from super().recipe_issues(recipe, name)
        if not isinstance(recipe.data, ImageDataConfig):
            return
        size = recipe.data.image_size
        if self.kind == "ssim" and self.win_size > size:
            yield _Issue(
                ("losses", name, "win_size"),
                self.win_size,
                f"a window no larger than data.image_size ({size})",
            )
        if self.kind == "ms_ssim" and size <= (self.win_size - 1) * 16:
            yield _Issue(
                ("losses", name, "win_size"),
                self.win_size,
                f"(win_size - 1) * 16 < data.image_size ({size}) for ms_ssim's 5 scales; "
                "use a smaller window, larger images or kind 'ssim'",
            )


@builtin("loss", "cross_entropy", build="losses:build_cross_entropy")
class CrossEntropyConfig(_ImageLoss):
    """Cross-entropy of the classification head (data.labels class or rotation)."""

    kind: Literal["cross_entropy"]


@builtin("loss", "task_mse", build="lab:build_task_mse")
class TaskLossConfig(_Section):
    """The conflict lab's error on the task of the loss's name."""

    kind: Literal["task_mse"]
    weight: NonNegative  # the loss's lambda

    def recipe_issues(self, recipe: "Recipe", name: str) -> Iterator[_Issue]:
        if not isinstance(recipe.data, LabDataConfig):
            yield _Issue(
                ("losses", name, "kind"),
                "task_mse",
                "an image loss (task_mse is for data.dataset conflict_lab)",
            )


def _choice_of(section: Any) -> str | None:
    """What a component section is, in the recipe's words: its built-in name or its target."""
    if isinstance(section, TargetConfig):
        return f"target {section.target}"
    for key in ("name", "dataset", "kind"):
        if hasattr(section, key):
            return getattr(section, key)
    return None


def _section_union(kind: str, target: type, default: str | None = None) -> Any:
    """The recipe type of a component: one of the registered built-ins' sections (chosen by
    their name key) or a `target:` reference to the user's code."""
    key = CHOICE_KEY[kind]
    sections: dict[str, type] = {}
    for entry in builtins(kind).values():
        sections.setdefault(entry.section.__name__, entry.section)
    tag_of = {name: entry.section.__name__ for name, entry in builtins(kind).items()}

    def choose(value: Any) -> str | None:
        if isinstance(value, BaseModel):
            return type(value).__name__
        if not isinstance(value, dict):
            return None
        if "target" in value:
            return target.__name__
        return tag_of.get(value.get(key, default))

    members = [Annotated[s, Tag(tag)] for tag, s in sections.items()]
    members.append(Annotated[target, Tag(target.__name__)])
    return Annotated[
        Union[tuple(members)],  # noqa: UP007 (a Union built at run time)
        Discriminator(
            choose,
            custom_error_type="recipe_choice",
            custom_error_message="no such component",
            custom_error_context={"kind": kind, "key": key},
        ),
    ]


DataSection = _section_union("data", TargetConfig, default="embedded")
ModelSection = _section_union("model", TargetConfig)
LossSection = _section_union("loss", TargetLoss)


# The methods, one entry each: name, builder (in methods.py), what it is.
for _name, _build, _summary in (
    ("conductor", "build_conductor", "GradientConductor: conflicts resolved by zone or smoothly"),
    ("conductor-stochastic", "build_conductor", "the conductor, one loss per micro-batch"),
    ("sum", "build_sum", "plain accumulation of the weighted losses"),
    ("sum-log", "build_sum", "sum with loss_scale log (the scale-invariant baseline)"),
    ("sum-normalized", "build_sum", "sum with loss_scale initial"),
    ("pcgrad", "build_torchjd", "TorchJD's PCGrad (pip install 'gcond[torchjd]')"),
    ("upgrad", "build_torchjd", "TorchJD's UPGrad (pip install 'gcond[torchjd]')"),
    ("mgda", "build_torchjd", "TorchJD's MGDA (pip install 'gcond[torchjd]')"),
    ("cagrad", "build_torchjd", "TorchJD's CAGrad (pip install 'gcond[torchjd,cagrad]')"),
):
    register("method", _name, f"methods:{_build}", summary=_summary)


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
        method = self.conductor.method
        if method in SCALED_SUMS and self.loss_scale not in ("none", SCALED_SUMS[method]):
            yield _Issue(
                ("loss_scale",),
                self.loss_scale,
                f"'none' or '{SCALED_SUMS[method]}' with conductor.method {method} (which is "
                f"sum with loss_scale {SCALED_SUMS[method]}); for sum with loss_scale "
                f"{self.loss_scale}, use conductor.method: sum",
            )
        yield from self._metric_issues()
        if self.eval.args and self.eval.target is None:
            yield _Issue(("eval", "args"), self.eval.args, "no args without eval.target")

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


def _union_members(annotation: Any) -> dict[str, Any] | None:
    """{tag: section} of a component's tagged union (see `_section_union`), else None."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is not Union:
        return None
    members = {}
    for member in get_args(annotation):
        tags = [m.tag for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)]
        if not tags:
            return None
        members[tags[0]] = get_args(member)[0]
    return members


def _walk(loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], Any]:
    """The recipe key path of a pydantic error location (the tags that say which component
    section was chosen are dropped), and the annotation at its end (None if there is no key)."""
    node: Any = Recipe
    path: list[str | int] = []
    parts = list(loc)
    while parts:
        members = _union_members(node)
        if members is not None:
            node = members.get(str(parts.pop(0)))
            continue
        part = parts.pop(0)
        path.append(part)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            node = field.annotation if field else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) is tuple and isinstance(part, int):
            node = get_args(node)[part]
        elif get_origin(node) is Annotated:
            parts.insert(0, path.pop())
            node = get_args(node)[0]
        else:
            node = None
    return tuple(path), node


def _unknown_key(loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str]:
    path, _ = _walk(loc)
    _, section = _walk(loc[:-1])
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return path, "unknown key"
    valid = list(section.model_fields)
    close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
    if close:
        return path, f"unknown key; did you mean '{close[0]}'?"
    owner = _choice_name(section)
    here = f" of {owner}" if owner else " here"
    return path, f"unknown key; valid keys{here}: " + ", ".join(valid)


def _choice_name(section: type) -> str | None:
    """'mae_vit' for the mae_vit section: the built-in(s) a section configures, for messages."""
    for kind in CHOICE_KEY:
        found = [name for name, entry in builtins(kind).items() if entry.section is section]
        if found:
            return "/".join(found)
    return "target" if section in (TargetConfig, TargetLoss) else None


def _choice_problem(value: Any, ctx: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """A component section that names no built-in (relative path, problem text)."""
    kind, key = ctx["kind"], ctx["key"]
    choices = list(names(kind))
    quoted = ", ".join(f"'{choice}'" for choice in choices)
    expected = f"one of {quoted}, or target: 'module:function' for your own code"
    if not isinstance(value, dict):
        return (), f"got {_show(value)}, expected a mapping with {key}: {expected}"
    if key not in value:
        return (key,), f"required key is missing; expected {expected}"
    got = value[key]
    text = f"got {_show(got)}, expected {expected}"
    close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.5)
    return (key,), text + (f"; did you mean '{close[0]}'?" if close else "")


def _problem(error: Mapping[str, Any], loc: tuple[str | int, ...]) -> tuple[tuple, str]:
    """(key path, problem text) for one pydantic error that is not an `_Issue` bundle."""
    kind, value, ctx = error["type"], error["input"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    path, _ = _walk(loc)
    if kind == "recipe_choice":
        relative, text = _choice_problem(value, ctx)
        return path + relative, text
    if kind == "missing" and path and isinstance(path[-1], int):  # a tuple given too few items
        items = len(get_args(_walk(loc[:-1])[1]))
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
                (_walk(loc)[0] + issue.path, f"got {_show(issue.value)}, expected {issue.expected}")
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
    """The folder of bundled recipes: inside the installed package, or `recipes/` at the top of
    the repository for an editable install."""
    installed = Path(__file__).resolve().parent / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


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
    recipe = recipe_from_dict(raw, overrides, source=path)
    _anchor_file_targets(recipe, path.parent)
    return recipe


def _anchor_file_targets(recipe: Recipe, recipe_dir: Path) -> None:
    """Make the file targets (``"my_mtl.py:build"``, relative to the recipe file) absolute, so
    that the recipe saved in a run directory still points at the same files."""
    sections = [recipe.model, recipe.data, *recipe.losses.values(), recipe.eval]
    for section in sections:
        target = getattr(section, "target", None)
        if target is None:
            continue
        parsed = Target.parse(target)
        if parsed.is_file and not Path(parsed.where).is_absolute():
            section.target = f"{(recipe_dir / parsed.where).resolve()}:{parsed.attribute}"


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
