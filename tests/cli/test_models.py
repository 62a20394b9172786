from types import SimpleNamespace

import pytest
import torch
from pydantic import TypeAdapter

from gcond_cli.components import lookup
from gcond_cli.data import num_masked_patches
from gcond_cli.models import MaskedAutoencoderViT, sincos_position_embedding
from gcond_cli.recipe import ImageDataConfig, ModelSection

MODEL = TypeAdapter(ModelSection)  # a model section, as the recipe validates it


def build_model(cfg, data):
    """The registered builder of a built-in model section, for images as in ``data``."""
    return lookup("model", cfg.name).builder()(cfg, SimpleNamespace(data=data))


DATA = ImageDataConfig.model_validate({"image_size": 16, "mask": {"ratio": 0.75, "patch_size": 4}})
TINY_VIT = {
    "name": "mae_vit",
    "patch_size": 4,
    "dim": 16,
    "depth": 1,
    "heads": 2,
    "decoder_dim": 8,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def inputs(batch: int, size: int = 16, patch: int = 4, ratio: float = 0.75, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    grid = size // patch
    rank = torch.rand(batch, grid * grid, generator=generator).argsort(1).argsort(1)
    patch_mask = (rank < num_masked_patches(ratio, grid * grid)).view(batch, grid, grid)
    return images, patch_mask


@pytest.fixture(scope="module")
def conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    data = ImageDataConfig.model_validate({"image_size": 32, "mask": {"patch_size": 4}})
    return build_model(
        MODEL.validate_python(dict(name="masked_conv", decoder_dim=16, num_classes=3)), data
    )


def test_mae_vit_shapes_and_logits():
    model = build_model(MODEL.validate_python({**TINY_VIT, "num_classes": 5}), DATA)
    output = model(*inputs(3))
    assert output["recon"].shape == (3, 3, 16, 16)
    assert output["logits"].shape == (3, 5)
    assert "logits" not in build_model(MODEL.validate_python(TINY_VIT), DATA)(*inputs(3))


def test_mae_vit_encoder_sees_only_visible_patches():
    torch.manual_seed(0)
    model = build_model(MODEL.validate_python({**TINY_VIT, "num_classes": 2}), DATA).eval()
    images, patch_mask = inputs(2)
    pixel_mask = patch_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    scrambled = torch.where(pixel_mask, torch.rand_like(images), images)
    torch.testing.assert_close(model(images, patch_mask), model(scrambled, patch_mask))


def test_mae_vit_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="patch_size"):
        build_model(MODEL.validate_python({**TINY_VIT, "patch_size": 8}), DATA)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model(MODEL.validate_python({**TINY_VIT, "dim": 18, "heads": 2}), DATA)


def test_sincos_position_embedding_is_distinct_per_position():
    embedding = sincos_position_embedding(16, 4)
    assert embedding.shape == (16, 16)
    assert torch.cdist(embedding, embedding).add(torch.eye(16)).min() > 0.1


def test_mae_vit_init():
    model = build_model(MODEL.validate_python(TINY_VIT), DATA)
    assert isinstance(model, MaskedAutoencoderViT)
    assert 0.005 < model.mask_token.std() < 0.05
    assert all((block.qkv.bias == 0).all() for block in model.blocks)


def test_masked_conv_shapes_logits_and_gradients(conv_model: torch.nn.Module):
    images, patch_mask = inputs(2, size=32)
    output = conv_model(images, patch_mask)
    assert output["recon"].shape == (2, 3, 32, 32)
    assert output["logits"].shape == (2, 3)
    (output["recon"].square().mean() + output["logits"].sum()).backward()
    assert conv_model.mask_colour.grad is not None and conv_model.mask_colour.grad.abs().sum() > 0
    assert all(p.grad is not None for p in conv_model.parameters())
    conv_model.zero_grad()


def test_masked_conv_unknown_backbone_suggests_names():
    with pytest.raises(ValueError, match="mobilenet_v3_small"):
        build_model(
            MODEL.validate_python(dict(name="masked_conv", backbone="mobilenet_v3_smal")), DATA
        )
    with pytest.raises(ValueError, match=r"no `\.features` trunk"):
        build_model(MODEL.validate_python(dict(name="masked_conv", backbone="resnet18")), DATA)


def test_mae_vit_gradients_reach_every_parameter():
    model = build_model(MODEL.validate_python({**TINY_VIT, "num_classes": 2}), DATA)
    output = model(*inputs(2))
    (output["recon"].square().mean() + output["logits"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def two_losses(output: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            (output["recon"] - images).abs().mean(),
            (output["recon"] - images).square().mean() + output["logits"].sum(),
        ]
    )


def assert_batched_backward_matches(model: torch.nn.Module, images, patch_mask):
    params = [p for p in model.parameters() if p.requires_grad]
    losses = two_losses(model(images, patch_mask), images)
    batched = torch.autograd.grad(losses, params, grad_outputs=torch.eye(2), is_grads_batched=True)
    for k in range(2):
        separate = torch.autograd.grad(two_losses(model(images, patch_mask), images)[k], params)
        for stacked, single in zip(batched, separate, strict=True):
            torch.testing.assert_close(stacked[k], single, atol=1e-6, rtol=1e-4)


def test_mae_vit_batched_backward_equals_separate_backwards():
    torch.manual_seed(0)
    model = build_model(MODEL.validate_python({**TINY_VIT, "num_classes": 2}), DATA)
    assert_batched_backward_matches(model, *inputs(2))


def test_masked_conv_batched_backward_equals_separate_backwards(conv_model: torch.nn.Module):
    # Training mode: BatchNorm normalises with batch statistics, which vmap handles.
    assert conv_model.training
    assert_batched_backward_matches(conv_model, *inputs(2, size=32))
