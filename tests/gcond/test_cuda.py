"""The conductor on a GPU: host syncs, bf16, fp16 with a GradScaler. Skipped without CUDA."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from gcond import GradientConductor
from gcond_cli.methods import SumMethod

pytestmark = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)


def mse(out, target):
    return ((out - target) ** 2).mean()


def l1(out, target):
    return (out - target).abs().mean()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).cuda()


def provider():
    x = torch.randn(16, 64, device="cuda")
    return lambda: (x, x.flip(1))


def count_syncs(method, steps: int = 2) -> int:
    data = provider()
    method.step(data)  # warm-up: lazy init, batched-backward probe
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                method.step(data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_host_syncs_do_not_grow_with_micro_batches():
    # Autograd's engine itself syncs in backward, so compare with plain accumulation: six more
    # micro-batches may add no more syncs to the conductor than they add to plain accumulation.
    counts = {}
    for n in (2, 8):
        model = net()
        losses = {"mse": mse, "l1": l1}
        lambdas = {"mse": 1.0, "l1": 1.0}
        counts[n] = (
            count_syncs(GradientConductor(model, losses, lambdas, n)),
            count_syncs(SumMethod(model, losses, lambdas, n)),
        )
    conductor_growth = counts[8][0] - counts[2][0]
    plain_growth = counts[8][1] - counts[2][1]
    assert conductor_growth <= plain_growth, counts


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_matches_fp32_direction(grad_dtype):
    model = net()
    losses = {"mse": mse, "l1": l1}
    data = provider()
    ref = GradientConductor(model, losses, {"mse": 1.0, "l1": 1.0}, 4)
    ref.step(data)
    g32 = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    low = GradientConductor(
        model,
        losses,
        {"mse": 1.0, "l1": 1.0},
        4,
        autocast_dtype=torch.bfloat16,
        grad_dtype=grad_dtype,
    )
    stats = low.step(data)
    g16 = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert stats["skipped"] == 0
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99


def test_fp16_overflow_is_refused_by_the_scaler():
    model = net()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    conductor = GradientConductor(
        model,
        {"mse": mse, "l1": l1},
        {"mse": 1.0, "l1": 1.0},
        2,
        autocast_dtype=torch.float16,
        scaler=scaler,
    )
    x = torch.randn(16, 64, device="cuda")
    huge = torch.full_like(x, 6e4)  # fp16 max is 65504: the scaled backward overflows
    weights = [p.detach().clone() for p in model.parameters()]
    stats = conductor.step(lambda: (huge, x))
    scaler.step(optimizer)
    scaler.update()
    assert stats["skipped"] == 1
    assert scaler.get_scale() == 2.0**15
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    stats = conductor.step(lambda: (x, x.flip(1)))
    scaler.step(optimizer)
    scaler.update()
    assert stats["skipped"] == 0 and math.isfinite(stats["final_grad_norm"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
