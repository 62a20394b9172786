"""Multidigits: pairs of real digits whose labels are their source digits' labels, splits
disjoint by source image, a stream that is a function of (seed, rank, counter), MNIST read from
torchvision's on-disk format (a fake folder and a fake download, no network), the model's
trunk / heads contract, and the recipe end to end."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sklearn.datasets import load_digits

from gcond_cli.compare.results import shown_metrics
from gcond_cli.data import DatasetError
from gcond_cli.digits import (
    SKLEARN_DIGITS,
    SKLEARN_VAL_DIGITS,
    DigitPairProvider,
    MultidigitsCNN,
    MultidigitsData,
    accuracy_sums,
    load_digit_splits,
    task_cross_entropy,
)
from gcond_cli.recipe import load_recipe, recipes_dir
from gcond_cli.run.loop import Trainer

RECIPE = recipes_dir() / "multidigits.yaml"
SKLEARN = SimpleNamespace(source="sklearn", root=None, download=False)


def _recipe(*overrides: str):
    return load_recipe(RECIPE, list(overrides))


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits(SKLEARN)


def test_the_splits_are_disjoint_by_source_digit_and_cover_all_of_them(splits):
    train, val = splits
    assert (len(train), len(val)) == (SKLEARN_DIGITS - SKLEARN_VAL_DIGITS, SKLEARN_VAL_DIGITS)
    assert set(train.sources.tolist()).isdisjoint(val.sources.tolist())
    assert sorted(train.sources.tolist() + val.sources.tolist()) == list(range(SKLEARN_DIGITS))
    # The split is a property of the data set: loading again gives the same one.
    again, _ = load_digit_splits(SKLEARN)
    assert torch.equal(again.sources, train.sources)
    # Both standardised by the training digits' mean and standard deviation.
    raw = torch.from_numpy(load_digits().images).float()
    mean, std = raw[train.sources].mean(), raw[train.sources].std()
    assert torch.equal(train.images, (raw[train.sources] - mean) / std)
    assert torch.equal(val.images, (raw[val.sources] - mean) / std)


def test_each_pair_is_its_two_source_digits_with_their_labels(splits):
    train, _ = splits
    raw = load_digits()
    provider = DigitPairProvider(train, 16, "cpu", seed=0)
    x, target = provider()
    left, right = provider.last_picks[:, 0], provider.last_picks[:, 1]
    assert x.shape == (16, 1, 8, 16) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, :, :8], train.images[left])
    assert torch.equal(x[:, 0, :, 8:], train.images[right])
    # The labels are scikit-learn's labels of the source images the pixels came from.
    source_left, source_right = train.sources[left], train.sources[right]
    assert target["left"].tolist() == raw.target[source_left.numpy()].tolist()
    assert target["right"].tolist() == raw.target[source_right.numpy()].tolist()
    total = target["left"] + target["right"]
    assert torch.equal(target["sum"], total) and torch.equal(target["parity"], total % 2)
    assert set(target) == {"left", "right", "parity", "sum"}


def test_the_stream_follows_seed_and_rank_and_resumes_exactly(splits):
    train, _ = splits

    def batch(seed: int = 0, rank: int = 0, world_size: int = 1, skip: int = 0):
        provider = DigitPairProvider(train, 8, "cpu", seed, rank=rank, world_size=world_size)
        if skip:
            provider.load_state_dict({"micro_batches_served": skip, "num_digits": len(train)})
        return provider()

    first, same = batch(), batch()
    assert torch.equal(first[0], same[0]) and first[1]["left"].tolist() == same[1]["left"].tolist()
    assert not torch.equal(batch(seed=1)[0], first[0])
    assert not torch.equal(batch(rank=1, world_size=2)[0], batch(rank=0, world_size=2)[0])
    provider = DigitPairProvider(train, 8, "cpu", 0)
    provider(), provider()
    assert provider.state_dict() == {"micro_batches_served": 2, "num_digits": 1437}
    assert torch.equal(provider()[0], batch(skip=2)[0])
    with pytest.raises(ValueError, match="1000 training digits, this source has 1437"):
        provider.load_state_dict({"micro_batches_served": 2, "num_digits": 1000})
    with pytest.raises(ValueError, match="rank"):
        DigitPairProvider(train, 8, "cpu", 0, rank=2, world_size=2)


def test_validation_pairs_are_fixed_held_out_digits(splits):
    _, val = splits
    raw = load_digits()
    by_seed = [
        MultidigitsData(r.data, r, device=torch.device("cpu"))
        for r in (_recipe("seed=0"), _recipe("seed=7", "eval.batch_size=300"))
    ]
    images = [torch.cat([x for x, _ in d.val()]) for d in by_seed]
    assert images[0].shape == (2000, 1, 8, 16) and torch.equal(images[0], images[1])
    assert [x.shape[0] for x, _ in by_seed[1].val()] == [300] * 6 + [200]
    # Every validation digit is a held-out one: its pixels are among the held-out digits'.
    halves = torch.cat([images[0][:, 0, :, :8], images[0][:, 0, :, 8:]]).flatten(1)
    distances = torch.cdist(
        halves, val.images.flatten(1), compute_mode="donot_use_mm_for_euclid_dist"
    )
    nearest = distances.argmin(1)
    assert distances.min(1).values.max().item() == 0
    lefts = torch.cat([t["left"] for _, t in by_seed[0].val()])
    assert lefts.tolist() == raw.target[val.sources[nearest[:2000]].numpy()].tolist()


def test_accuracy_sums_count_correct_predictions_per_task():
    target = {"left": torch.tensor([1, 2, 3, 4]), "parity": torch.tensor([0, 1, 1, 0])}
    output = {
        "left": torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 0]), 10).float(),
        "parity": torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 2).float(),
    }
    sums = accuracy_sums(output, target)
    assert {k: v.item() for k, v in sums.items()} == {
        "acc_left": 2.0,
        "acc_parity": 3.0,
        "mean_acc": 2.5,
        "count": 4.0,
    }
    loss = task_cross_entropy("parity")(output, target)
    expected = torch.nn.functional.cross_entropy(output["parity"], target["parity"])
    assert loss.item() == expected.item()


@pytest.mark.parametrize("side", [8, 28])
def test_the_model_is_its_heads_after_its_trunk(side):
    torch.manual_seed(0)
    model = MultidigitsCNN(["left", "right", "parity"], width=4, dim=16)
    x = torch.randn(5, 1, side, 2 * side)
    z = model.trunk(x)
    assert z.shape == (5, 16)
    out = model(x)
    assert {k: v.shape for k, v in out.items()} == {
        "left": (5, 10),
        "right": (5, 10),
        "parity": (5, 2),
    }
    by_parts = model.heads(z)
    assert all(torch.equal(out[k], by_parts[k]) for k in out)
    # Every parameter is in the trunk or in a head.
    count = sum(p.numel() for p in model.parameters())
    parts = [model.trunk, model.heads]
    assert count == sum(p.numel() for m in parts for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# MNIST, from torchvision's on-disk format (raw idx files), without a network

MNIST_SIZES = {"train": 12, "t10k": 5}


def _idx(array: torch.Tensor) -> bytes:
    """An idx file (big-endian header: 0x0000, type 0x08 = uint8, number of dimensions, sizes)."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def _fake_mnist_files() -> dict[str, bytes]:
    """Tiny MNIST files; every image is its label's value in every pixel, plus its index."""
    files = {}
    for split, count in MNIST_SIZES.items():
        labels = torch.arange(count) % 10
        images = (labels * 20 + torch.arange(count) % 3).view(-1, 1, 1).expand(-1, 28, 28)
        files[f"{split}-images-idx3-ubyte"] = _idx(images.contiguous())
        files[f"{split}-labels-idx1-ubyte"] = _idx(labels)
    return files


def _mnist_recipe(root: Path, *overrides: str):
    return _recipe("data.source=mnist", f"data.root={root}", "data.val_samples=7", *overrides)


def test_mnist_pairs_from_a_folder_in_torchvisions_format(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, content in _fake_mnist_files().items():
        (raw / name).write_bytes(content)
    recipe = _mnist_recipe(tmp_path)
    data = MultidigitsData(recipe.data, recipe, device=torch.device("cpu"))
    x, target = data.train()()
    assert x.shape == (32, 1, 28, 56)
    assert data.state_dict() == {"micro_batches_served": 1, "num_digits": 12}
    # Each half is one source image: constant, and its label is the one written with it.
    picks = data.provider.last_picks
    assert target["left"].tolist() == (picks[:, 0] % 10).tolist()
    assert target["right"].tolist() == (picks[:, 1] % 10).tolist()
    assert torch.equal(x[:, 0, :, :28].amax((1, 2)), x[:, 0, :, :28].amin((1, 2)))
    index = torch.arange(MNIST_SIZES["train"])
    pixels = ((index % 10) * 20 + index % 3).float().div(255).repeat_interleave(28 * 28)
    expected = (pixels[picks[:, 0] * 28 * 28] - pixels.mean()) / pixels.std()
    torch.testing.assert_close(x[:, 0, 0, 0], expected)
    # The validation pairs come from the test file (5 images, labels 0..4).
    (val_x, val_target), *rest = data.val()
    assert not rest and val_x.shape == (7, 1, 28, 56)
    assert max(val_target["left"].tolist() + val_target["right"].tolist()) <= 4


def test_mnist_download_from_a_fake_mirror(tmp_path, monkeypatch):
    """torchvision's download path (mirrors, MD5 check, gunzip) from a local folder's file://
    URLs; only its copy loop is replaced, as it reads an HTTP response's length."""
    import torchvision.datasets.utils
    from torchvision.datasets import MNIST

    fetched = []

    def retrieve(url: str, filename: str, chunk_size: int = 0) -> None:
        fetched.append(url.rsplit("/", 1)[1])
        with urllib.request.urlopen(url) as response:
            Path(filename).write_bytes(response.read())

    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", retrieve)

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    resources = []
    for name, content in _fake_mnist_files().items():
        packed = gzip.compress(content)
        (mirror / f"{name}.gz").write_bytes(packed)
        resources.append((f"{name}.gz", hashlib.md5(packed).hexdigest()))
    monkeypatch.setattr(MNIST, "mirrors", [mirror.as_uri() + "/"])
    monkeypatch.setattr(MNIST, "resources", resources)
    root = tmp_path / "datasets"
    recipe = _mnist_recipe(root, "data.download=true")
    data = MultidigitsData(recipe.data, recipe, device=torch.device("cpu"))
    assert data.state_dict()["num_digits"] == MNIST_SIZES["train"]
    assert (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert fetched == [name for name, _ in resources]


def test_missing_mnist_says_what_to_do(tmp_path):
    recipe = _mnist_recipe(tmp_path)
    with pytest.raises(DatasetError) as caught:
        MultidigitsData(recipe.data, recipe, device=torch.device("cpu"))
    message = str(caught.value)
    assert "MNIST not found under" in message and "train-images-idx3-ubyte" in message
    assert "data.download: true" in message and "data.root" in message


# ---------------------------------------------------------------------------------------------
# The recipe


def test_compare_ranks_the_accuracies_higher_is_better():
    recipe = _recipe()
    assert recipe.metrics() == {
        "eval/acc_left": "max",
        "eval/acc_right": "max",
        "eval/acc_parity": "max",
        "eval/mean_acc": "max",
    }
    present = {"acc_left", "acc_right", "acc_parity", "mean_acc"}
    shown = shown_metrics(recipe, present)
    assert list(shown) == ["mean_acc", "acc_left", "acc_parity", "acc_right"]
    assert {recipe.better(m) for m in shown} == set(shown.values()) == {"max"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.name=mae_vit", "model"),
        ("losses.left.kind=cross_entropy", "losses.left"),
        ("losses.middle.kind=task_cross_entropy losses.middle.weight=1", "losses.middle"),
        ("data.source=emnist", "data.source"),
        ("checkpoint.best_metric=eval/ssim", "checkpoint.best_metric"),
    ],
)
def test_mismatched_parts_are_refused_with_exit_2(cli, override, expected):
    result = cli("validate", "multidigits", *override.split())
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_task_cross_entropy_needs_multidigits(cli):
    result = cli("validate", "conflict_lab", "losses.t1.kind=task_cross_entropy")
    assert result.exit_code == 2, result.output
    assert "task_cross_entropy is for data.dataset multidigits" in result.output


def test_the_recipe_validates(cli):
    result = cli("validate", "multidigits")
    assert result.exit_code == 0, result.output
    assert "dataset: multidigits" in result.output


@pytest.mark.slow  # end-to-end runs
def test_train_end_to_end_and_resume_bit_identical(cli, tmp_path, monkeypatch):
    tiny = ("schedule.max_steps=4", "schedule.warmup_steps=1", "eval.every=2", "model.width=4")
    tiny += (f"log.runs_dir={tmp_path}", "data.val_samples=100")
    result = cli("train", "multidigits", *tiny, "--run-name", "full")
    assert result.exit_code == 0, result.output
    run = tmp_path / "multidigits" / "full"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("eval/acc_left", "eval/acc_right", "eval/acc_parity", "eval/mean_acc"):
        assert 0 <= evals[-1][key] <= 1
    mean = sum(evals[-1][f"eval/acc_{t}"] for t in ("left", "right", "parity")) / 3
    assert evals[-1]["eval/mean_acc"] == pytest.approx(mean)

    original = Trainer.train_step

    def stop_after_two(self):
        stats = original(self)
        if self.step == 1:
            self.stop_signal = signal.SIGINT
        return stats

    monkeypatch.setattr(Trainer, "train_step", stop_after_two)
    result = cli("train", "multidigits", *tiny, "--run-name", "cut")
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(Trainer, "train_step", original)
    cut = tmp_path / "multidigits" / "cut"
    result = cli("train", "multidigits", f"log.runs_dir={tmp_path}", "--resume", cut)
    assert result.exit_code == 0, result.output

    def weights(run_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]

    resumed, uninterrupted = weights(cut), weights(run)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
