"""The two classifiers of distribution shifting: one selects the aux set, the other (never the same network)
measures the histograms evaluate reports.

Both are the digits CNN (metrics/digits_classifier.py), trained on disjoint stratified halves of the labelled training
split with different seeds: the histogram a run is judged by does not come from the network whose decisions
built its aux set, so guidance cannot score by moving samples across that one network's boundaries alone.
Neither sees a held-out image. Each is cached under ROOT/features/shift-<role>/.
"""

from __future__ import annotations

from typing import Literal

import torch

from sims_platform.config.schema import PipelineConfig
from sims_platform.data import LabeledImages, holdout_split
from sims_platform.metrics import DigitsClassifier, train_digits_classifier
from sims_platform.storage import fsio

Role = Literal["select", "judge"]
# Which stratified half of the training split each role trains on, and its seed offset from the run's seed.
_HALF = {"select": 0, "judge": 1}
_SEED_SALT = {"select": 101, "judge": 202}
HALF_FRACTION = 0.5


def halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, per-class stratified halves of a labelled set (indices, each sorted)."""
    return holdout_split(labels, HALF_FRACTION, seed)


def shift_classifier(cfg: PipelineConfig, features_uri: str, train: LabeledImages, device: torch.device,
                     role: Role) -> DigitsClassifier:
    """The selecting ('select') or the measuring ('judge') classifier of the training split `train`, cached under
    the run's features folder, on `device`."""
    if cfg.shift is None:
        raise ValueError("shift classifiers need a shift section in the config")
    half = halves(train.labels, cfg.data.holdout_seed)[_HALF[role]]
    clf = train_digits_classifier(LabeledImages(train.images[half], train.labels[half]),
                                  cache_uri=fsio.join(features_uri, f"shift-{role}"),
                                  seed=cfg.seed + _SEED_SALT[role])
    if clf.num_classes != cfg.data.num_classes:
        raise ValueError(f"shift {role} classifier: its training half has labels of {clf.num_classes} classes, "
                         f"data.num_classes is {cfg.data.num_classes} (a class with a single training image?)")
    return clf.to(device)


@torch.no_grad()
def classify(clf: DigitsClassifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The most probable class of each image (int64 [N], on the CPU), batch by batch."""
    return torch.cat([clf.classify(images[i:i + batch_size]).argmax(dim=1).cpu()
                      for i in range(0, images.shape[0], batch_size)]) if len(images) else \
        torch.zeros(0, dtype=torch.int64)
