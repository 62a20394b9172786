"""The arbitrator (docs/algorithm.md, steps 3 and 6): norm EMAs, stability and strength scores, the
dominance rule, ties, history and state."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcond import Arbitrator


def arbitrator(num_losses: int = 2, dominance_window: int = 0, **kwargs: Any) -> Arbitrator:
    """Dominance off by default: most tests look at the scores alone."""
    return Arbitrator(num_losses, dominance_window=dominance_window, **kwargs)


def favour(arb: Arbitrator, k: int) -> None:
    """A step where loss k's gradient kept its direction and the other ones turned around."""
    cosines = [0.9 if i == k else -0.5 for i in range(arb.num_losses)]
    arb.observe([1.0] * arb.num_losses, cosines)


# ----------------------------------------------------------------------------- norm EMA


def test_norm_ema_starts_at_first_norm_then_follows_the_ema():
    arb = arbitrator(norm_ema_beta=0.75)  # β and 1 − β exact in binary
    arb.observe([2.0, 8.0], None)
    assert arb.norm_ema == [2.0, 8.0]
    arb.observe([6.0, 4.0], [0.0, 0.0])
    assert arb.norm_ema == [0.75 * 2.0 + 0.25 * 6.0, 0.75 * 8.0 + 0.25 * 4.0]  # [3.0, 7.0]
    arb.observe([3.0, 11.0], [0.0, 0.0])
    assert arb.norm_ema == [3.0, 0.75 * 7.0 + 0.25 * 11.0]  # [3.0, 8.0]


def test_norm_ema_default_beta():
    arb = arbitrator()
    arb.observe([1.0, 1.0], None)
    arb.observe([3.0, 1.0], None)
    assert arb.norm_ema == [pytest.approx(0.95 + 0.05 * 3.0, abs=1e-15), 1.0]


# ----------------------------------------------------------------------------- scores


def test_score_is_stability_plus_relative_strength():
    arb = arbitrator(tie_breaking_weights=(0.5, 0.25), norm_ema_beta=0.5)
    arb.observe([2.0, 2.0], None)  # EMAs 2, 2
    arb.observe([6.0, 2.0], [0.5, -0.5])  # EMAs 4, 2: strengths s = 6/4 = 1.5 and 2/2 = 1
    # score_k = 0.5·max(0, cos_k) + 0.25·s_k/(s_0 + s_1)
    assert arb.score(0, 1) == pytest.approx(0.5 * 0.5 + 0.25 * 1.5 / 2.5, abs=1e-15)
    assert arb.score(1, 0) == pytest.approx(0.5 * 0.0 + 0.25 * 1.0 / 2.5, abs=1e-15)


def test_first_step_has_no_stability():
    arb = arbitrator(tie_breaking_weights=(1.0, 0.0))
    arb.observe([1.0, 5.0], None)
    assert arb.score(0, 1) == arb.score(1, 0) == 0.0


def test_stability_beats_strength_when_its_weight_dominates():
    # Loss 1 jumps to 3× its EMA (strong), loss 0 keeps its direction (stable).
    arb = arbitrator()  # weights (0.8, 0.2)
    arb.observe([1.0, 1.0], None)
    arb.observe([1.0, 3.0], [0.9, 0.1])
    assert arb.pick(0, 1) == (0, False)
    # The same step with the strength weight dominating: loss 1 wins.
    arb = arbitrator(tie_breaking_weights=(0.1, 0.9))
    arb.observe([1.0, 1.0], None)
    arb.observe([1.0, 3.0], [0.9, 0.1])
    assert arb.pick(0, 1) == (1, False)


def test_strength_is_relative_to_the_losses_own_ema():
    # Equal stability. Loss 0 is 10× larger in absolute terms but steady; loss 1 doubles.
    arb = arbitrator()
    arb.observe([10.0, 1.0], None)
    arb.observe([10.0, 2.0], [0.5, 0.5])
    assert arb.pick(0, 1) == (1, False)
    assert arb.pick(1, 0) == (1, False)


def test_negative_previous_cosine_counts_as_zero_stability():
    arb = arbitrator(tie_breaking_weights=(1.0, 1.0))
    arb.observe([1.0, 1.0], None)
    arb.observe([1.0, 1.0], [-0.9, 0.0])
    assert arb.score(0, 1) == arb.score(1, 0) == 0.5
    assert arb.pick(0, 1) == (0, False)  # a tie, not a loss for the turned-around gradient
    arb.observe([1.0, 1.0], [-0.9, 0.1])
    assert arb.pick(0, 1) == (1, False)


def test_non_finite_previous_cosine_counts_as_zero_stability():
    arb = arbitrator(tie_breaking_weights=(1.0, 0.0))
    arb.observe([1.0, 1.0], [float("nan"), float("inf")])
    assert arb.score(0, 1) == arb.score(1, 0) == 0.0


def test_only_the_pair_counts_toward_strength():
    # Three losses; the strength share of loss 0 against 1 ignores loss 2.
    arb = arbitrator(3, tie_breaking_weights=(0.0, 1.0), norm_ema_beta=0.5)
    arb.observe([1.0, 1.0, 1.0], None)
    arb.observe([3.0, 1.0, 100.0], None)  # strengths 3/2, 1, 100/50.5
    assert arb.score(0, 1) == pytest.approx(1.5 / 2.5, abs=1e-15)
    assert arb.pick(0, 1) == (0, False)
    assert arb.pick(1, 2) == (2, False)


# ----------------------------------------------------------------------------- ties


def test_exact_tie_goes_to_the_loss_listed_first():
    arb = arbitrator(3)
    assert arb.pick(0, 1) == (0, False)  # nothing observed: all scores equal
    assert arb.pick(1, 2) == (1, False)
    assert arb.pick(2, 1) == (1, False)  # the order of the arguments does not matter
    arb.observe([2.0, 2.0, 2.0], [0.3, 0.3, 0.3])
    assert arb.pick(0, 2) == (0, False)
    assert arb.pick(2, 0) == (0, False)


# ----------------------------------------------------------------------------- dominance


def test_dominance_after_window_consecutive_wins():
    arb = arbitrator(dominance_window=3)
    favour(arb, 0)
    assert [arb.pick(0, 1) for _ in range(3)] == [(0, False)] * 3
    favour(arb, 1)  # the scores now favour loss 1 ...
    assert arb.pick(0, 1) == (0, True)  # ... but loss 0 won the last 3
    assert arb.pick(1, 0) == (0, True)


def test_no_dominance_before_the_window_fills():
    arb = arbitrator(dominance_window=3)
    favour(arb, 0)
    assert [arb.pick(0, 1) for _ in range(2)] == [(0, False)] * 2
    favour(arb, 1)
    assert arb.pick(0, 1) == (1, False)


def test_a_different_winner_breaks_the_streak():
    arb = arbitrator(3, dominance_window=2)
    favour(arb, 0)
    assert arb.pick(0, 1) == (0, False)
    assert arb.pick(0, 2) == (0, False)  # loss 0 won the last two: it dominates
    favour(arb, 1)
    assert arb.pick(1, 2) == (1, False)  # 0 is not in the pair: scores decide, 1 wins
    assert arb.pick(0, 1) == (1, False)  # last two winners 0, 1: no dominance
    favour(arb, 0)
    assert arb.pick(0, 1) == (1, True)  # now loss 1 won the last two


def test_window_zero_disables_dominance():
    arb = arbitrator(dominance_window=0)
    favour(arb, 0)
    for _ in range(10):
        assert arb.pick(0, 1) == (0, False)
    assert arb.dominant() is None
    favour(arb, 1)
    assert arb.pick(0, 1) == (1, False)


def test_window_one_follows_the_last_winner():
    arb = arbitrator(dominance_window=1)
    favour(arb, 1)
    assert arb.pick(0, 1) == (1, False)
    favour(arb, 0)
    assert arb.pick(0, 1) == (1, True)


def test_every_pick_records_its_winner():
    arb = arbitrator(3, dominance_window=5)
    favour(arb, 2)
    winners = []
    for i, j in [(0, 1), (1, 2), (0, 2), (0, 1)]:
        winner, _ = arb.pick(i, j)
        winners.append(winner)
        assert arb.history[-1] == winner
    assert winners == [0, 2, 2, 0]
    assert list(arb.history) == winners


def test_sticky_dominance_never_lets_go_while_conflicts_go_on():
    # The original rule: outright wins extend the streak, so once loss 0 has won 3 in a row it
    # wins every later arbitration whatever the scores say.
    arb = arbitrator(dominance_window=3, dominance_rule="sticky")
    favour(arb, 0)
    assert [arb.pick(0, 1) for _ in range(3)] == [(0, False)] * 3
    favour(arb, 1)
    assert [arb.pick(0, 1) for _ in range(20)] == [(0, True)] * 20


def test_bounded_dominance_gives_a_streak_window_outright_wins_then_the_scores_decide():
    arb = arbitrator(dominance_window=3, dominance_rule="bounded")
    favour(arb, 0)
    assert [arb.pick(0, 1) for _ in range(3)] == [(0, False)] * 3
    favour(arb, 1)  # the scores now favour loss 1
    assert [arb.pick(0, 1) for _ in range(3)] == [(0, True)] * 3
    assert arb.pick(0, 1) == (1, False)  # the streak has had its 3 outright wins
    assert list(arb.history) == [1]
    # A new streak is earned on score: that win and 2 more, then 3 outright wins.
    assert [arb.pick(0, 1) for _ in range(2)] == [(1, False)] * 2
    favour(arb, 0)
    assert [arb.pick(0, 1) for _ in range(4)] == [(1, True)] * 3 + [(0, False)]


def test_bounded_dominance_streak_restarts_after_a_score_decision():
    # An outright win, then a pair without the dominant loss (scores decide): the count of
    # outright wins in a row restarts.
    arb = arbitrator(3, dominance_window=2, dominance_rule="bounded")
    favour(arb, 0)
    assert [arb.pick(0, 1), arb.pick(0, 2)] == [(0, False)] * 2
    assert arb.pick(0, 1) == (0, True)
    assert arb.outright == 1
    favour(arb, 2)
    assert arb.pick(1, 2) == (2, False) and arb.outright == 0


def test_bounded_state_keeps_the_count_of_outright_wins():
    arb = arbitrator(dominance_window=1, dominance_rule="bounded")
    favour(arb, 0)
    assert [arb.pick(0, 1), arb.pick(0, 1)] == [(0, False), (0, True)]
    restored = arbitrator(dominance_window=1, dominance_rule="bounded")
    restored.load_state_dict(arb.state_dict())
    restored.observe([1.0, 1.0], [0.9, -0.5])
    # The streak has had its one outright win: the scores decide the next pick, in both.
    assert restored.pick(0, 1) == arb.pick(0, 1) == (0, False)
    # A state of the sticky rule (no count) loads with the count at 0.
    sticky = Arbitrator(2, dominance_window=1, dominance_rule="sticky").state_dict()
    assert "outright" not in sticky
    restored.load_state_dict(sticky)
    assert restored.outright == 0


def test_dominance_rule_is_checked():
    with pytest.raises(ValueError, match="dominance_rule"):
        arbitrator(dominance_rule="loose")


# ----------------------------------------------------------------------------- state


def run_steps(
    arb: Arbitrator, steps: list[tuple[list[float], list[float] | None]]
) -> list[tuple[int, bool]]:
    decisions: list[tuple[int, bool]] = []
    for norms, cosines in steps:
        arb.observe(norms, cosines)
        decisions += [arb.pick(i, j) for i, j in [(0, 1), (1, 2), (0, 2)]]
    return decisions


step_lists = st.lists(
    st.tuples(
        st.lists(st.floats(0.01, 100.0), min_size=3, max_size=3),
        st.none() | st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3),
    ),
    min_size=0,
    max_size=5,
)


@settings(max_examples=40, deadline=None)
@given(
    before=step_lists,
    after=step_lists,
    window=st.integers(0, 3),
    through_file=st.booleans(),
)
@pytest.mark.parametrize("rule", ["sticky", "bounded"])
def test_state_round_trip_preserves_decisions(
    before, after, window: int, through_file: bool, rule: str
):
    kwargs = {"dominance_window": window, "norm_ema_beta": 0.9, "dominance_rule": rule}
    original = Arbitrator(3, **kwargs)
    run_steps(original, before)
    state = original.state_dict()
    if through_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    restored = Arbitrator(3, **kwargs)
    restored.load_state_dict(state)
    assert restored.norm_ema == original.norm_ema
    assert list(restored.history) == list(original.history)
    assert restored.outright == original.outright
    assert run_steps(restored, after) == run_steps(original, after)
    assert restored.norm_ema == original.norm_ema


def test_state_keeps_an_uninitialised_ema_uninitialised():
    arb = Arbitrator(2)
    restored = Arbitrator(2)
    restored.load_state_dict(arb.state_dict())
    assert restored.norm_ema == [None, None]
    restored.observe([4.0, 2.0], None)
    assert restored.norm_ema == [4.0, 2.0]  # the first norm, not β·0 + (1 − β)·norm


def test_state_is_tensors_only():
    arb = Arbitrator(2)
    favour(arb, 0)
    arb.pick(0, 1)
    assert all(isinstance(v, torch.Tensor) for v in arb.state_dict().values())


def test_repr_shows_every_constructor_argument():
    arb = Arbitrator(
        3, dominance_window=5, tie_breaking_weights=(0.6, 0.4), norm_ema_beta=0.9, eps=1e-6
    )
    assert repr(arb) == (
        "Arbitrator(num_losses=3, dominance_window=5, tie_breaking_weights=(0.6, 0.4), "
        "norm_ema_beta=0.9, eps=1e-06, dominance_rule='bounded')"
    )
