"""Across-seed confidence intervals used by the benchmarks' verdicts."""

import math

import pytest
from scipy import stats as sps

from sims_platform.evaluation.intervals import confidence_interval, excludes_zero


def test_t_interval_matches_the_textbook_formula():
    # Five per-seed gaps: mean 1.0, sd sqrt(2.5); the 95% half-width is t(0.975, 4) * sd / sqrt(5).
    values = [-1.0, 0.0, 1.0, 2.0, 3.0]
    mean, low, high = confidence_interval(values)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == pytest.approx(1.0)
    assert (low, high) == pytest.approx((1.0 - half, 1.0 + half), rel=1e-12)
    ref = sps.t.interval(0.95, 4, loc=1.0, scale=sps.sem(values))
    assert (low, high) == pytest.approx(ref, rel=1e-12)


def test_interval_widens_with_the_level_and_one_seed_has_no_interval():
    _, lo95, hi95 = confidence_interval([0.5, 1.5, 2.5])
    _, lo99, hi99 = confidence_interval([0.5, 1.5, 2.5], level=0.99)
    assert lo99 < lo95 < hi95 < hi99
    mean, low, high = confidence_interval([4.2])
    assert mean == 4.2 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="at least one value"):
        confidence_interval([])


def test_excludes_zero_only_for_one_sided_finite_intervals():
    assert excludes_zero(0.1, 2.0) and excludes_zero(-3.0, -0.5)
    assert not excludes_zero(-0.1, 2.0)
    assert not excludes_zero(float("nan"), float("nan"))
