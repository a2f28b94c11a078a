"""The target-reweighted reference: FID against the real data as it would look with the target's class balance.

Per-class float64 feature statistics (sums) of the held-out images merge with class weights: class c's sums are
scaled by count * t(c) / n_c, so the result is the statistics of a set of `count` images in which class c makes up
the share t(c), each of its n_c images weighted equally. With integer replication factors r_c (class c repeated
r_c times, count = sum r_c n_c, t(c) = r_c n_c / count) it equals the directly computed statistics of that
replicated set; its mean and covariance are those of the held-out data resampled to the target proportions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sims_platform.metrics import FeatureExtractor, FeatureStats
from sims_platform.shift.selection import class_probabilities


def per_class_stats(extractor: FeatureExtractor, images: Tensor, labels: Tensor, num_classes: int,
                    batch_size: int) -> list[FeatureStats]:
    """Feature statistics of the images of each class 0..num_classes-1, computed batch by batch."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"per_class_stats: labels {list(labels.shape)} do not match images {list(images.shape)}")
    stats = [FeatureStats(extractor.dim) for _ in range(num_classes)]
    for i in range(0, images.shape[0], batch_size):
        with torch.no_grad():
            feats = extractor(images[i:i + batch_size]).detach().cpu()
        y = labels[i:i + batch_size]
        for c in torch.unique(y).tolist():
            if not 0 <= c < num_classes:
                raise ValueError(f"per_class_stats: label {c} outside 0..{num_classes - 1}")
            stats[c].update(feats[y == c])
    return stats


def reweighted_stats(per_class: list[FeatureStats], weights: Tensor | list[float],
                     count: int | None = None) -> FeatureStats:
    """Statistics of `count` images whose class shares are `weights` (see the module doc); count defaults to
    the number of images in per_class, so the reweighted covariance's (N - 1) matches the real set's size."""
    t = class_probabilities(weights, "reweighted_stats weights")
    if len(per_class) != t.numel():
        raise ValueError(f"reweighted_stats: {len(per_class)} classes of statistics, {t.numel()} weights")
    empty = [c for c, s in enumerate(per_class) if s.count == 0 and t[c] > 0]
    if empty:
        raise ValueError(f"reweighted_stats: classes {empty} have weight > 0 but no reference images")
    n = count if count is not None else sum(s.count for s in per_class)
    if n < 2:
        raise ValueError(f"reweighted_stats: count must be >= 2 (a covariance needs two images), got {n}")
    out = FeatureStats(per_class[0].dim)
    for s, share in zip(per_class, t.tolist()):
        if share == 0:
            continue
        scale = n * share / s.count
        out.sum += scale * s.sum
        out.sum_outer += scale * s.sum_outer
    out.count = int(n)
    return out
