"""EDM2's published reference statistics (dataset-refs/*.pkl: num_images, mu and sigma per metric) as FeatureStats."""

from __future__ import annotations

import numpy as np
import torch

from sims_platform.metrics.stats import FeatureStats
from sims_platform.models.edm2_pickle import read_pickle
from sims_platform.storage import fsio

# evaluate.features -> the metric name EDM2's calculate_metrics.py files its statistics under.
EDM2_METRICS = {"inception": "fid", "dinov2": "fd_dinov2"}


def _array(v: object, what: str, uri: str) -> torch.Tensor:
    if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
        raise ValueError(f"{uri}: {what} is a {type(v).__name__}, expected a float array")
    return torch.from_numpy(np.asarray(v, dtype=np.float64).copy())


def read_edm2_refs(uri: str) -> dict[str, FeatureStats]:
    """Every metric's statistics in an EDM2 reference pickle, keyed by EDM2's metric name (fid, fd_dinov2).

    EDM2 stores the mean and the unbiased (N-1) covariance; they are turned back into the sums FeatureStats
    keeps, so FeatureStats.mean()/cov() return them and the FID code is the one every other reference uses.
    """
    data = read_pickle(fsio.read_bytes(uri), uri)
    if not isinstance(data, dict) or not isinstance(data.get("num_images"), int):
        raise ValueError(f"{uri}: not an EDM2 reference-statistics pickle (expected a dict with num_images and "
                         "per-metric {mu, sigma})")
    n = data["num_images"]
    if n < 2:
        raise ValueError(f"{uri}: num_images is {n}; a covariance needs at least 2")
    out = {}
    for metric, entry in data.items():
        if metric == "num_images":
            continue
        if not isinstance(entry, dict) or {"mu", "sigma"} - set(entry):
            raise ValueError(f"{uri}: '{metric}' has no mu and sigma")
        mu, sigma = _array(entry["mu"], f"{metric}.mu", uri), _array(entry["sigma"], f"{metric}.sigma", uri)
        d = mu.shape[0] if mu.ndim == 1 else 0
        if d < 1 or sigma.shape != (d, d):
            raise ValueError(f"{uri}: {metric} has mu {list(mu.shape)} and sigma {list(sigma.shape)}, expected "
                             "[D] and [D, D]")
        stats = FeatureStats(d)
        stats.count = n
        stats.sum = mu * n
        stats.sum_outer = sigma * (n - 1) + n * torch.outer(mu, mu)
        out[metric] = stats
    return out


def edm2_reference(uri: str, features: str, dim: int | None = None) -> FeatureStats:
    """The statistics of evaluate.features `features` (inception -> fid, dinov2 -> fd_dinov2) in an EDM2 pickle."""
    metric = EDM2_METRICS.get(features)
    if metric is None:
        raise ValueError(f"evaluate.reference: EDM2 reference statistics exist for features "
                         f"{', '.join(EDM2_METRICS)}, not '{features}'")
    refs = read_edm2_refs(uri)
    if metric not in refs:
        raise ValueError(f"evaluate.reference: {uri} has statistics for {', '.join(refs) or 'nothing'}, not "
                         f"'{metric}' (features '{features}')")
    if dim is not None and refs[metric].dim != dim:  # named here, not as a shape error inside the FID
        raise ValueError(f"evaluate.reference: {uri} holds {refs[metric].dim}-d '{metric}' statistics, but the "
                         f"'{features}' network gives {dim}-d features: use the reference file made with it")
    return refs[metric]
