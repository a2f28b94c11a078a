"""The held-out split: a deterministic per-class share of the real data that no training stage ever sees.

FID, precision and recall compare samples with this held-out part only, so a model (or a feature network) that
memorised its training images gains nothing from it. The split depends only on the labels, data.holdout_fraction
and data.holdout_seed, never on the run's seed: every training seed is measured against the same reference.
When data.reference_path names a separate reference set, nothing is held out: training reads all of data.path.
"""

from __future__ import annotations

import torch

from sims_platform.config.schema import DataConfig
from sims_platform.data.images import LabeledImages


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), each sorted; per class, round(fraction * n_class) are held out.

    A class with at least two images keeps at least one on each side, so neither side loses a class.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"data.holdout_fraction must be in (0, 1), got {fraction}")
    labels = labels.detach().to("cpu", torch.int64)
    held: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n = len(idx)
        n_hold = round(fraction * n)
        if n >= 2:
            n_hold = min(max(n_hold, 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(c)))
        held.append(idx[perm[:n_hold]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def split_images(images: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """(training part, held-out part) of an in-memory image set, in the source's order."""
    train, held = holdout_split(images.labels, fraction, seed)
    return (LabeledImages(images.images[train], images.labels[train]),
            LabeledImages(images.images[held], images.labels[held]))


# Salt of the class_fractions permutations, so they differ from the held-out split's for the same seed.
_SUBSET_SALT = 7_919


def class_subset(labels: torch.Tensor, fractions: dict[int, float] | None, seed: int) -> torch.Tensor:
    """Sorted indices keeping round(f * n_c) (at least 1) of each class c listed in fractions, all of the others.

    Which images a class keeps is a seeded permutation (data.class_fractions, e.g. a class-imbalanced base);
    the same labels, fractions and seed always give the same subset.
    """
    labels = labels.detach().to("cpu", torch.int64)
    if not fractions:
        return torch.arange(len(labels))
    keep = torch.ones(len(labels), dtype=torch.bool)
    for c, f in sorted(fractions.items()):
        if not 0 < f <= 1:
            raise ValueError(f"data.class_fractions: class {c} fraction must be in (0, 1], got {f}")
        idx = torch.nonzero(labels == c).flatten()
        n_keep = max(1, round(f * len(idx))) if len(idx) else 0
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 1_000_003 + _SUBSET_SALT + c))
        keep[idx[perm[n_keep:]]] = False
    return torch.nonzero(keep).flatten()


def training_indices(labels: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Sorted indices of data.path the training stages read: all of them when data.reference_path names a separate
    reference set, else the training part of the held-out split."""
    if cfg.reference_path is not None:
        return torch.arange(len(labels))
    return holdout_split(labels, cfg.holdout_fraction, cfg.holdout_seed)[0]
