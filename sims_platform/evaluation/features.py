"""The FID feature network of a run, as every stage that measures builds it (evaluate, reference, benchmarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sims_platform.metrics import FeatureExtractor, build_feature_extractor

if TYPE_CHECKING:  # the stages package imports this module
    from sims_platform.stages.context import StageContext


class _TrainingImages:
    """ctx.labelled (the whole training split), loaded only if the feature network asks (the digits classifier): a pretrained network never
    needs the training images, and loading every image of ImageNet would not fit in memory."""

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx

    @property
    def images(self) -> torch.Tensor:
        return self._ctx.labelled.images

    @property
    def labels(self) -> torch.Tensor:
        return self._ctx.labelled.labels


def feature_extractor(ctx: StageContext) -> FeatureExtractor:
    """evaluate.features' network on ctx.device; the digits classifier is trained on the training images only
    (ctx.labelled: never a reference image)."""
    ev = ctx.cfg.evaluate
    weights, sha256 = ev.feature_weights()
    # Built (or trained) on the CPU, then moved: features are computed on ctx.device.
    return build_feature_extractor(ev.features, cache_uri=ctx.layout.features, real=_TrainingImages(ctx),
                                   seed=ctx.cfg.seed, weights=weights, sha256=sha256, device=ctx.device)
