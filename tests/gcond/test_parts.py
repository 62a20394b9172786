"""Each part of the conductor alone, on hand-made cases with exact values: accumulation hands on
the gradients and their Gram matrix, a resolver turns them into merge weights, the updater
writes ``p.grad``; ``step()`` is their composition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gcond import (
    Accumulator,
    ConductorConfig,
    ConflictResolver,
    GradientConductor,
    Gradients,
    NormEqualizer,
    Resolved,
    Resolver,
    Updater,
    WeightingResolver,
)


class Theta(nn.Module):
    """One parameter vector θ (ones); loss k of the target c (K×P) is ⟨c_k, θ⟩, so
    g_k = λ_k · c_k."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta


def _linear_losses(k: int) -> dict:
    return {f"l{j}": (lambda out, c, j=j: (c[j] * out).sum()) for j in range(k)}


def _gradients(rows: list[list[float]], prev: list[float] | None = None) -> Gradients:
    stack = torch.tensor(rows)
    gram = stack.double() @ stack.double().T
    return Gradients(stack, gram, [0.0] * len(rows), prev)


# ------------------------------------------------------------------ accumulate


@pytest.mark.parametrize("accumulation", ["full", "stochastic"])
def test_accumulator_hands_on_the_mean_gradients_their_gram_and_last_steps_cosines(accumulation):
    model = Theta(3)
    config = ConductorConfig(accumulation_steps=2, accumulation=accumulation)
    acc = Accumulator(
        model, list(model.parameters()), _linear_losses(2), {"l0": 1.0, "l1": 2.0}, config
    )
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    first = acc.accumulate(lambda: (None, c))
    # λ-weighted means over the micro-batches that served each loss: g0 = c0, g1 = 2·c1.
    assert first.stack.tolist() == [[1.0, 0.0, 0.0], [0.0, 6.0, 8.0]]
    assert first.gram.tolist() == [[1.0, 0.0], [0.0, 100.0]]
    assert first.norms == [1.0, 10.0] and first.nonfinite == [False, False]
    assert first.loss_means == [1.0, 7.0] and first.prev_cosines is None
    acc.commit(first.norms)
    second = acc.accumulate(lambda: (None, -c))
    assert second.prev_cosines == [-1.0, -1.0]
    assert acc.prev_stack.tolist() == [[1.0, 0.0, 0.0], [0.0, 6.0, 8.0]]


def test_a_nan_loss_is_blamed_on_its_own_value_first():
    grads = Gradients(
        torch.zeros(2, 1), torch.tensor([[math.nan, 0.0], [0.0, math.nan]]), [1.0, math.inf], None
    )
    assert grads.nonfinite == [False, True]


# ------------------------------------------------------------------ resolve


def test_conflict_resolver_projects_a_weak_conflict_symmetrically():
    # g0 = (1, 0), g1 = (-1, 2): cos = -1/√5 ≈ -0.447, between main (-0.5) and weak (0).
    resolver = ConflictResolver(["a", "b"], ConductorConfig())
    resolved = resolver.resolve(_gradients([[1.0, 0.0], [-1.0, 2.0]]))
    # g0' = g0 + g1/5, g1' = g1 + g0: w = (1 + 1, 1 + 1/5).
    assert resolved.weights.tolist() == pytest.approx([2.0, 1.2])
    assert resolved.stats["conflicts/weak"] == 1.0 and resolved.stats["proj_iters"] == 1.0
    assert resolved.stats["wins/a"] == resolved.stats["wins/b"] == 0.0


def test_conflict_resolver_critical_conflict_winner_takes_all_larger_strength_wins():
    # cos = -1: critical. First step: stability 0, strength s_k = ‖g_k‖/ema_k = 1 for both: an
    # exact tie goes to the loss listed first.
    resolver = ConflictResolver(["a", "b"], ConductorConfig())
    resolved = resolver.resolve(_gradients([[1.0, 0.0], [-2.0, 0.0]]))
    assert resolved.weights.tolist() == [1.0, 0.0]
    assert resolved.stats["wins/a"] == 1.0 and resolved.stats["conflicts/critical"] == 1.0
    assert resolved.stats["norm_ema/b"] == 2.0
    # Its state is the arbitrator's, under the key states have always used.
    assert list(resolver.state_dict()) == ["arbitrator"]


def test_conflict_resolver_applies_the_norm_cap_before_resolving():
    resolver = ConflictResolver(["a", "b"], ConductorConfig(norm_cap=2.0))
    resolved = resolver.resolve(_gradients([[4.0, 0.0], [0.0, 1.0]]))
    assert resolved.weights.tolist() == [0.5, 1.0]


def test_weighting_resolver_feeds_the_capped_gram_and_returns_weights_on_raw_gradients():
    seen = []

    def weighting(gram: torch.Tensor) -> torch.Tensor:
        seen.append(gram.clone())
        return torch.tensor([1.0, 1.0], dtype=gram.dtype)

    resolver = WeightingResolver(weighting, norm_cap=2.0)
    assert isinstance(resolver, Resolver)
    resolved = resolver.resolve(_gradients([[4.0, 0.0], [0.0, 1.0]]))
    assert seen[0].tolist() == [[4.0, 0.0], [0.0, 1.0]]
    assert resolved.weights.tolist() == [0.5, 1.0] and resolved.stats == {}
    with pytest.raises(ValueError, match="2 weights"):
        WeightingResolver(lambda gram: torch.ones(3)).resolve(_gradients([[1.0], [1.0]]))


def test_norm_equalization_scales_every_gradient_up_to_the_largest_norm():
    # g_a = (1, 0), g_b = (0, 4): orthogonal, no conflict. First step: EMAs = norms (1, 4), so
    # s = (4/1, 4/4) and the merge is 4·g_a + g_b; the statistic is the factor applied.
    resolver = ConflictResolver(["a", "b"], ConductorConfig(norm_equalization="max"))
    resolved = resolver.resolve(_gradients([[1.0, 0.0], [0.0, 4.0]]))
    assert resolved.weights.tolist() == [4.0, 1.0]
    assert resolved.stats["norm_scale/a"] == 4.0 and resolved.stats["norm_scale/b"] == 1.0
    assert resolved.stats["conflicts/weak"] == 0.0


def test_norm_equalization_follows_an_ema_of_the_norms_over_steps():
    # β = 0.5 (exact in binary). Step 1: norms (1, 4) → EMAs (1, 4), s = (4, 1).
    # Step 2: norms (3, 2) → EMAs (0.5·1 + 0.5·3, 0.5·4 + 0.5·2) = (2, 3), s = (3/2, 1): this
    # step's g_a (norm 3) is scaled by 1.5, not brought to g_b's norm 2 of this step.
    config = ConductorConfig(norm_equalization="max", norm_equalization_beta=0.5)
    resolver = ConflictResolver(["a", "b"], config)
    assert resolver.resolve(_gradients([[1.0, 0.0], [0.0, 4.0]])).weights.tolist() == [4.0, 1.0]
    second = resolver.resolve(_gradients([[3.0, 0.0], [0.0, 2.0]]))
    assert second.weights.tolist() == [1.5, 1.0]
    assert resolver.equalizer is not None and resolver.equalizer.ema == [2.0, 3.0]
    # β = 0: this step's norms exactly.
    exact = ConflictResolver(["a", "b"], config.replace(norm_equalization_beta=0.0))
    exact.resolve(_gradients([[1.0, 0.0], [0.0, 4.0]]))
    assert exact.resolve(_gradients([[3.0, 0.0], [0.0, 2.0]])).weights.tolist() == [1.0, 1.5]


def test_norm_equalization_comes_before_the_resolution():
    # g_a = (1, 0), g_b = (-2, 4): cos = -2/√20 ≈ -0.447, a weak conflict. Equalised first:
    # g_a' = √20·g_a. Then both are projected: g_a'' = g_a' − ⟨g_a', g_b⟩/‖g_b‖²·g_b
    # = √20·g_a + (√20/10)·g_b and g_b' = g_b − ⟨g_a', g_b⟩/‖g_a'‖²·g_a' = g_b + 2·g_a.
    resolver = ConflictResolver(["a", "b"], ConductorConfig(norm_equalization="max"))
    resolved = resolver.resolve(_gradients([[1.0, 0.0], [-2.0, 4.0]]))
    root = math.sqrt(20.0)
    assert resolved.weights.tolist() == pytest.approx([root + 2.0, 1.0 + root / 10], rel=1e-15)
    assert resolved.stats["conflicts/weak"] == 1.0


def test_norm_cap_applies_to_the_equalised_norms():
    # Norms (1, 4) equalised to (4, 4), then capped to 2: factors (4·0.5, 1·0.5).
    config = ConductorConfig(norm_equalization="max", norm_cap=2.0)
    resolved = ConflictResolver(["a", "b"], config).resolve(_gradients([[1.0, 0.0], [0.0, 4.0]]))
    assert resolved.weights.tolist() == [2.0, 0.5]


def test_a_vanished_gradient_is_not_blown_up_by_the_equalisation():
    equalizer = NormEqualizer(2, beta=0.0, eps=1e-8)
    assert equalizer.scales([0.0, 3.0]).tolist() == [1.0, 1.0]
    assert equalizer.scales([1e-9, 3.0]).tolist() == [1.0, 1.0]


def test_equalizer_state_round_trip_and_old_states_without_it():
    config = ConductorConfig(norm_equalization="max", norm_equalization_beta=0.5)
    resolver = ConflictResolver(["a", "b"], config)
    resolver.resolve(_gradients([[1.0, 0.0], [0.0, 4.0]]))
    state = resolver.state_dict()
    assert list(state) == ["arbitrator", "norm_equalizer"]
    restored = ConflictResolver(["a", "b"], config)
    restored.load_state_dict(state)
    step = _gradients([[3.0, 0.0], [0.0, 2.0]])
    assert restored.resolve(step).weights.tolist() == resolver.resolve(step).weights.tolist()
    assert restored.equalizer.ema == resolver.equalizer.ema == [2.0, 3.0]  # type: ignore[union-attr]
    # A state saved without the equaliser (off, or older) starts its EMAs afresh.
    fresh = ConflictResolver(["a", "b"], config)
    fresh.load_state_dict({"arbitrator": state["arbitrator"]})
    assert fresh.equalizer is not None and fresh.equalizer.ema == [None, None]
    # With it off, the state is the arbitrator's alone and an equaliser's state is read as nothing.
    off = ConflictResolver(["a", "b"], ConductorConfig())
    off.load_state_dict(state)
    assert list(off.state_dict()) == ["arbitrator"]


def test_weighting_resolver_feeds_the_equalised_gram_and_keeps_the_emas():
    seen = []

    def weighting(gram: torch.Tensor) -> torch.Tensor:
        seen.append(gram.clone())
        return torch.tensor([1.0, 1.0], dtype=gram.dtype)

    resolver = WeightingResolver(
        weighting, norm_equalization="max", norm_equalization_beta=0.5, loss_names=["a", "b"]
    )
    first = resolver.resolve(_gradients([[1.0, 0.0], [0.0, 4.0]]))
    assert seen[0].tolist() == [[16.0, 0.0], [0.0, 16.0]]
    assert first.weights.tolist() == [4.0, 1.0]
    assert first.stats == {"norm_scale/a": 4.0, "norm_scale/b": 1.0}
    restored = WeightingResolver(weighting, norm_equalization="max", norm_equalization_beta=0.5)
    restored.load_state_dict(resolver.state_dict())
    step = _gradients([[3.0, 0.0], [0.0, 2.0]])
    assert restored.resolve(step).weights.tolist() == resolver.resolve(step).weights.tolist()
    with pytest.raises(ValueError, match="norm_equalization"):
        WeightingResolver(weighting, norm_equalization="mean")


# ------------------------------------------------------------------ update


def test_updater_merges_and_writes_p_grad_with_the_analytic_norm():
    model = Theta(2)
    updater = Updater(list(model.parameters()), ConductorConfig())
    grads = _gradients([[3.0, 0.0], [0.0, 4.0]])
    norm = updater.apply(grads, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert model.theta.grad.tolist() == [3.0, 4.0] and norm == 5.0 and updater.steps == 1


def test_updater_momentum_is_bias_corrected_and_lion_takes_the_sign():
    model = Theta(2)
    config = ConductorConfig(momentum_beta=0.5, use_lion=True)
    updater = Updater(list(model.parameters()), config)
    w = torch.tensor([1.0], dtype=torch.float64)
    updater.apply(_gradients([[2.0, -4.0]]), w)
    assert updater.momentum.buffer.tolist() == [1.0, -2.0]  # 0.5·g
    assert model.theta.grad.tolist() == [1.0, -1.0]  # sign(m / (1 - 0.5))
    norm = updater.apply(_gradients([[-6.0, 0.0]]), w)
    assert updater.momentum.buffer.tolist() == [-2.5, -1.0]
    assert model.theta.grad.tolist() == [-1.0, -1.0] and norm == pytest.approx(math.sqrt(2))


def test_updater_skip_leaves_nothing_for_the_optimizer():
    model = Theta(2)
    model.theta.grad = torch.ones(2)
    Updater(list(model.parameters()), ConductorConfig()).skip()
    assert model.theta.grad is None


# ------------------------------------------------------------------ composition


class Halves:
    """A resolver that always merges with weights 1/2, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def resolve(self, gradients: Gradients) -> Resolved:
        self.calls += 1
        return Resolved(torch.full((gradients.stack.shape[0],), 0.5, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.calls = state["calls"]


def test_step_is_accumulate_then_finish_with_any_resolver():
    model = Theta(3)
    halves = Halves()
    cond = GradientConductor(model, _linear_losses(2), {"l0": 1.0, "l1": 1.0}, 1, resolver=halves)
    c = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    stats = cond.step(lambda: (None, c))
    assert model.theta.grad.tolist() == [1.0, 0.0, 2.0]
    assert stats["final_grad_norm"] == pytest.approx(math.sqrt(5))
    assert stats["cos/l0_vs_l1"] == 0.0 and math.isnan(stats["norm_ema/l0"])
    assert cond.state_dict()["calls"] == 1 == halves.calls
    gradients = cond.accumulate(lambda: (None, c))
    assert halves.calls == 1  # accumulate alone does not resolve
    cond.finish(gradients)
    assert halves.calls == 2 and cond.updater.steps == 2


def test_a_resolver_without_the_protocol_is_refused():
    with pytest.raises(TypeError, match="resolver must have resolve"):
        GradientConductor(Theta(2), _linear_losses(1), {"l0": 1.0}, 1, resolver=object())
