"""Multidigits: two real handwritten digits side by side, several tasks on one shared trunk.

The data (``data.dataset: multidigits``). Each input is two real handwritten digits placed side by
side, one grey channel: 8×16 pixels from the 1,797 8×8 digits that ship inside scikit-learn's
wheel (``data.source: sklearn``, the default: ``sklearn.datasets.load_digits`` reads them from
the installed package, no download), or 28×56 from MNIST (``data.source: mnist``, read by
torchvision from ``data.root``, fetched there with ``data.download: true``). The tasks, one per
loss, each named after its task (`MULTIDIGITS_TASKS`):

* ``left`` and ``right``: the class of each digit (10-way);
* ``parity``: the parity of their sum (2-way: 0 even, 1 odd);
* ``sum``: their sum (19-way), for a recipe that wants it instead.

Why these conflict. ``left`` and ``right`` each want the shared representation z to describe one
half of the input; ``parity`` wants one feature of both halves at once: the sum's parity is the
XOR of the two digits' parities, which no linear head can read off features that describe each
digit alone, so through a linear head it asks the trunk to spend capacity on a joint feature the
other tasks do not need. Its cross-entropy also starts 3.3 times smaller (ln 2 against ln 10).

Source images never cross the split: the digits are split first, then paired within each split.
scikit-learn's 1,797 digits are cut by a fixed permutation into `SKLEARN_VAL_DIGITS` held out for
validation and the rest for training (the same split for every seed); MNIST's own split is used
(its 60,000 training images train, its 10,000 test images validate). Pixels (ink 0..16 in
scikit-learn's digits, 0..255 in MNIST) are standardised by the training digits' mean and
standard deviation.

Training pairs are drawn with replacement, both digits uniformly from the training digits, by a
CPU generator keyed by (seed, rank, micro-batch number): every rank of a distributed run draws its
own stream, the provider's state is one counter, and a resumed run continues the exact stream.
The validation pairs (``data.val_samples`` of them, from the held-out digits) are fixed by the
source alone, the same for every seed.

The model (``model.name: multidigits_cnn``): a shared convolutional trunk, ``model.trunk(x) ->
z`` (``model.dim`` floats), and one linear head per task, ``model.heads(z) -> {task: logits}``;
``model(x) == model.heads(model.trunk(x))``. Losses (``kind: task_cross_entropy``): each task's
cross-entropy. Evaluation: ``eval/acc_<task>``, each task's accuracy on the validation pairs, and
``eval/mean_acc``, their mean (all better higher).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DEFAULT_ROOT, BuiltinData, DatasetError, _generator
from .data.sets import _READ_ERRORS
from .recipe import MULTIDIGITS_TASKS

SKLEARN_DIGITS = 1797  # the digits in scikit-learn's wheel (sklearn/datasets/data/digits.csv.gz)
SKLEARN_VAL_DIGITS = 360  # about 20 % of them held out for validation
_SPLIT_KEY = "multidigits-split"
_VAL_KEY = "multidigits-validation"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class DigitSet:
    """One split of single digits: images float32 N×H×W (standardised), labels int64 N, and each
    image's index in its source (scikit-learn's 1,797 digits, or MNIST's train or test file)."""

    images: Tensor
    labels: Tensor
    sources: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def pair_targets(left: Tensor, right: Tensor) -> dict[str, Tensor]:
    """Every task's label of the pairs (left class, right class): int64, one per pair."""
    total = left + right
    return {"left": left, "right": right, "parity": total % 2, "sum": total}


def load_digit_splits(cfg: Any) -> tuple[DigitSet, DigitSet]:
    """Train and validation digits of ``cfg.source`` (see the module docstring)."""
    if cfg.source == "mnist":
        (train_images, train_labels), (val_images, val_labels) = _mnist(cfg)
        train_sources = torch.arange(train_labels.shape[0])
        val_sources = torch.arange(val_labels.shape[0])
    else:
        images, labels = _sklearn_digits()
        order = torch.randperm(SKLEARN_DIGITS, generator=_generator(_SPLIT_KEY, "sklearn"))
        val_sources, train_sources = order[:SKLEARN_VAL_DIGITS], order[SKLEARN_VAL_DIGITS:]
        train_images, train_labels = images[train_sources], labels[train_sources]
        val_images, val_labels = images[val_sources], labels[val_sources]
    train_pixels = train_images.float()
    mean, std = train_pixels.mean(), train_pixels.std()
    train = DigitSet((train_pixels - mean) / std, train_labels.long(), train_sources)
    val = DigitSet((val_images.float() - mean) / std, val_labels.long(), val_sources)
    return train, val


@functools.cache
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: float64 1797×8×8 in 0..16, int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.images), torch.from_numpy(digits.target)


def _mnist(cfg: Any) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """MNIST's training and test splits, uint8 N×28×28 and labels, read by torchvision."""
    from torchvision.datasets import MNIST

    root = Path(cfg.root).expanduser() if cfg.root else DEFAULT_ROOT
    fix = "point data.root at the folder that holds MNIST/"
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data.root: {root} is a file, not a folder; {fix}")
    splits = []
    for train in (True, False):
        try:
            dataset = MNIST(str(root), train=train, download=cfg.download)
        except _READ_ERRORS as error:
            if cfg.download:
                raise DatasetError(
                    f"data.source 'mnist': the download to {root} failed: "
                    f"{type(error).__name__}: {error}"
                ) from None
            raw = root / "MNIST" / "raw"
            missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
            problem = (
                f"not found under {root} (missing in {raw}: {', '.join(missing)})"
                if missing
                else f"in {raw} cannot be read: {type(error).__name__}: {error}"
            )
            raise DatasetError(
                f"data.source 'mnist': MNIST {problem}; set data.download: true to fetch it "
                f"there, or {fix}"
            ) from None
        splits.append((dataset.data, dataset.targets))
    return splits[0], splits[1]


def _pairs(digits: DigitSet, picks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairs of ``digits`` (on their device) side by side: picks int64 B×2 (left, right digit
    indices) -> (float32 B×1×H×2W, {task: int64 B})."""
    left, right = picks[:, 0], picks[:, 1]
    images = torch.cat([digits.images[left], digits.images[right]], dim=-1).unsqueeze(1)
    return images, pair_targets(digits.labels[left], digits.labels[right])


class DigitPairProvider:
    """Fresh training pairs ``(images, {task: label})`` on the device, counter-based (see the
    module docstring); ``last_picks`` are the last micro-batch's (left, right) digit indices."""

    def __init__(
        self,
        digits: DigitSet,
        micro_batch_size: int,
        device: torch.device | str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.device = torch.device(device)
        self.digits = DigitSet(
            digits.images.to(self.device), digits.labels.to(self.device), digits.sources
        )
        self.micro_batch_size, self.seed, self.rank = micro_batch_size, seed, rank
        self.micro_batches_served = 0
        self.last_picks = torch.empty(0, 2, dtype=torch.int64)

    def __call__(self) -> tuple[Tensor, dict[str, Tensor]]:
        generator = _generator(self.seed, "multidigits", self.rank, self.micro_batches_served)
        self.last_picks = torch.randint(
            len(self.digits), (self.micro_batch_size, 2), generator=generator
        )
        self.micro_batches_served += 1
        return _pairs(self.digits, self.last_picks.to(self.device))

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches_served": self.micro_batches_served, "num_digits": len(self.digits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_digits"]) != len(self.digits):
            raise ValueError(
                f"data provider state is for {int(state['num_digits'])} training digits, this "
                f"source has {len(self.digits)}; resume with the same data.source"
            )
        self.micro_batches_served = int(state["micro_batches_served"])


def validation_picks(digits: DigitSet, count: int, source: str) -> Tensor:
    """The fixed validation pairs: int64 count×2 indices into the held-out digits."""
    return torch.randint(len(digits), (count, 2), generator=_generator(_VAL_KEY, source))


def val_batches(
    digits: DigitSet, picks: Tensor, device: torch.device | str, batch_size: int
) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """The validation pairs ``picks`` in batches of ``batch_size``, on ``device``."""
    images, targets = _pairs(digits, picks)
    batches = []
    for start in range(0, picks.shape[0], batch_size):
        part = slice(start, start + batch_size)
        target = {task: labels[part].to(device) for task, labels in targets.items()}
        batches.append((images[part].to(device), target))
    return batches


def accuracy_sums(output: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-batch sums for the eval loop: correct predictions of each task in ``output``
    (``acc_<task>``), their mean over tasks (``mean_acc``) and the sample count."""
    sums = {
        f"acc_{task}": (logits.argmax(dim=1) == target[task]).float().sum()
        for task, logits in output.items()
    }
    sums["mean_acc"] = sum(sums.values()) / len(output)
    labels = next(iter(target.values()))
    sums["count"] = torch.full((), float(labels.shape[0]), device=labels.device)
    return sums


class MultidigitsData(BuiltinData):
    """Multidigits as a run's data source (see ``run.py``): the training pairs' provider, the
    fixed validation pairs, evaluated on each task's accuracy."""

    def __init__(
        self,
        cfg: Any,
        recipe: Any,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        datasets: Any = None,
        console: Any = None,
    ) -> None:
        from .tasks import SummedMetrics

        train, val = load_digit_splits(cfg)
        self.provider = DigitPairProvider(
            train, cfg.micro_batch_size, device, recipe.seed, rank=rank, world_size=world_size
        )
        picks = validation_picks(val, cfg.val_samples, cfg.source)
        self.batches = val_batches(val, picks, device, recipe.eval.batch_size)
        self.task = SummedMetrics(accuracy_sums)


build_multidigits_data = MultidigitsData  # the registry's builder of dataset multidigits


class DigitHeads(nn.Module):
    """One linear head per task: z (B×dim) -> {task: logits B×classes}."""

    def __init__(self, dim: int, tasks: list[str]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {task: nn.Linear(dim, MULTIDIGITS_TASKS[task]) for task in tasks}
        )

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        return {task: head(z) for task, head in self.heads.items()}


class MultidigitsCNN(nn.Module):
    """A shared conv trunk to z, one head per task: ``model(x) == heads(trunk(x))``.

    trunk: two 3×3 convolutions of ``width`` channels, 2×2 max-pool, a 3×3 convolution of
    2·``width``, 2×2 max-pool, average-pool to 2×4 cells (a no-op for 8×16 pairs; MNIST's 28×56
    pairs are averaged down), a linear layer to z (``dim``, ReLU). The 2×4 cells keep where a
    feature is, so the left and right digits stay apart in z's inputs.
    """

    def __init__(self, tasks: list[str], width: int = 32, dim: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((2, 4)),
            nn.Flatten(),
            nn.Linear(2 * width * 8, dim),
            nn.ReLU(),
        )
        self.heads = DigitHeads(dim, tasks)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.trunk(x))


def build_multidigits_cnn(cfg: Any, recipe: Any) -> nn.Module:
    """The multidigits model (a MultidigitsCnnConfig), one head per task (loss)."""
    return MultidigitsCNN(list(recipe.losses), width=cfg.width, dim=cfg.dim)


def task_cross_entropy(name: str) -> Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]:
    """The cross-entropy of task ``name``'s logits against its labels."""

    def loss(output: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(output[name].float(), target[name])

    return loss


def build_task_cross_entropy(name: str, cfg: Any, recipe: Any) -> Callable[..., Tensor]:
    """The cross-entropy of the task of the loss's name."""
    return task_cross_entropy(name)
