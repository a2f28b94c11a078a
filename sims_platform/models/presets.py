"""Network presets: one table, each row a named, reproducible architecture (measured results in comments)."""

from __future__ import annotations

from sims_platform.config.schema import NetworkConfig
from sims_platform.models.precond import Precond

# EDM2 ImageNet-512 sizes (64x64x4 latents, 1000 classes). Parameter counts as measured on the reference
# code (shared/reference/edm2-facts.md); tests/test_network.py checks ours within 1%.
_EDM2 = dict(channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])

PRESETS: dict[str, dict] = {
    # Demo: 16x16 grayscale digits on a CPU. Small enough to train in minutes on two cores.
    "digits-tiny": dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=0.0),
    # Autoguidance's guide for digits-tiny (the guide section): half its channels, a quarter of its parameters.
    "digits-mini": dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=0.0),
    "digits-small": dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8], dropout=0.0),
    "edm2-xs": dict(model_channels=128, dropout=0.0, **_EDM2),   # 124.7M, FID 3.53
    "edm2-s": dict(model_channels=192, dropout=0.0, **_EDM2),    # 280.2M, FID 2.56
    "edm2-m": dict(model_channels=256, dropout=0.1, **_EDM2),    # 497.8M, FID 2.25
    "edm2-l": dict(model_channels=320, dropout=0.1, **_EDM2),    # 777.5M, FID 2.06
    "edm2-xl": dict(model_channels=384, dropout=0.1, **_EDM2),   # ~1.1B, FID 1.96
    "edm2-xxl": dict(model_channels=448, dropout=0.1, **_EDM2),  # ~1.5B, FID 1.91
}

# EDM2-paper parameter counts (millions) for the ImageNet-512 presets.
EDM2_PARAMS_M = {"edm2-xs": 124.7, "edm2-s": 280.2, "edm2-m": 497.8, "edm2-l": 777.5, "edm2-xl": 1119.3,
                 "edm2-xxl": 1523.2}


def architecture(cfg: NetworkConfig) -> dict:
    """The preset's U-Net arguments with the config's overrides applied."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"network.preset: unknown preset '{cfg.preset}', expected one of {', '.join(PRESETS)}")
    arch = dict(PRESETS[cfg.preset])
    for key in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout"):
        value = getattr(cfg, key)
        if value is not None:
            arch[key] = value
    return arch


def build_network(cfg: NetworkConfig, img_resolution: int, img_channels: int, label_dim: int) -> Precond:
    arch = architecture(cfg)
    levels = len(arch["channel_mult"])
    if img_resolution % (1 << (levels - 1)):
        raise ValueError(f"network: resolution {img_resolution} is not divisible by 2^{levels - 1} "
                         f"(channel_mult has {levels} levels)")
    return Precond(img_resolution, img_channels, label_dim, sigma_data=cfg.sigma_data, **arch)


def count_parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())
