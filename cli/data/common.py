"""What every data set shares: the in-memory split (`ImageSet`), the keyed random streams, the
bundled sources and the mask size."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import DatasetError

if TYPE_CHECKING:
    pass

# Photographs bundled inside scikit-image's wheel (no download). Train and validation come from
# disjoint source images; "cat" is left out because it is the same photograph as "chelsea", and
# the synthetic ones (colorwheel, checkerboard, logo, ...) because they are not photographs, and
# "clock" because it is mostly motion blur.
EMBEDDED_TRAIN_SOURCES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "camera",
    "brick",
    "grass",
    "moon",
    "text",
    "cell",
    "page",
)
EMBEDDED_VAL_SOURCES: tuple[str, ...] = ("coffee", "rocket", "gravel", "coins")

# scikit-image's LFW subset (lfw_subset.npy, in the wheel, no download): 200 grey 25×25 images,
# the first 100 faces (the rest are non-face patches, left out). A face has one clear "up", which
# the embedded crops (mostly orientation-free texture) lack. The first FACES_TRAIN faces train,
# the others are held out for validation.
FACES = 100
FACES_TRAIN = 75

DEFAULT_ROOT = Path.home() / ".cache" / "gcond" / "datasets"
SYNTHETIC_CLASSES = ("disk", "square", "diamond", "ring")

# The validation images are a property of the dataset, not of the run: the same for every seed,
# so that runs with different seeds are evaluated on the same images (their masks follow the seed).
_VAL_KEY = "validation-images"


# Image files an image folder is read from (torchvision ImageFolder's list).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """A dataset split held in memory.

    images: uint8 N×3×H0×W0 (CPU). labels: int64 N, or None when the dataset has no classes.
    skipped: the unreadable files left out (data.skip_bad_images), as "path: reason".
    """

    images: Tensor
    labels: Tensor | None
    num_classes: int = 0
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]


def num_masked_patches(ratio: float, num_patches: int) -> int:
    """Masked patches per sample: round(ratio · L), halves rounded up. The models rely on it."""
    return math.floor(ratio * num_patches + 0.5)


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a tuple of plain values (stable across runs and machines)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _pool_side(cfg: Any) -> int:
    # Source crops are stored at twice the model's side: a random resized crop covering 35–100 %
    # of the area is then resampled *down* (by 1.2–2×), never up, so crops stay sharp.
    return 2 * cfg.image_size


_SHOWN = 10  # damaged files or empty folders named in one message


def _listed(lines: list[str]) -> str:
    """Up to _SHOWN lines, indented one per line, and how many more there are."""
    more = [f"... and {len(lines) - _SHOWN} more"] if len(lines) > _SHOWN else []
    return "".join(f"\n  {line}" for line in [*lines[:_SHOWN], *more])


def _val_subset(images: Tensor, labels: Tensor, count: int, where: str) -> ImageSet:
    """`count` images of a validation split (a fixed choice, the same for every seed)."""
    if images.shape[0] < count:
        raise DatasetError(
            f"data.val_samples: {count} validation images asked for, {where} holds "
            f"{images.shape[0]}; lower data.val_samples to {images.shape[0]} or less"
        )
    keep = torch.randperm(images.shape[0], generator=_generator(_VAL_KEY))[:count]
    return ImageSet(images[keep].contiguous(), labels[keep].contiguous(), int(labels.max()) + 1)
