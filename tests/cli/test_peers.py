"""The peers of issue 18 through our wiring, each against its paper's update rule worked out by
hand here, or against TorchJD's own class used the way TorchJD documents.

The model is one parameter vector θ; each loss is built from ⟨c_k, θ⟩ so its gradient is known
in closed form, and a micro-batch's target carries per-loss scales.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gcond_cli.app import app
from gcond_cli.methods import build_method, method_unavailable
from gcond_cli.methods.peers import (
    UNCERTAINTY_LR,
    DBMTLResolver,
    TorchJDMatrixResolver,
    gram_factor,
    matrix_aggregator,
)
from gcond_cli.recipe import ConductorConfig, RecipeError, load_recipe

DOC_JACOBIAN = [[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]  # TorchJD's documented example
runner = CliRunner()


class Theta(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta


def _build(name, loss_fns, lambdas=None, accumulation_steps=2, loss_scale="none"):
    reason = method_unavailable(name)
    if reason:
        pytest.skip(reason)
    dim = 3 if name in ("config", "nashmtl", "alignedmtl", "imtlg", "dualproj") else 2
    model = Theta(dim)
    cfg = ConductorConfig(method=name, accumulation_steps=accumulation_steps)
    lambdas = lambdas or dict.fromkeys(loss_fns, 1.0)
    method = build_method(
        cfg, model, loss_fns, lambdas, autocast_dtype=None, scaler=None, loss_scale=loss_scale
    )
    return model, method


def _provider(scales: list[list[float]]):
    batches = iter([(torch.zeros(()), torch.tensor(s)) for s in scales])
    return lambda: next(batches)


def _linear(rows):
    """Loss k = ⟨c_k, θ⟩ times the micro-batch's scale k: gradient (scale k)·c_k."""
    c = torch.tensor(rows)
    return {f"t{k}": (lambda out, s, k=k: s[k] * (c[k] * out).sum()) for k in range(len(c))}


# ------------------------------------------------------------------------------ TorchJD's


@pytest.mark.parametrize("name", ["alignedmtl", "imtlg", "dualproj", "config", "nashmtl"])
def test_a_torchjd_peer_writes_torchjds_aggregation_of_the_accumulated_gradients(name) -> None:
    from torchjd import aggregation

    reference = {
        "alignedmtl": aggregation.AlignedMTL,
        "imtlg": aggregation.IMTLG,
        "dualproj": aggregation.DualProj,
        "config": aggregation.ConFIG,
        "nashmtl": lambda: aggregation.NashMTL(n_tasks=2),
    }[name]()
    model, method = _build(name, _linear(DOC_JACOBIAN))
    # Scales (2, 0.5) then (0, 1.5) accumulate to the rows themselves.
    method.step(_provider([[2.0, 0.5], [0.0, 1.5]]))
    expected = reference(torch.tensor(DOC_JACOBIAN, dtype=torch.float64)).float()
    torch.testing.assert_close(model.theta.grad, expected, rtol=1e-5, atol=1e-5)


def test_config_on_hand_computed_gradients() -> None:
    # g1 = (1, 0), g2 = (0, 2): unit vectors e1, e2; pinv·1 = (1, 1), its unit (1, 1)/√2;
    # length = Σ_k ⟨g_k, unit⟩ = 3/√2, so ConFIG writes (1.5, 1.5).
    model, method = _build("config", _linear([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    method.step(_provider([[1.0, 1.0]] * 2))
    torch.testing.assert_close(model.theta.grad, torch.tensor([1.5, 1.5, 0.0]))


@pytest.mark.parametrize("name", ["config", "nashmtl"])
@pytest.mark.parametrize("rank", [3, 2])
def test_an_aggregator_of_the_gram_factor_is_the_aggregator_of_the_matrix(name, rank) -> None:
    """Fed the K×K factor of the Gram matrix, ConFIG and NashMTL give merge weights whose
    combination of the K×P rows is their aggregation of the rows, rank-deficient ones too."""
    reason = method_unavailable(name)
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(rank)
    matrix = torch.randn(rank, 7, generator=g, dtype=torch.float64)
    if rank == 2:
        matrix = torch.cat([matrix, (0.5 * matrix[0] - 2.0 * matrix[1])[None]])
    factor, _, _ = gram_factor(matrix @ matrix.T)
    torch.testing.assert_close(factor @ factor.T, matrix @ matrix.T)
    resolver = TorchJDMatrixResolver(matrix_aggregator(name, 3))
    weights = resolver._weigh(matrix @ matrix.T)
    expected = matrix_aggregator(name, 3)(matrix)
    torch.testing.assert_close(weights @ matrix, expected, rtol=1e-6, atol=1e-8)


def test_nashmtl_keeps_its_weights_in_the_conductors_state() -> None:
    if method_unavailable("nashmtl"):
        pytest.skip(method_unavailable("nashmtl"))
    _, method = _build("nashmtl", _linear(DOC_JACOBIAN))
    method.step(_provider([[1.0, 1.0]] * 2))
    state = method.state_dict()["nashmtl"]
    assert state["step"] == 1.0
    weighting = method.resolver.aggregator.weighting
    assert torch.equal(state["alpha"], torch.from_numpy(weighting.prvs_alpha))


def test_geometric_mean_differentiates_the_geometric_mean_of_the_weighted_losses() -> None:
    # L_k = a_k + ⟨c_k, θ⟩ at θ = 0, a = (4, 1), λ = (1, 4): the weighted losses are (4, 4),
    # their geometric mean 4, its gradient 4 · ½ Σ_k ∇L_k / L_k = 2 (c1 / 4 + c2).
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = (4.0, 1.0)
    fns = {f"t{k}": (lambda out, s, k=k: a[k] + (c[k] * out).sum()) for k in range(2)}
    model, method = _build("geometric-mean", fns, lambdas={"t0": 1.0, "t1": 4.0})
    method.step(_provider([[1.0, 1.0]] * 2))
    torch.testing.assert_close(model.theta.grad, 2.0 * (c[0] / 4.0 + c[1]))


def test_a_loss_of_weight_zero_takes_no_part_in_a_scalariser() -> None:
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fns = {f"t{k}": (lambda out, s, k=k: 2.0 + (c[k] * out).sum()) for k in range(2)}
    for name in ("geometric-mean", "famo"):
        model, method = _build(name, fns, lambdas={"t0": 1.0, "t1": 0.0})
        method.step(_provider([[1.0, 1.0]] * 2))
        assert model.theta.grad[1] == 0.0 and model.theta.grad[0] > 0.0


def test_famo_is_torchjds_famo_used_as_documented() -> None:
    """TorchJD's example: scalarise, backward, optimizer step, recompute the losses on the same
    batch, ``update``; our method does the update at the start of the next step."""
    from torchjd.scalarization import FAMO

    c = torch.tensor([[1.0, 0.5], [-0.3, 1.0]])

    def losses(theta, scale):
        return torch.stack([(scale[k] * (c[k] @ theta - 1.0 - k)) ** 2 + 0.1 for k in range(2)])

    fns = {f"t{k}": (lambda out, s, k=k: losses(out, s)[k]) for k in range(2)}
    scales = [[1.0, 2.0], [0.5, 1.0], [2.0, 1.5], [1.0, 1.0]]
    model, method = _build("famo", fns, accumulation_steps=1)
    theta = torch.zeros(2, requires_grad=True)
    famo = FAMO(2)
    for i, s in enumerate(scales):
        model.theta.grad = None
        method.step(_provider([s]))
        with torch.no_grad():
            model.theta -= 0.1 * model.theta.grad
        loss = famo(losses(theta, torch.tensor(s)))
        (grad,) = torch.autograd.grad(loss, theta)
        torch.testing.assert_close(model.theta.grad, grad, rtol=0, atol=0, msg=f"step {i}")
        with torch.no_grad():
            theta -= 0.1 * grad
            famo.update(losses(theta, torch.tensor(s)))
    method.state_dict()  # measures the last step's losses, as famo.update just did
    torch.testing.assert_close(method.famo._w, famo._w, rtol=0, atol=0)
    assert not torch.equal(famo._w, torch.zeros(2))


# ------------------------------------------------------------------------------ DB-MTL


def _exp_linear(rows):
    """Loss k = exp(scale k · ⟨c_k, θ⟩): its log has gradient (scale k)·c_k whatever θ."""
    c = torch.tensor(rows)
    return {f"t{k}": (lambda out, s, k=k: torch.exp(s[k] * (c[k] * out).sum())) for k in range(2)}


def test_db_mtl_rescales_the_gradient_emas_of_the_log_losses_to_the_largest() -> None:
    model, method = _build("db-mtl", _exp_linear([[3.0, 4.0], [0.0, 1.0]]))
    assert isinstance(method.resolver, DBMTLResolver)
    # Step 1: g = ((3, 4), (0, 1)); ĝ = 0.1 g, norms 0.5 and 0.1; weights (1, 5):
    # (0.3, 0.4) + 5 · (0, 0.1) = (0.3, 0.9).
    stats = method.step(_provider([[1.0, 1.0]] * 2))
    torch.testing.assert_close(model.theta.grad, torch.tensor([0.3, 0.9]))
    assert stats["ema_norm/t0"] == pytest.approx(0.5) and stats["ema_norm/t1"] == pytest.approx(0.1)
    with torch.no_grad():  # θ moves: exp(⟨c, θ⟩) is no longer 1, its log's gradient stays c
        model.theta -= 0.5 * model.theta.grad
    # Step 2, loss 0 scaled by 2: g = ((6, 8), (0, 1)); ĝ1 = 0.9 (0.3, 0.4) + 0.1 (6, 8) =
    # (0.87, 1.16), norm 1.45; ĝ2 = 0.9 (0, 0.1) + 0.1 (0, 1) = (0, 0.19), norm 0.19;
    # (0.87, 1.16) + (1.45 / 0.19) (0, 0.19) = (0.87, 2.61).
    model.theta.grad = None
    method.step(_provider([[2.0, 1.0]] * 2))
    torch.testing.assert_close(model.theta.grad, torch.tensor([0.87, 2.61]))


def test_db_mtl_follows_its_beta_schedule() -> None:
    """β_t = β / t^σ: with σ = 1, step 2's β is 0.45."""
    from gcond import Gradients

    resolver = DBMTLResolver(["a", "b"], beta=0.9, beta_sigma=1.0)

    def gradients(rows):
        stack = torch.tensor(rows)
        return Gradients(stack, (stack @ stack.T).double(), [1.0, 1.0], None)

    resolver.resolve(gradients([[3.0, 4.0], [0.0, 1.0]]))
    second = gradients([[6.0, 8.0], [0.0, 1.0]])
    resolved = resolver.resolve(second)
    # ĝ1 = 0.45 (0.3, 0.4) + 0.55 (6, 8) = (3.435, 4.58), norm 5.725; ĝ2 = (0, 0.595).
    torch.testing.assert_close(second.stack, torch.tensor([[3.435, 4.58], [0.0, 0.595]]))
    torch.testing.assert_close(resolved.weights, torch.tensor([1.0, 5.725 / 0.595]).double())


def test_db_mtl_trains_on_log_losses_and_refuses_another_scale() -> None:
    recipe = load_recipe("conflict_lab", ["conductor.method=db-mtl", "loss_scale=log"])
    assert recipe.conductor.method == "db-mtl"
    with pytest.raises(RecipeError, match=r"'none' or 'log' with conductor\.method db-mtl"):
        load_recipe("conflict_lab", ["conductor.method=db-mtl", "loss_scale=initial"])
    with pytest.raises(RecipeError, match="takes the log of the losses itself"):
        load_recipe("conflict_lab", ["conductor.method=famo", "loss_scale=log"])


# ------------------------------------------------------------------------------ uncertainty


def _offset_linear(offsets, rows):
    c = torch.tensor(rows)
    return {
        f"t{k}": (lambda out, s, k=k: offsets[k] + s[k] * (c[k] * out).sum())
        for k in range(len(offsets))
    }


def test_uncertainty_follows_kendalls_regression_form_with_its_own_adam() -> None:
    b, c = (4.0, 0.25), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    model, method = _build("uncertainty", _offset_linear(b, c.tolist()))
    # Step 1 at θ = 0, s = 0: ∇θ = Σ_k ½ e^{-s_k} c_k = ½ (c1 + c2);
    # ∂/∂s_k = ½ (1 − e^{-s_k} L_k) = (−1.5, 0.375): Adam's first step moves s by −lr·sign.
    stats = method.step(_provider([[1.0, 1.0]] * 2))
    torch.testing.assert_close(model.theta.grad, 0.5 * (c[0] + c[1]))
    s1 = torch.tensor([UNCERTAINTY_LR, -UNCERTAINTY_LR])
    torch.testing.assert_close(method.log_vars.detach(), s1, rtol=0, atol=1e-8)
    assert stats["log_var/t0"] == pytest.approx(UNCERTAINTY_LR)
    g1 = torch.tensor([-1.5, 0.375])
    with torch.no_grad():
        model.theta -= 0.1 * model.theta.grad
    theta = model.theta.detach().clone()
    model.theta.grad = None
    method.step(_provider([[1.0, 1.0]] * 2))
    # Step 2: ∇θ = ½ Σ_k e^{-s_k} c_k; ∂/∂s_k = ½ (1 − e^{-s_k} L_k(θ)), then Adam's second step.
    torch.testing.assert_close(
        model.theta.grad, 0.5 * (math.exp(-s1[0]) * c[0] + math.exp(-s1[1]) * c[1])
    )
    values = torch.tensor(b) + c @ theta
    g2 = 0.5 * (1 - torch.exp(-s1) * values)
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    s2 = s1 - UNCERTAINTY_LR * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
    torch.testing.assert_close(method.log_vars.detach(), s2, rtol=0, atol=1e-7)


def test_uncertainty_is_torchjds_uw_at_unit_weights() -> None:
    from torchjd.scalarization import UW

    _, method = _build("uncertainty", _offset_linear((1.0, 2.0), [[1.0, 0.0], [0.0, 1.0]]))
    uw = UW(2)
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.3, -0.7]))
        uw.log_var.copy_(torch.tensor([0.3, -0.7]))
    values = torch.tensor([1.5, 0.2])
    torch.testing.assert_close(method.objective(values), uw(values))


def test_uncertainty_learns_each_losss_log_variance() -> None:
    """With the losses held at 4 and 1/4, s_k goes to log L_k (the minimum of ½e^{-s}L + ½s)."""
    _, method = _build("uncertainty", _offset_linear((4.0, 0.25), [[0.0, 0.0], [0.0, 0.0]]))
    for _ in range(400):
        method.step(_provider([[1.0, 1.0]] * 2))
    torch.testing.assert_close(
        method.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]), atol=0.05, rtol=0
    )


# ------------------------------------------------------------------------------ dependencies


def test_a_missing_torchjd_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    monkeypatch.setitem(sys.modules, "torchjd.scalarization", None)
    for name in ("config", "geometric-mean", "famo", "alignedmtl"):
        assert "pip install 'gcond[torchjd]'" in method_unavailable(name)
    assert "pip install 'gcond[nashmtl]'" in method_unavailable("nashmtl")
    for name in ("db-mtl", "uncertainty"):
        assert method_unavailable(name) is None


def test_a_missing_solver_of_nashmtl_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchjd")
    import torchjd._mixins

    real = torchjd._mixins.find_spec
    monkeypatch.setattr(torchjd._mixins, "find_spec", lambda n: None if n == "ecos" else real(n))
    reason = method_unavailable("nashmtl")
    assert "ecos" in reason and "pip install 'gcond[nashmtl]'" in reason


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_commands_exit_2_naming_what_to_install(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    args = [command, "conflict_lab", "conductor.method=config", f"log.runs_dir={tmp_path}"]
    if command == "compare":
        args = [command, "conflict_lab", "--methods", "sum,config", f"log.runs_dir={tmp_path}"]
    result = runner.invoke(app, [*args, "schedule.max_steps=2", "schedule.warmup_steps=0"])
    assert result.exit_code == 2, result.output
    assert "gcond[torchjd]" in result.output


def test_validate_exits_2_naming_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without importing anything: a module is looked up, not loaded."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "ecos" else real(n))
    result = runner.invoke(app, ["validate", "conflict_lab", "conductor.method=nashmtl"])
    assert result.exit_code == 2
    assert "method 'nashmtl' needs ecos: pip install 'gcond[nashmtl]'" in result.output
    assert runner.invoke(app, ["validate", "conflict_lab", "conductor.method=famo"]).exit_code == 0
