"""Bad data gets a clear error (issue 12): image folders and datasets the user points at.

Every case builds its data in a temporary folder and runs the real `gcond train` (in this process
through typer's runner; a few in a fresh interpreter, end to end), then checks: exit code 2, the
file or folder named in the message, no traceback, and nothing created under the runs directory.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from gcond_cli import data
from gcond_cli.app import app
from gcond_cli.data import folders
from gcond_cli.recipe import ImageDataConfig
from tests.helpers import TINY

# TINY: image_size 16, micro-batch 4, val 8
runner = CliRunner()


# ------------------------------------------------------------------------------------ helpers


def image_folder(root: Path, classes: dict[str, int] | None = None) -> Path:
    """root/<class>/<i>.png: small RGB images of varied sizes (8 per class by default)."""
    for label, (name, count) in enumerate((classes or {"cat": 8, "dog": 8}).items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            colour = (20 * i, 120 * label, 60)
            Image.new("RGB", (20 + i, 24), colour).save(root / name / f"{i:02d}.png")
    return root


def png_header_only_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit side×side PNG of zeros: a few KB on disk, side² pixels once decoded."""
    compressor, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte + bits
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(
        signature + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def train(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    """`gcond train TINY log.runs_dir=tmp_path/runs OVERRIDES` in this process."""
    args = ["train", str(TINY), f"log.runs_dir={tmp_path / 'runs'}", *overrides]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def folder_args(root: Path, *more: str) -> list[str]:
    return ["data.dataset=imagefolder", f"data.root={root}", *more]


def assert_refused(tmp_path: Path, code: int, output: str, *expected: str) -> None:
    assert code == 2, output
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output}"
    assert "Traceback" not in output
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))


# ------------------------------------------------------------------------------ image folders

# (id, build the data under the given folder -> (data.root, texts the message must hold))
Case = Callable[[Path], tuple[Path, list[str]]]


def missing_root(tmp: Path) -> tuple[Path, list[str]]:
    return tmp / "nope", [f"data.root: {tmp / 'nope'} does not exist", "one sub-folder per class"]


def root_is_a_file(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "photo.png").write_bytes(b"x")
    return tmp / "photo.png", [f"{tmp / 'photo.png'} is a file, not a folder"]


def empty_root(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "empty").mkdir()
    return tmp / "empty", [f"{tmp / 'empty'} is empty", f"{tmp / 'empty'}/cat/001.jpg"]


def no_class_folders(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "flat").mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8)).save(tmp / "flat" / f"{i}.png")
    return tmp / "flat", [f"{tmp / 'flat'} has no class sub-folders", "one sub-folder per class"]


def class_folders_without_images(tmp: Path) -> tuple[Path, list[str]]:
    root = image_folder(tmp / "d")
    for name in ("notes", "bird"):
        (root / name).mkdir()
        (root / name / "readme.txt").write_text("not an image")
    return root, ["2 class folder(s)", str(root / "bird"), str(root / "notes"), ".png"]


def truncated_image(tmp: Path) -> tuple[Path, list[str]]:
    root = image_folder(tmp / "d")
    whole = root / "cat" / "03.png"
    Image.radial_gradient("L").save(whole)  # 256×256 with real content, so the cut is in pixels
    whole.write_bytes(whole.read_bytes()[:2000])
    return root, ["1 of the 16 images", f"{whole}: ", "truncated", "data.skip_bad_images: true"]


def not_an_image(tmp: Path) -> tuple[Path, list[str]]:
    root = image_folder(tmp / "d")
    (root / "dog" / "notes.jpg").write_text("a text file with an image extension")
    return root, [f"{root / 'dog' / 'notes.jpg'}: not an image"]


def decompression_bomb(tmp: Path) -> tuple[Path, list[str]]:
    # 20 000² = 4·10⁸ pixels: over 2 × Image.MAX_IMAGE_PIXELS, Pillow raises.
    root = image_folder(tmp / "d")
    bomb = png_header_only_bomb(root / "cat" / "bomb.png", 20_000)
    limit = f"{Image.MAX_IMAGE_PIXELS:,}"
    return root, [f"{bomb}: 400,000,000 pixels, over Pillow's limit of {limit}"]


def mild_decompression_bomb(tmp: Path) -> tuple[Path, list[str]]:
    # 10 000² = 10⁸ pixels: between 1 × and 2 × the limit, where Pillow only warns; refused too.
    root = image_folder(tmp / "d")
    bomb = png_header_only_bomb(root / "dog" / "big.png", 10_000)
    return root, [f"{bomb}: 100,000,000 pixels, over Pillow's limit"]


def train_val_classes_differ(tmp: Path) -> tuple[Path, list[str]]:
    image_folder(tmp / "d" / "train", {"cat": 8, "dog": 8, "fox": 2})
    image_folder(tmp / "d" / "val", {"cat": 8, "dog": 8, "owl": 2})
    train, val = tmp / "d" / "train", tmp / "d" / "val"
    return tmp / "d", [f"only in {train}: fox", f"only in {val}: owl"]


def fewer_than_val_samples(tmp: Path) -> tuple[Path, list[str]]:
    root = image_folder(tmp / "d", {"cat": 4, "dog": 4})
    return root, ["data.val_samples: 8 held-out images leave none", str(root)]


def val_folder_smaller_than_val_samples(tmp: Path) -> tuple[Path, list[str]]:
    image_folder(tmp / "d" / "train", {"cat": 8})
    image_folder(tmp / "d" / "val", {"cat": 5})
    return tmp / "d", [f"{tmp / 'd' / 'val'} holds 5 images", "lower data.val_samples to 5"]


def fewer_than_one_micro_batch(tmp: Path) -> tuple[Path, list[str]]:
    root = image_folder(tmp / "d", {"cat": 5, "dog": 5})  # 10 - 8 held out = 2 < 4
    return root, ["data.micro_batch_size: 4 training images", str(root), "leaving 2"]


def many_damaged_images(tmp: Path) -> tuple[Path, list[str]]:
    root = image_folder(tmp / "d")
    for i in range(13):
        (root / "cat" / f"broken{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return root, ["13 of the 29 images", "broken00.png", "broken09.png", "... and 3 more"]


CASES: list[Case] = [
    missing_root,
    root_is_a_file,
    empty_root,
    no_class_folders,
    class_folders_without_images,
    truncated_image,
    not_an_image,
    decompression_bomb,
    mild_decompression_bomb,
    train_val_classes_differ,
    fewer_than_val_samples,
    val_folder_smaller_than_val_samples,
    fewer_than_one_micro_batch,
    many_damaged_images,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_image_folder_is_refused_naming_the_culprit(tmp_path: Path, case: Case) -> None:
    root, expected = case(tmp_path)
    code, output = train(tmp_path, *folder_args(root))
    assert_refused(tmp_path, code, output, *expected)


def test_unreadable_image_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, whom file modes do not stop: the permission error is injected.
    root = image_folder(tmp_path / "d")
    locked, real_open = root / "dog" / "02.png", Image.open

    def open_(path: object, *args: object, **kwargs: object) -> Image.Image:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    code, output = train(tmp_path, *folder_args(root))
    assert_refused(tmp_path, code, output, f"{locked}: no read permission")


def test_unreadable_class_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "d")
    locked, real_scandir = root / "cat", os.scandir

    def scandir(path: object = ".") -> object:
        if Path(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, output = train(tmp_path, *folder_args(root))
    assert_refused(tmp_path, code, output, f"cannot list {locked}: Permission denied", "chmod")


def test_folder_too_large_for_memory_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_folder(tmp_path / "d")
    monkeypatch.setattr(folders, "_available_memory", lambda: 10_000)
    decoded = []
    monkeypatch.setattr(folders, "_open_rgb", lambda path: decoded.append(path))
    code, output = train(tmp_path, *folder_args(root))
    # 16 images × 3 × 32 × 32 bytes (32 = 2 × image_size) = 49 152 bytes
    assert_refused(tmp_path, code, output, f"{root} need 49.2 KB", "16 × 3 × 32 × 32 bytes")
    assert "lower data.image_size" in output and "10 KB available" in output
    assert decoded == []  # refused before reading a single image


def test_skip_bad_images_trains_without_them_and_lists_them(tmp_path: Path) -> None:
    root, _ = truncated_image(tmp_path)
    (root / "dog" / "notes.jpg").write_text("not an image")
    code, output = train(
        tmp_path, *folder_args(root, "data.skip_bad_images=true", "--run-name", "r")
    )
    assert code == 0, output
    run_dir = tmp_path / "runs" / "tiny" / "r"
    listed = (run_dir / "bad_images.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in listed] == [
        str(root / "cat" / "03.png"),
        str(root / "dog" / "notes.jpg"),
    ]
    warning = f"2 unreadable images of {root} left out; the list is in {run_dir / 'bad_images.txt'}"
    assert output.count("data.skip_bad_images") == 1 and warning in output
    # What reading the folder costs is said before it is read: 17 images × 3 × 32 × 32 bytes.
    assert f"reading 17 images of {root} into memory: 52.2 KB" in output


def test_skipping_can_leave_too_few_images(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", {"cat": 6, "dog": 6})  # 12 - 8 held out = 4: one batch
    (root / "cat" / "00.png").write_bytes(b"broken")
    code, output = train(tmp_path, *folder_args(root, "data.skip_bad_images=true"))
    assert_refused(tmp_path, code, output, "11 readable images", "leaving 3")


def test_compare_refuses_bad_data_before_making_its_directory(tmp_path: Path) -> None:
    root, expected = truncated_image(tmp_path)
    args = ["compare", str(TINY), f"log.runs_dir={tmp_path / 'runs'}", *folder_args(root)]
    result = runner.invoke(app, [*args, "--methods", "sum,conductor"])
    assert_refused(tmp_path, result.exit_code, result.output, *expected)


# ---------------------------------------------------------------------- the loader's results


def data_cfg(root: Path, **settings: object) -> ImageDataConfig:
    base = {"dataset": "imagefolder", "root": str(root), "image_size": 16}
    return ImageDataConfig.model_validate(
        {**base, "micro_batch_size": 4, "val_samples": 3, **settings}
    )


def test_every_image_mode_loads_like_torchvision_image_folder(tmp_path: Path) -> None:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    rgb = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    modes = {
        "grey": rgb.convert("L"),
        "rgba": rgb.convert("RGBA"),
        "palette": rgb.convert("P"),
        "cmyk": rgb.convert("CMYK"),
        "sixteen": rgb.convert("I;16"),
        "one_pixel": Image.new("RGB", (1, 1), (9, 99, 199)),
    }
    for i, (name, image) in enumerate(modes.items()):
        (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
        image.save(tmp_path / f"class{i % 2}" / f"{name}.{'jpg' if name == 'cmyk' else 'png'}")
    cfg = data_cfg(tmp_path, val_samples=1, micro_batch_size=1)
    train, val = data.build_datasets(cfg, seed=0)
    side = 32
    reference = ImageFolder(
        str(tmp_path),
        transform=transforms.Compose(
            [transforms.Resize(side), transforms.CenterCrop(side), transforms.PILToTensor()]
        ),
    )
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    order = torch.randperm(len(reference), generator=data._generator(data._VAL_KEY))
    assert torch.equal(val.images, expected[order[:1]])
    assert torch.equal(train.images, expected[order[1:]])
    assert train.labels.tolist() == [reference.targets[i] for i in order[1:]]


def test_rows_are_permuted_in_place() -> None:
    rows = torch.arange(40).view(10, 4)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    expected = rows[order].clone()
    data._take_rows_(rows, order)
    assert torch.equal(rows, expected)


def test_progress_bar_counts_the_images_on_a_terminal_only(tmp_path: Path) -> None:
    image_folder(tmp_path / "d")
    for terminal in (True, False):
        text = io.StringIO()
        console = Console(file=text, force_terminal=terminal, width=120)
        data.build_datasets(data_cfg(tmp_path / "d"), seed=0, console=console)
        output = text.getvalue()
        assert "reading 16 images" in output  # the memory line, always
        assert ("16/16" in output) is terminal, output


# ---------------------------------------------------------------------- CIFAR-10 and STL-10


def test_dataset_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.tar").write_bytes(b"x")
    for dataset in ("cifar10", "stl10"):
        code, output = train(tmp_path, f"data.dataset={dataset}", f"data.root={tmp_path}/data.tar")
        assert_refused(tmp_path, code, output, f"{tmp_path / 'data.tar'} is a file")


def test_cifar10_empty_folder_names_the_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    code, output = train(tmp_path, "data.dataset=cifar10", f"data.root={tmp_path}")
    expected = [f"{folder / 'data_batch_1'} is missing", f"{folder / 'batches.meta'} is missing"]
    assert_refused(tmp_path, code, output, *expected, "data.download: true")


def test_cifar10_damaged_batch_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    code, output = train(tmp_path, "data.dataset=cifar10", f"data.root={tmp_path}")
    damaged = f"{folder / 'data_batch_1'} is damaged (its MD5 checksum differs)"
    assert_refused(tmp_path, code, output, damaged, f"{folder / 'data_batch_2'} is missing")


def test_cifar10_unparsable_batch_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past torchvision's checksum (here skipped), the batch files are unpickled: a damaged one
    # raises the parser's error, which is reported like a failed checksum.
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, _ in [*CIFAR10.train_list, *CIFAR10.test_list]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    code, output = train(tmp_path, "data.dataset=cifar10", f"data.root={tmp_path}")
    assert_refused(tmp_path, code, output, f"{folder / 'data_batch_1'} is damaged")


def test_stl10_partial_folder_names_the_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "train_X.bin").write_bytes(bytes(100))
    code, output = train(tmp_path, "data.dataset=stl10", f"data.root={tmp_path}")
    expected = [f"{folder / 'train_X.bin'} is damaged", f"{folder / 'test_y.bin'} is missing"]
    assert_refused(tmp_path, code, output, *expected)


def test_cifar10_not_downloaded_says_how_to_get_it(tmp_path: Path) -> None:
    code, output = train(tmp_path, "data.dataset=cifar10", f"data.root={tmp_path}")
    assert_refused(tmp_path, code, output, f"CIFAR-10 not found under {tmp_path}", "download")


# ---------------------------------------------------------------- end to end, fresh process


def gcond(tmp_path: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """`gcond train TINY log.runs_dir=... ARGS` in a fresh interpreter; `code` runs first."""
    argv = ["train", str(TINY), f"log.runs_dir={tmp_path / 'runs'}", *args]
    main = f"import sys\nfrom gcond_cli.app import main\nsys.argv = {['gcond', *argv]!r}\nmain()"
    program = f"{code or ''}\n{main}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.slow  # a fresh interpreter
def test_end_to_end_bad_folder_exits_2_without_traceback(tmp_path: Path) -> None:
    root, expected = truncated_image(tmp_path)
    done = gcond(tmp_path, *folder_args(root))
    assert_refused(tmp_path, done.returncode, done.stdout + done.stderr, *expected)
    assert expected[0] in done.stderr  # errors go to stderr


@pytest.mark.slow  # a fresh interpreter
def test_end_to_end_unexpected_exception_keeps_its_traceback(tmp_path: Path) -> None:
    # A bug anywhere in a command (here: where the recipe is read, before torch is imported).
    bug = "import gcond_cli.app as app\napp.resolve_recipe_path = lambda name: 1 / 0"
    done = gcond(tmp_path, code=bug)
    assert done.returncode == 1, done.stderr
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr
