"""What every standard feature network sees first: images quantised to uint8 RGB, as EDM2 writes them to disk."""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255] exactly as EDM2 turns samples into pixels; uint8 input passes through.

    EDM2 (training/encoders.py, the pixel encoder's decode) computes (x * 127.5 + 128) clipped to [0, 255] and
    truncated: round-to-nearest of (x + 1) * 127.5. A real image stored as u / 127.5 - 1 maps back to u
    exactly, so real and generated images go through the same quantisation.
    """
    if images.dtype == torch.uint8:
        return images
    return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_rgb(images: Tensor, where: str) -> Tensor:
    """[N, 1|3, H, W] -> [N, 3, H, W]: grey images repeat their channel (the convention of EDM/StyleGAN metrics)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{where}: expected images [N, 1 or 3, H, W], got {shape}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
