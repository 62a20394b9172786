"""The image data sets, loaded once into CPU uint8 tensors: scikit-image's bundled photographs
and faces, procedural shapes, CIFAR-10 and STL-10 (an image folder: ``folders.py``)."""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DatasetError
from .common import (
    _VAL_KEY,
    DEFAULT_ROOT,
    EMBEDDED_TRAIN_SOURCES,
    EMBEDDED_VAL_SOURCES,
    FACES,
    FACES_TRAIN,
    SYNTHETIC_CLASSES,
    ImageSet,
    _generator,
    _listed,
    _pool_side,
    _val_subset,
)
from .folders import _imagefolder

if TYPE_CHECKING:
    from rich.console import Console

# ----------------------------------------------------------------------------------------------
# Datasets


def build_datasets(
    cfg: Any, seed: int, *, console: Console | None = None
) -> tuple[ImageSet, ImageSet]:
    """Train and validation `ImageSet`s for `cfg.dataset` (a DataConfig).

    Problems with the data the user pointed at raise `DatasetError`. `console`, if given, is
    told what an image folder will take in memory, and shows a progress bar while it is read
    (on a terminal only).
    """
    builders = {
        "embedded": _embedded,
        "faces": _faces,
        "synthetic": _synthetic_sets,
        "cifar10": _cifar10,
        "stl10": _stl10,
        "imagefolder": functools.partial(_imagefolder, console=console),
    }
    if cfg.dataset not in builders:
        raise DatasetError(
            f"data.dataset: unknown dataset {cfg.dataset!r}; expected one of {', '.join(builders)}"
        )
    if cfg.labels == "class" and cfg.dataset == "embedded":
        raise DatasetError(
            "data.labels: dataset 'embedded' has no class labels; "
            "use labels: rotation or labels: none"
        )
    return builders[cfg.dataset](cfg, seed)


@functools.cache
def _skimage_photo(name: str) -> Tensor:
    """One bundled scikit-image photograph as uint8 3×H×W (grey ones repeated to 3 channels)."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    image = torch.from_numpy(array)
    image = image.unsqueeze(0).expand(3, -1, -1) if image.ndim == 2 else image.permute(2, 0, 1)
    return image[:3].contiguous()


def _resize(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of uint8 N×3×H×W images to `size`, back to uint8."""
    out = F.interpolate(
        images.float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def _cut_crops(sources: list[Tensor], count: int, side: int, generator: torch.Generator) -> Tensor:
    """`count` square crops resized to `side`, taken round-robin from `sources`.

    Each crop covers a random square of side log-uniform in [side, 4·side] (capped by the
    photograph), so the pool mixes fine texture with whole objects.
    """
    crops = torch.empty(count, 3, side, side, dtype=torch.uint8)
    for i in range(count):
        source = sources[i % len(sources)]
        short = min(source.shape[-2:])
        if short < side:  # only for very large image_size: upsample the photograph once
            scale = side / short
            source = _resize(
                source[None],
                (math.ceil(source.shape[-2] * scale), math.ceil(source.shape[-1] * scale)),
            )[0]
            short = min(source.shape[-2:])
        low, high = math.log(side), math.log(min(short, 4 * side))
        extent = int(math.exp(low + (high - low) * torch.rand((), generator=generator).item()))
        top = int(torch.randint(source.shape[-2] - extent + 1, (), generator=generator))
        left = int(torch.randint(source.shape[-1] - extent + 1, (), generator=generator))
        crops[i] = _resize(source[None, :, top : top + extent, left : left + extent], side)[0]
    return crops


def _embedded(cfg: Any, seed: int) -> tuple[ImageSet, ImageSet]:
    """Random crops of scikit-image's bundled photographs (see EMBEDDED_*_SOURCES).

    Source photographs differ in size, so each split is a fixed pool of square crops
    (`train_samples` and `val_samples` of them, side 2·image_size); the per-step random resized
    crop, flips and jitter are then applied to these on the device. No class labels.
    """
    side = _pool_side(cfg)
    train_sources = [_skimage_photo(name) for name in EMBEDDED_TRAIN_SOURCES]
    val_sources = [_skimage_photo(name) for name in EMBEDDED_VAL_SOURCES]
    train = _cut_crops(train_sources, cfg.train_samples, side, _generator(seed, "embedded"))
    val = _cut_crops(val_sources, cfg.val_samples, side, _generator(_VAL_KEY, "embedded"))
    return ImageSet(train, None), ImageSet(val, None)


def _faces(cfg: Any, seed: int) -> tuple[ImageSet, ImageSet]:
    """The upright faces of scikit-image's bundled LFW subset (see FACES), grey, resized to side
    2·image_size. Train: the FACES_TRAIN training faces (`train_samples` is not used). Validation:
    `val_samples` images cycling through the held-out faces, mirrored on every other pass (a
    mirrored face is still upright), so that each face is seen under several of the rotations and
    masks drawn for the validation set. The same for every seed. No class labels.
    """
    import skimage.data

    faces = torch.from_numpy(skimage.data.lfw_subset()[:FACES])  # float64 100×25×25 in [0, 1]
    grey = faces.mul(255).round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1)
    images = _resize(grey, _pool_side(cfg))
    held_out = images[FACES_TRAIN:]
    passes = [held_out, held_out.flip(-1)] * math.ceil(cfg.val_samples / (2 * len(held_out)))
    val = torch.cat(passes)[: cfg.val_samples].contiguous()
    return ImageSet(images[:FACES_TRAIN].contiguous(), None), ImageSet(val, None)


def synthetic_images(count: int, side: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Procedural images: a soft-edged shape on a two-colour gradient; label = shape class.

    Returns (uint8 count×3×side×side, int64 labels in [0, len(SYNTHETIC_CLASSES))).
    """

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    labels = torch.randint(len(SYNTHETIC_CLASSES), (count,), generator=generator)
    colour_a, colour_b, colour_shape = (uniform(count, 3, 1, 1) for _ in range(3))
    angle = uniform(count, 1, 1, high=2 * math.pi)
    centre = uniform(count, 2, 1, 1, low=0.3, high=0.7)
    radius = uniform(count, 1, 1, low=0.15, high=0.3)

    axis = (torch.arange(side) + 0.5) / side
    y, x = axis.view(1, side, 1), axis.view(1, 1, side)
    ramp = (0.5 + (x - 0.5) * angle.cos() + (y - 0.5) * angle.sin()).clamp(0, 1)
    background = colour_a + (colour_b - colour_a) * ramp.unsqueeze(1)

    dx, dy = (x - centre[:, 0]).abs(), (y - centre[:, 1]).abs()  # broadcast to count×side×side
    outlines = (  # per class (SYNTHETIC_CLASSES): signed distance to the outline, > 0 inside
        lambda dx, dy, r: r - (dx**2 + dy**2).sqrt(),
        lambda dx, dy, r: r - torch.maximum(dx, dy),
        lambda dx, dy, r: r - (dx + dy),
        lambda dx, dy, r: 0.3 * r - ((dx**2 + dy**2).sqrt() - 0.7 * r).abs(),
    )
    inside = torch.empty(count, side, side)
    for label, outline in enumerate(outlines):
        chosen = labels == label
        inside[chosen] = outline(dx[chosen], dy[chosen], radius[chosen])
    alpha = torch.sigmoid(inside * side / 1.5).unsqueeze(1)  # ~1.5 px soft edge
    images = background * (1 - alpha) + colour_shape * alpha
    return (images * 255).round().to(torch.uint8), labels


def _synthetic_sets(cfg: Any, seed: int) -> tuple[ImageSet, ImageSet]:
    side, classes = _pool_side(cfg), len(SYNTHETIC_CLASSES)
    train = synthetic_images(cfg.train_samples, side, _generator(seed, "synthetic"))
    val = synthetic_images(cfg.val_samples, side, _generator(_VAL_KEY, "synthetic"))
    return ImageSet(*train, num_classes=classes), ImageSet(*val, num_classes=classes)


# The torchvision datasets' own integrity check (MD5 of every file) fails with a RuntimeError;
# a file that passes it but cannot be parsed fails with whatever its parser raises.
_READ_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    pickle.UnpicklingError,
)


def _torchvision_split(cls: Any, cfg: Any, pretty: str, **kwargs: Any) -> Any:
    root = Path(cfg.root).expanduser() if cfg.root else DEFAULT_ROOT
    folder = root / cls.base_folder
    fix = f"point data.root at the folder that holds {cls.base_folder}/"
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data.root: {root} is a file, not a folder; {fix}")
    try:
        return cls(str(root), download=cfg.download, **kwargs)
    except _READ_ERRORS as error:
        if cfg.download:
            problem = f"the download to {root} failed: {type(error).__name__}: {error}"
            raise DatasetError(f"data.dataset {cfg.dataset!r}: {problem}") from None
        if not folder.is_dir():
            raise DatasetError(
                f"data.dataset {cfg.dataset!r}: {pretty} not found under {root} (no folder "
                f"{folder}); set data.download: true to fetch it there, or {fix}"
            ) from None
        damaged = _damaged_files(cls, folder) or [f"{type(error).__name__}: {error}"]
        raise DatasetError(
            f"data.dataset {cfg.dataset!r}: {pretty} in {folder} is incomplete or damaged:"
            f"{_listed(damaged)}\nDelete {folder} and set data.download: true to fetch it "
            f"again, or {fix}"
        ) from None


def _damaged_files(cls: Any, folder: Path) -> list[str]:
    """The files of a torchvision dataset's folder that are missing or fail their checksum."""
    from torchvision.datasets.utils import check_integrity

    expected = [*cls.train_list, *cls.test_list]
    meta = getattr(cls, "meta", None)
    if meta:
        expected.append((meta["filename"], meta["md5"]))
    damaged = []
    for name, md5 in expected:
        path = folder / name
        try:
            if not path.is_file():
                damaged.append(f"{path} is missing")
            elif not check_integrity(str(path), md5):
                damaged.append(f"{path} is damaged (its MD5 checksum differs)")
        except OSError as error:
            damaged.append(f"{path} cannot be read: {error.strerror or error}")
    return damaged


def _cifar10(cfg: Any, seed: int) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10: the train split (all 50 000, 32 px) and `val_samples` of the test split."""
    from torchvision.datasets import CIFAR10

    def load(train: bool) -> tuple[Tensor, Tensor]:
        split = _torchvision_split(CIFAR10, cfg, "CIFAR-10", train=train)
        return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(
            split.targets, dtype=torch.int64
        )

    train = ImageSet(*load(True), num_classes=10)
    return train, _val_subset(*load(False), cfg.val_samples, "the CIFAR-10 test split")


def _stl10(cfg: Any, seed: int) -> tuple[ImageSet, ImageSet]:
    """STL-10: the labelled train split (5 000, 96 px) and `val_samples` of the test split."""
    from torchvision.datasets import STL10

    def load(split: str) -> tuple[Tensor, Tensor]:
        data = _torchvision_split(STL10, cfg, "STL-10", split=split)
        return torch.from_numpy(data.data).contiguous(), torch.from_numpy(data.labels).long()

    train = ImageSet(*load("train"), num_classes=10)
    return train, _val_subset(*load("test"), cfg.val_samples, "the STL-10 test split")
