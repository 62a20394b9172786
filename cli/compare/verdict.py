"""Is a difference between two methods real? Paired differences over seeds, a 95 % interval.

Runs of one seed share their data stream, masks and initial weights, so a method and the
baseline are compared seed by seed: d_s = metric(method, s) − metric(baseline, s). The verdict is
the mean of d_s with Student's t interval (n − 1 degrees of freedom), and a label:

* ``better`` / ``worse``: the interval excludes 0, on the side the metric prefers / the other;
* ``within noise``: the interval contains 0 (no difference these seeds can show);
* ``too few seeds``: one seed has no spread to judge by.

Nothing here imports torch: the comparison's numbers are plain floats.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

CONFIDENCE = 0.95
BETTER, WORSE, NOISE, TOO_FEW = "better", "worse", "within noise", "too few seeds"


@dataclass(frozen=True)
class Verdict:
    """The paired difference method − baseline on one metric."""

    mean: float
    low: float | None  # the 95 % interval; None with one seed
    high: float | None
    seeds: int
    label: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student's t quantile (scipy's, as installed with scikit-image)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def paired_verdict(
    method: Mapping[Any, float], baseline: Mapping[Any, float], better: str
) -> Verdict | None:
    """The verdict over the seeds both have a finite value for (None if they share none).

    ``better`` is "max" or "min": which way the metric improves.
    """
    seeds = [
        s
        for s in method
        if s in baseline and math.isfinite(method[s]) and math.isfinite(baseline[s])
    ]
    if not seeds:
        return None
    diffs = [method[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return Verdict(mean, None, None, 1, TOO_FEW)
    half = t_quantile(CONFIDENCE, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    if low <= 0 <= high:
        return Verdict(mean, low, high, len(diffs), NOISE)
    improved = (low > 0) == (better == "max")
    return Verdict(mean, low, high, len(diffs), BETTER if improved else WORSE)


def format_difference(verdict: Verdict, fmt: str = "{:+.4f}") -> str:
    """``+0.0001 (95 % CI −0.0040 … +0.0040)``, or the mean alone with one seed."""
    text = fmt.format(verdict.mean)
    if verdict.low is None or verdict.high is None:
        return text
    return f"{text} (95 % CI {fmt.format(verdict.low)} … {fmt.format(verdict.high)})"


def sentence(
    name: str,
    baseline: str,
    metric: str,
    verdict: Verdict,
    fmt: str,
    conflict_share: float | None,
) -> str:
    """One line a user can quote, e.g. "conductor vs sum: SSIM +0.0001 (95 % CI −0.0040 …
    +0.0040), within noise, 3 seeds; losses conflicted on 4 % of steps"."""
    seeds = f"{verdict.seeds} seed" + ("s" if verdict.seeds != 1 else "")
    label = verdict.label if verdict.label != TOO_FEW else "too few seeds to tell (use --seeds 3)"
    text = f"{name} vs {baseline}: {metric} {format_difference(verdict, fmt)}, {label}, {seeds}"
    if conflict_share is not None:
        text += f"; losses conflicted on {conflict_share:.0%} of steps"
    return text
