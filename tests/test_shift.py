"""Distribution shifting: the selection math on a known histogram, and the reweighted reference against a direct
computation."""

from __future__ import annotations

import pytest
import torch

from sims_platform.metrics import FeatureStats
from sims_platform.shift.reference import reweighted_stats
from sims_platform.shift.selection import (
    ShiftError,
    aux_histogram,
    class_histogram,
    fit_gain,
    guided_histogram,
    stratified_counts,
    stratified_indices,
    total_variation,
)

BASE = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)  # an imbalanced base
UNIFORM = torch.full((6,), 1 / 6, dtype=torch.float64)


# ----------------------------------------------------------------------------
# The selection math


@pytest.mark.parametrize("w", [0.25, 1.0, 3.0])
def test_derived_aux_histogram_guides_the_base_to_the_target(w):
    aux = aux_histogram(BASE, UNIFORM, w)
    assert abs(float(aux.sum()) - 1) < 1e-12 and (aux > 0).all()
    torch.testing.assert_close(guided_histogram(BASE, aux, w), UNIFORM, rtol=0, atol=1e-12)
    # The aux over-represents what the target wants less of: the most common base class most of all.
    assert aux.argmax() == BASE.argmax() and aux[0] > BASE[0]


def test_known_histogram_by_hand():
    # Two classes, w = 1: pi_aux ∝ pi_base^2 / t; base (0.8, 0.2), target (0.5, 0.5) -> (0.64, 0.04) / 0.68.
    aux = aux_histogram([0.8, 0.2], [0.5, 0.5], 1.0)
    torch.testing.assert_close(aux, torch.tensor([0.64, 0.04], dtype=torch.float64) / 0.68, rtol=0, atol=1e-15)


def test_gain_designs_for_the_effective_weight_and_is_recovered():
    aux = aux_histogram(BASE, UNIFORM, 1.0, gain=0.4)
    # The guided sampler that acts with weight 0.4 w reaches the target...
    torch.testing.assert_close(guided_histogram(BASE, aux, 0.4), UNIFORM, rtol=0, atol=1e-12)
    # ...and fitting the gain on what an ideal-formula design achieved recovers the factor.
    ideal = aux_histogram(BASE, UNIFORM, 1.0)
    measured = guided_histogram(BASE, ideal, 0.4 * 1.0)
    assert fit_gain(BASE, ideal, measured, 1.0) == pytest.approx(0.4, abs=1e-10)


def test_target_class_the_base_never_produces_is_an_error():
    with pytest.raises(ShiftError, match=r"no samples of classes \[2\]"):
        aux_histogram([0.5, 0.5, 0.0], [0.3, 0.3, 0.4], 1.0)
    with pytest.raises(ShiftError, match=r"target is 0 on classes \[1\]"):
        aux_histogram([0.5, 0.5], [1.0, 0.0], 1.0)
    with pytest.raises(ShiftError, match="sum to"):
        aux_histogram([0.5, 0.5], [0.6, 0.6], 1.0)
    with pytest.raises(ShiftError, match="w and gain must be > 0"):
        aux_histogram([0.5, 0.5], [0.5, 0.5], 0.0)


@pytest.mark.parametrize("total", [0, 1, 7, 100, 2001])
def test_stratified_counts_sum_exactly_and_round_by_largest_remainder(total):
    aux = aux_histogram(BASE, UNIFORM, 1.0)
    counts = stratified_counts(aux, total)
    assert sum(counts) == total
    assert all(abs(c - float(p) * total) < 1 for c, p in zip(counts, aux))


def test_stratified_counts_ties_go_to_the_lower_class():
    assert stratified_counts([0.25, 0.25, 0.25, 0.25], 6) == [2, 2, 1, 1]
    assert stratified_counts([0.5, 0.3, 0.2], 3) == [1, 1, 1]  # floors 1, 0, 0; remainders .5, .9, .6: 1 and 2 +1


def test_stratified_indices_match_counts_and_repeat_only_when_short():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    idx, repeats = stratified_indices(labels, [20, 30, 10], seed=7)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [20, 30, 10]
    assert repeats == 7  # class 2 has 3 samples for 10 places
    assert len(set(idx[labels[idx] != 2].tolist())) == 50  # no repeats where a class has enough
    assert set(idx[labels[idx] == 2].tolist()) == {80, 81, 82}  # each short-class sample at least once
    again, _ = stratified_indices(labels, [20, 30, 10], seed=7)
    assert torch.equal(idx, again)
    with pytest.raises(ShiftError, match="of class 1 asked for, but the set has none"):
        stratified_indices(torch.tensor([0, 0, 2]), [1, 1, 1], seed=0)


def test_histogram_and_total_variation():
    h = class_histogram(torch.tensor([0, 0, 1, 3]), 4)
    assert h.tolist() == [0.5, 0.25, 0.0, 0.25]
    assert total_variation(h, [0.25] * 4) == pytest.approx(0.25)
    with pytest.raises(ShiftError, match="expected 0..3"):
        class_histogram(torch.tensor([4]), 4)


# ----------------------------------------------------------------------------
# The target-reweighted reference


def test_reweighted_reference_equals_direct_statistics_of_the_resampled_set():
    gen = torch.Generator().manual_seed(0)
    n_c, dim = [5, 9, 4], 6
    feats = [torch.randn(n, dim, generator=gen, dtype=torch.float64) + 3 * c for c, n in enumerate(n_c)]
    per_class = [FeatureStats(dim).update(f) for f in feats]
    # The target as integer replications: class c repeated r_c times in the directly computed set.
    reps = [4, 1, 6]
    direct = FeatureStats(dim).update(torch.cat([f.repeat(r, 1) for f, r in zip(feats, reps)]))
    count = sum(r * n for r, n in zip(reps, n_c))
    target = [r * n / count for r, n in zip(reps, n_c)]
    got = reweighted_stats(per_class, target, count=count)
    assert got.count == direct.count == count
    torch.testing.assert_close(got.mean(), direct.mean(), rtol=0, atol=1e-9)
    torch.testing.assert_close(got.cov(), direct.cov(), rtol=0, atol=1e-9)
    # The default count is the real set's size; the mean does not depend on it.
    torch.testing.assert_close(reweighted_stats(per_class, target).mean(), direct.mean(), rtol=0, atol=1e-9)
    assert reweighted_stats(per_class, target).count == sum(n_c)


def test_reweighted_reference_needs_images_of_every_weighted_class():
    per_class = [FeatureStats(2).update(torch.randn(3, 2)), FeatureStats(2)]
    with pytest.raises(ValueError, match=r"classes \[1\] have weight > 0"):
        reweighted_stats(per_class, [0.5, 0.5])
