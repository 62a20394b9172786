"""The verdict: paired differences over seeds, Student's t interval, and its label."""

import math

import pytest

from gcond_cli.compare.verdict import (
    BETTER,
    NOISE,
    TOO_FEW,
    WORSE,
    format_difference,
    paired_verdict,
    sentence,
    t_quantile,
)


def test_t_quantiles_are_students():
    # Tabulated two-sided 95 % values.
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)


def test_a_consistent_improvement_is_better():
    # Differences 0.010, 0.012, 0.014: mean 0.012, sd 0.002, half-width 4.3027 · 0.002 / √3.
    method = {"0": 0.510, "1": 0.612, "2": 0.714}
    baseline = {"0": 0.5, "1": 0.6, "2": 0.7}
    verdict = paired_verdict(method, baseline, "max")
    half = 4.302652729749462 * 0.002 / math.sqrt(3)
    assert verdict.mean == pytest.approx(0.012)
    assert verdict.low == pytest.approx(0.012 - half)
    assert verdict.high == pytest.approx(0.012 + half)
    assert (verdict.seeds, verdict.label) == (3, BETTER)
    # The same numbers on a metric where lower is better are a loss.
    assert paired_verdict(method, baseline, "min").label == WORSE


def test_a_consistent_loss_is_worse():
    # Differences -0.10, -0.11 with two seeds: half-width 12.706 · 0.00707 / √2 = 0.0635.
    verdict = paired_verdict({"0": 0.10, "1": 0.20}, {"0": 0.20, "1": 0.31}, "max")
    assert verdict.high == pytest.approx(-0.105 + 12.7062 * 0.005, abs=1e-4)
    assert verdict.high < 0 and verdict.label == WORSE


def test_differences_of_both_signs_are_within_noise():
    # Pairing matters: the seeds differ far more than the methods, and the methods' differences
    # (+0.01, -0.01, +0.005) straddle 0.
    verdict = paired_verdict(
        {"0": 0.31, "1": 0.49, "2": 0.705}, {"0": 0.30, "1": 0.50, "2": 0.70}, "max"
    )
    assert verdict.label == NOISE
    assert verdict.low < 0 < verdict.high


def test_identical_results_are_within_noise_with_a_zero_width_interval():
    verdict = paired_verdict({"0": 0.3, "1": 0.4}, {"0": 0.3, "1": 0.4}, "max")
    assert (verdict.mean, verdict.low, verdict.high, verdict.label) == (0.0, 0.0, 0.0, NOISE)


def test_one_seed_says_too_few_and_only_shared_finite_seeds_count():
    verdict = paired_verdict({"0": 0.4}, {"0": 0.3}, "max")
    assert verdict.label == TOO_FEW and verdict.low is None and verdict.seeds == 1
    assert verdict.mean == pytest.approx(0.1)
    # Seed 1 has no baseline, seed 2 is NaN: one pair is left.
    verdict = paired_verdict({"0": 0.4, "1": 0.5, "2": math.nan}, {"0": 0.3, "2": 0.1}, "max")
    assert verdict.seeds == 1
    assert paired_verdict({"1": 0.5}, {"0": 0.3}, "max") is None


def test_the_sentence_a_user_can_quote():
    verdict = paired_verdict(
        {"0": 0.3601, "1": 0.3650, "2": 0.3560}, {"0": 0.3600, "1": 0.3648, "2": 0.3560}, "max"
    )
    line = sentence("conductor", "sum", "SSIM", verdict, "{:+.4f}", 0.04)
    assert line == (
        f"conductor vs sum: SSIM {format_difference(verdict)}, within noise, 3 seeds; "
        "losses conflicted on 4% of steps"
    )
    assert format_difference(verdict).startswith("+0.0001 (95 % CI -0.")
    single = paired_verdict({"0": 0.4}, {"0": 0.3}, "max")
    assert sentence("pcgrad", "sum", "SSIM", single, "{:+.4f}", None) == (
        "pcgrad vs sum: SSIM +0.1000, too few seeds to tell (use --seeds 3), 1 seed"
    )
