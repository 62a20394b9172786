"""TorchJD methods through our wiring: recipe -> build_method -> GradientConductor(resolver=...).

The model is one parameter vector θ and loss k is ⟨c_k, θ⟩ (times a per-micro-batch scale the
target carries), so the per-loss gradients are the chosen rows c_k and the written ``p.grad``
must be what TorchJD documents for them, or what is worked out by hand below.
"""

import math
import sys

import pytest
import torch
from torch import nn

from gcond_cli.methods import (
    METHODS,
    MethodUnavailable,
    TorchJDResolver,
    build_method,
    method_unavailable,
    torchjd_aggregator,
)
from gcond_cli.recipe import ConductorConfig

pytest.importorskip("torchjd")

# The example in TorchJD's documentation (torchjd.aggregation); UPGrad: [0.2929, 1.9004, 1.9004].
DOC_JACOBIAN = [[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]


class Theta(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta


def _build(name: str, rows: list[list[float]], accumulation_steps: int = 2):
    c = torch.tensor(rows)
    loss_fns = {
        f"task{k}": (lambda out, scales, k=k: scales[k] * (c[k] * out).sum()) for k in range(len(c))
    }
    cfg = ConductorConfig(method=name, accumulation_steps=accumulation_steps)
    model = Theta(c.shape[1])
    method = build_method(
        cfg, model, loss_fns, dict.fromkeys(loss_fns, 1.0), autocast_dtype=None, scaler=None
    )
    return model, method


def _provider(scales: list[list[float]]):
    """Micro-batch i carries the per-loss scales ``scales[i]`` as its target."""
    batches = iter([(torch.zeros(()), torch.tensor(s)) for s in scales])
    return lambda: next(batches)


def _grad(name: str, rows: list[list[float]]) -> tuple[torch.Tensor, dict[str, float]]:
    model, method = _build(name, rows)
    stats = method.step(_provider([[1.0] * len(rows)] * 2))
    return model.theta.grad, stats


def test_upgrad_gives_torchjds_documented_value() -> None:
    grad, stats = _grad("upgrad", DOC_JACOBIAN)
    torch.testing.assert_close(grad, torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4, rtol=0)
    # The conductor's statistics still describe the raw gradients: cos = -22 / sqrt(18 · 38).
    assert stats["min_cosine_sim"] == pytest.approx(-22 / math.sqrt(18 * 38))


def test_pcgrad_projects_each_gradient_on_the_others_normal_plane() -> None:
    # g1 = (1, 0), g2 = (-1, 1), ⟨g1, g2⟩ = -1:  g1' = g1 + g2/2 = (0.5, 0.5),
    # g2' = g2 + g1 = (0, 1); PCGrad writes g1' + g2' = (0.5, 1.5).
    grad, _ = _grad("pcgrad", [[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(grad, torch.tensor([0.5, 1.5]))
    # The documented matrix: g1' = g1 + 22/38 g2, g2' = g2 + 22/18 g1.
    grad, _ = _grad("pcgrad", DOC_JACOBIAN)
    g1, g2 = torch.tensor(DOC_JACOBIAN)
    torch.testing.assert_close(grad, g1 + 22 / 38 * g2 + g2 + 22 / 18 * g1)
    torch.testing.assert_close(grad, torch.tensor([0.5848, 3.8012, 3.8012]), atol=1e-4, rtol=0)


def test_mgda_gives_the_min_norm_point_of_the_convex_hull() -> None:
    # min over a of ‖a g1 + (1-a) g2‖ with ‖g1‖² = 18, ‖g2‖² = 38, ⟨g1, g2⟩ = -22:
    # a = (38 + 22) / (18 + 38 + 44) = 0.6, so 0.6 g1 + 0.4 g2 = (0, 1, 1).
    grad, _ = _grad("mgda", DOC_JACOBIAN)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.skipif(method_unavailable("cagrad") is not None, reason="CAGrad's solver missing")
def test_cagrad_is_torchjds_cagrad() -> None:
    from torchjd.aggregation import CAGrad

    grad, _ = _grad("cagrad", DOC_JACOBIAN)
    torch.testing.assert_close(grad, CAGrad(c=0.4)(torch.tensor(DOC_JACOBIAN)))


def test_the_aggregator_sees_gradients_accumulated_over_the_micro_batches() -> None:
    # Scales (2, 0.5) then (0, 1.5) average to (1, 1): aggregated after accumulation, PCGrad
    # gives (0.5, 1.5) as above; aggregating each micro-batch and averaging would give
    # (-0.25, 1.5).
    model, method = _build("pcgrad", [[1.0, 0.0], [-1.0, 1.0]])
    method.step(_provider([[2.0, 0.5], [0.0, 1.5]]))
    torch.testing.assert_close(model.theta.grad, torch.tensor([0.5, 1.5]))


def test_pcgrad_leaves_the_global_random_stream_alone_and_resumes_its_own() -> None:
    rows = [[1.0, 0.0, 0.5], [-1.0, 1.0, 0.0], [0.2, -1.0, 1.0]]
    torch.manual_seed(3)
    _, method = _build("pcgrad", rows, accumulation_steps=1)
    assert isinstance(method.resolver, TorchJDResolver)
    before = torch.get_rng_state()
    method.step(_provider([[1.0] * 3]))
    assert torch.equal(torch.get_rng_state(), before)

    state = method.state_dict()
    model_a, a = _build("pcgrad", rows, accumulation_steps=1)
    model_b, b = _build("pcgrad", rows, accumulation_steps=1)
    a.load_state_dict(state)
    b.load_state_dict(state)
    a.step(_provider([[1.0] * 3]))
    b.step(_provider([[1.0] * 3]))
    torch.testing.assert_close(model_a.theta.grad, model_b.theta.grad, rtol=0, atol=0)


def test_every_torchjd_method_is_a_recipe_method() -> None:
    assert {"pcgrad", "upgrad", "mgda", "cagrad"} <= set(METHODS)
    for name in ("pcgrad", "upgrad", "mgda", "cagrad"):
        assert ConductorConfig(method=name).method == name


def test_a_missing_torchjd_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)
    with pytest.raises(MethodUnavailable, match=r"pip install 'gcond\[torchjd\]'"):
        torchjd_aggregator("upgrad")
    with pytest.raises(MethodUnavailable, match="needs TorchJD"):
        _build("pcgrad", [[1.0, 0.0], [0.0, 1.0]])
    assert "gcond[torchjd]" in method_unavailable("mgda")
