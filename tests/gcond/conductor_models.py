"""Models whose per-loss gradients are known in closed form, and conductors over them: shared
by the conductor's tests (test_conductor*.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcond import GradientConductor


class Theta(nn.Module):
    """A bare parameter vector θ. With loss ⟨c_k, θ⟩ the gradient of loss k is exactly c_k."""

    def __init__(self, init: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.theta if x is None else self.theta * 0 + self.theta  # x unused on purpose


def dot(c: list[float]):
    vec = torch.tensor(c, dtype=torch.float32)
    return lambda out, target: (out * vec).sum()


def data_dot(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """⟨target, θ⟩: the gradient is the micro-batch's target vector."""
    return (out * target).sum()


def constant_provider():
    return lambda: (None, None)


def conductor_for(c1, c2, *, init=(0.0, 0.0, 0.0), names=("a", "b"), **kwargs):
    model = Theta(list(init))
    losses = {names[0]: dot(c1), names[1]: dot(c2)}
    lambdas = {names[0]: 1.0, names[1]: 1.0}
    kwargs.setdefault("accumulation_steps", 2)
    return model, GradientConductor(model, losses, lambdas, **kwargs)


def grad_of(model: Theta) -> list[float]:
    return model.theta.grad.tolist()


def assert_close_list(actual, expected, tol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, abs=tol), (actual, expected)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x):
        return self.net(x)


def mse(out, target):
    return ((out - target) ** 2).mean()


def l1(out, target):
    return (out - target).abs().mean()


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def series_provider(vectors: list[list[float]]):
    """Micro-batch i yields target vectors[i]: with data_dot the gradient is that vector."""
    it = iter([torch.tensor(v, dtype=torch.float32) for v in vectors])
    return lambda: (None, next(it))
