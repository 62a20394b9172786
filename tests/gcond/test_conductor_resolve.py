"""The conductor's resolution, on models whose per-loss gradients are known in closed form:
the conflict zones, smooth resolution, norm EMA and cap, and the step's statistics."""

from __future__ import annotations

import math

import pytest

from gcond import GradientConductor
from tests.gcond.conductor_models import (
    Theta,
    assert_close_list,
    conductor_for,
    constant_provider,
    data_dot,
    dot,
    grad_of,
    series_provider,
)

# ----------------------------------------------------------------------------- zones, exact


def test_weak_conflict_symmetric_projection():
    # cos(a, b) = -3 / (3·√5) ≈ -0.447: weak zone. Simultaneous projections:
    # a' = a − (⟨a,b⟩/‖b‖²) b = (3,0,0) + 3/5·(−1,2,0) = (2.4, 1.2, 0)
    # b' = b − (⟨a,b⟩/‖a‖²) a = (−1,2,0) + 3/9·(3,0,0) = (0, 2, 0)
    model, cond = conductor_for([3, 0, 0], [-1, 2, 0])
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [2.4, 3.2, 0.0])
    assert stats["conflicts/weak"] == 1 and stats["conflicts/main"] == 0
    assert stats["cos/a_vs_b"] == pytest.approx(-1 / math.sqrt(5))
    assert stats["min_cosine_sim"] == pytest.approx(-1 / math.sqrt(5))
    assert stats["wins/a"] == 0 and stats["wins/b"] == 0  # no arbitration in the weak zone
    assert stats["proj_iters"] == 1
    assert stats["final_grad_norm"] == pytest.approx(4.0)


def test_harmful_only_writes_the_plain_sum_when_it_harms_no_loss():
    # The same pair: a + b = (2, 2, 0) decreases both losses (⟨a, a+b⟩ = 6, ⟨b, a+b⟩ = 2), so
    # conflicts="harmful" leaves them alone and says so; the cosine is reported as always.
    model, cond = conductor_for([3, 0, 0], [-1, 2, 0], conflicts="harmful")
    stats = cond.step(constant_provider())
    assert grad_of(model) == [2.0, 2.0, 0.0]
    assert stats["conflicts/harmless"] == 1 and stats["conflicts/weak"] == 0
    assert stats["proj_iters"] == 0
    assert stats["min_cosine_sim"] == pytest.approx(-1 / math.sqrt(5))


def test_harmful_only_resolves_when_the_sum_would_increase_a_loss():
    # a = (1, 0, 0), b = (-4, 8, 0): ⟨a, a+b⟩ = -3. Weak zone, both projected:
    # a' = a + 0.05·b = (0.8, 0.4, 0), b' = b + 4·a = (0, 8, 0); p.grad = (0.8, 8.4, 0).
    model, cond = conductor_for([1, 0, 0], [-4, 8, 0], conflicts="harmful")
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [0.8, 8.4, 0.0])
    assert stats["conflicts/harmless"] == 0 and stats["conflicts/weak"] == 1


def test_main_conflict_projects_the_loser_only():
    # cos = -1/√2: main zone. First step: equal scores, the tie goes to "a" (listed first);
    # b' = b − (⟨b,a⟩/‖a‖²) a = (−2,2,0) + 2·(1,0,0) = (0,2,0); a untouched.
    model, cond = conductor_for([1, 0, 0], [-2, 2, 0])
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [1.0, 2.0, 0.0])
    assert stats["conflicts/main"] == 1 and stats["wins/a"] == 1 and stats["wins/b"] == 0


def test_main_conflict_tie_goes_to_the_loss_listed_first():
    model, cond = conductor_for([1, 0, 0], [-2, 2, 0], names=("b", "a"))
    stats = cond.step(constant_provider())
    assert stats["wins/b"] == 1  # "b" is listed first now
    assert_close_list(grad_of(model), [1.0, 2.0, 0.0])


def test_critical_conflict_winner_takes_all():
    # cos = -3/√10 ≈ -0.949 < -0.8: the loser is zeroed.
    model, cond = conductor_for([1, 0, 0], [-3, 1, 0])
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [1.0, 0.0, 0.0])
    assert stats["conflicts/critical"] == 1 and stats["wins/a"] == 1


@pytest.mark.parametrize("c2", [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
def test_no_action_at_or_above_weak(c2):
    model, cond = conductor_for([1, 0, 0], c2)
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [1 + c2[0], c2[1], 0.0])
    assert stats["proj_iters"] == 0
    assert stats["conflicts/weak"] + stats["conflicts/main"] + stats["conflicts/critical"] == 0


def test_three_losses_several_iterations():
    # a=(1,0,0), b=(-1,1,0) [cos -0.707, main], c=(-1,-1,0) [cos(a,c) -0.707, cos(b,c)=0].
    # Iteration 1: lowest pair (a,b) (ties broken by order), main: a wins, b ← (0,1,0).
    # Iteration 2: (a,c) main: a wins (dominance not yet), c ← (0,-1,0).
    # Iteration 3: (b,c) now cos -1 → critical: tie on scores → b (listed first) wins, c ← 0.
    model = Theta([0.0, 0.0, 0.0])
    losses = {"a": dot([1, 0, 0]), "b": dot([-1, 1, 0]), "c": dot([-1, -1, 0])}
    cond = GradientConductor(model, losses, dict.fromkeys(losses, 1.0), 1, dominance_window=0)
    stats = cond.step(constant_provider())
    assert stats["proj_iters"] == 3
    assert (stats["conflicts/main"], stats["conflicts/critical"]) == (2, 1)
    assert (stats["wins/a"], stats["wins/b"], stats["wins/c"]) == (2, 1, 0)
    assert_close_list(grad_of(model), [1.0, 1.0, 0.0])


def test_projection_max_iters_is_respected():
    model = Theta([0.0, 0.0, 0.0])
    losses = {"a": dot([1, 0, 0]), "b": dot([-1, 1, 0]), "c": dot([-1, -1, 0])}
    cond = GradientConductor(
        model, losses, dict.fromkeys(losses, 1.0), 1, projection_max_iters=1, dominance_window=0
    )
    stats = cond.step(constant_provider())
    assert stats["proj_iters"] == 1
    # Only (a, b) was resolved: a + (0,1,0) + c.
    assert_close_list(grad_of(model), [0.0, 0.0, 0.0])


def test_smooth_resolution_at_main_threshold_projects_both():
    # cos exactly -0.5 = main: α = π/2, so both sides are fully projected (sin α = 1).
    # a=(2,0,0), b=(-1,√3,0): d = -2; a' = a − d/‖b‖²·b = (2,0,0) + 0.5·(−1,√3,0)
    # b' = b − d/‖a‖²·a = (−1,√3,0) + 0.5·(2,0,0) = (0,√3,0)
    s3 = math.sqrt(3.0)
    model, cond = conductor_for([2, 0, 0], [-1, s3, 0], resolution="smooth")
    cond.step(constant_provider())
    assert_close_list(grad_of(model), [1.5, 0.5 * s3 + s3, 0.0], tol=1e-5)


def test_smooth_resolution_below_critical_spares_the_winner():
    # cos < critical: α = π, sin α = 0 for the winner, full projection for the loser.
    model, cond = conductor_for([1, 0, 0], [-3, 1, 0], resolution="smooth")
    stats = cond.step(constant_provider())
    assert stats["wins/a"] == 1
    assert_close_list(grad_of(model), [1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- statistics, norms


def test_norm_ema_starts_at_first_norm_then_follows_beta():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(model, {"a": data_dot}, {"a": 1.0}, 1, norm_ema_beta=0.9)
    provider = series_provider([[3.0, 4.0], [0.0, 1.0]])
    s1 = cond.step(provider)
    assert s1["raw_norm/a"] == pytest.approx(5.0) and s1["norm_ema/a"] == pytest.approx(5.0)
    s2 = cond.step(provider)
    assert s2["norm_ema/a"] == pytest.approx(0.9 * 5.0 + 0.1 * 1.0)
    assert s2["min_cosine_sim"] == 1.0  # one loss


def test_norm_cap_rescales_before_resolution_but_reports_raw():
    model, cond = conductor_for([3, 0, 0], [0, 0.5, 0], norm_cap=1.0)
    stats = cond.step(constant_provider())
    assert stats["raw_norm/a"] == pytest.approx(3.0)
    assert_close_list(grad_of(model), [1.0, 0.5, 0.0])


def test_norm_equalization_writes_the_equalised_sum_and_reports_raw_norms():
    # g_a = (1, 0, 0), g_b = (0, 4, 3): norms 1 and 5, orthogonal. First step: s = (5, 1), so
    # p.grad = 5·g_a + g_b = (5, 4, 3). Second step, same gradients: the EMAs stay (1, 5).
    model, cond = conductor_for([1, 0, 0], [0, 4, 3], norm_equalization="max")
    stats = cond.step(constant_provider())
    assert stats["raw_norm/a"] == 1.0 and stats["norm_scale/a"] == 5.0
    assert stats["norm_scale/b"] == 1.0
    assert grad_of(model) == [5.0, 4.0, 3.0]
    cond.step(constant_provider())
    assert grad_of(model) == [5.0, 4.0, 3.0]


def test_loss_statistics_are_unweighted_means_and_total_is_weighted():
    model = Theta([1.0, 2.0])
    cond = GradientConductor(model, {"a": data_dot, "b": dot([1.0, 0.0])}, {"a": 0.5, "b": 2.0}, 2)
    stats = cond.step(series_provider([[1.0, 0.0], [0.0, 1.0]]))
    # loss a: ⟨(1,0),θ⟩=1, ⟨(0,1),θ⟩=2 → mean 1.5; loss b: θ_0 = 1 on both.
    assert stats["loss/a"] == pytest.approx(1.5) and stats["loss/b"] == pytest.approx(1.0)
    assert stats["loss/total"] == pytest.approx(0.5 * 1.5 + 2.0 * 1.0)
    # g_a = 0.5 · mean((1,0),(0,1)) = (0.25, 0.25); g_b = 2·(1,0)
    assert_close_list(grad_of(model), [2.25, 0.25])
