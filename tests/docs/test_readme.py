"""Every Python example in the README runs as written."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tests.helpers import REPO

README = REPO / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def namespace() -> dict:
    """What the README's examples assume the reader already has: a model, losses, data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1))
    images = torch.rand(4, 3, 16, 16)

    def l1_fn(out, target):
        return (out - target).abs().mean()

    def ssim_fn(out, target):
        from pytorch_msssim import ssim

        return 1 - ssim(out.float(), target.float(), data_range=1.0, win_size=7)

    return {
        "torch": torch,
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "l1_fn": l1_fn,
        "ssim_fn": ssim_fn,
        "data_provider": lambda: (images, images),
    }


def test_the_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_example_runs(code):
    scope = namespace()
    exec(compile(code, str(README), "exec"), scope)
    assert scope["model"][0].weight.grad is not None
