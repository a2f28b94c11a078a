"""Pixel space: the model sees images in [-1, 1] directly."""

from __future__ import annotations

import torch


class PixelEncoder:
    def __init__(self, channels: int):
        self.channels = channels

    def resolution(self, image_resolution: int) -> int:
        return image_resolution

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).clamp(-1, 1)
