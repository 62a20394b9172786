"""Losses and evaluation metrics.

Each builder returns `fn(output, target) -> scalar float32 tensor`, where output is the model's
dict ("recon", "logits") and target the data provider's ("image", "mask", "label"). Every loss
computes in fp32 and none syncs with the host, so the training loop can stack them as they are.

`masked_only` restricts a reconstruction loss to the masked region (target["mask"] == 1):
* l1 / mse: the mean over masked pixels (all 3 channels);
* ssim / ms_ssim: SSIM is a windowed statistic, so the masked region cannot be cut out; instead
  the unmasked pixels of the reconstruction are replaced by the target's
  (recon·mask + image·(1 − mask)) and SSIM is taken over the whole image. Windows that see only
  visible pixels then score 1, so the loss scales with the masked fraction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from pytorch_msssim.ssim import _ssim
from torch import Tensor

LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]

# How the losses' scales are set before any method sees them (recipe key `loss_scale`):
# none: L_k as it is; log: log L_k (gradient ∇L_k / L_k: the scale-invariant baseline);
# initial: L_k / L_k⁽⁰⁾, L_k⁽⁰⁾ being L_k's mean over the first optimizer step.
LOSS_SCALES = ("none", "log", "initial")
# log(0) would be -inf; a loss that is exactly 0 contributes a zero gradient instead.
_TINY = torch.finfo(torch.float32).tiny

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # pytorch-msssim's defaults
_WIN_SIGMA = 1.5


def build_pixel_loss(name: str, cfg: Any, recipe: Any) -> LossFn:
    """l1 / mse of the reconstruction (a PixelLossConfig)."""
    return _pixel_loss(cfg.kind, cfg.masked_only)


def build_ssim_loss(name: str, cfg: Any, recipe: Any) -> LossFn:
    """1 - SSIM / MS-SSIM of the reconstruction (an SsimLossConfig); the recipe has checked
    that the window fits the images."""
    return _ssim_loss(cfg.win_size, cfg.masked_only, multiscale=cfg.kind == "ms_ssim")


def build_cross_entropy(name: str, cfg: Any, recipe: Any) -> LossFn:
    """Cross-entropy of the classification head against the data's labels."""
    return _cross_entropy


def task_mse(name: str) -> LossFn:
    """The mean squared error of task ``name`` (its output and its target, both keyed by the
    task's name): the lab's and QM9's per-task loss."""

    def loss(output: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(output[name].float(), target[name].float())

    return loss


def log_scaled(fn: LossFn) -> LossFn:
    """``log fn(output, target)``: its gradient is ``∇L / L``, so every loss counts by its relative
    change, whatever its units. A loss of exactly 0 is clamped to the smallest normal float (a
    zero gradient rather than -inf)."""

    def loss(output: Any, target: Any) -> Tensor:
        return torch.log(fn(output, target).float().clamp_min(_TINY))

    return loss


class InitialScale:
    """``L_k / L_k⁽⁰⁾`` for every loss, the references shared by the wrapped loss functions.

    ``reference`` is None until measured (a K-vector on the device, in the order of ``names``);
    the method wrapper :class:`gcond_cli.methods.InitialScaleMethod` measures it over the first
    optimizer step's micro-batches and keeps it in its state. Dividing by a device tensor keeps
    the loss free of host syncs.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.reference: Tensor | None = None

    def wrap(self, name: str, fn: LossFn) -> LossFn:
        index = self.names.index(name)

        def loss(output: Any, target: Any) -> Tensor:
            if self.reference is None:
                raise RuntimeError("loss_scale 'initial': the reference losses are not measured")
            return fn(output, target).float() / self.reference[index]

        return loss


def _pixel_loss(kind: str, masked_only: bool) -> LossFn:
    def loss(output: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        diff = output["recon"].float() - target["image"].float()
        error = diff.abs() if kind == "l1" else diff.square()
        if not masked_only:
            return error.mean()
        mask = target["mask"].float()  # B×1×S×S, broadcast over the 3 channels
        # clamp: a zero mask ratio has no masked pixel; the loss is then 0, not NaN.
        return (error * mask).sum() / (3 * mask.sum()).clamp(min=1)

    return loss


@functools.cache
def _window(size: int, channels: int, device: torch.device) -> Tensor:
    """pytorch-msssim's Gaussian window (channels×1×1×size), built once per device: left to
    itself, the library builds it on the CPU and copies it to the device on every call."""
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    gauss = torch.exp(-(coords**2) / (2 * _WIN_SIGMA**2))
    return (gauss / gauss.sum()).view(1, 1, 1, size).repeat(channels, 1, 1, 1).to(device)


@functools.cache
def _ms_ssim_weights(device: torch.device) -> Tensor:
    return torch.tensor(_MS_SSIM_WEIGHTS).to(device)


def _ms_ssim(x: Tensor, y: Tensor, window: Tensor, weights: Tensor) -> Tensor:
    """Per-image MS-SSIM, pytorch-msssim's algorithm with the level weights already on the device
    (its `ms_ssim` uploads them from a Python list each call, which syncs on CUDA)."""
    contrasts = []
    for level in range(weights.shape[0]):
        per_channel, contrast = _ssim(x, y, data_range=1.0, win=window, size_average=False)
        if level < weights.shape[0] - 1:
            contrasts.append(torch.relu(contrast))
            padding = [side % 2 for side in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    levels = torch.stack([*contrasts, torch.relu(per_channel)])  # levels×B×C
    return torch.prod(levels ** weights.view(-1, 1, 1), dim=0).mean(1)


def _ssim_loss(win_size: int, masked_only: bool, multiscale: bool) -> LossFn:
    def loss(output: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        recon = output["recon"]
        # SSIM's variance terms cancel catastrophically in half precision.
        with torch.autocast(device_type=recon.device.type, enabled=False):
            recon, image = recon.float(), target["image"].float()
            if masked_only:
                mask = target["mask"].float()
                recon = recon * mask + image * (1 - mask)
            window = _window(win_size, recon.shape[1], recon.device)
            if not multiscale:
                return 1 - ssim(recon, image, data_range=1.0, win=window)
            return 1 - _ms_ssim(recon, image, window, _ms_ssim_weights(recon.device)).mean()

    return loss


def _cross_entropy(output: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(output["logits"].float(), target["label"])


def reconstruction_images(
    output: dict[str, Tensor], target: dict[str, Tensor], count: int
) -> dict[str, Tensor]:
    """The first ``count`` validation images: input, what the encoder saw, the reconstruction."""
    image, mask = target["image"][:count], target["mask"][:count]
    return {
        "input": image,
        "masked": image * (1 - mask) + 0.5 * mask,
        "reconstruction": output["recon"][:count].float().clamp(0, 1),
    }


def eval_metrics(output: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-batch sums over samples, for the eval loop to add up and divide by "count".

    On the full reconstruction clamped to [0, 1]: "l1", "mse", "ssim" (pytorch-msssim, window 11
    or the largest odd size that fits), "psnr" (dB, per image); "accuracy" (correct
    predictions) when the output has logits; "count" (samples). All are device tensors.
    """
    with torch.no_grad(), torch.autocast(device_type=target["image"].device.type, enabled=False):
        recon = output["recon"].float().clamp(0, 1)
        image = target["image"].float()
        l1 = (recon - image).abs().flatten(1).mean(1)
        mse = (recon - image).square().flatten(1).mean(1)
        side = min(image.shape[-2:])
        win_size = min(11, side if side % 2 else side - 1)
        window = _window(win_size, image.shape[1], image.device)
        similarity = ssim(recon, image, data_range=1.0, size_average=False, win=window)
        psnr = -10 * torch.log10(mse.clamp(min=1e-10))
        metrics = {
            "l1": l1.sum(),
            "mse": mse.sum(),
            "ssim": similarity.sum(),
            "psnr": psnr.sum(),
            "count": torch.full((), float(image.shape[0]), device=image.device),
        }
        if "logits" in output and "label" in target:
            correct = output["logits"].argmax(dim=1) == target["label"]
            metrics["accuracy"] = correct.float().sum()
    return metrics
