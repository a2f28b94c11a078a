"""Mergeable float64 feature statistics (count, sum, sum of outer products) for FID, and those of a set of images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sims_platform.metrics.extractor import FeatureExtractor, check_images


class FeatureStats:
    """Running first and second moments of D-dimensional features.

    Sums rather than means are kept so that statistics computed in parallel (one per rank or per
    Indexed Job shard) merge exactly by addition, whatever the split.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"FeatureStats: dim must be >= 1, got {dim}")
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"

    # accumulate ---------------------------------------------------------------

    def update(self, features: Tensor) -> FeatureStats:
        """Add a batch of features [N, dim]; returns self."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected features of shape [N, {self.dim}], "
                             f"got {list(features.shape)}")
        # float64 before the products: float32 sums of squares lose the covariance for large N.
        x = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(f"FeatureStats.update: {bad} of {x.shape[0]} feature rows are NaN/inf "
                             "(were the images fed to the feature extractor finite?)")
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x
        return self

    def _check_compatible(self, other: FeatureStats) -> None:
        if not isinstance(other, FeatureStats):
            raise TypeError(f"FeatureStats: cannot combine with {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats: feature dims differ ({self.dim} vs {other.dim}); were they "
                             "computed with the same feature extractor?")

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add other's statistics into self (in place); returns self."""
        self._check_compatible(other)
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    @classmethod
    def merged(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        """A new FeatureStats holding the sum of parts (the parts are left unchanged)."""
        parts = list(parts)
        if not parts:
            raise ValueError("FeatureStats.merged: need at least one part")
        out = cls(parts[0].dim)
        for p in parts:
            out.merge(p)
        return out

    # moments ------------------------------------------------------------------

    def mean(self) -> Tensor:
        if self.count < 1:
            raise ValueError("FeatureStats.mean: no features accumulated")
        return self.sum / self.count

    def cov(self) -> Tensor:
        """Unbiased (N-1) covariance, float64 [dim, dim]."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.cov: need at least 2 features, have {self.count}")
        mu = self.mean()
        cov = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        # The subtraction leaves rounding-level asymmetry; FID's sqrtm prefers an exactly symmetric input.
        return (cov + cov.T) / 2

    # serialisation ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (ints and CPU float64 tensors), suitable for torch.save."""
        return {"dim": self.dim, "count": self.count, "sum": self.sum.clone(),
                "sum_outer": self.sum_outer.clone()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        """Inverse of to_dict; the sums may be tensors or nested lists."""
        missing = {"dim", "count", "sum", "sum_outer"} - set(d)
        if missing:
            raise ValueError(f"FeatureStats.from_dict: missing keys {sorted(missing)}")
        out = cls(int(d["dim"]))
        out.count = int(d["count"])
        s = torch.as_tensor(d["sum"], dtype=torch.float64).cpu()
        so = torch.as_tensor(d["sum_outer"], dtype=torch.float64).cpu()
        if s.shape != (out.dim,) or so.shape != (out.dim, out.dim):
            raise ValueError(f"FeatureStats.from_dict: dim {out.dim} but sum {list(s.shape)} and "
                             f"sum_outer {list(so.shape)}")
        if out.count < 0:
            raise ValueError(f"FeatureStats.from_dict: negative count {out.count}")
        out.sum, out.sum_outer = s.clone(), so.clone()
        return out


def feature_stats(extractor: FeatureExtractor, images: Tensor, batch_size: int = 250) -> FeatureStats:
    """Feature statistics of images, computed batch by batch."""
    check_images(images, "feature_stats")
    if batch_size < 1:
        raise ValueError(f"feature_stats: batch_size must be >= 1, got {batch_size}")
    stats = FeatureStats(extractor.dim)
    for i in range(0, images.shape[0], batch_size):
        stats.update(extractor(images[i:i + batch_size]))
    return stats
