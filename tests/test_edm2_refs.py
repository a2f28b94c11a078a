"""EDM2's published reference statistics (dataset-refs/img512.pkl layout) read safely into FeatureStats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from sims_platform.metrics.edm2_refs import edm2_reference, read_edm2_refs
from sims_platform.metrics.fid import fid_from_stats
from sims_platform.metrics.stats import FeatureStats
from sims_platform.storage.safe_pickle import UnsafePickleError


def _edm2_stats(features: np.ndarray) -> dict:
    # What EDM2's calculate_metrics.py stores: float64 mean and unbiased covariance per metric.
    mu = features.mean(0)
    return dict(mu=mu, sigma=np.cov(features, rowvar=False, ddof=1))


def test_edm2_reference_pickle_reads_into_feature_stats(tmp_path):
    rng = np.random.default_rng(0)
    fid_feats, dino_feats = rng.normal(size=(50, 8)) * 3 + 1, rng.normal(size=(50, 4))
    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps(dict(num_images=50, fid=_edm2_stats(fid_feats),
                                       fd_dinov2=_edm2_stats(dino_feats))))
    refs = read_edm2_refs(str(path))
    assert set(refs) == {"fid", "fd_dinov2"} and refs["fid"].count == 50 and refs["fd_dinov2"].dim == 4
    own = FeatureStats(8).update(torch.from_numpy(fid_feats))  # the same features, accumulated by us
    ref = edm2_reference(str(path), "inception")
    assert torch.allclose(ref.mean(), own.mean(), rtol=0, atol=1e-12)
    assert torch.allclose(ref.cov(), own.cov(), rtol=0, atol=1e-12)
    assert fid_from_stats(ref, own) == pytest.approx(0.0, abs=1e-6)
    # Merging stays exact: the sums are reconstructed, not just the moments.
    assert torch.allclose(FeatureStats.merged([ref, own]).cov(), own.cov() * 98 / 99, atol=1e-10)
    assert edm2_reference(str(path), "dinov2").dim == 4
    only_fid = tmp_path / "fid-only.pkl"
    only_fid.write_bytes(pickle.dumps(dict(num_images=50, fid=_edm2_stats(fid_feats))))
    with pytest.raises(ValueError, match="has statistics for fid, not 'fd_dinov2'"):
        edm2_reference(str(only_fid), "dinov2")
    with pytest.raises(ValueError, match="not 'digits-classifier'"):
        edm2_reference(str(path), "digits-classifier")
    # Statistics of another network's width name the file, before anything is sampled.
    with pytest.raises(ValueError, match=r"img512\.pkl holds 8-d 'fid' statistics, but the 'inception' network "
                                         r"gives 2048-d features"):
        edm2_reference(str(path), "inception", 2048)


def test_reference_pickle_that_carries_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps(dict(num_images=50, fid=Evil())))
    with pytest.raises(UnsafePickleError, match=r"img512\.pkl: refused to load: it needs 'posix\.system'"):
        read_edm2_refs(str(path))
    assert not marker.exists()
