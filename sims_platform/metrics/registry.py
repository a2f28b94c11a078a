"""The feature networks evaluate.features can name, and how each is built (trained, or read from its weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sims_platform.metrics.digits_classifier import train_digits_classifier
from sims_platform.metrics.extractor import FeatureExtractor, LabeledImagesLike
from sims_platform.metrics.weights import Weights, WeightsError, load_weights


def _build_digits(*, cache_uri: str, real: LabeledImagesLike, seed: int, weights: str | None,
                  sha256: str | None, field: str) -> FeatureExtractor:
    return train_digits_classifier(real, cache_uri=cache_uri, seed=seed)


def _pretrained(make: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
    """A builder for a network with published weights: read from `weights` (checked against sha256)."""
    def build(*, cache_uri: str, real: LabeledImagesLike, seed: int, weights: str | None,
              sha256: str | None, field: str) -> FeatureExtractor:
        if not weights:
            raise WeightsError(f"{field} is required: the path or URI of the network's weights "
                               "(nothing is downloaded at run time)")
        return make(load_weights(weights, sha256, field=field), field=field)
    return build


def _inception(w: Weights, *, field: str) -> FeatureExtractor:
    from sims_platform.metrics.inception import InceptionFeatures
    return InceptionFeatures(w, field=field)


def _dinov2(w: Weights, *, field: str) -> FeatureExtractor:
    from sims_platform.metrics.dinov2 import DINOv2Features  # imports transformers (seconds): only when used
    return DINOv2Features(w, field=field)


_BUILDERS: dict[str, Callable[..., FeatureExtractor]] = {
    "digits-classifier": _build_digits,
    "inception": _pretrained(_inception),  # FID: Inception-v3, TF 2015-12-05 weights, 2048-d
    "dinov2": _pretrained(_dinov2),  # FD_DINOv2: DINOv2 ViT-L/14, 1024-d
}
FEATURE_EXTRACTORS = tuple(_BUILDERS)


def build_feature_extractor(name: str, *, cache_uri: str, real: LabeledImagesLike, seed: int = 0,
                            weights: str | None = None, sha256: str | None = None,
                            device: torch.device | str | None = None) -> FeatureExtractor:
    """The feature network named by evaluate.features, cached under cache_uri (see RunLayout.features).

    Pretrained networks (inception, dinov2) read `weights` (a path or URI; evaluate.<name>_weights) and, if
    given, check its sha256 (evaluate.<name>_sha256). `device`: where the network runs (default: the CPU).
    """
    if name not in _BUILDERS:
        raise ValueError(f"evaluate.features: unknown feature extractor '{name}', expected one of "
                         f"{', '.join(FEATURE_EXTRACTORS)}")
    extractor = _BUILDERS[name](cache_uri=cache_uri, real=real, seed=seed, weights=weights, sha256=sha256,
                                field=f"evaluate.{name}_weights")
    if device is not None:
        extractor.to(device)
    return extractor
