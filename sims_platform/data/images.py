"""An in-memory labeled image set: the form every data source is loaded into."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LabeledImages:
    images: torch.Tensor  # float32 [N, C, R, R] in [-1, 1]
    labels: torch.Tensor  # int64 [N]; all 0 when the model is unconditional

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"LabeledImages: expected images [N, C, R, R] and labels [N], "
                             f"got {tuple(self.images.shape)} and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])
