"""The pixel path from a latent sample to the FID feature network, end to end through the production pieces: the
latent encoder's decode (EDM2's [0, 1] range), the one quantisation (metrics/preprocess.py) and Inception's input.

Two VAEs: a linear, exactly invertible one, whose reconstruction error is float rounding, so a known image's latent
must come back as the image's own uint8 pixels and features; and a tiny random diffusers AutoencoderKL, whose
reconstruction is arbitrary, so the path is held against EDM2's own arithmetic on the same VAE: pixels at most one
level apart (EDM2 truncates, we round), features within what a one-level change of the pixels moves them.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sims_platform.config.schema import EncoderConfig
from sims_platform.encoders.latent import LatentEncoder
from sims_platform.metrics import build_feature_extractor
from sims_platform.metrics.inception import FIDInceptionV3, inception_input
from sims_platform.metrics.preprocess import quantize_uint8
from sims_platform.tracking import image_grid_png
from test_encoders import TINY_VAE, edm2_decode

NO_DATA = SimpleNamespace(images=torch.zeros(0, 3, 8, 8), labels=None)


class InvertibleVAE(nn.Module):
    """diffusers' AutoencoderKL interface over pixel (un)shuffling: a 2x-downsampling VAE with an exact inverse
    and a tiny posterior std. Like the SD VAE it is fed [0, 1] pixels; its raw latents are those pixels x 4 - 2."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(latent_channels=12, block_out_channels=[8, 8])
        self.anchor = nn.Parameter(torch.zeros(()))  # so .to() and parameters() behave like a real model

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        mean = F.pixel_unshuffle(x, 2) * 4 - 2
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 1e-4)))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=F.pixel_shuffle((z + 2) / 4, 2))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A random FID Inception-v3 as the evaluate stage builds it from a weights file (one per module: ~10 s)."""
    tmp_path = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # batch statistics of a few images, so that features differ between images
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(inception_input(_u8(3, 3, 32, 32, seed=9)))
    path = tmp_path / "pt_inception-random.pth"
    torch.save(net.eval().state_dict(), path)
    return build_feature_extractor("inception", cache_uri="unused", real=NO_DATA, weights=str(path),
                                   sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _u8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _known_images() -> torch.Tensor:
    """Smooth, full-range images (a gradient plus a disc), uint8, as a real photo would be stored."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = ((yy - 16) ** 2 + (xx - 12) ** 2 < 64).float()
    r, g, b = xx / 31 * 255, yy / 31 * 255, disc * 255
    img = torch.stack([r, g, b]).round().to(torch.uint8)
    return torch.stack([img, img.flip(-1)])


def test_a_known_images_latent_reaches_inception_as_the_image(inception):
    cfg = EncoderConfig(kind="latent", vae_config={}, latent_mean=[0.0] * 12, latent_std=[1.0] * 12)
    enc = LatentEncoder(cfg, vae=InvertibleVAE())
    u8 = _known_images()
    latents = enc.encode(u8.float() / 127.5 - 1)  # what the encode stage stores, what a sampler produces
    pixels = quantize_uint8(enc.decode(latents))
    # Reconstruction error here is float rounding (~1e-6 of a level), far below the half level quantisation
    # tolerates: the pixels are the image's exactly, and so are Inception's features.
    assert torch.equal(pixels, u8)
    torch.testing.assert_close(inception(enc.decode(latents)), inception(u8), rtol=0, atol=0)
    # the grid a user looks at in MLflow shows the same pixels
    assert image_grid_png(enc.decode(latents), nrow=2) == image_grid_png(u8.float() / 127.5 - 1, nrow=2)


def test_a_range_mistake_on_the_path_changes_the_features(inception):
    """The check above can fail: decoding as if the VAE spoke [-1, 1] (the convention EDM2 does not use) washes the
    image out and moves its features by far more than the one-level tolerance."""
    cfg = EncoderConfig(kind="latent", vae_config={}, latent_mean=[0.0] * 12, latent_std=[1.0] * 12)
    enc = LatentEncoder(cfg, vae=InvertibleVAE())
    u8 = _known_images()
    latents = enc.encode(u8.float() / 127.5 - 1)
    raw = latents / enc.scale + enc.mean
    washed = enc.vae.decode(raw).sample.clamp(-1, 1)  # [0, 1] read as [-1, 1]: pixels 128..255
    assert quantize_uint8(washed).min() >= 127
    good, bad = inception(u8), inception(washed)
    one_level = inception((u8.int() + 1).clamp(0, 255).to(torch.uint8))
    assert (bad - good).norm() > 10 * (one_level - good).norm()


def test_a_random_vaes_samples_reach_inception_as_edm2s_pixels(inception):
    enc = LatentEncoder(EncoderConfig(kind="latent", vae_config=TINY_VAE, batch_size=2))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.5
    ours = quantize_uint8(enc.decode(z))
    with torch.no_grad():
        theirs = edm2_decode(enc.vae, z)
    diff = ours.int() - theirs.int()
    assert ours.shape == (2, 3, 16, 16) and diff.min() >= 0 and diff.max() <= 1
    # Features of our pixels against EDM2's: no farther apart than a one-level change of EDM2's pixels moves them.
    f_ours, f_theirs = inception(enc.decode(z)), inception(theirs)
    f_shift = inception((theirs.int() + 1).clamp(0, 255).to(torch.uint8))
    assert (f_ours - f_theirs).norm(dim=1).max() <= (f_shift - f_theirs).norm(dim=1).max()
