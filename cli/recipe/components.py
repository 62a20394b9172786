"""The sections of the built-in components a recipe chooses by name (data sets, models,
losses), each registered with its builder (``components.py``), the user's own (``target:``),
and the method table."""

from collections.abc import Iterator
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    Union,
)

from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
)

from ..components import CHOICE_KEY, builtin, builtins
from .fields import (
    IMAGE_DATASETS,
    MAX_SIZE,
    Cosine,
    Count,
    Fraction,
    NonNegative,
    Positive,
    Size,
    _identifier,
    _invalid,
    _Issue,
    _Section,
    _target,
)

if TYPE_CHECKING:
    from .schema import Recipe


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

    def task_metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Each loss's own metric (for Δm against single-task learning)."""
        return {name: f"err_{name}" for name in recipe.losses}

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
    # Whether the model has trunk(x) and heads(z) (conductor.gradients_at: representation).
    has_split: ClassVar[bool] = False

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
    has_split: ClassVar[bool] = True  # trunk = the MLP up to z, heads = the gain/bias heads
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


# Multidigits (cli/digits.py): each task, named by its loss, and its number of classes.
MULTIDIGITS_TASKS = {"left": 10, "right": 10, "parity": 2, "sum": 19}


@builtin("data", "multidigits", build="digits:build_multidigits_data")
class MultidigitsDataConfig(_Section):
    """Two real handwritten digits side by side: left, right, and their sum's parity or sum."""

    dataset: Literal["multidigits"]
    source: Literal["sklearn", "mnist"] = "sklearn"  # sklearn: bundled 8×8 digits; mnist: 28×28
    root: str | None = None  # mnist: the folder that holds MNIST/ (default ~/.cache/gcond/datasets)
    download: bool = False  # mnist: fetch it into root
    micro_batch_size: Size = 32  # pairs
    val_samples: Count = 2000  # fixed validation pairs of held-out digits

    def metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Each task's accuracy (`acc_<task>`) and their mean."""
        return {**{f"acc_{name}": "max" for name in recipe.losses}, "mean_acc": "max"}

    def task_metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Each loss's own metric (for Δm against single-task learning)."""
        return {name: f"acc_{name}" for name in recipe.losses}

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        """Multidigits goes with its model (or the user's) and one loss per task."""
        yield from _task_data_issues(
            recipe,
            "multidigits",
            (MultidigitsCnnConfig, "multidigits_cnn"),
            (MultidigitsLossConfig, "task_cross_entropy"),
            MULTIDIGITS_TASKS,
            "task",
            "multidigits task",
        )


@builtin("model", "multidigits_cnn", build="digits:build_multidigits_cnn")
class MultidigitsCnnConfig(_Section):
    """A small CNN for multidigits: a shared conv trunk to z, one linear head per task."""

    name: Literal["multidigits_cnn"]
    width: Size = 32  # channels of the first convolutions (the last has twice as many)
    dim: Size = 64  # the shared representation z
    has_split: ClassVar[bool] = True  # trunk = the convolutions to z, heads = one linear per task

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        if not isinstance(recipe.data, MultidigitsDataConfig):
            yield _Issue(
                ("model", "name"),
                "multidigits_cnn",
                "a model other than multidigits_cnn (it is for data.dataset multidigits)",
            )


@builtin("loss", "task_cross_entropy", build="digits:build_task_cross_entropy")
class MultidigitsLossConfig(_Section):
    """Multidigits: the cross-entropy of the task of the loss's name."""

    kind: Literal["task_cross_entropy"]
    weight: NonNegative  # the loss's lambda

    def recipe_issues(self, recipe: "Recipe", name: str) -> Iterator[_Issue]:
        if not isinstance(recipe.data, MultidigitsDataConfig):
            yield _Issue(
                ("losses", name, "kind"),
                "task_cross_entropy",
                "a loss for data.dataset "
                f"{_choice_of(recipe.data)} (task_cross_entropy is for data.dataset multidigits)",
            )


# QM9 (cli/qm9.py): the eleven targets, one loss each, named after it, in the papers' order.
QM9_TARGET_NAMES = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")


@builtin("data", "qm9", build="qm9:build_qm9_data")
class Qm9DataConfig(_Section):
    """QM9's molecules (qm9pack's files): eleven regression targets, fixed train/val/test split."""

    dataset: Literal["qm9"]
    root: str | None = None  # a folder of qm9pack-format CSVs; default: the installed qm9pack
    micro_batch_size: Size = 64  # molecules
    train_samples: Count = 25000
    val_samples: Count = 5000  # selects the model
    test_samples: Count = 10000  # what is reported

    def metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Mean standardised MAE on validation and test, each target's test MAE."""
        names = {"val_std_mae": "min", "test_std_mae": "min"}
        return {**names, **{f"test_mae_{name}": "min" for name in recipe.losses}}

    def task_metrics(self, recipe: "Recipe") -> dict[str, str]:
        """Each loss's own metric (for Δm against single-task learning)."""
        return {name: f"test_mae_{name}" for name in recipe.losses}

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        """QM9 goes with its model (or the user's) and one loss per target."""
        yield from _task_data_issues(
            recipe,
            "qm9",
            (Qm9MlpConfig, "qm9_mlp"),
            (Qm9LossConfig, "qm9_mse"),
            QM9_TARGET_NAMES,
            "target",
            "QM9 target",
        )


@builtin("model", "qm9_mlp", build="qm9:build_qm9_mlp")
class Qm9MlpConfig(_Section):
    """An MLP for QM9's molecule features: a shared trunk to z, one linear head per target."""

    name: Literal["qm9_mlp"]
    dim: Size = 256  # trunk width = the shared representation z
    depth: Size = 3  # trunk layers
    has_split: ClassVar[bool] = True  # trunk = the MLP to z, heads = one linear per target

    def recipe_issues(self, recipe: "Recipe") -> Iterator[_Issue]:
        if not isinstance(recipe.data, Qm9DataConfig):
            yield _Issue(
                ("model", "name"),
                "qm9_mlp",
                "a model other than qm9_mlp (it is for data.dataset qm9)",
            )


@builtin("loss", "qm9_mse", build="qm9:build_qm9_mse")
class Qm9LossConfig(_Section):
    """QM9: the squared error of the (standardised) target of the loss's name."""

    kind: Literal["qm9_mse"]
    weight: NonNegative  # the loss's lambda

    def recipe_issues(self, recipe: "Recipe", name: str) -> Iterator[_Issue]:
        if not isinstance(recipe.data, Qm9DataConfig):
            yield _Issue(
                ("losses", name, "kind"),
                "qm9_mse",
                f"a loss for data.dataset {_choice_of(recipe.data)} "
                "(qm9_mse is for data.dataset qm9)",
            )


def _task_data_issues(
    recipe: "Recipe",
    dataset: str,
    model: tuple[type, str],
    loss: tuple[type, str],
    tasks: tuple[str, ...],
    task: str,
    described: str,
) -> Iterator[_Issue]:
    """A data set of named tasks goes with its model (or the user's) and one loss per task, of
    its kind (or the user's) and named after its task. ``model`` and ``loss``: the built-in's
    section and name; ``task``: what one is called ("task", "target"); ``described``: the same
    with the data set's name ("QM9 target")."""
    (model_section, model_name), (loss_section, loss_kind) = model, loss
    if not isinstance(recipe.model, model_section | TargetConfig):
        yield _Issue(
            ("model",),
            _choice_of(recipe.model),
            f"{model_name} (or your own model) with data.dataset {dataset}",
        )
    for name, section in recipe.losses.items():
        if not isinstance(section, loss_section | TargetConfig):
            yield _Issue(
                ("losses", name),
                _choice_of(section),
                f"kind {loss_kind} with data.dataset {dataset} (one loss per {task})",
            )
        elif name not in tasks:
            yield _Issue(
                ("losses", name), name, f"a loss named after its {described}: " + ", ".join(tasks)
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
