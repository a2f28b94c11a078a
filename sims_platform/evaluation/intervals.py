"""Across-seed summaries: the mean of per-seed values with a t-distribution confidence interval (benchmarks)."""

from __future__ import annotations

import math
import statistics

from scipy import stats as sps


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its two-sided t interval (n - 1 degrees of freedom).

    The bounds are NaN for fewer than 2 values: one seed says nothing about the spread between seeds.
    """
    if not values:
        raise ValueError("confidence_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = sps.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def excludes_zero(low: float, high: float) -> bool:
    """Whether an interval lies wholly on one side of 0 (NaN bounds never do)."""
    return math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0)
