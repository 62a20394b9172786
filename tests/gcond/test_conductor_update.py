"""The conductor's update: momentum with bias correction, Lion, the raw gradient, and the
trust ratio per parameter tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gcond import GradientConductor
from tests.gcond.conductor_models import (
    Theta,
    assert_close_list,
    constant_provider,
    data_dot,
    dot,
    grad_of,
    series_provider,
)

# ----------------------------------------------------------------------------- momentum & friends


def test_momentum_with_bias_correction():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.9)
    provider = series_provider([[1.0, 0.0], [0.0, 2.0]])
    cond.step(provider)
    assert_close_list(grad_of(model), [1.0, 0.0])  # m̂_1 = g_1
    stats = cond.step(provider)
    # m_2 = 0.9·0.1·g1 + 0.1·g2 = (0.09, 0.2); m̂_2 = m_2 / (1 − 0.81)
    expected = [0.09 / 0.19, 0.2 / 0.19]
    assert_close_list(grad_of(model), expected)
    assert stats["final_grad_norm"] == pytest.approx(math.hypot(*expected), rel=1e-6)


def test_momentum_zero_writes_the_resolved_gradient_itself():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.0)
    provider = series_provider([[1.0, 0.0], [0.0, 2.0]])
    cond.step(provider)
    cond.step(provider)
    assert_close_list(grad_of(model), [0.0, 2.0])


def test_lion_writes_the_sign_of_the_momentum():
    model = Theta([0.0, 0.0, 0.0])
    cond = GradientConductor(
        model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.9, use_lion=True
    )
    provider = series_provider([[0.5, -3.0, 0.0], [-1.0, 1.0, 0.0]])
    cond.step(provider)
    assert grad_of(model) == [1.0, -1.0, 0.0]
    cond.step(provider)
    # m_2 = (0.045 − 0.1, −0.27 + 0.1, 0) → signs (−1, −1, 0)
    assert grad_of(model) == [-1.0, -1.0, 0.0]


def test_return_raw_grad_skips_momentum():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(
        model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.9, return_raw_grad=True
    )
    provider = series_provider([[1.0, 0.0], [0.0, 2.0]])
    cond.step(provider)
    cond.step(provider)
    assert_close_list(grad_of(model), [0.0, 2.0])
    assert cond.state_dict()["momentum"].abs().sum() == 0  # never updated


class TwoTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
        self.z = nn.Parameter(torch.zeros(2))  # ‖z‖ = 0 → ratio 1

    def forward(self, x=None):
        return torch.cat([self.w, self.z])


@pytest.mark.parametrize(("coef", "clip", "expected_w_norm"), [(0.1, 10.0, 0.5), (5.0, 2.0, 2.0)])
def test_trust_ratio_per_parameter_tensor(coef, clip, expected_w_norm):
    model = TwoTensors()
    cond = GradientConductor(
        model,
        {"a": dot([0.6, 0.8, 0.3, 0.4])},
        {"a": 1.0},
        1,
        trust_ratio_coef=coef,
        trust_ratio_clip=clip,
    )
    stats = cond.step(constant_provider())
    # w: ‖u‖ = 1, ratio = coef·5 clipped at clip; z: ‖z‖ = 0 → untouched.
    assert model.w.grad.norm().item() == pytest.approx(expected_w_norm, rel=1e-6)
    assert_close_list(model.w.grad.tolist(), [0.6 * expected_w_norm, 0.8 * expected_w_norm])
    assert_close_list(model.z.grad.tolist(), [0.3, 0.4])
    assert stats["final_grad_norm"] == pytest.approx(math.hypot(expected_w_norm, 0.5), rel=1e-6)
