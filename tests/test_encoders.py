"""Encoders: pixel space is the identity; latent space wraps diffusers' AutoencoderKL (tiny, random, offline)."""

import pytest
import torch

from sims_platform.config.schema import EncoderConfig
from sims_platform.encoders import PixelEncoder, build_encoder
from sims_platform.encoders.latent import LatentEncoder

TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16}


def test_pixel_encoder_round_trip():
    enc = build_encoder(EncoderConfig(kind="pixel"), 1)
    assert isinstance(enc, PixelEncoder) and enc.resolution(16) == 16
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(enc.decode(enc.encode(x)), x)


def test_latent_encoder_shapes_and_edm2_normalisation():
    cfg = EncoderConfig(kind="latent", vae_config=TINY_VAE, batch_size=3)
    enc = build_encoder(cfg, 3)
    assert isinstance(enc, LatentEncoder) and enc.channels == 4 and enc.resolution(16) == 8
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    z = enc.encode(images)
    assert z.shape == (5, 4, 8, 8)
    raw = enc.vae.encode(images).latent_dist.mean
    mean = torch.tensor(cfg.latent_mean).reshape(1, 4, 1, 1)
    std = torch.tensor(cfg.latent_std).reshape(1, 4, 1, 1)
    assert torch.allclose(z, (raw - mean) * (0.5 / std), atol=1e-5)
    out = enc.decode(z)
    assert out.shape == (5, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # decode inverts the normalisation before the VAE decoder
    assert torch.allclose(out, enc.vae.decode(raw).sample.clamp(-1, 1), atol=1e-4)
    # grayscale images are fed to the RGB VAE as three equal channels
    assert enc.encode(images[:, :1]).shape == (5, 4, 8, 8)


def test_latent_encoder_loads_a_saved_vae_by_path(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    a = LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "vae")))
    b = LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "vae")))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(x), b.encode(x))


def test_missing_vae_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="encoder.vae"):
        LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "no-such-vae")))


def test_resolution_must_divide(tmp_path):
    enc = LatentEncoder(EncoderConfig(kind="latent", vae_config=TINY_VAE))
    with pytest.raises(ValueError, match="data.resolution"):
        enc.resolution(15)
