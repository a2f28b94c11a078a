"""Encoders: pixel space and VAE latent space behind one encode/decode interface."""

from __future__ import annotations

import torch

from sims_platform.config.schema import EncoderConfig
from sims_platform.encoders.base import Encoder
from sims_platform.encoders.pixel import PixelEncoder


def build_encoder(cfg: EncoderConfig, image_channels: int, device: torch.device | str = "cpu") -> Encoder:
    """The encoder of cfg; a VAE runs on `device` (inputs and outputs stay on the CPU, where shards live)."""
    if cfg.kind == "pixel":
        return PixelEncoder(image_channels)
    from sims_platform.encoders.latent import LatentEncoder

    return LatentEncoder(cfg, device=device)


__all__ = ["Encoder", "PixelEncoder", "build_encoder"]
