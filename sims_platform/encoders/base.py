"""The encoder interface: the space the diffusion model lives in (pixels or VAE latents)."""

from __future__ import annotations

from typing import Protocol

import torch


class Encoder(Protocol):
    """encode: images in [-1, 1] [N,C,H,W] -> model space; decode: model space -> images in [-1, 1]."""

    channels: int

    def resolution(self, image_resolution: int) -> int: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...
