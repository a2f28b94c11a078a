"""The feature-network interface FID and precision/recall use: images in [-1, 1] -> feature vectors."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class LabeledImagesLike(Protocol):
    @property
    def images(self) -> Tensor: ...  # float in [-1, 1], [N, C, R, R]

    @property
    def labels(self) -> Tensor | None: ...  # int64 [N]; None for unlabelled data


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images in [-1, 1] [N, C, H, W] to features [N, dim]; owns its input preprocessing."""

    name: str
    dim: int
    fingerprint: str  # identifies the network's weights: reference statistics are cached under it

    def __call__(self, images: Tensor) -> Tensor: ...

    def to(self, device: torch.device | str) -> FeatureExtractor: ...


def check_images(images: Tensor, where: str) -> None:
    """A clear error unless images is a batch [N, C, H, W]."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{where}: expected images [N, C, H, W] in [-1, 1], got {shape}")
