"""Datasets and the device data provider.

Datasets are loaded once into CPU uint8 tensors (`ImageSet`). The training set then moves to the
device once, and `DeviceDataProvider` cuts every micro-batch from it on the device: random
resized crop, flips and colour jitter drawn *per sample*, and per-sample patch masks.

Randomness is counter-based, so the stream is a pure function of (seed, rank, position):
* the sample order of epoch `e` is `randperm(N)` from a generator keyed by (seed, e), the same on
  every rank; rank r takes the slice `perm[r::world_size]` (cut to equal length), like
  `DistributedSampler`, so the ranks see disjoint samples within an epoch;
* the augmentation and mask parameters of micro-batch `n` come from a CPU generator keyed by
  (seed, rank, n). They are drawn on the CPU (identical on every device type) and reach the
  device in one small transfer.
Hence `state_dict()` is a few integers, the same on every rank, and any rank can restore the
stream from rank 0's checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatasetError

if TYPE_CHECKING:
    from rich.console import Console

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


def _val_subset(images: Tensor, labels: Tensor, count: int, where: str) -> ImageSet:
    """`count` images of a validation split (a fixed choice, the same for every seed)."""
    if images.shape[0] < count:
        raise DatasetError(
            f"data.val_samples: {count} validation images asked for, {where} holds "
            f"{images.shape[0]}; lower data.val_samples to {images.shape[0]} or less"
        )
    keep = torch.randperm(images.shape[0], generator=_generator(_VAL_KEY))[:count]
    return ImageSet(images[keep].contiguous(), labels[keep].contiguous(), int(labels.max()) + 1)


_SHOWN = 10  # damaged files or empty folders named in one message


def _listed(lines: list[str]) -> str:
    """Up to _SHOWN lines, indented one per line, and how many more there are."""
    more = [f"... and {len(lines) - _SHOWN} more"] if len(lines) > _SHOWN else []
    return "".join(f"\n  {line}" for line in [*lines[:_SHOWN], *more])


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


# ----------------------------------------------------------------------------------------------
# Image folders

_LAYOUT = "expected one sub-folder per class, e.g. {root}/cat/001.jpg, {root}/dog/002.png"


@dataclass
class _Folder:
    """The image files of one class-per-sub-folder tree, in torchvision ImageFolder's order."""

    root: Path
    classes: list[str]
    files: list[tuple[Path, int]]  # (path, class index)


def _unlistable(folder: Path | str, error: OSError) -> DatasetError:
    return DatasetError(
        f"data.root: cannot list {folder}: {error.strerror or error}; give the user running "
        "gcond read access to it (chmod -R u+rX), or point data.root elsewhere"
    )


def _listing(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        raise _unlistable(folder, error) from None


def _scan_folder(root: Path) -> _Folder:
    """Find the class folders of `root` and their image files (nothing is decoded yet)."""
    entries = _listing(root)
    layout = _LAYOUT.format(root=root)
    if not entries:
        raise DatasetError(f"data.root: {root} is empty; {layout}")
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        raise DatasetError(f"data.root: {root} has no class sub-folders, only files; {layout}")
    files, empty = [], []
    for label, name in enumerate(classes):
        found = []
        # torchvision ImageFolder's order: walk entries sorted by folder path, names sorted
        for top, _, names in sorted(os.walk(root / name, followlinks=True, onerror=_walk_error)):
            found += [
                (Path(top) / n, label) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)
            ]
        if not found:
            empty.append(str(root / name))
        files += found
    if empty:
        raise DatasetError(
            f"data.root: {len(empty)} class folder(s) of {root} hold no image files (files "
            f"ending in {', '.join(IMAGE_SUFFIXES)}):{_listed(empty)}\n"
            "Put the class's images there, or remove the folder."
        )
    return _Folder(root, classes, files)


def _walk_error(error: OSError) -> None:
    raise _unlistable(error.filename, error)


class _BadImage(Exception):
    """An image file that cannot be decoded; the message says why."""


def _open_rgb(path: Path) -> Any:
    """The image at `path` decoded to an RGB PIL image, or `_BadImage` saying why not.

    Pillow refuses an image of more than 2 × Image.MAX_IMAGE_PIXELS pixels (a decompression
    bomb) and only warns above 1 ×; here both are refused alike: whatever Pillow's limit is,
    an image over it is not loaded.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # decodes every pixel: a truncated file fails here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
            raise _BadImage(
                f"{size}, over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
            ) from None
        except PermissionError:
            raise _BadImage("no read permission") from None
        except Image.UnidentifiedImageError:
            raise _BadImage("not an image Pillow can read (wrong extension?)") from None
        # Decoders of damaged files raise many types (OSError for truncated data, SyntaxError,
        # ValueError, zlib and struct errors, ...): any of them means this file is unreadable.
        except Exception as exc:
            raise _BadImage(f"{type(exc).__name__}: {exc}") from None


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def _check_memory(root: Path, count: int, side: int, console: Console | None) -> None:
    """Refuse before reading if `count` images of side×side RGB do not fit in memory."""
    need = count * 3 * side * side
    sizes = f"{count:,} × 3 × {side} × {side} bytes; {side} = 2 × data.image_size"
    available = _available_memory()
    if available is not None and need > available:
        raise DatasetError(
            f"data.root: the {count:,} images of {root} need {_bytes(need)} in memory ({sizes}), "
            f"more than the {_bytes(available)} available; lower data.image_size, or point "
            "data.root at a subset of the images"
        )
    if console is not None:
        console.print(
            f"data: reading {count:,} images of {root} into memory: {_bytes(need)} ({sizes})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _decode_folders(
    folders: list[_Folder], side: int, console: Console | None
) -> tuple[list[tuple[Tensor, Tensor]], list[str]]:
    """Every folder's images resized (short side) and centre-cropped to side×side, with labels;
    and the unreadable files as "path: reason" (left out of the images)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(side, antialias=True),
            transforms.CenterCrop(side),
            transforms.PILToTensor(),
        ]
    )
    total = sum(len(f.files) for f in folders)
    progress = Progress(
        "reading images",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=console is None or not console.is_terminal,  # no bar in a log file
    )
    loaded, bad = [], []
    with progress:
        task = progress.add_task("read", total=total)
        for folder in folders:
            images = torch.empty(len(folder.files), 3, side, side, dtype=torch.uint8)
            labels = []
            for path, label in folder.files:
                try:
                    images[len(labels)] = transform(_open_rgb(path))
                    labels.append(label)
                except _BadImage as exc:
                    bad.append(f"{path}: {exc}")
                progress.advance(task)
            loaded.append((images[: len(labels)], torch.tensor(labels, dtype=torch.int64)))
    return loaded, bad


def _refuse_bad_images(root: Path, bad: list[str], total: int) -> None:
    raise DatasetError(
        f"data.root: {len(bad)} of the {total} images in {root} cannot be read:{_listed(bad)}\n"
        "Replace or delete them, or set data.skip_bad_images: true to train without them "
        "(their list is then written to bad_images.txt in the run directory)."
    )


def _check_sizes(cfg: Any, folders: list[_Folder], counts: list[int], kind: str) -> None:
    """Refuse a training split smaller than one micro-batch, or a validation split smaller than
    data.val_samples. counts: images per folder, `kind` of images (e.g. "readable images")."""
    if len(folders) == 2:
        train, val = counts
        if val < cfg.val_samples:
            raise DatasetError(
                f"data.val_samples: {cfg.val_samples} validation images asked for, but "
                f"{folders[1].root} holds {val} {kind}; lower data.val_samples to {val} or "
                "less, or add images"
            )
        where = f"{folders[0].root} holds {train} {kind}"
    else:
        (total,) = counts
        train = total - cfg.val_samples
        if train < 1:
            raise DatasetError(
                f"data.val_samples: {cfg.val_samples} held-out images leave none to train on "
                f"({folders[0].root} holds {total} {kind}); lower data.val_samples, or add images"
            )
        where = (
            f"{folders[0].root} holds {total} {kind} and data.val_samples holds {cfg.val_samples}"
            f" out for validation, leaving {train}"
        )
    if train < cfg.micro_batch_size:
        raise DatasetError(
            f"data.micro_batch_size: {cfg.micro_batch_size} training images per micro-batch, "
            f"but {where}; lower data.micro_batch_size to {train} or less, or add images"
        )


def _take_rows_(rows: Tensor, order: Tensor) -> None:
    """rows[:] = rows[order], in place: one spare row instead of a second copy of the set."""
    order_list, done = order.tolist(), [False] * len(order)
    spare = torch.empty_like(rows[0])
    for start in range(len(order_list)):
        if done[start]:
            continue
        spare.copy_(rows[start])
        j = start
        while True:  # follow the cycle through `start`
            done[j] = True
            source = order_list[j]
            if source == start:
                rows[j].copy_(spare)
                break
            rows[j].copy_(rows[source])
            j = source


def _imagefolder(cfg: Any, seed: int, console: Console | None = None) -> tuple[ImageSet, ImageSet]:
    """An image folder (one sub-folder per class), images resized and centre-cropped to
    2·image_size, read once into memory.

    With root/train and root/val (or validation, test) sub-folders, those are the splits;
    otherwise `val_samples` images of root are held out (a fixed choice, the same for every
    seed) and the rest is the training set. Unreadable images are refused, all of them named,
    or with `skip_bad_images` left out and listed in `ImageSet.skipped`.
    """
    if not cfg.root:
        raise DatasetError(
            "data.root: required for dataset 'imagefolder' "
            "(a directory with one sub-folder per class)"
        )
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DatasetError(
            f"data.root: {root} does not exist; point it at a folder of images, "
            + _LAYOUT.format(root=root)
        )
    if not root.is_dir():
        raise DatasetError(
            f"data.root: {root} is a file, not a folder; " + _LAYOUT.format(root=root)
        )
    side = _pool_side(cfg)
    val_dirs = [root / name for name in ("val", "validation", "test") if (root / name).is_dir()]
    split = (root / "train").is_dir() and bool(val_dirs)
    if split:
        folders = [_scan_folder(root / "train"), _scan_folder(val_dirs[0])]
        train_only = sorted(set(folders[0].classes) - set(folders[1].classes))
        val_only = sorted(set(folders[1].classes) - set(folders[0].classes))
        if train_only or val_only:
            sides = [
                f"only in {folder.root}: {', '.join(names)}"
                for folder, names in zip(folders, (train_only, val_only), strict=True)
                if names
            ]
            raise DatasetError(
                f"data.root: the class folders of {folders[0].root} and {folders[1].root} "
                f"differ ({'; '.join(sides)}); both splits need the same class folders"
            )
    else:
        folders = [_scan_folder(root)]
    _check_sizes(cfg, folders, [len(folder.files) for folder in folders], "images")
    total = sum(len(folder.files) for folder in folders)
    _check_memory(root, total, side, console)
    loaded, bad = _decode_folders(folders, side, console)
    if bad and not cfg.skip_bad_images:
        _refuse_bad_images(root, bad, total)
    if bad:
        _check_sizes(cfg, folders, [len(labels) for _, labels in loaded], "readable images")
    classes = len(folders[0].classes)
    if split:
        (train_images, train_labels), (val_images, val_labels) = loaded
        train = ImageSet(train_images, train_labels, classes, skipped=tuple(bad))
        return train, _val_subset(val_images, val_labels, cfg.val_samples, str(val_dirs[0]))
    ((images, labels),) = loaded
    # The held-out choice is a fixed permutation; applied in place, so that the split costs no
    # second copy of the images (the memory check above counted one).
    order = torch.randperm(len(labels), generator=_generator(_VAL_KEY))
    _take_rows_(images, order)
    labels = labels[order]
    held = cfg.val_samples
    return (
        ImageSet(images[held:], labels[held:], classes, skipped=tuple(bad)),
        ImageSet(images[:held], labels[:held], classes),
    )


# ----------------------------------------------------------------------------------------------
# Augmentation (batched, on the device)

# RGB -> YIQ. A rotation of the IQ plane approximates torchvision's HSV hue shift with one 3×3
# matrix per sample (exact HSV round trips would cost a dozen elementwise passes).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrices(shift: Tensor) -> Tensor:
    """B×3×3 RGB->RGB matrices rotating hue by `shift` turns (B,); built on the CPU."""
    cos, sin = torch.cos(2 * math.pi * shift), torch.sin(2 * math.pi * shift)
    rotation = torch.zeros(shift.shape[0], 3, 3)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    return torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ


def _grey(images: Tensor) -> Tensor:
    """B×1×H×W luma of B×3×H×W RGB (Python-float weights: no constant to copy to the device)."""
    red, green, blue = images.unbind(1)
    return (0.299 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def _colour_jitter(images: Tensor, factors: Tensor, hue: Tensor, aug: Any) -> Tensor:
    """Per-sample brightness, contrast, saturation, hue (torchvision's order and clamping).

    images: B×3×S×S float in [0, 1]; factors: B×3 (brightness, contrast, saturation);
    hue: B×3×3 colour matrices. Steps whose strength is 0 in the recipe are skipped (a static
    choice, not a data-dependent branch).
    """

    def per_sample(column: int) -> Tensor:
        return factors[:, column].view(-1, 1, 1, 1)

    if aug.brightness > 0:
        images = (images * per_sample(0)).clamp(0, 1)
    if aug.contrast > 0:
        mean = _grey(images).mean((2, 3), keepdim=True)
        images = (mean + per_sample(1) * (images - mean)).clamp(0, 1)
    if aug.saturation > 0:
        grey = _grey(images)
        images = (grey + per_sample(2) * (images - grey)).clamp(0, 1)
    if aug.hue > 0:
        images = torch.einsum("bij,bjhw->bihw", hue, images).clamp(0, 1)
    return images


def _rotation_matrices(k: Tensor) -> Tensor:
    """B×2×2 matrices R such that sampling at R·p rotates the output by k·90° like torch.rot90."""
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    powers = torch.stack([torch.linalg.matrix_power(quarter, j) for j in range(4)])
    return powers[k]


def pixel_mask(patch_mask: Tensor, patch_size: int) -> Tensor:
    """B×h×w bool patch mask -> float32 B×1×S×S pixel mask (1 = masked)."""
    batch, rows, cols = patch_mask.shape
    pixels = patch_mask.to(torch.float32)[:, :, None, :, None]
    pixels = pixels.expand(batch, rows, patch_size, cols, patch_size)
    return pixels.reshape(batch, 1, rows * patch_size, cols * patch_size)


def _random_patch_masks(count: int, grid: int, masked: int, generator: torch.Generator) -> Tensor:
    """count×grid×grid bool, exactly `masked` True per sample (the lowest-noise patches)."""
    noise = torch.rand(count, grid * grid, generator=generator)
    rank = noise.argsort(1).argsort(1)
    return (rank < masked).view(count, grid, grid)


# The per-sample parameters, in the order they are packed for the host-to-device copy.
_PACKED = ("index", "theta", "jitter", "hue", "rotation", "mask")


class DeviceDataProvider:
    """Micro-batches cut from a device-resident uint8 training set (see the module docstring).

    `provider()` -> `((images, patch_mask), target)`:
    images float32 B×3×S×S in [0, 1]; patch_mask bool B×(S/p)×(S/p), True = masked;
    target = {"image": images, "mask": float32 B×1×S×S (1 = masked), "label": int64 B (only when
    cfg.labels != "none"; for "rotation" it is k in 0..3, the image rotated by k·90°)}.
    """

    def __init__(
        self,
        train_set: ImageSet,
        cfg: Any,
        device: torch.device | str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        size = len(train_set)
        if size // world_size < 1:
            raise DatasetError(
                f"data: {size} training samples cannot be split over {world_size} processes"
            )
        if size >= 2**24:  # indices travel as (exact) float32 in the packed copy
            raise DatasetError(f"data: {size} training samples exceed the provider's 2**24 limit")
        if cfg.labels == "class" and train_set.labels is None:
            raise DatasetError(
                "data.labels: this dataset has no class labels; "
                "use labels: rotation or labels: none"
            )
        self.cfg = cfg
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.images = train_set.images.to(self.device)  # uint8, stays on the device
        self.labels = train_set.labels.to(self.device) if cfg.labels == "class" else None
        self.num_samples = size
        self.shard_size = size // world_size
        self.grid = cfg.image_size // cfg.mask.patch_size
        self.num_masked = num_masked_patches(cfg.mask.ratio, self.grid**2)
        # Sample the crop on a finer grid and average-pool it back: a box filter that keeps the
        # downsampling from source resolution (up to ~2× for the embedded pool) from aliasing.
        self.supersample = max(1, min(4, round(train_set.images.shape[-1] / cfg.image_size)))
        self.epoch = 0
        self.position = 0
        self.micro_batches_served = 0
        self._shard_epoch, self._shard = -1, torch.empty(0, dtype=torch.int64)

    def state_dict(self) -> dict[str, int]:
        """The position of the stream: plain ints, identical on every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "micro_batches_served": self.micro_batches_served,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"data provider state is for {int(state['num_samples'])} training "
                f"samples, this dataset has {self.num_samples}; resume with the "
                "same data settings"
            )
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), self.shard_size)
        self.micro_batches_served = int(state["micro_batches_served"])

    def _shard_of_epoch(self, epoch: int) -> Tensor:
        if epoch != self._shard_epoch:
            generator = _generator(self.seed, "order", epoch)
            order = torch.randperm(self.num_samples, generator=generator)
            self._shard = order[self.rank :: self.world_size][: self.shard_size]
            self._shard_epoch = epoch
        return self._shard

    def _next_indices(self, count: int) -> Tensor:
        """The next `count` sample indices of this rank's shard, rolling over epochs."""
        chunks = []
        while count > 0:
            if self.position == self.shard_size:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(count, self.shard_size - self.position)
            chunks.append(self._shard_of_epoch(self.epoch)[self.position : self.position + take])
            self.position += take
            count -= take
        return torch.cat(chunks)

    def _draw_parameters(self, count: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Per-sample parameters, drawn on the CPU; float32 count×width per _PACKED field."""
        aug = self.cfg.augment

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(count, generator=generator)

        area = uniform(*aug.crop_scale)
        aspect = uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])).exp()
        width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
        centre_x, centre_y = (1 - width) * uniform(-1, 1), (1 - height) * uniform(-1, 1)
        flip_x = torch.where(torch.rand(count, generator=generator) < aug.hflip, -1.0, 1.0)
        flip_y = torch.where(torch.rand(count, generator=generator) < aug.vflip, -1.0, 1.0)
        jitter = torch.stack(
            [
                uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness),
                uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast),
                uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation),
            ],
            dim=1,
        )
        hue = _hue_matrices(uniform(-aug.hue, aug.hue))
        rotations = torch.randint(4, (count,), generator=generator)
        if self.cfg.labels != "rotation":
            rotations.zero_()
        # Output coordinate p (in [-1, 1]²) samples the source at diag(w·fx, h·fy)·R_k·p + centre:
        # crop, flip, then rotate by k·90°, all in one affine grid.
        scale = torch.diag_embed(torch.stack([width * flip_x, height * flip_y], dim=1))
        theta = torch.cat(
            [
                scale @ _rotation_matrices(rotations),
                torch.stack([centre_x, centre_y], dim=1).unsqueeze(-1),
            ],
            dim=2,
        )
        masks = _random_patch_masks(count, self.grid, self.num_masked, generator)
        return {
            "index": self._next_indices(count),
            "theta": theta,
            "jitter": jitter,
            "hue": hue,
            "rotation": rotations,
            "mask": masks,
        }

    def __call__(self) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        cfg, count, size = self.cfg, self.cfg.micro_batch_size, self.cfg.image_size
        generator = _generator(self.seed, "augment", self.rank, self.micro_batches_served)
        drawn = self._draw_parameters(count, generator)
        # One host-to-device copy for all of them; from pinned memory it does not block the host.
        packed = torch.cat([drawn[name].reshape(count, -1).float() for name in _PACKED], dim=1)
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True)
        widths = [drawn[name][0].numel() for name in _PACKED]
        fields = dict(zip(_PACKED, packed.split(widths, dim=1), strict=True))
        indices = fields["index"].squeeze(1).long()
        theta = fields["theta"].view(count, 2, 3)
        patch_mask = fields["mask"].view(count, self.grid, self.grid) > 0.5

        source = self.images[indices].float().div_(255)  # B×3×H0×W0, gathered on the device
        fine = size * self.supersample
        grid = F.affine_grid(theta, [count, 3, fine, fine], align_corners=False)
        images = F.grid_sample(
            source, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        if self.supersample > 1:
            images = F.avg_pool2d(images, self.supersample)
        images = _colour_jitter(
            images.clamp(0, 1), fields["jitter"], fields["hue"].view(count, 3, 3), cfg.augment
        )

        target = {"image": images, "mask": pixel_mask(patch_mask, cfg.mask.patch_size)}
        if cfg.labels == "class":
            target["label"] = self.labels[indices]
        elif cfg.labels == "rotation":
            target["label"] = fields["rotation"].squeeze(1).long()
        self.micro_batches_served += 1
        return (images, patch_mask), target


def build_val_batches(
    val_set: ImageSet, cfg: Any, device: torch.device | str, seed: int, batch_size: int
) -> list[tuple[tuple[Tensor, Tensor], dict[str, Tensor]]]:
    """Fixed validation batches on `device`: the largest centred square of every image resized to
    image_size (no augmentation), masks and rotation labels fixed by the seed."""
    size, count = cfg.image_size, len(val_set)
    height, width = val_set.images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    centred = val_set.images[:, :, top : top + side, left : left + side]
    images = (
        F.interpolate(
            centred.float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )
        .div_(255)
        .clamp_(0, 1)
    )

    generator = _generator(seed, "validation")
    grid = size // cfg.mask.patch_size
    masks = _random_patch_masks(count, grid, num_masked_patches(cfg.mask.ratio, grid**2), generator)
    labels = val_set.labels if cfg.labels == "class" else None
    if cfg.labels == "class" and labels is None:
        raise DatasetError(
            "data.labels: this dataset has no class labels; use labels: rotation or labels: none"
        )
    if cfg.labels == "rotation":
        labels = torch.randint(4, (count,), generator=generator)
        rotated = images
        for k in range(1, 4):
            chosen = (labels == k).view(-1, 1, 1, 1)
            rotated = torch.where(chosen, torch.rot90(images, k, dims=(-2, -1)), rotated)
        images = rotated

    batches = []
    for start in range(0, count, batch_size):
        part = slice(start, start + batch_size)
        batch_images = images[part].to(device)
        patch_mask = masks[part].to(device)
        target = {"image": batch_images, "mask": pixel_mask(patch_mask, cfg.mask.patch_size)}
        if labels is not None:
            target["label"] = labels[part].to(device)
        batches.append(((batch_images, patch_mask), target))
    return batches


class BuiltinData:
    """A built-in data set as a run's data source (see ``run.py``): ``provider`` serves the
    training micro-batches and keeps the data order's state, ``batches`` are the fixed
    validation batches, ``task`` evaluates on them."""

    provider: Any
    batches: list[Any]
    task: Any

    def train(self) -> Any:
        return self.provider

    def val(self) -> list[Any]:
        return self.batches

    def state_dict(self) -> dict[str, int]:
        return self.provider.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.provider.load_state_dict(state)


class ImageData(BuiltinData):
    """A built-in image data set as a run's data source (see ``run.py``): the provider of
    augmented, masked training micro-batches and the fixed validation batches, evaluated on
    reconstruction metrics (and accuracy with labels)."""

    def __init__(
        self,
        cfg: Any,
        recipe: Any,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        datasets: tuple[ImageSet, ImageSet] | None = None,
        console: Console | None = None,
    ) -> None:
        from .losses import eval_metrics, reconstruction_images
        from .tasks import SummedMetrics

        train_set, val_set = datasets or build_datasets(cfg, recipe.seed, console=console)
        self.skipped = train_set.skipped
        self.provider = DeviceDataProvider(
            train_set, cfg, device, recipe.seed, rank=rank, world_size=world_size
        )
        self.batches = build_val_batches(val_set, cfg, device, recipe.seed, recipe.eval.batch_size)
        self.task = SummedMetrics(eval_metrics, reconstruction_images, recipe.eval.num_images)


build_image_data = ImageData  # the registry's builder of the image data sets
