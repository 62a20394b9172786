"""Conflict resolution math (docs/algorithm.md, step 5): golden values on tiny hand-made
stacks, then properties over hypothesis-generated families of K×P gradient stacks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gcond import (
    Resolution,
    cosine_matrix,
    harms_a_loss,
    most_conflicting_pair,
    resolve,
    resolve_gram,
    smooth_angle,
    zone_of,
)

THRESHOLDS = (-0.8, -0.5, 0.0)  # (critical, main, weak), the library default
CRITICAL, MAIN, WEAK = THRESHOLDS
PI = math.pi

property_settings = settings(max_examples=40, deadline=None)


def stack(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def winner_is(index: int) -> Callable[[int, int], int]:
    """An arbitrator that always lets ``index`` win (it must be one of the pair)."""

    def arbitrate(i: int, j: int) -> int:
        assert index in (i, j)
        return index

    return arbitrate


def lower_index_wins(i: int, j: int) -> int:
    return min(i, j)


class Recorder:
    """An arbitrator that remembers which pairs it was asked about."""

    def __init__(self, decide: Callable[[int, int], int] = lower_index_wins) -> None:
        self.decide = decide
        self.calls: list[tuple[int, int]] = []

    def __call__(self, i: int, j: int) -> int:
        self.calls.append((i, j))
        return self.decide(i, j)


def assert_rows(actual: torch.Tensor, expected: list[list[float]], tol: float = 1e-12) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=0.0, atol=tol
    )


def counts(weak: int = 0, main: int = 0, critical: int = 0) -> dict[str, int]:
    return {"weak": weak, "main": main, "critical": critical}


# ----------------------------------------------------------------------------- assertion helpers


def pairwise_cosines(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = rows.norm(dim=1)
    return rows @ rows.T / torch.outer(norms, norms).clamp_min(1e-300), norms


def assert_no_conflict_left(
    resolved: torch.Tensor, res: Resolution, weak: float = WEAK, tol: float = 1e-6
) -> None:
    """Unless the budget ran out, no pair of non-zero resolved gradients conflicts; if it ran out,
    every iteration was spent and a pair is still at (or, within rounding, just at) ``weak``."""
    cos, norms = pairwise_cosines(resolved)
    alive = norms > 1e-9 * max(float(norms.max()), 1e-300)
    pairs = [
        (i, j) for i, j in itertools.combinations(range(len(norms)), 2) if alive[i] and alive[j]
    ]
    lowest = min((float(cos[i, j]) for i, j in pairs), default=1.0)
    if res.budget_exhausted:
        assert lowest < weak + tol, (lowest, res)
    else:
        assert lowest >= weak - tol, (lowest, res)


def assert_merge_weights_give_sum(grads: torch.Tensor, resolved: torch.Tensor, res: Resolution):
    merged = res.merge_weights @ grads
    scale = max(float(grads.abs().max()), float(resolved.abs().max()), 1e-300)
    torch.testing.assert_close(merged, resolved.sum(dim=0), rtol=1e-9, atol=1e-9 * scale)


def decisions(res: Resolution) -> tuple[int, dict[str, int], list[tuple[int, int]], bool]:
    return res.iterations, res.zone_counts, res.arbitrations, res.budget_exhausted


def assert_resolution_is_identity(grads: torch.Tensor, resolved: torch.Tensor, res: Resolution):
    assert torch.equal(resolved, grads)
    assert torch.equal(res.transform, torch.eye(grads.shape[0], dtype=torch.float64))
    assert decisions(res) == (0, counts(), [], False)
    assert torch.equal(resolved.sum(dim=0), grads.sum(dim=0))


# ----------------------------------------------------------------------------- generated stacks


@st.composite
def gradient_stacks(draw: st.DrawFn, well_conditioned: bool = False) -> torch.Tensor:
    """K×P float64 stacks, K in 2..4, P in 2..8, row norms spread over ~2 decades.

    Constructions: independent Gaussian rows; ``opposed``, where g2 = −a·g1 + noise (main and
    critical conflicts); ``chain``, where every row opposes the previous one, so resolving one
    pair leaves the next in conflict. Unless ``well_conditioned``, the noise may be 0 (cos = −1,
    collinear rows, where the lowest cosine is a tie that rounding decides) and K may exceed P.
    """
    k = draw(st.integers(2, 4))
    p = draw(st.integers(k if well_conditioned else 2, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    grads = torch.randn(k, p, generator=gen, dtype=torch.float64)
    noises = [0.05, 0.3, 0.8] if well_conditioned else [0.0, 0.05, 0.3, 0.8]
    construction = draw(st.sampled_from(["random", "opposed", "chain"]))
    if construction != "random":
        pairs = [(0, 1)] if construction == "opposed" else [(r - 1, r) for r in range(1, k)]
        for a, b in pairs:
            factor = draw(st.floats(0.1, 10.0))
            noise = draw(st.sampled_from(noises))
            grads[b] = -factor * grads[a] + noise * grads[b]
    exponents = draw(st.lists(st.floats(-1.0, 1.0), min_size=k, max_size=k))
    grads = grads * (10.0 ** torch.tensor(exponents, dtype=torch.float64)).unsqueeze(1)
    assume(float(grads.norm(dim=1).min()) > 1e-3)
    return grads


@st.composite
def cases(draw: st.DrawFn, well_conditioned: bool = False) -> tuple[str, torch.Tensor]:
    """(mode, stack). Smooth-mode stacks are always well conditioned: with exactly opposed rows,
    or K > P, smooth projections shrink a loser to rounding noise, which the Gram-space loop
    mistakes for a gradient (see the vanished-gradient tests at the end)."""
    mode = draw(st.sampled_from(["zones", "smooth"]))
    return mode, draw(gradient_stacks(well_conditioned or mode == "smooth"))


@st.composite
def paired_stacks(draw: st.DrawFn, lo: float, hi: float) -> tuple[torch.Tensor, list[int]]:
    """K ∈ {2, 4} gradients in pairs (0, 1), (2, 3) with cos(pair) in [lo, hi], each pair in its
    own 2-D subspace of a random orthonormal basis, so pairs never interact. Also returns, per
    pair, which member an arbitrator should let win."""
    k = draw(st.sampled_from([2, 4]))
    p = draw(st.integers(k, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    basis, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    rows, winners = [], []
    for pair in range(k // 2):
        u, v = basis[:, 2 * pair], basis[:, 2 * pair + 1]
        c = draw(st.floats(lo, hi))
        n1, n2 = draw(st.floats(0.1, 10.0)), draw(st.floats(0.1, 10.0))
        rows += [n1 * u, n2 * (c * u + math.sqrt(1.0 - c * c) * v)]
        winners.append(2 * pair + draw(st.integers(0, 1)))
    return torch.stack(rows), winners


# ----------------------------------------------------------------------------- golden: zones


def test_weak_zone_projects_both_simultaneously():
    # g1 = (2, 0), g2 = (-1, 2): ⟨g1,g2⟩ = -2, ‖g1‖² = 4, ‖g2‖² = 5, cos = -1/√5 ≈ -0.447, weak.
    # g1' = g1 - (-2/5)·g2 = (2, 0) + 0.4·(-1, 2) = (1.6, 0.8)
    # g2' = g2 - (-2/4)·g1 = (-1, 2) + 0.5·(2, 0)  = (0, 2)      (old g1, not g1')
    # Then ⟨g1',g2'⟩ = 1.6 > 0: done after one iteration.
    arbitrate = Recorder()
    resolved, res = resolve(stack((2, 0), (-1, 2)), THRESHOLDS, arbitrate=arbitrate)
    assert_rows(resolved, [[1.6, 0.8], [0.0, 2.0]])
    assert torch.equal(res.transform, stack((1, 0.4), (0.5, 1)))
    assert decisions(res) == (1, counts(weak=1), [], False)
    assert arbitrate.calls == []  # symmetric: nobody wins a weak conflict


@pytest.mark.parametrize(
    ("winner", "expected"),
    [
        # g1 wins: g2' = g2 - (⟨g2,g1⟩/‖g1‖²)·g1 = (-3, 4) - (-3)·(1, 0) = (0, 4)
        (0, [[1.0, 0.0], [0.0, 4.0]]),
        # g2 wins: g1' = g1 - (-3/25)·(-3, 4) = (1 - 9/25, 12/25) = (0.64, 0.48)
        (1, [[0.64, 0.48], [-3.0, 4.0]]),
    ],
)
def test_main_zone_projects_the_loser_only(winner: int, expected: list[list[float]]):
    # g1 = (1, 0), g2 = (-3, 4): cos = -3/5 = -0.6 ∈ [-0.8, -0.5), a main conflict.
    grads = stack((1, 0), (-3, 4))
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=winner_is(winner))
    assert_rows(resolved, expected)
    assert torch.equal(resolved[winner], grads[winner])
    assert decisions(res) == (1, counts(main=1), [(winner, 1 - winner)], False)


@pytest.mark.parametrize("winner", [0, 1])
def test_critical_zone_zeroes_the_loser(winner: int):
    # g1 = (1, 0), g2 = (-12, 5): cos = -12/13 ≈ -0.923 < -0.8, winner takes all.
    grads = stack((1, 0), (-12, 5))
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=winner_is(winner))
    assert torch.equal(resolved[winner], grads[winner])
    assert torch.equal(resolved[1 - winner], torch.zeros(2, dtype=torch.float64))
    # The zeroed loser is skipped afterwards (norm below eps): one iteration, budget not exhausted.
    assert decisions(res) == (1, counts(critical=1), [(winner, 1 - winner)], False)


@pytest.mark.parametrize(
    "grads",
    [
        stack((1, 0), (0, 1)),  # cos = 0 exactly = weak: no conflict
        stack((1, 0), (1, 1)),
        stack((3, 1, 0), (0, 2, 5), (1, 0, 0)),
    ],
)
def test_no_action_at_and_above_weak(grads: torch.Tensor):
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=Recorder())
    assert_resolution_is_identity(grads, resolved, res)


def test_cosine_exactly_main_is_a_weak_conflict():
    # a = (1,1,1,1), b = (-1,-1,-1,1): ⟨a,b⟩ = -2, ‖a‖ = ‖b‖ = 2, cos = -0.5 exactly (= main).
    # Weak zone, symmetric: a' = a + (2/4)·b = (.5,.5,.5,1.5), b' = b + (2/4)·a = (-.5,-.5,-.5,1.5)
    resolved, res = resolve(stack((1, 1, 1, 1), (-1, -1, -1, 1)), THRESHOLDS)
    assert_rows(resolved, [[0.5, 0.5, 0.5, 1.5], [-0.5, -0.5, -0.5, 1.5]])
    assert decisions(res) == (1, counts(weak=1), [], False)


def test_cosine_exactly_critical_is_a_main_conflict():
    # a = (1, 0), b = (-4, 3): cos = -4/5 = -0.8 exactly (= critical): a main conflict, so the
    # loser is projected, not zeroed. The default arbitrator lets the larger gradient (b) win:
    # a' = a - (-4/25)·b = (1 - 16/25, 12/25) = (0.36, 0.48).
    resolved, res = resolve(stack((1, 0), (-4, 3)), THRESHOLDS)
    assert_rows(resolved, [[0.36, 0.48], [-4.0, 3.0]])
    assert decisions(res) == (1, counts(main=1), [(1, 0)], False)


@pytest.mark.parametrize(
    ("cosine", "zone"),
    [
        (1.0, None),
        (0.0, None),  # = weak
        (-1e-15, None),  # float residue of an exact projection, not a conflict
        (-1e-6, "weak"),
        (-0.5, "weak"),  # = main
        (-0.5 - 1e-12, "main"),
        (-0.8, "main"),  # = critical
        (-0.8 - 1e-12, "critical"),
        (-1.0, "critical"),
    ],
)
def test_zone_boundaries(cosine: float, zone: str | None):
    assert zone_of(cosine, THRESHOLDS) == zone
    # The same decision from a Gram matrix of two unit vectors with that cosine.
    res = resolve_gram(stack((1, cosine), (cosine, 1)), THRESHOLDS, arbitrate=lower_index_wins)
    expected = counts() if zone is None else counts(**{zone: 1})
    assert res.zone_counts == expected


def test_custom_thresholds_move_the_zones():
    # cos = -0.6: a main conflict by default, weak with main = -0.7, none with weak = -0.7,
    # critical when all three thresholds sit above it.
    gram = stack((1, -0.6), (-0.6, 1))
    assert resolve_gram(gram, THRESHOLDS).zone_counts == counts(main=1)
    assert resolve_gram(gram, (-0.9, -0.7, 0.0)).zone_counts == counts(weak=1)
    assert resolve_gram(gram, (-0.9, -0.8, -0.7)).zone_counts == counts()
    assert resolve_gram(gram, (-0.5, -0.5, -0.5)).zone_counts == counts(critical=1)


# g1 = (1,0,0), g2 = (-3,4,0), g3 = (-1,-2,2): ‖·‖ = 1, 5, 3.
# cos12 = -3/5 = -0.6 (main), cos13 = -1/3 (weak), cos23 = (3 - 8)/15 = -1/3 (weak).
CHAIN = stack((1, 0, 0), (-3, 4, 0), (-1, -2, 2))
CHAIN_STEPS = [
    # 1. lowest is (1,2) at -0.6, main; g1 wins: g2' = g2 + 3·g1 = (0, 4, 0).
    #    Now cos(g2', g3) = -8/(4·3) = -2/3: the fix made a new main conflict.
    [[1, 0, 0], [0, 4, 0], [-1, -2, 2]],
    # 2. lowest is (2,3) at -2/3, main; g2 wins: g3' = g3 - (-8/16)·g2' = (-1, 0, 2).
    #    Now cos(g1, g3') = -1/√5 ≈ -0.447, weak.
    [[1, 0, 0], [0, 4, 0], [-1, 0, 2]],
    # 3. (1,3) weak, symmetric: g1' = g1 - (-1/5)·g3' = (0.8, 0, 0.4), g3'' = g3' + g1 = (0, 0, 2).
    #    All pairs now have cos ≥ 0.
    [[0.8, 0, 0.4], [0, 4, 0], [0, 0, 2]],
]


def test_three_gradients_need_several_iterations():
    arbitrate = Recorder(lower_index_wins)
    resolved, res = resolve(CHAIN, THRESHOLDS, arbitrate=arbitrate)
    assert_rows(resolved, CHAIN_STEPS[-1])
    assert arbitrate.calls == [(0, 1), (1, 2)]
    assert decisions(res) == (3, counts(weak=1, main=2), [(0, 1), (1, 2)], False)
    assert_merge_weights_give_sum(CHAIN, resolved, res)


@pytest.mark.parametrize("max_iters", [1, 2, 3])
def test_max_iters_stops_the_sequence(max_iters: int):
    resolved, res = resolve(CHAIN, THRESHOLDS, arbitrate=lower_index_wins, max_iters=max_iters)
    assert_rows(resolved, CHAIN_STEPS[max_iters - 1])
    assert res.iterations == max_iters
    # With 3 iterations the last one resolves everything: the budget was enough.
    assert res.budget_exhausted == (max_iters < 3)


def test_zero_max_iters_changes_nothing():
    resolved, res = resolve(CHAIN, THRESHOLDS, max_iters=0)
    assert torch.equal(resolved, CHAIN)
    assert res.iterations == 0
    assert res.budget_exhausted  # conflicts were left unresolved


@pytest.mark.parametrize("k", [2, 3, 4])
def test_default_budget_is_twice_k(k: int):
    # Smooth mode barely moves a pair at cos = -0.1 (α ≈ 0.1π), so it never resolves within budget;
    # the extra gradients are orthogonal to the pair and to each other.
    gram = torch.eye(k, dtype=torch.float64)
    gram[0, 1] = gram[1, 0] = -0.1
    res = resolve_gram(gram, THRESHOLDS, mode="smooth", arbitrate=lower_index_wins)
    assert res.iterations == 2 * k
    assert res.budget_exhausted
    assert resolve_gram(gram, THRESHOLDS, mode="smooth", max_iters=11).iterations == 11


def test_single_gradient_is_left_alone():
    grads = stack((1, -2, 3))
    resolved, res = resolve(grads, THRESHOLDS)
    assert_resolution_is_identity(grads, resolved, res)


def test_resolve_keeps_shape_and_dtype():
    grads = torch.tensor([[[1.0, 0.0]], [[-3.0, 4.0]]])  # K=2, each gradient 1×2, float32
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=winner_is(0))
    assert resolved.shape == grads.shape
    assert resolved.dtype == torch.float32
    assert resolved.tolist() == [[[1.0, 0.0]], [[0.0, 4.0]]]
    assert res.transform.dtype == torch.float64


# ----------------------------------------------------------------------------- golden: smooth


@pytest.mark.parametrize(
    ("cosine", "power", "alpha"),
    [
        (1.0, 2.0, 0.0),
        (0.0, 2.0, 0.0),  # weak
        (-0.25, 2.0, PI / 4),  # half-way through the weak zone
        (-0.5, 2.0, PI / 2),  # main
        (-0.65, 2.0, PI / 2 + PI / 2 * 0.5**2),  # half-way between main and critical
        (-0.65, 1.0, PI / 2 + PI / 2 * 0.5),
        (-0.8, 2.0, PI),  # critical
        (-1.0, 2.0, PI),
    ],
)
def test_smooth_angle_key_values(cosine: float, power: float, alpha: float):
    assert smooth_angle(cosine, THRESHOLDS, power) == pytest.approx(alpha, abs=1e-12)


def test_smooth_angle_is_monotone_and_continuous():
    cosines = torch.linspace(-1, 1, 2001, dtype=torch.float64).tolist()
    angles = [smooth_angle(c, THRESHOLDS) for c in cosines]
    steps = [b - a for a, b in itertools.pairwise(angles)]
    assert all(s <= 0.0 for s in steps)
    assert max(-s for s in steps) < 0.02  # steepest slope: π/0.3 per unit of cosine


@pytest.mark.parametrize("winner", [0, 1])
def test_smooth_resolution_follows_the_formula(winner: int):
    # g1 = (1, 0), g2 = (-3, 4): cos = -0.6, t = (-0.6 + 0.5)/(-0.8 + 0.5) = 1/3,
    # α = π/2 + π/2·(1/3)² = 5π/9. With d = ⟨g_w, g_l⟩ = -3, simultaneously:
    # g_w' = g_w - sin(α)·d/‖g_l‖²·g_l,  g_l' = g_l - sin(π/2)·d/‖g_w‖²·g_w.
    grads = stack((1, 0), (-3, 4))
    alpha = 5 * PI / 9
    assert smooth_angle(-0.6, THRESHOLDS) == pytest.approx(alpha, abs=1e-12)
    w, lo = grads[winner], grads[1 - winner]
    d = float(w @ lo)
    expected = torch.empty_like(grads)
    expected[winner] = w - math.sin(alpha) * d / float(lo @ lo) * lo
    expected[1 - winner] = lo - 1.0 * d / float(w @ w) * w
    resolved, res = resolve(grads, THRESHOLDS, mode="smooth", arbitrate=winner_is(winner))
    assert_rows(resolved, expected.tolist())
    # After it, ⟨g_w', g_l'⟩ = 1.92·sin(α) > 0: one iteration.
    assert decisions(res) == (1, counts(main=1), [(winner, 1 - winner)], False)


def test_smooth_weak_zone_is_arbitrated_and_partial():
    # cos = -0.25: α = π/4 for both sides. Unit vectors g1 = (1, 0), g2 = (-1/4, √15/4), d = -1/4:
    # g_w' = g_w + sin(π/4)/4·g_l, g_l' = g_l + sin(π/4)/4·g_w.
    s = math.sqrt(15) / 4
    grads = stack((1, 0), (-0.25, s))
    arbitrate = Recorder(winner_is(1))
    resolved, res = resolve(grads, THRESHOLDS, mode="smooth", arbitrate=arbitrate, max_iters=1)
    k = math.sin(PI / 4) / 4
    assert_rows(resolved, [[1 - k / 4, k * s], [-0.25 + k, s]])
    assert arbitrate.calls == [(0, 1)]
    assert decisions(res) == (1, counts(weak=1), [(1, 0)], False)


def test_smooth_critical_projects_rather_than_zeroes():
    # cos = -12/13 ≤ critical: α = π, sin(α) = 0: the winner keeps its value, the loser is
    # projected (sin(min(π, π/2)) = 1): g2' = (-12, 5) - (-12/1)·(1, 0) = (0, 5).
    resolved, res = resolve(
        stack((1, 0), (-12, 5)), THRESHOLDS, mode="smooth", arbitrate=winner_is(0)
    )
    assert_rows(resolved, [[1.0, 0.0], [0.0, 5.0]])
    assert decisions(res) == (1, counts(critical=1), [(0, 1)], False)


# ----------------------------------------------------------------------------- golden: norm cap


def test_scale_prescales_rows():
    grads = stack((3, 4), (0, 2))
    resolved, res = resolve(grads, THRESHOLDS, scale=torch.tensor([0.2, 1.0], dtype=torch.float64))
    assert_rows(resolved, [[0.6, 0.8], [0.0, 2.0]])
    assert res.transform.tolist() == [[0.2, 0.0], [0.0, 1.0]]
    assert_merge_weights_give_sum(grads, resolved, res)


def test_scale_applies_before_resolution():
    # g1 = (10, 0) capped to (1, 0); g2 = (-3, 4): main conflict, g1 wins:
    # g2' = g2 - (-3/1)·(1, 0) = (0, 4) = g2 + 0.3·g1 (raw). Merge weights (0.1 + 0.3, 1).
    grads = stack((10, 0), (-3, 4))
    resolved, res = resolve(
        grads,
        THRESHOLDS,
        scale=torch.tensor([0.1, 1.0], dtype=torch.float64),
        arbitrate=winner_is(0),
    )
    assert_rows(resolved, [[1.0, 0.0], [0.0, 4.0]])
    assert res.merge_weights.tolist() == pytest.approx([0.4, 1.0], abs=1e-15)
    assert_merge_weights_give_sum(grads, resolved, res)


# ----------------------------------------------------------------------------- Gram helpers


def test_cosine_matrix_gives_zero_for_a_zero_vector():
    grads = stack((1, 0), (0, 0), (-1, 1))
    cos = cosine_matrix(grads @ grads.T)
    r = 1 / math.sqrt(2)
    assert_rows(cos, [[1, 0, -r], [0, 0, 0], [-r, 0, 1]], tol=1e-15)


def test_cosine_matrix_gives_zero_between_tiny_vectors():
    # Both norms 1e-9 < eps = 1e-8: the pair's cosine is 0, not -1.
    grads = stack((1e-9, 0), (-1e-9, 0))
    assert cosine_matrix(grads @ grads.T, eps=1e-8)[0, 1] == 0.0
    assert cosine_matrix(grads @ grads.T, eps=1e-10)[0, 1] == pytest.approx(-1.0, abs=1e-12)


def test_cosine_matrix_stays_in_range():
    grads = stack((0.1, 0.2, 0.3), (0.3, 0.6, 0.9), (-0.7, -1.4, -2.1))  # parallel, rounded
    cos = cosine_matrix(grads @ grads.T)
    assert float(cos.max()) <= 1.0
    assert float(cos.min()) >= -1.0
    assert float(cos[0, 2]) == pytest.approx(-1.0, abs=1e-15)


def test_most_conflicting_pair_skips_tiny_norms():
    # (1,2) is exactly opposed, but ‖g2‖ = 1e-9 < eps = 1e-8: skipped, (1,3) is the lowest left.
    grads = stack((1, 0), (-1e-9, 0), (-1, 2))
    gram = grads @ grads.T
    i, j, c = most_conflicting_pair(gram, eps=1e-8)
    assert (i, j) == (0, 2)
    assert c == pytest.approx(-1 / math.sqrt(5), abs=1e-15)
    assert most_conflicting_pair(gram, eps=1e-10)[:2] == (0, 1)
    assert most_conflicting_pair(gram[:2, :2], eps=1e-8) is None


def test_tiny_gradient_is_never_resolved():
    # g2 is exactly opposed to g1 but its norm is below eps: no conflict is counted.
    grads = stack((1, 0), (-1e-9, 0), (0, 1))
    resolved, res = resolve(grads, THRESHOLDS)
    assert_resolution_is_identity(grads, resolved, res)


def test_most_conflicting_pair_breaks_ties_in_listed_order():
    # cos(g1, g2) = cos(g2, g3) = -0.6 exactly: the first pair in (i, j) order is taken.
    gram = stack((1, -0.6, 0), (-0.6, 1, -0.6), (0, -0.6, 1))
    assert most_conflicting_pair(gram, eps=1e-8) == (0, 1, -0.6)
    assert most_conflicting_pair(gram[[2, 1, 0]][:, [2, 1, 0]], eps=1e-8) == (0, 1, -0.6)


# ----------------------------------------------------------------------------- golden: conflicts


def test_harmful_only_leaves_a_conflict_the_sum_survives_alone():
    # The weak-zone stack above: g1 = (2, 0), g2 = (-1, 2), cos ≈ -0.447. Its plain sum (1, 2)
    # harms neither loss: ⟨g1, g1+g2⟩ = 4 - 2 = 2 ≥ 0, ⟨g2, g1+g2⟩ = -2 + 5 = 3 ≥ 0.
    grads = stack((2, 0), (-1, 2))
    resolved, res = resolve(grads, THRESHOLDS, conflicts="harmful", arbitrate=Recorder())
    assert_rows(resolved, [[2.0, 0.0], [-1.0, 2.0]])
    assert decisions(res) == (0, counts(), [], False)
    assert res.harmless
    _, every = resolve(grads, THRESHOLDS)
    assert every.iterations == 1 and not every.harmless  # "all" projects it


def test_harmful_only_resolves_a_conflict_the_sum_would_lose_a_loss_to():
    # g1 = (1, 0), g2 = (-4, 8): cos = -4/√80 ≈ -0.447, weak, but ⟨g1, g1+g2⟩ = 1 - 4 = -3 < 0:
    # the sum would increase loss 1. Resolved as always, both projected:
    # g1' = g1 - (-4/80)·g2 = (0.8, 0.4), g2' = g2 - (-4/1)·g1 = (0, 8).
    grads = stack((1, 0), (-4, 8))
    resolved, res = resolve(grads, THRESHOLDS, conflicts="harmful")
    assert_rows(resolved, [[0.8, 0.4], [0.0, 8.0]])
    assert decisions(res) == (1, counts(weak=1), [], False)
    assert not res.harmless
    assert torch.equal(res.transform, resolve(grads, THRESHOLDS)[1].transform)


def test_harmful_only_stops_once_the_merge_harms_no_loss():
    # g1 = (1,0,0), g2 = (-3,4,0), g3 = (0,-1,3). The sum (-2,3,3) harms loss 1 (⟨g1,·⟩ = -2).
    # 1. lowest cos is (1,2) at -0.6, main; g1 wins: g2' = (0,4,0). The merge (1,3,3) now harms
    #    nothing (⟨g1,·⟩ = 1, ⟨g2,·⟩ = -3+12 = 9, ⟨g3,·⟩ = -3+9 = 6): stop, though g2' and g3
    #    still conflict weakly (cos = -4/(4·√10) ≈ -0.32), which "all" goes on to project:
    #    g2'' = g2' + 0.4·g3 = (0, 3.6, 1.2), g3' = g3 + 0.25·g2' = (0, 0, 3).
    grads = stack((1, 0, 0), (-3, 4, 0), (0, -1, 3))
    resolved, res = resolve(grads, THRESHOLDS, conflicts="harmful", arbitrate=lower_index_wins)
    assert_rows(resolved, [[1, 0, 0], [0, 4, 0], [0, -1, 3]])
    assert decisions(res) == (1, counts(main=1), [(0, 1)], False)
    assert not res.harmless  # something was resolved
    every, res_all = resolve(grads, THRESHOLDS, arbitrate=lower_index_wins)
    assert_rows(every, [[1, 0, 0], [0, 3.6, 1.2], [0, 0, 3]])
    assert decisions(res_all) == (2, counts(weak=1, main=1), [(0, 1)], False)


def test_harms_a_loss_reads_the_first_order_change_of_each_loss():
    gram = stack((1, -2), (-2, 9))  # ‖g1‖ = 1, ‖g2‖ = 3, cos = -2/3
    assert harms_a_loss(gram, torch.tensor([1.0, 1.0]))  # ⟨g1, g1+g2⟩ = 1 - 2 < 0
    assert not harms_a_loss(gram, torch.tensor([2.0, 1.0]))  # 2 - 2 = 0 (the boundary), 5
    assert harms_a_loss(gram, torch.tensor([1.5, 1.0]))  # 1.5 - 2 < 0, -3 + 9
    assert not harms_a_loss(stack((1, 0), (0, 0)), torch.tensor([1.0, 1.0]))  # a vanished g2


def test_conflicts_must_be_a_known_rule():
    with pytest.raises(
        ValueError, match="conflicts must be 'all', 'harmful' or 'significant', got 'some'"
    ):
        resolve_gram(stack((1, 0), (0, 1)), THRESHOLDS, conflicts="some")


# ----------------------------------------------------------------------------- properties


@property_settings
@given(case=cases())
def test_no_conflict_survives_unless_budget_exhausted(case: tuple[str, torch.Tensor]):
    mode, grads = case
    resolved, res = resolve(grads, THRESHOLDS, mode=mode)
    assert_no_conflict_left(resolved, res)
    if res.budget_exhausted:
        assert res.iterations == 2 * grads.shape[0]


@property_settings
@given(case=cases())
def test_harmful_only_is_a_prefix_of_resolving_all(case: tuple[str, torch.Tensor]):
    # "harmful" takes the same decisions as "all", in the same order, and stops at the first
    # point where the merge harms no loss; it stops earlier only there.
    mode, grads = case
    _, res = resolve(grads, THRESHOLDS, mode=mode, conflicts="harmful")
    _, prefix = resolve(grads, THRESHOLDS, mode=mode, max_iters=res.iterations)
    assert torch.equal(res.transform, prefix.transform)
    assert res.arbitrations == prefix.arbitrations
    _, every = resolve(grads, THRESHOLDS, mode=mode)
    gram = grads.to(torch.float64) @ grads.to(torch.float64).T
    if res.iterations < every.iterations:
        assert not harms_a_loss(gram, res.merge_weights)


@property_settings
@given(case=cases())
def test_merge_weights_give_the_sum_of_resolved(case: tuple[str, torch.Tensor]):
    mode, grads = case
    resolved, res = resolve(grads, THRESHOLDS, mode=mode)
    assert_merge_weights_give_sum(grads, resolved, res)


@property_settings
@given(case=paired_stacks(CRITICAL + 0.01, MAIN - 0.01))
def test_main_conflict_keeps_winner_and_projects_loser(case: tuple[torch.Tensor, list[int]]):
    grads, winners = case
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=lambda i, j: winners[i // 2])
    assert res.zone_counts == counts(main=len(winners))
    assert sorted(res.arbitrations) == [(w, w ^ 1) for w in winners]
    for w in winners:
        loser = w ^ 1
        assert torch.equal(resolved[w], grads[w])
        g_w, g_l = grads[w], grads[loser]
        expected = g_l - (g_l @ g_w) / (g_w @ g_w) * g_w
        torch.testing.assert_close(resolved[loser], expected, rtol=1e-12, atol=1e-12)
        assert abs(float(resolved[loser] @ g_w)) <= 1e-12 * float(g_w @ g_w + g_l @ g_l)


@property_settings
@given(case=paired_stacks(-1.0, CRITICAL - 0.01))
def test_critical_conflict_zeroes_loser(case: tuple[torch.Tensor, list[int]]):
    grads, winners = case
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=lambda i, j: winners[i // 2])
    assert res.zone_counts == counts(critical=len(winners))
    for w in winners:
        assert torch.equal(resolved[w], grads[w])
        assert torch.equal(resolved[w ^ 1], torch.zeros_like(grads[w]))


@property_settings
@given(case=paired_stacks(MAIN + 0.01, WEAK - 0.01))
def test_weak_conflict_is_symmetric(case: tuple[torch.Tensor, list[int]]):
    grads, _ = case
    arbitrate = Recorder()
    resolved, res = resolve(grads, THRESHOLDS, arbitrate=arbitrate)
    assert arbitrate.calls == []
    assert res.zone_counts == counts(weak=grads.shape[0] // 2)
    for a in range(0, grads.shape[0], 2):
        g_a, g_b = grads[a], grads[a + 1]
        d = g_a @ g_b
        torch.testing.assert_close(resolved[a], g_a - d / (g_b @ g_b) * g_b)
        torch.testing.assert_close(resolved[a + 1], g_b - d / (g_a @ g_a) * g_a)


@property_settings
@given(grads=gradient_stacks(), mode=st.sampled_from(["zones", "smooth"]))
def test_no_conflict_means_no_change(grads: torch.Tensor, mode: str):
    grads = grads.abs()  # non-negative entries: every cosine ≥ 0 = weak
    arbitrate = Recorder()
    resolved, res = resolve(grads, THRESHOLDS, mode=mode, arbitrate=arbitrate)
    assert_resolution_is_identity(grads, resolved, res)
    assert arbitrate.calls == []
    assert torch.equal(res.merge_weights, torch.ones(grads.shape[0], dtype=torch.float64))


@property_settings
@given(case=cases(well_conditioned=True), factor=st.sampled_from([1e-3, 0.37, 7.0, 1e4]))
def test_decisions_do_not_depend_on_scale(case: tuple[str, torch.Tensor], factor: float):
    mode, grads = case
    resolved, res = resolve(grads, THRESHOLDS, mode=mode)
    scaled, res_scaled = resolve(factor * grads, THRESHOLDS, mode=mode)
    assert decisions(res_scaled) == decisions(res)
    # Rounding differs between scales; chains of near-opposed rows amplify it to ~1e-9.
    torch.testing.assert_close(res_scaled.transform, res.transform, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        scaled, factor * resolved, rtol=1e-7, atol=1e-7 * factor * float(grads.abs().max())
    )


@property_settings
@given(case=cases(well_conditioned=True), data=st.data())
def test_permuting_tasks_permutes_the_result(case: tuple[str, torch.Tensor], data: st.DataObject):
    mode, grads = case
    # The default arbitrator (larger gradient wins) is permutation-consistent with distinct norms.
    norms = sorted(grads.norm(dim=1).tolist())
    assume(all(b > a * (1 + 1e-6) for a, b in itertools.pairwise(norms)))
    k = grads.shape[0]
    perm = data.draw(st.permutations(range(k)))
    resolved, res = resolve(grads, THRESHOLDS, mode=mode)
    permuted, res_p = resolve(grads[perm], THRESHOLDS, mode=mode)
    torch.testing.assert_close(
        permuted, resolved[perm], rtol=1e-7, atol=1e-7 * float(grads.abs().max())
    )
    assert res_p.zone_counts == res.zone_counts
    assert res_p.iterations == res.iterations
    assert [(perm[w], perm[lo]) for w, lo in res_p.arbitrations] == res.arbitrations


@property_settings
@given(
    grads=gradient_stacks(),
    mode=st.sampled_from(["zones", "smooth"]),
    exponents=st.lists(st.integers(-20, 20), min_size=4, max_size=4),
)
def test_finite_at_extreme_scales(grads: torch.Tensor, mode: str, exponents: list[int]):
    k = grads.shape[0]
    magnitudes = (10.0 ** torch.tensor(exponents[:k], dtype=torch.float64)).unsqueeze(1)
    grads = grads * magnitudes
    resolved, res = resolve(grads, THRESHOLDS, mode=mode)
    assert torch.isfinite(resolved).all()
    assert torch.isfinite(res.transform).all()
    assert torch.isfinite(res.merge_weights @ grads).all()


# ----------------------------------------------------------------------------- vanished gradients
# resolve_gram reads norms from T @ gram @ T.T, which after a projection that cancels a gradient
# carries an absolute error of ~1e-8·‖G‖; such a gradient must not be "resolved" again.


def test_a_vanished_loser_is_not_resolved_again():
    # g2 = -0.3·g1: cos = -1, critical. Smooth mode (α = π) projects the loser g2 onto g1's normal
    # plane, which leaves ‖g2'‖ ≈ 2.5e-16 < eps: nothing is left to resolve after one iteration.
    # The library counts three more (phantom, weak) conflicts, arbitrates them and reports the
    # budget exhausted; at 1e-3 scale it stops after one.
    g1 = torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64)
    grads = torch.stack([g1, -0.3 * g1])
    resolved, res = resolve(grads, THRESHOLDS, mode="smooth")
    assert float(resolved[1].norm()) < 1e-8
    assert decisions(res) == (1, counts(critical=1), [(0, 1)], False)


def test_no_pair_is_resolved_once_a_gradient_has_vanished():
    # K = 4 > P = 2, smooth: g2 loses critical conflicts to g3 and g4 in turn and shrinks
    # geometrically. After 7 iterations ‖g2‖ = 4.0e-9 < eps (the Gram-space estimate says
    # 1.1e-8); the 8th iteration still pairs it with g4, divides by its garbage ‖g2‖² (transform
    # entries reach 1e8) and moves the winner g4 from (1.20, 3.52) to (1.02, 3.08), by 13 %.
    grads = stack(
        (1.274493913285944, 0.24729589921706369),
        (-1.0586539012474427, 0.2816075049248646),
        (3.7931820709780935, -1.5318743121175151),
        (1.1998066781132706, 3.5244651426355893),
    )
    eps = 1e-8
    _, full = resolve(grads, THRESHOLDS, mode="smooth", eps=eps)
    for step, (winner, loser) in enumerate(full.arbitrations):  # smooth: one per iteration
        before, _ = resolve(grads, THRESHOLDS, mode="smooth", eps=eps, max_iters=step)
        norms = before.norm(dim=1)
        assert min(float(norms[winner]), float(norms[loser])) >= eps, (step, norms.tolist())
