"""Metrics: mergeable feature statistics, Frechet distance (FID) and the pluggable feature networks."""

from sims_platform.metrics.features import (
    FEATURE_EXTRACTORS,
    DigitsClassifier,
    DigitsClassifierHParams,
    FeatureExtractor,
    build_feature_extractor,
    feature_stats,
    reference_stats,
    train_digits_classifier,
)
from sims_platform.metrics.fid import fid_from_stats, frechet_distance
from sims_platform.metrics.stats import FeatureStats

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
    "reference_stats",
    "train_digits_classifier",
]
