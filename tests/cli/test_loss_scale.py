"""`loss_scale` and the scale-only baselines `sum-log` / `sum-normalized`, with exact gradients.

The model's output is its parameter vector w (2 floats) and micro-batch i carries two points
a_i, b_i; the losses are L_a = |w - a_i|² and L_b = 5 |w - b_i|², so every gradient is known in
closed form: ∇ log L = ∇L / L, and ∇(L / L⁽⁰⁾) = ∇L / L⁽⁰⁾ with L⁽⁰⁾ the mean of L over the
first step's micro-batches at the initial w.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcond_cli.methods import InitialScaleMethod, build_method
from gcond_cli.recipe import ConductorConfig, RecipeError, load_recipe
from tests.helpers import TINY

W0 = torch.tensor([0.5, -1.0])
LAMBDAS = {"a": 0.7, "b": 0.3}
# Two steps of two micro-batches; a and b lie on the same side of w, so the per-loss gradients
# do not conflict and the conductor merges them as Σ λ_k g_k.
POINTS = [
    ([2.0, 1.0], [3.0, 0.5]),
    ([1.5, 2.0], [2.5, 1.0]),
    ([2.5, 0.0], [1.5, 2.0]),
    ([3.0, 1.5], [2.0, 0.0]),
]


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(W0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


LOSS_FNS = {
    "a": lambda w, t: (w - t["a"]).square().sum(),
    "b": lambda w, t: 5 * (w - t["b"]).square().sum(),
}


class Provider:
    """The micro-batches of POINTS in order; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, b = POINTS[self.calls % len(POINTS)]
        self.calls += 1
        return torch.zeros(()), {"a": torch.tensor(a), "b": torch.tensor(b)}


def _method(name: str, loss_scale: str = "none"):
    model = Point()
    cfg = ConductorConfig(method=name, accumulation_steps=2)
    method = build_method(
        cfg, model, LOSS_FNS, LAMBDAS, autocast_dtype=None, scaler=None, loss_scale=loss_scale
    )
    return model, method


def _raw(w: torch.Tensor, a: list[float], b: list[float]) -> tuple[torch.Tensor, ...]:
    """(L_a, L_b, ∇L_a, ∇L_b) at w."""
    da, db = w - torch.tensor(a), w - torch.tensor(b)
    return da.square().sum(), 5 * db.square().sum(), 2 * da, 10 * db


def _expected_log(w: torch.Tensor, batches: list) -> torch.Tensor:
    total = torch.zeros(2)
    for a, b in batches:
        la, lb, ga, gb = _raw(w, a, b)
        total += LAMBDAS["a"] * ga / la + LAMBDAS["b"] * gb / lb
    return total / len(batches)


def _expected_initial(w: torch.Tensor, batches: list, reference: list[float]) -> torch.Tensor:
    total = torch.zeros(2)
    for a, b in batches:
        _, _, ga, gb = _raw(w, a, b)
        total += LAMBDAS["a"] * ga / reference[0] + LAMBDAS["b"] * gb / reference[1]
    return total / len(batches)


def _reference(batches: list) -> list[float]:
    values = [_raw(W0, a, b)[:2] for a, b in batches]
    return [sum(v[k] for v in values).item() / len(values) for k in range(2)]


@pytest.mark.parametrize(
    ("name", "loss_scale"),
    [("sum-log", "none"), ("sum", "log"), ("conductor", "log"), ("pcgrad", "log")],
)
def test_log_scale_trains_on_the_gradient_over_the_loss(name, loss_scale):
    if name == "pcgrad":
        pytest.importorskip("torchjd")
    model, method = _method(name, loss_scale)
    stats = method.step(Provider())
    torch.testing.assert_close(model.w.grad, _expected_log(W0, POINTS[:2]), rtol=1e-6, atol=0)
    # The logged losses are the scaled ones: the mean of log L over the micro-batches.
    la = [_raw(W0, a, b)[0].log().item() for a, b in POINTS[:2]]
    assert stats["loss/a"] == pytest.approx(sum(la) / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("name", "loss_scale"),
    [("sum-normalized", "none"), ("sum", "initial"), ("conductor", "initial")],
)
def test_initial_scale_divides_by_the_first_steps_mean_and_keeps_the_data_stream(name, loss_scale):
    model, method = _method(name, loss_scale)
    assert isinstance(method, InitialScaleMethod)
    provider = Provider()
    method.step(provider)
    # Measured on the first step's own micro-batches, which the step then trains on: the
    # stream is not shifted (two calls for two micro-batches).
    assert provider.calls == 2
    reference = _reference(POINTS[:2])
    torch.testing.assert_close(method.scale.reference, torch.tensor(reference), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        model.w.grad, _expected_initial(W0, POINTS[:2], reference), rtol=1e-6, atol=0
    )
    # Later steps keep the first step's reference (with the weights as they are then).
    with torch.no_grad():
        model.w.sub_(0.1)
    model.w.grad = None
    method.step(provider)
    assert provider.calls == 4
    torch.testing.assert_close(
        model.w.grad, _expected_initial(W0 - 0.1, POINTS[2:], reference), rtol=1e-6, atol=0
    )


def test_initial_scale_reference_is_kept_in_the_state():
    model, method = _method("conductor", "initial")
    method.step(Provider())
    state = method.state_dict()
    assert set(state) == {"method", "loss_reference"}
    other_model, other = _method("conductor", "initial")
    other.load_state_dict(state)
    torch.testing.assert_close(other.scale.reference, method.scale.reference, rtol=0, atol=0)
    # A resumed method does not measure again: the first step it runs trains on its batches.
    provider = Provider()
    other.step(provider)
    assert provider.calls == 2
    torch.testing.assert_close(other_model.w.grad, model.w.grad, rtol=0, atol=0)


def test_no_loss_scale_leaves_the_method_unwrapped():
    _, method = _method("conductor", "none")
    assert not isinstance(method, InitialScaleMethod)
    model, method = _method("sum", "none")
    method.step(Provider())
    expected = torch.zeros(2)
    for a, b in POINTS[:2]:
        _, _, ga, gb = _raw(W0, a, b)
        expected += (LAMBDAS["a"] * ga + LAMBDAS["b"] * gb) / 2
    torch.testing.assert_close(model.w.grad, expected, rtol=1e-6, atol=0)


def test_a_scaled_sum_refuses_another_loss_scale():
    with pytest.raises(RecipeError) as caught:
        load_recipe(TINY, ["conductor.method=sum-log", "loss_scale=initial"])
    (line,) = caught.value.errors
    assert "loss_scale" in line and "conductor.method: sum" in line
    # Its own scale, or none, is fine.
    assert load_recipe(TINY, ["conductor.method=sum-log", "loss_scale=log"]).loss_scale == "log"
    with pytest.raises(RecipeError, match="loss_scale"):
        load_recipe(TINY, ["loss_scale=sqrt"])
