"""On the device: batched augmentation, per-sample patch masks, `DeviceDataProvider` that cuts
every micro-batch from the training set, the validation batches, and the built-in data sources
(`BuiltinData`, `ImageData`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DatasetError
from .common import ImageSet, _generator, num_masked_patches
from .sets import build_datasets

if TYPE_CHECKING:
    from rich.console import Console

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
        from ..losses import eval_metrics, reconstruction_images
        from ..tasks import SummedMetrics

        train_set, val_set = datasets or build_datasets(cfg, recipe.seed, console=console)
        self.skipped = train_set.skipped
        self.provider = DeviceDataProvider(
            train_set, cfg, device, recipe.seed, rank=rank, world_size=world_size
        )
        self.batches = build_val_batches(val_set, cfg, device, recipe.seed, recipe.eval.batch_size)
        self.task = SummedMetrics(eval_metrics, reconstruction_images, recipe.eval.num_images)


build_image_data = ImageData  # the registry's builder of the image data sets
