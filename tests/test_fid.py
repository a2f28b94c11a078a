"""FID: Frechet distance vs torchmetrics, mergeable statistics, and the cached digits-classifier features."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sims_platform.metrics import (
    FeatureExtractor,
    FeatureStats,
    build_feature_extractor,
    feature_stats,
    fid_from_stats,
    frechet_distance,
)
from sims_platform.evaluation.reference import in_memory_reference

# ----------------------------------------------------------------------------
# Frechet distance


def _two_feature_sets(n: int = 500, d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    b = 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.3
    return a, b


def test_frechet_distance_matches_torchmetrics() -> None:
    from torchmetrics.image.fid import _compute_fid

    a, b = _two_feature_sets()
    sa, sb = FeatureStats(64).update(a), FeatureStats(64).update(b)
    ours = fid_from_stats(sa, sb)
    theirs = float(_compute_fid(sa.mean(), sa.cov(), sb.mean(), sb.cov()))
    assert ours > 1.0
    assert ours == pytest.approx(theirs, rel=1e-6)
    # numpy inputs give the same number as tensors
    assert frechet_distance(sa.mean().numpy(), sa.cov().numpy(), sb.mean().numpy(),
                            sb.cov().numpy()) == pytest.approx(ours, rel=1e-12)


def test_frechet_distance_identical_is_zero() -> None:
    a, _ = _two_feature_sets()
    s = FeatureStats(64).update(a)
    assert abs(fid_from_stats(s, s)) < 1e-8


def test_frechet_distance_diagonal_gaussians_analytic() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_covariance_is_finite() -> None:
    # Fewer samples than dims: rank-deficient covariances need the eps offset fallback.
    g = torch.Generator().manual_seed(2)
    a = FeatureStats(32).update(torch.randn(8, 32, generator=g))
    b = FeatureStats(32).update(torch.randn(8, 32, generator=g) + 1)
    fid = fid_from_stats(a, b)
    assert np.isfinite(fid) and fid > 0


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="dims differ"):
        fid_from_stats(FeatureStats(3).update(torch.randn(4, 3)), FeatureStats(4).update(torch.randn(4, 4)))


# ----------------------------------------------------------------------------
# Mergeable statistics


def test_stats_merge_equals_one_shot() -> None:
    a, _ = _two_feature_sets()
    a = a.float() * 3 + 5  # float32 input, offset mean: accumulation must still be float64-exact
    one = FeatureStats(64).update(a)
    parts = [FeatureStats(64).update(p) for p in torch.split(a, [1, 137, 362])]
    merged = FeatureStats.merged(parts)
    assert merged.count == one.count == 500
    torch.testing.assert_close(merged.mean(), one.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.cov(), one.cov(), rtol=0, atol=1e-12)
    torch.testing.assert_close(one.cov(), torch.cov(a.double().T), rtol=0, atol=1e-10)
    assert parts[0].count == 1  # merged() leaves its inputs alone


def test_stats_round_trip_and_errors() -> None:
    s = FeatureStats(5).update(torch.randn(10, 5))
    buf = io.BytesIO()
    torch.save(s.to_dict(), buf)
    back = FeatureStats.from_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert back.count == 10 and torch.equal(back.cov(), s.cov())
    listed = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in s.to_dict().items()}
    assert torch.equal(FeatureStats.from_dict(listed).mean(), s.mean())
    with pytest.raises(ValueError, match="dims differ"):
        s.merge(FeatureStats(6))
    with pytest.raises(ValueError, match=r"shape \[N, 5\]"):
        s.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(5).update(torch.randn(1, 5)).cov()


# ----------------------------------------------------------------------------
# digits-classifier features


@pytest.fixture(scope="module")
def digits() -> SimpleNamespace:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return SimpleNamespace(images=x, labels=torch.tensor(d.target, dtype=torch.int64))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def extractor(digits: SimpleNamespace, cache: str) -> FeatureExtractor:
    return build_feature_extractor("digits-classifier", cache_uri=cache, real=digits, seed=0)


def test_digits_classifier_accuracy(extractor: FeatureExtractor, digits: SimpleNamespace) -> None:
    assert isinstance(extractor, FeatureExtractor)
    assert not extractor.from_cache
    m = extractor.metrics
    print(f"digits-classifier: {m}")
    assert m["holdout_accuracy"] > 0.95 and m["train_accuracy"] > 0.95
    assert m["train_seconds"] < 30
    probs = extractor.classify(digits.images[:300])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(300))
    assert (probs.argmax(1) == digits.labels[:300]).float().mean() > 0.95


def test_digits_classifier_deterministic_and_cached(extractor: FeatureExtractor, digits: SimpleNamespace,
                                                    cache: str, tmp_path) -> None:
    x = digits.images[:64]
    other = build_feature_extractor("digits-classifier", cache_uri=str(tmp_path), real=digits, seed=0)
    assert not other.from_cache
    assert torch.equal(other(x), extractor(x))

    t0 = time.perf_counter()
    again = build_feature_extractor("digits-classifier", cache_uri=cache, real=digits, seed=0)
    assert again.from_cache and time.perf_counter() - t0 < 2.0
    assert torch.equal(again(x), extractor(x))
    assert again.metrics == extractor.metrics


def test_digits_classifier_cache_fingerprint(digits: SimpleNamespace, tmp_path) -> None:
    small = SimpleNamespace(images=digits.images[:100], labels=digits.labels[:100])
    first = build_feature_extractor("digits-classifier", cache_uri=str(tmp_path), real=small, seed=0)
    assert not first.from_cache
    again = build_feature_extractor("digits-classifier", cache_uri=str(tmp_path), real=small, seed=0)
    assert again.from_cache
    # other seed or other data: the cached network is stale and is retrained
    reseeded = build_feature_extractor("digits-classifier", cache_uri=str(tmp_path), real=small, seed=1)
    assert not reseeded.from_cache and reseeded.fingerprint != first.fingerprint
    other = SimpleNamespace(images=digits.images[100:200], labels=digits.labels[100:200])
    assert not build_feature_extractor("digits-classifier", cache_uri=str(tmp_path), real=other,
                                       seed=1).from_cache


def test_digits_classifier_preprocessing(extractor: FeatureExtractor, digits: SimpleNamespace) -> None:
    x = digits.images[:16]
    f = extractor(x)
    assert f.shape == (16, extractor.dim) and f.dtype == torch.float32
    # RGB input is mapped to luma, a larger resolution is resized: same network input contract
    torch.testing.assert_close(extractor(x.expand(-1, 3, -1, -1)), f, atol=1e-5, rtol=1e-5)
    assert extractor(F.interpolate(x, size=(32, 32), mode="nearest")).shape == f.shape
    # out-of-range samples are clipped like saved images would be
    assert torch.equal(extractor(x * 5), extractor((x * 5).clamp(-1, 1)))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        extractor(x[0])


def test_fid_real_subset_vs_noise(extractor: FeatureExtractor, digits: SimpleNamespace) -> None:
    ref, kept = in_memory_reference(extractor, digits.images, batch_size=500, max_samples=700)
    assert ref.count == len(digits.labels)
    # the first max_samples features, kept for precision/recall
    torch.testing.assert_close(kept, extractor(digits.images[:700]), atol=1e-5, rtol=1e-5)
    assert torch.equal(feature_stats(extractor, digits.images, batch_size=500).sum_outer, ref.sum_outer)

    subset = feature_stats(extractor, digits.images[::2], batch_size=300)
    noise = torch.rand(900, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid_real = fid_from_stats(subset, ref)
    fid_noise = fid_from_stats(feature_stats(extractor, noise), ref)
    print(f"FID real-subset {fid_real:.3f}, noise {fid_noise:.3f}")
    assert 0 <= fid_real * 20 < fid_noise


def test_feature_registry_errors(digits: SimpleNamespace, tmp_path) -> None:
    for name in ("inception", "dinov2"):  # pretrained networks need their weights configured
        with pytest.raises(ValueError, match=f"evaluate.{name}_weights is required"):
            build_feature_extractor(name, cache_uri=str(tmp_path), real=digits, seed=0)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_feature_extractor("clip", cache_uri=str(tmp_path), real=digits, seed=0)
    with pytest.raises(ValueError, match="needs class labels"):
        build_feature_extractor("digits-classifier", cache_uri=str(tmp_path),
                                real=SimpleNamespace(images=digits.images, labels=None), seed=0)
