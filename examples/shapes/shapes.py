"""Shapes: a small multi-task vision problem whose three losses differ in scale by ~1000x.

This file is a user's own project plugged into gcond's harness (`--plugin`); it imports only
torch and the standard library. Each image is one soft-edged, upright shape — a circle,
triangle, square or cross, of random size, position and colour — on a noisy background of
another colour. One small CNN trunk reads it, and three heads answer:

* ``shape``: which of the four shapes (cross-entropy: about ln 4 = 1.4 at the start);
* ``size``: the side of a square of the shape's area, in pixels (mean squared error in pixel²:
  about 100 at the start; predicting the mean size would score 4);
* ``centre``: where the shape's centre is, as a fraction of the image side (mean squared
  error: about 0.1 at the start; predicting the mean centre would score 0.012).

So at the start the size loss is ~60 times the shape loss, and ~1000 times the centre loss.

Every image is drawn from the seed alone (no download): micro-batch number i of a seed is a
function of (seed, rank, i), so the data object's state is one counter and a resumed run sees
exactly the stream it would have seen. The validation set is the same for every seed, so runs
of different seeds are scored on the same images. The shape parameters are drawn on the CPU
(a few numbers per image) and the images are rendered on the run's device.

The contracts gcond's harness calls (see ``recipe.yaml`` next to this file):

* ``build_model(**args) -> nn.Module``, whose output is ``{"shape", "size", "centre"}``;
* ``make_data(seed, device, **args)`` -> an object with ``train()`` (a zero-argument callable
  returning one micro-batch ``(images, targets)``), ``val()`` (the fixed validation batches)
  and ``state_dict()`` / ``load_state_dict()``;
* ``shape_loss`` / ``size_loss`` / ``centre_loss``: ``fn(output, target) -> scalar tensor``;
* ``evaluate(model, batches) -> dict[str, float]``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHAPES = ("circle", "triangle", "square", "cross")
Batch = tuple[Tensor, dict[str, Tensor]]

_VAL_KEY = "shapes-validation"
_EDGE_PX = 0.75  # softness of a shape's edge, in pixels


# ---------------------------------------------------------------------------------- the data


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a tuple of plain values, the same on every machine."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _inside(shape: Tensor, u: Tensor, v: Tensor, radius: Tensor) -> Tensor:
    """Signed distance in pixels to each shape's outline, > 0 inside.

    ``u``, ``v``: B×S×S pixel offsets from the centre (x to the right, y upwards);
    ``shape``: B class indices; ``radius``: B×1×1 circumradius in pixels.
    """
    circle = radius - torch.sqrt(u**2 + v**2)
    # A regular n-gon: the distance to its farthest edge line (exact inside, close outside).
    normals = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)  # of its edges: apex up
    edges = torch.stack([u * math.cos(a) + v * math.sin(a) for a in normals])
    triangle = radius * math.cos(math.pi / 3) - edges.amax(0)
    half = radius * math.cos(math.pi / 4)
    square = half - torch.maximum(u.abs(), v.abs())
    # A plus sign: two bars of length 2·radius and width 2/3·radius.
    arm, bar = radius, radius / 3
    cross = torch.maximum(
        torch.minimum(arm - u.abs(), bar - v.abs()), torch.minimum(bar - u.abs(), arm - v.abs())
    )
    outlines = torch.stack([circle, triangle, square, cross], dim=1)  # B×4×S×S
    index = shape.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:])
    return outlines.gather(1, index).squeeze(1)


def draw_batch(
    generator: torch.Generator, count: int, image_size: int, noise: float, device: torch.device
) -> Batch:
    """``count`` images (count×3×S×S floats, roughly in [0, 1]) and their targets:
    ``shape`` (int64), ``size`` (pixels, float) and ``centre`` (count×2, fractions of S)."""
    s = image_size

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    shape = torch.randint(len(SHAPES), (count,), generator=generator)
    radius = uniform(count, low=0.2 * s, high=0.34 * s)  # circumradius, in pixels
    # The centre keeps the whole shape, and a pixel of margin, inside the image.
    centre = (radius + 1).unsqueeze(1) + uniform(count, 2) * (s - 2 * radius - 2).unsqueeze(1)
    background = uniform(count, 3)
    # Each channel of the shape differs from the background's by 0.25 to 0.75 (cyclically).
    foreground = (background + uniform(count, 3, low=0.25, high=0.75)) % 1.0
    pixel_noise = noise * torch.randn(count, 3, s, s, generator=generator)

    # Render on the device: the parameters are a few numbers per image, the images are not.
    shape, radius, centre, background, foreground, pixel_noise = (
        t.to(device) for t in (shape, radius, centre, background, foreground, pixel_noise)
    )
    axis = torch.arange(s, device=device, dtype=torch.float32) + 0.5  # pixel centres
    u = (axis.view(1, 1, s) - centre[:, 0].view(-1, 1, 1)).expand(-1, s, s)  # x, along the width
    v = (centre[:, 1].view(-1, 1, 1) - axis.view(1, s, 1)).expand(-1, s, s)  # y, upwards
    alpha = torch.sigmoid(_inside(shape, u, v, radius.view(-1, 1, 1)) / _EDGE_PX)  # B×S×S
    alpha = alpha.unsqueeze(1)
    images = background.view(-1, 3, 1, 1) * (1 - alpha) + foreground.view(-1, 3, 1, 1) * alpha
    targets = {
        "shape": shape,
        # The shape's area as rendered (soft edge included), as the side of an equal square.
        "size": alpha.sum(dim=(1, 2, 3)).sqrt(),
        "centre": centre / s,
    }
    return images + pixel_noise, targets


class ShapesData:
    """The training stream and the validation set of one seed.

    ``train()`` returns the provider: each call draws the next micro-batch from
    (seed, rank, number of micro-batches served). ``state_dict()`` is that number.
    """

    def __init__(
        self,
        seed: int,
        device: torch.device,
        micro_batch_size: int,
        image_size: int,
        noise: float,
        val_samples: int,
        val_batch_size: int,
        rank: int,
    ) -> None:
        self.seed, self.device, self.rank = seed, torch.device(device), rank
        self.micro_batch_size, self.image_size, self.noise = micro_batch_size, image_size, noise
        self.val_samples, self.val_batch_size = val_samples, val_batch_size
        self.micro_batches_served = 0
        self._val: list[Batch] | None = None

    def next_batch(self) -> Batch:
        generator = _generator(self.seed, "train", self.rank, self.micro_batches_served)
        self.micro_batches_served += 1
        return draw_batch(
            generator, self.micro_batch_size, self.image_size, self.noise, self.device
        )

    def train(self) -> Any:
        return self.next_batch

    def val(self) -> list[Batch]:
        """The same batches on every call and for every seed (drawn once, kept)."""
        if self._val is None:
            self._val = []
            for start in range(0, self.val_samples, self.val_batch_size):
                count = min(self.val_batch_size, self.val_samples - start)
                generator = _generator(_VAL_KEY, self.image_size, self.noise, start)
                self._val.append(
                    draw_batch(generator, count, self.image_size, self.noise, self.device)
                )
        return self._val

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches_served": self.micro_batches_served}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.micro_batches_served = int(state["micro_batches_served"])


def make_data(
    seed: int,
    device: torch.device,
    micro_batch_size: int = 32,
    image_size: int = 24,
    noise: float = 0.1,
    val_samples: int = 1024,
    val_batch_size: int = 256,
    rank: int = 0,
) -> ShapesData:
    """The data of one run: ``noise`` is the standard deviation of the per-pixel noise. The
    harness passes ``rank`` under torchrun (each process draws its own stream)."""
    if image_size < 16:
        raise ValueError(f"image_size: {image_size} is too small to tell shapes apart; use >= 16")
    return ShapesData(
        seed, device, micro_batch_size, image_size, noise, val_samples, val_batch_size, rank
    )


# --------------------------------------------------------------------------------- the model


class ShapesNet(nn.Module):
    """Three 3×3 conv blocks (conv, GroupNorm, ReLU, halving max-pool), a shared linear layer,
    three heads. GroupNorm rather than BatchNorm: its statistics are the sample's own."""

    def __init__(self, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        channels = (3, width, 2 * width, 2 * width)
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU()]
            blocks += [nn.MaxPool2d(2)]
        self.trunk = nn.Sequential(
            *blocks,
            nn.AdaptiveAvgPool2d(4),  # keeps where things are (the centre head needs it)
            nn.Flatten(),
            nn.Linear(channels[-1] * 16, hidden),
            nn.ReLU(),
        )
        self.shape = nn.Linear(hidden, len(SHAPES))
        self.size = nn.Linear(hidden, 1)
        self.centre = nn.Linear(hidden, 2)

    def heads(self, z: Tensor) -> dict[str, Tensor]:
        """The three heads on the representation z = ``self.trunk(images)``: with ``trunk``
        this is the split that ``conductor.gradients_at: representation`` uses."""
        return {"shape": self.shape(z), "size": self.size(z).squeeze(1), "centre": self.centre(z)}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.heads(self.trunk(images))


def build_model(width: int = 16, hidden: int = 128) -> nn.Module:
    return ShapesNet(width, hidden)


# -------------------------------------------------------------------------- losses and eval


def shape_loss(output: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    return F.cross_entropy(output["shape"], target["shape"])


def size_loss(output: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    return F.mse_loss(output["size"], target["size"])


def centre_loss(output: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    return F.mse_loss(output["centre"], target["centre"])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """``accuracy`` of the shape, ``size_mae`` in pixels, ``centre_mae`` (distance) in pixels."""
    was_training = model.training
    model.eval()
    correct = size_error = centre_error = 0.0
    count = 0
    for images, target in batches:
        output = model(images)
        side = images.shape[-1]
        correct += (output["shape"].argmax(1) == target["shape"]).sum().item()
        size_error += (output["size"] - target["size"]).abs().sum().item()
        distance = ((output["centre"] - target["centre"]) * side).norm(dim=1)
        centre_error += distance.sum().item()
        count += images.shape[0]
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: no validation batches")
    return {
        "accuracy": correct / count,
        "size_mae": size_error / count,
        "centre_mae": centre_error / count,
    }
