"""Metrics: mergeable feature statistics, Frechet distance (FID) and the pluggable feature networks."""

from sims_platform.metrics.digits_classifier import (
    DigitsClassifier,
    DigitsClassifierHParams,
    train_digits_classifier,
)
from sims_platform.metrics.extractor import FeatureExtractor
from sims_platform.metrics.fid import fid_from_stats, frechet_distance
from sims_platform.metrics.registry import FEATURE_EXTRACTORS, build_feature_extractor
from sims_platform.metrics.stats import FeatureStats, feature_stats

__all__ = [
    "FEATURE_EXTRACTORS",
    "DigitsClassifier",
    "DigitsClassifierHParams",
    "FeatureExtractor",
    "FeatureStats",
    "build_feature_extractor",
    "feature_stats",
    "fid_from_stats",
    "frechet_distance",
    "train_digits_classifier",
]
