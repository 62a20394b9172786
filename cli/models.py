"""Masked reconstruction models: `mae_vit` (a ViT masked autoencoder) and `masked_conv` (a
torchvision convolutional trunk with a light upsampling decoder).

Both take `(images, patch_mask)` — images float B×3×S×S in [0, 1], patch_mask bool B×h×w with
True = masked — and return `{"recon": B×3×S×S}` plus `{"logits": B×num_classes}` when
num_classes > 0. The reconstruction is a linear output in pixel units (no sigmoid, which would
slow learning near 0 and 1); the losses choose where to compare it and the eval metrics clamp it.

Forward passes avoid host syncs and in-place ops on tensors that need grad, so one forward can
feed `torch.autograd.grad(..., is_grads_batched=True)` for per-loss gradients.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .data import num_masked_patches, pixel_mask

# torchvision classification families whose models expose a `.features` trunk.
_TRUNK_FAMILIES = (
    "alexnet",
    "convnext",
    "densenet",
    "efficientnet",
    "mobilenet",
    "squeezenet",
    "vgg",
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def build_mae_vit(cfg: Any, recipe: Any) -> nn.Module:
    """The `mae_vit` model of a recipe (its MaeVitConfig), sized for the recipe's images."""
    data = recipe.data
    return MaskedAutoencoderViT(
        image_size=data.image_size,
        patch_size=cfg.patch_size,
        mask_ratio=data.mask.ratio,
        mask_patch_size=data.mask.patch_size,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        num_classes=cfg.num_classes,
    )


def build_masked_conv(cfg: Any, recipe: Any) -> nn.Module:
    """The `masked_conv` model of a recipe (its MaskedConvConfig)."""
    return MaskedConvAutoencoder(
        backbone=cfg.backbone,
        image_size=recipe.data.image_size,
        decoder_dim=cfg.decoder_dim,
        num_classes=cfg.num_classes,
    )


# ----------------------------------------------------------------------------------------------
# mae_vit


def sincos_position_embedding(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, grid²×dim (as in MAE: half the channels encode the
    row, half the column)."""
    if dim % 4:
        raise ValueError(f"position embedding needs a width divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )

    def encode(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each B×heads×tokens×head_dim
        attended = F.scaled_dot_product_attention(query, key, value)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(self.norm2(x))


def _gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens B×L×D, index B×K -> B×K×D."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MaskedAutoencoderViT(nn.Module):
    """ViT masked autoencoder: the encoder sees only the visible patches; a light decoder fills
    in mask tokens and predicts every patch's pixels.

    Every sample must mask exactly `num_masked_patches(mask_ratio, L)` patches (the data provider
    guarantees it): the count is fixed at build time so the forward needs no host sync.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        mask_ratio: float,
        mask_patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if patch_size != mask_patch_size:
            raise ValueError(
                f"model.patch_size ({patch_size}) must equal data.mask.patch_size "
                f"({mask_patch_size}) for mae_vit"
            )
        if image_size % patch_size:
            raise ValueError(
                f"data.image_size ({image_size}) must be a multiple of "
                f"model.patch_size ({patch_size})"
            )
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        num_patches = self.grid**2
        self.num_visible = num_patches - num_masked_patches(mask_ratio, num_patches)
        if self.num_visible < 1:
            raise ValueError(
                f"data.mask.ratio {mask_ratio} masks all {num_patches} patches; lower it"
            )

        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer(
            "pos_embed", sincos_position_embedding(dim, self.grid), persistent=False
        )
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else None

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_position_embedding(decoder_dim, self.grid), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        # As MAE: xavier-uniform linears (and the patch projection seen as one), normal(0.02)
        # mask token, unit LayerNorms, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: Tensor, patch_mask: Tensor) -> dict[str, Tensor]:
        batch, size = images.shape[0], images.shape[-1]
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # B×L×D
        # A stable sort puts each sample's visible patches first, in raster order.
        order = torch.argsort(patch_mask.flatten(1).to(torch.uint8), dim=1, stable=True)
        x = _gather_tokens(tokens, order[:, : self.num_visible])
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        output = {}
        if self.head is not None:
            output["logits"] = self.head(x.mean(dim=1))

        y = self.decoder_embed(x)
        masks = self.mask_token.expand(batch, order.shape[1] - self.num_visible, -1)
        y = _gather_tokens(torch.cat([y, masks], dim=1), torch.argsort(order, dim=1))
        y = y + self.decoder_pos_embed
        for block in self.decoder_blocks:
            y = block(y)
        patches = self.decoder_pred(self.decoder_norm(y))  # B×L×(p·p·3)
        p, g = self.patch_size, self.grid
        recon = patches.view(batch, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        output["recon"] = recon.reshape(batch, 3, size, size)
        return output


# ----------------------------------------------------------------------------------------------
# masked_conv


def _trunk(name: str) -> nn.Sequential:
    """`torchvision.models.get_model(name).features`, with errors that list valid names."""
    names = torchvision.models.list_models(module=torchvision.models)
    trunks = sorted(n for n in names if n.startswith(_TRUNK_FAMILIES))
    examples = ", ".join(
        [
            "mobilenet_v3_small",
            "mobilenet_v3_large",
            "efficientnet_b0",
            "convnext_tiny",
            "densenet121",
            "vgg11",
        ]
    )
    if name not in names:
        close = difflib.get_close_matches(name, trunks, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"model.backbone: unknown torchvision model {name!r}; {hint}"
            f"valid backbones include {examples}"
        )
    trunk = getattr(torchvision.models.get_model(name, weights=None), "features", None)
    if not isinstance(trunk, nn.Sequential):
        raise ValueError(
            f"model.backbone: {name!r} has no `.features` trunk (e.g. resnets); "
            f"use one of {examples}"
        )
    return trunk


class MaskedConvAutoencoder(nn.Module):
    """Masked patches are painted with a learnable colour, the image goes through a torchvision
    trunk, and a light U-Net-like decoder upsamples back to S: at every resolution the trunk
    passed through, the upsampled map is added to a 1×1 projection of the trunk's feature map
    there, then refined by a 3×3 conv + GELU. A 3×3 conv predicts the pixels.

    In training mode BatchNorm in the trunk needs micro-batches of at least 2 images.
    """

    def __init__(
        self, *, backbone: str, image_size: int, decoder_dim: int, num_classes: int = 0
    ) -> None:
        super().__init__()
        self.trunk = _trunk(backbone)
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # In normalised units: 0 is the dataset-mean colour.
        self.mask_colour = nn.Parameter(torch.zeros(1, 3, 1, 1))

        skip_at, skip_channels, out_channels = self._probe(backbone, image_size)
        self.skip_at = skip_at
        self.bottleneck = nn.Conv2d(out_channels, decoder_dim, kernel_size=1)
        self.skip_proj = nn.ModuleList(
            nn.Conv2d(c, decoder_dim, kernel_size=1) for c in reversed(skip_channels)
        )
        self.refine = nn.ModuleList(
            nn.Sequential(nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1), nn.GELU())
            for _ in skip_channels
        )
        self.pixels = nn.Conv2d(decoder_dim, 3, kernel_size=3, padding=1)
        self.head = nn.Linear(out_channels, num_classes) if num_classes > 0 else None

    @torch.no_grad()
    def _probe(self, backbone: str, image_size: int) -> tuple[frozenset[int], list[int], int]:
        """Run the trunk once to find the layers that reduce resolution (their inputs become
        decoder skips), the skips' channels and the trunk's output channels."""
        self.trunk.eval()
        x = torch.zeros(1, 3, image_size, image_size)
        skip_at, skip_channels = set(), []
        try:
            for index, layer in enumerate(self.trunk):
                y = layer(x)
                if y.shape[-1] < x.shape[-1]:
                    skip_at.add(index)
                    skip_channels.append(x.shape[1])
                x = y
        except RuntimeError as error:
            raise ValueError(
                f"model.backbone: {backbone!r} cannot take {image_size}-px images "
                f"({error}); raise data.image_size or pick a smaller trunk"
            ) from error
        self.trunk.train()
        return frozenset(skip_at), skip_channels, x.shape[1]

    def forward(self, images: Tensor, patch_mask: Tensor) -> dict[str, Tensor]:
        masked = pixel_mask(patch_mask, images.shape[-1] // patch_mask.shape[-1])  # B×1×S×S
        x = (images - self.mean) / self.std
        x = x * (1 - masked) + self.mask_colour * masked

        skips = []
        for index, layer in enumerate(self.trunk):
            if index in self.skip_at:
                skips.append(x)
            x = layer(x)
        output = {}
        if self.head is not None:
            output["logits"] = self.head(x.mean(dim=(2, 3)))

        y = self.bottleneck(x)
        for skip, project, refine in zip(reversed(skips), self.skip_proj, self.refine, strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = refine(y + project(skip))
        output["recon"] = self.pixels(y)
        return output
