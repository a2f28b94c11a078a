"""Frechet distance between two Gaussians (FID), in float64 with scipy's matrix square root."""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import torch

from sims_platform.metrics.stats import FeatureStats

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


def _f64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(x, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"frechet_distance: {name} contains NaN/inf")
    return out


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Matrix square root and its relative residual ||X X - A||_F / ||A||_F."""
    x = scipy.linalg.sqrtm(a)
    if not np.isfinite(x).all():
        return x, float("inf")
    denom = max(float(np.linalg.norm(a)), 1e-300)
    return x, float(np.linalg.norm(x @ x - a) / denom)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), float64."""
    mu1, mu2 = _f64(mu1, "mu1"), _f64(mu2, "mu2")
    sigma1, sigma2 = _f64(sigma1, "sigma1"), _f64(sigma2, "sigma2")
    d = mu1.shape[0] if mu1.ndim == 1 else 0
    if d < 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: expected mu [D] and sigma [D, D] with one D; got "
                         f"mu1 {list(mu1.shape)}, mu2 {list(mu2.shape)}, sigma1 {list(sigma1.shape)}, "
                         f"sigma2 {list(sigma2.shape)}")

    covmean, err = _sqrtm(sigma1 @ sigma2)
    if err > 1e-6:
        # Nearly singular product (fewer samples than dims, dead features): the usual remedy is to
        # add eps to the diagonals, which moves FID by O(eps * D) only.
        log.warning("frechet_distance: sqrtm residual %.2e; adding %g to the covariance diagonals",
                    err, eps)
        offset = np.eye(d) * eps
        covmean, err = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("frechet_distance: sqrt(sigma1 sigma2) is not finite even with the eps offset")

    if np.iscomplexobj(covmean):
        # The exact root of a product of PSD matrices is real; an imaginary part is rounding noise
        # unless it is large compared with the real trace.
        imag = np.abs(np.diagonal(covmean).imag).max()
        scale = max(1.0, abs(float(np.trace(covmean.real))))
        if imag > 1e-3 * scale:
            raise ValueError(f"frechet_distance: sqrt(sigma1 sigma2) has an imaginary part of {imag:.3g} "
                             f"(trace {scale:.3g}); are the covariances positive semi-definite?")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between the Gaussians fitted to two FeatureStats."""
    if a.dim != b.dim:
        raise ValueError(f"fid_from_stats: feature dims differ ({a.dim} vs {b.dim}); the statistics "
                         "come from different feature extractors")
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
