import math
from types import SimpleNamespace

import pytest
import pytorch_msssim
import torch
from pydantic import TypeAdapter

from gcond_cli.components import lookup
from gcond_cli.losses import eval_metrics
from gcond_cli.recipe import ImageDataConfig, LossSection, RecipeError, recipe_from_dict

LOSS = TypeAdapter(LossSection)  # a loss section, as the recipe validates it


def build_loss(name, cfg, data):
    """The registered builder of a built-in loss section."""
    return lookup("loss", cfg.kind).builder()(name, cfg, SimpleNamespace(data=data))


def data_cfg(image_size: int = 16) -> ImageDataConfig:
    return ImageDataConfig.model_validate({"image_size": image_size, "mask": {"patch_size": 4}})


def loss_fn(kind: str, image_size: int = 16, **settings: object):
    return build_loss(
        "test",
        LOSS.validate_python({"kind": kind, "weight": 1.0, **settings}),
        data_cfg(image_size),
    )


def hand_made():
    """2×3×2×2 images: recon − image = 1 on the masked (left) column, 3 on the visible one."""
    image = torch.zeros(2, 3, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 1, 2, 2)
    recon = image + 1 + 2 * (1 - mask)
    return {"recon": recon}, {"image": image, "mask": mask}


@pytest.mark.parametrize(
    ("kind", "masked_only", "expected"),
    [("l1", False, 2.0), ("l1", True, 1.0), ("mse", False, 5.0), ("mse", True, 1.0)],
)
def test_pixel_losses_exact_values(kind: str, masked_only: bool, expected: float):
    output, target = hand_made()
    assert loss_fn(kind, masked_only=masked_only)(output, target).item() == expected


def test_masked_pixel_loss_without_masked_pixels_is_zero():
    output, target = hand_made()
    target["mask"] = torch.zeros_like(target["mask"])
    assert loss_fn("mse", masked_only=True)(output, target).item() == 0.0


def random_pair(size: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, size, size, generator=generator)
    recon = (image + 0.2 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    mask = (torch.rand(2, 1, size, size, generator=generator) < 0.5).float()
    return {"recon": recon}, {"image": image, "mask": mask}


def test_ssim_of_identical_images_is_zero():
    _, target = random_pair()
    loss = loss_fn("ssim", win_size=7)({"recon": target["image"].clone()}, target)
    assert abs(loss.item()) < 1e-6


def test_ssim_matches_pytorch_msssim():
    output, target = random_pair()
    expected = 1 - pytorch_msssim.ssim(output["recon"], target["image"], data_range=1.0, win_size=7)
    torch.testing.assert_close(loss_fn("ssim", win_size=7)(output, target), expected)


def test_masked_ssim_keeps_the_visible_pixels_of_the_target():
    output, target = random_pair()
    pasted = output["recon"] * target["mask"] + target["image"] * (1 - target["mask"])
    expected = 1 - pytorch_msssim.ssim(pasted, target["image"], data_range=1.0, win_size=7)
    loss = loss_fn("ssim", win_size=7, masked_only=True)(output, target)
    torch.testing.assert_close(loss, expected)
    assert loss < loss_fn("ssim", win_size=7)(output, target)


def test_ms_ssim_matches_pytorch_msssim():
    output, target = random_pair(size=40)
    expected = 1 - pytorch_msssim.ms_ssim(
        output["recon"], target["image"], data_range=1.0, win_size=3
    )
    torch.testing.assert_close(
        loss_fn("ms_ssim", image_size=40, win_size=3)(output, target), expected
    )


def test_a_window_too_large_for_the_images_is_a_recipe_error():
    def errors(kind: str, image_size: int) -> list[str]:
        raw = {
            "data": {"image_size": image_size, "mask": {"patch_size": 4}},
            "model": {"name": "mae_vit"},
            "losses": {"test": {"kind": kind, "weight": 1.0}},
            "schedule": {"max_steps": 1},
            "checkpoint": {"keep_best": False},
        }
        with pytest.raises(RecipeError) as caught:
            recipe_from_dict(raw)
        return caught.value.errors

    assert errors("ms_ssim", 64) == [
        "losses.test.win_size: got 11, expected (win_size - 1) * 16 < data.image_size (64) for "
        "ms_ssim's 5 scales; use a smaller window, larger images or kind 'ssim'"
    ]
    assert errors("ssim", 8) == [
        "losses.test.win_size: got 11, expected a window no larger than data.image_size (8)"
    ]


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("l1", {}),
        ("mse", {"masked_only": True}),
        ("ssim", {"win_size": 7}),
        ("ssim", {"win_size": 7, "masked_only": True}),
        ("cross_entropy", {}),
    ],
)
def test_losses_return_fp32_under_bf16_autocast(kind: str, settings: dict):
    output, target = random_pair()
    weight = torch.randn(5, 3, requires_grad=True)
    target["label"] = torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = {
            "recon": torch.nn.functional.conv2d(output["recon"], torch.eye(3).view(3, 3, 1, 1)),
            "logits": target["image"].flatten(2).mean(2) @ weight.T,
        }
        assert output["recon"].dtype == torch.bfloat16
        loss = loss_fn(kind, **settings)(output, target)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and math.isfinite(loss.item())


def test_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    label = torch.tensor([0, 0])
    expected = torch.nn.functional.cross_entropy(logits, label)
    assert loss_fn("cross_entropy")({"logits": logits}, {"label": label}) == expected


def test_eval_metrics_are_sums_over_samples():
    output, target = random_pair()
    output["recon"] = output["recon"] * 1.5 - 0.2  # out of range: metrics clamp it
    output["logits"] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    target["label"] = torch.tensor([0, 1])
    metrics = eval_metrics(output, target)

    clamped = output["recon"].clamp(0, 1)
    mse = (clamped - target["image"]).square().flatten(1).mean(1)
    assert metrics["count"].item() == 2 and metrics["accuracy"].item() == 1
    torch.testing.assert_close(metrics["mse"], mse.sum())
    torch.testing.assert_close(metrics["l1"], (clamped - target["image"]).abs().mean() * 2)
    torch.testing.assert_close(metrics["psnr"], (-10 * mse.log10()).sum())
    ssim = pytorch_msssim.ssim(clamped, target["image"], data_range=1.0, size_average=False)
    torch.testing.assert_close(metrics["ssim"], ssim.sum())


def test_eval_metrics_of_a_perfect_reconstruction():
    _, target = random_pair(size=8)  # window shrinks to fit: 7
    metrics = eval_metrics({"recon": target["image"]}, target)
    assert "accuracy" not in metrics
    assert metrics["ssim"].item() == pytest.approx(2.0)
    assert metrics["l1"].item() == 0 and metrics["psnr"].item() == pytest.approx(200.0)
