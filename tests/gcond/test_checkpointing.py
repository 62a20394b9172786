"""Activation checkpointing (``torch.utils.checkpoint``) under the conductor.

Non-reentrant checkpointing gives the same gradients as none. Reentrant checkpointing cannot: on
inputs that need no gradient the parameters inside get none (silently, under any backward), and
``autograd.grad`` through it is refused by torch; the conductor refuses both at the first step
with a message that names ``use_reentrant=False``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gcond import GradientConductor

BACKWARDS = ["batched", "sequential", "auto"]
FIX = "pass use_reentrant=False to torch.utils.checkpoint.checkpoint"


class TwoBlocks(nn.Module):
    """``checkpointed`` is None (no checkpoint), 0 (the first block, whose input needs no
    gradient) or 1 (the second, whose input does); ``reentrant`` picks the form."""

    def __init__(self, checkpointed: int | None = None, reentrant: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.second = nn.Linear(8, 2)
        self.checkpointed, self.reentrant = checkpointed, reentrant

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        module = (self.first, self.second)[index]
        if self.checkpointed == index:
            return checkpoint(module, x, use_reentrant=self.reentrant)
        return module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(1, self.block(0, x))


LOSSES = {
    "p": lambda out, t: ((out[:, 0] - t) ** 2).mean(),
    "q": lambda out, t: ((out[:, 1] + t) ** 2).mean(),
}
gen = torch.Generator().manual_seed(0)
BATCH = (torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen))


def written(model: TwoBlocks, backward: str, representation: bool = False) -> torch.Tensor:
    options = {}
    if representation:
        options = {
            "gradients_at": "representation",
            "split": (lambda x: model.block(0, x), lambda z: model.block(1, z)),
        }
    cond = GradientConductor(
        model, LOSSES, {"p": 1.0, "q": 0.5}, 2, per_loss_backward=backward, **options
    )
    cond.step(lambda: BATCH)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("checkpointed", [0, 1])
def test_non_reentrant_checkpointing_gives_the_gradients_of_none(backward, checkpointed):
    reference = written(TwoBlocks(), backward)
    got = written(TwoBlocks(checkpointed, reentrant=False), backward)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_reentrant_checkpointing_on_inputs_without_gradient_is_refused(backward):
    """Without the check the first block's weights would get no gradient: a wrong model."""
    with pytest.raises(
        ValueError, match=f"use_reentrant=True on inputs that need no gradient.*{FIX}"
    ):
        written(TwoBlocks(0, reentrant=True), backward)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_reentrant_checkpointing_inside_the_model_is_refused_with_the_fix(backward):
    with pytest.raises(ValueError, match=f"cannot take autograd.grad through it.*{FIX}"):
        written(TwoBlocks(1, reentrant=True), backward)


def test_at_the_representation_a_reentrant_trunk_is_refused_and_a_non_reentrant_one_exact():
    with pytest.raises(ValueError, match=FIX):
        written(TwoBlocks(0, reentrant=True), "auto", representation=True)
    reference = written(TwoBlocks(), "auto", representation=True)
    got = written(TwoBlocks(0, reentrant=False), "auto", representation=True)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-7)


def test_the_model_s_own_warnings_still_reach_the_user():
    class Warns(TwoBlocks):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            warnings.warn("the model's own warning", UserWarning, stacklevel=1)
            return super().forward(x)

    with pytest.warns(UserWarning, match="the model's own warning"):
        written(Warns(), "auto")
