"""Image folders (``data.root``): listed, checked for size and memory, decoded, their
unreadable images refused or left out (``data.skip_bad_images``)."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import DatasetError
from .common import _VAL_KEY, IMAGE_SUFFIXES, ImageSet, _generator, _listed, _pool_side, _val_subset

if TYPE_CHECKING:
    from rich.console import Console

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
