"""Encoders: pixel space and VAE latent space behind one encode/decode interface."""

from __future__ import annotations

from sims_platform.config.schema import EncoderConfig
from sims_platform.encoders.base import Encoder
from sims_platform.encoders.pixel import PixelEncoder


def build_encoder(cfg: EncoderConfig, image_channels: int) -> Encoder:
    if cfg.kind == "pixel":
        return PixelEncoder(image_channels)
    from sims_platform.encoders.latent import LatentEncoder

    return LatentEncoder(cfg)


__all__ = ["Encoder", "PixelEncoder", "build_encoder"]
