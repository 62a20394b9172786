"""Properties every gradient method keeps (conductor, stochastic, sum, each TorchJD one), checked
by the same assertions on the same small model: finite ``p.grad`` for finite losses, invariance
to the order of the losses, scaling every λ scales the update, and a ``state_dict`` round trip
that continues bit for bit."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gcond_cli.methods import build_method, method_unavailable
from gcond_cli.recipe import ConductorConfig

PEERS = [
    "alignedmtl",
    "imtlg",
    "dualproj",
    "config",
    "nashmtl",
    "db-mtl",
    "geometric-mean",
    "famo",
    "uncertainty",
]
# A method, or a method with conductor options on top ("name+option").
OPTIONS = {
    "equalized": {"norm_equalization": "max", "norm_equalization_beta": 0.5},
    "bounded": {"dominance_rule": "bounded", "dominance_window": 1},
}
WITH_OPTIONS = ["conductor+equalized", "conductor+bounded", "upgrad+equalized"]
METHODS = [
    "conductor",
    "conductor-stochastic",
    "sum",
    "pcgrad",
    "upgrad",
    "mgda",
    "cagrad",
    *PEERS,
    *WITH_OPTIONS,
]
# Order of the losses: stochastic mode gives micro-batch i to loss i mod K, so the order picks
# which data each loss sees; PCGrad projects in a random order. The others promise invariance.
ORDER_FREE = ["conductor", "sum", "upgrad", "mgda", "cagrad", *PEERS, *WITH_OPTIONS]
# NashMTL's weights solve G·α = 1/α, so scaling every gradient by c scales α by 1/c: its update
# does not grow with λ (and TorchJD caps its norm at 1).
SCALE_WITH_LAMBDA = [m for m in METHODS if m != "nashmtl"]
LOSS_NAMES = ["fit", "away", "l1"]


def _losses() -> dict:
    """Three losses that conflict: toward the target, partly away from it, an L1 toward its flip."""
    return {
        "fit": lambda out, y: (out - y).pow(2).mean(),
        "away": lambda out, y: (out + 0.5 * y).pow(2).mean(),
        "l1": lambda out, y: (out - y.flip(1)).abs().mean(),
    }


def _provider():
    count = iter(range(10**6))

    def provider():
        g = torch.Generator().manual_seed(next(count))
        return torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)

    return provider


def _method(name: str, order=LOSS_NAMES, scale: float = 1.0):
    name, _, option = name.partition("+")
    reason = method_unavailable(name)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    fns = _losses()
    lambdas = {"fit": 1.0, "away": 0.4, "l1": 0.3}
    cfg = ConductorConfig(method=name, accumulation_steps=3, **OPTIONS.get(option, {}))
    method = build_method(
        cfg,
        model,
        {k: fns[k] for k in order},
        {k: scale * lambdas[k] for k in order},
        autocast_dtype=None,
        scaler=None,
    )
    return model, method


def _grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _steps(model, method, provider, n: int) -> torch.Tensor:
    for _ in range(n):
        for p in model.parameters():
            p.grad = None
        method.step(provider)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    return _grad(model)


@pytest.mark.parametrize("name", METHODS)
def test_finite_losses_give_a_finite_gradient(name):
    model, method = _method(name)
    stats = method.step(_provider())
    assert stats["skipped"] == 0.0
    assert torch.isfinite(_grad(model)).all() and _grad(model).abs().sum() > 0


@pytest.mark.parametrize("name", ORDER_FREE)
def test_the_order_of_the_losses_does_not_matter(name):
    model, method = _method(name)
    reordered_model, reordered = _method(name, order=list(reversed(LOSS_NAMES)))
    a = _steps(model, method, _provider(), 3)
    b = _steps(reordered_model, reordered, _provider(), 3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SCALE_WITH_LAMBDA)
def test_scaling_every_lambda_scales_the_update(name):
    model, method = _method(name)
    scaled_model, scaled = _method(name, scale=2.0)
    method.step(_provider())
    scaled.step(_provider())
    torch.testing.assert_close(_grad(scaled_model), 2.0 * _grad(model), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_a_state_dict_round_trip_continues_bit_for_bit(name):
    model, method = _method(name)
    provider = _provider()
    _steps(model, method, provider, 2)
    copy_model, copy = _method(name)
    copy_model.load_state_dict(model.state_dict())
    copy.load_state_dict(method.state_dict())
    # Two steps: a method's own optimizer state (FAMO's, uncertainty's) shows in the second.
    later = [provider() for _ in range(6)]
    a = _steps(model, method, _replay(later), 2)
    b = _steps(copy_model, copy, _replay(later), 2)
    assert torch.equal(a, b)


def _replay(batches: list) -> Callable[[], tuple]:
    return functools.partial(next, iter(batches))
