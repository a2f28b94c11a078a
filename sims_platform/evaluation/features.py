"""The FID feature network of a run, as every stage that measures builds it (evaluate, reference, benchmarks)."""

from __future__ import annotations

from typing import Protocol

import torch

from sims_platform.config.schema import PipelineConfig
from sims_platform.data import LabeledImages
from sims_platform.metrics import FeatureExtractor, build_feature_extractor


class TrainingSplit(Protocol):
    """Where the whole training split comes from, loaded when first asked for (a step's data)."""

    @property
    def labelled(self) -> LabeledImages: ...


class _TrainingImages:
    """The training split, loaded only if the feature network asks (the digits classifier): a pretrained network
    never needs the training images, and loading every image of ImageNet would not fit in memory."""

    def __init__(self, split: TrainingSplit) -> None:
        self._split = split

    @property
    def images(self) -> torch.Tensor:
        return self._split.labelled.images

    @property
    def labels(self) -> torch.Tensor:
        return self._split.labelled.labels


def feature_extractor(cfg: PipelineConfig, cache_uri: str, split: TrainingSplit,
                      device: torch.device) -> FeatureExtractor:
    """evaluate.features' network on `device`, cached under cache_uri (the run's features folder); the digits
    classifier is trained on the training split only (never a reference image), seeded by evaluate.features_seed:
    the run's seed never enters it, so every training seed of a benchmark is measured with the same network."""
    ev = cfg.evaluate
    weights, sha256 = ev.feature_weights()
    # Built (or trained) on the CPU, then moved: features are computed on the device.
    return build_feature_extractor(ev.features, cache_uri=cache_uri, real=_TrainingImages(split),
                                   seed=ev.features_seed, weights=weights, sha256=sha256, device=device)
