"""Encoders: pixel space is the identity; latent space wraps diffusers' AutoencoderKL (tiny, random, offline)."""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sims_platform.config.schema import EncoderConfig
from sims_platform.encoders import PixelEncoder, build_encoder
from sims_platform.encoders.latent import LatentEncoder
from sims_platform.encoders.vae_source import VaeSourceError
from sims_platform.metrics.preprocess import quantize_uint8
from s3_support import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)

TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16}


def test_pixel_encoder_round_trip():
    enc = build_encoder(EncoderConfig(kind="pixel"), 1)
    assert isinstance(enc, PixelEncoder) and enc.resolution(16) == 16
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(enc.decode(enc.encode(x)), x)


# ----------------------------------------------------------------------------
# EDM2's StabilityVAEEncoder arithmetic, performed here on a tiny random VAE (training/encoders.py, read for its
# steps: encode_pixels feeds uint8 / 255; encode_latents scales by float32 final_std / raw_std and adds
# final_mean - raw_mean * scale; decode undoes the affine map, clamps the VAE's output to [0, 1], * 255, uint8).

RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]


def _edm2_scale_bias() -> tuple[torch.Tensor, torch.Tensor]:
    scale = np.float32(0.5) / np.float32(RAW_STD)
    bias = np.float32(0) - np.float32(RAW_MEAN) * scale
    return torch.from_numpy(scale).reshape(1, -1, 1, 1), torch.from_numpy(bias).reshape(1, -1, 1, 1)


def edm2_encode_posterior(vae, u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final-latent posterior mean and std EDM2 samples from: (mean, std) of the VAE on u8 / 255, scaled."""
    scale, bias = _edm2_scale_bias()
    d = vae.encode(u8.to(torch.float32) / 255)["latent_dist"]
    return d.mean * scale + bias, d.std * scale


def edm2_decode(vae, z: torch.Tensor) -> torch.Tensor:
    scale, bias = _edm2_scale_bias()
    x = (z.to(torch.float32) - bias) / scale
    return vae.decode(x)["sample"].clamp(0, 1).mul(255).to(torch.uint8)


def _u8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_latent_encoder_encodes_as_edm2():
    enc = build_encoder(EncoderConfig(kind="latent", vae_config=TINY_VAE, batch_size=3), 3)
    assert isinstance(enc, LatentEncoder) and enc.channels == 4 and enc.resolution(16) == 8
    u8 = _u8(5, 3, 16, 16)
    ours = enc.encode_posterior(u8.float() / 127.5 - 1)  # the project's pixel convention
    with torch.no_grad():
        mean, std = edm2_encode_posterior(enc.vae, u8)
    assert ours.shape == (5, 8, 8, 8)
    torch.testing.assert_close(ours[:, :4], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 4:], std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.encode(u8.float() / 127.5 - 1), mean, rtol=1e-5, atol=1e-5)
    # grayscale images are fed to the RGB VAE as three equal channels
    assert enc.encode(u8[:, :1].float() / 127.5 - 1).shape == (5, 4, 8, 8)


def test_latent_encoder_decodes_to_edm2s_pixels():
    enc = build_encoder(EncoderConfig(kind="latent", vae_config=TINY_VAE, batch_size=3), 3)
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    images = enc.decode(z)
    assert images.shape == (6, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    ours = quantize_uint8(images)
    with torch.no_grad():
        theirs = edm2_decode(enc.vae, z)
        v = enc.vae.decode((z - _edm2_scale_bias()[1]) / _edm2_scale_bias()[0]).sample.clamp(0, 1)
    diff = ours.int() - theirs.int()
    # EDM2 truncates 255 v, we round it: equal where the fraction is below one half, else one level above.
    assert diff.min() >= 0 and diff.max() <= 1
    frac = (v * 255) - (v * 255).floor()
    assert torch.equal(diff[frac < 0.499], torch.zeros_like(diff[frac < 0.499]))
    assert (theirs < 64).any() and (theirs > 192).any()  # the test spans the range, not one grey level


def test_the_old_convention_fails_the_parity_check():
    """The fixture can tell conventions apart: feeding [-1, 1] (or clamping to [-1, 1]) is far from EDM2."""
    enc = build_encoder(EncoderConfig(kind="latent", vae_config=TINY_VAE), 3)
    u8 = _u8(2, 3, 16, 16, seed=3)
    with torch.no_grad():
        mean, _ = edm2_encode_posterior(enc.vae, u8)
        scale, bias = _edm2_scale_bias()
        wrong = enc.vae.encode(u8.float() / 127.5 - 1).latent_dist.mean * scale + bias
    assert (wrong - mean).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# Where the VAE comes from


def _vae_folder(path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(path)  # config.json + diffusion_pytorch_model.safetensors
    return hashlib.sha256((path / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def test_latent_encoder_loads_a_pinned_vae_folder_by_path(tmp_path):
    sha = _vae_folder(tmp_path / "vae")
    a = LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "vae"), vae_sha256=sha))
    b = LatentEncoder(EncoderConfig(kind="latent", vae=f"file://{tmp_path / 'vae'}", vae_sha256=sha.upper()))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(x), b.encode(x))


def test_a_vae_that_is_not_the_pinned_file_is_refused(tmp_path):
    _vae_folder(tmp_path / "vae")
    with pytest.raises(VaeSourceError, match="encoder.vae_sha256: .*diffusion_pytorch_model.safetensors has sha256"):
        LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "vae"), vae_sha256="0" * 64))


def test_a_pickled_vae_is_never_read(tmp_path):
    """Only the safetensors weights are read: a folder holding a pickle (which could run code) is refused."""
    folder = tmp_path / "vae"
    _vae_folder(folder)
    marker = tmp_path / "executed"
    (folder / "diffusion_pytorch_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(VaeSourceError, match="has no diffusion_pytorch_model.safetensors"):
        LatentEncoder(EncoderConfig(kind="latent", vae=str(folder), vae_sha256="0" * 64))
    assert not marker.exists()


def test_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(VaeSourceError, match="encoder.vae: .*no-such-vae has no"):
        LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "no-such-vae"), vae_sha256="0" * 64))


def test_an_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(VaeSourceError, match="encoder.vae: cannot fetch hub model 'stabilityai/sd-vae-ft-mse'"):
        LatentEncoder(EncoderConfig(kind="latent", vae="stabilityai/sd-vae-ft-mse", vae_revision="abc123"))


def test_a_vae_from_a_storage_uri(tmp_path, s3_bucket):
    import s3fs

    sha = _vae_folder(tmp_path / "vae")
    s3fs.S3FileSystem().put(str(tmp_path / "vae") + "/", f"{s3_bucket}/models/vae/", recursive=True)
    enc = LatentEncoder(EncoderConfig(kind="latent", vae=f"{s3_bucket}/models/vae", vae_sha256=sha))
    ref = LatentEncoder(EncoderConfig(kind="latent", vae=str(tmp_path / "vae"), vae_sha256=sha))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(enc.encode(x), ref.encode(x))
    with pytest.raises(VaeSourceError, match="encoder.vae_sha256"):
        LatentEncoder(EncoderConfig(kind="latent", vae=f"{s3_bucket}/models/vae", vae_sha256="f" * 64))


@pytest.mark.parametrize("vae, fields, message", [
    ("s3://bucket/models/sd-vae-ft-mse", {}, "encoder.vae_sha256 is required"),
    ("file:///models/vae", {}, "encoder.vae_sha256 is required"),
    ("./models/vae", {}, "encoder.vae_sha256 is required"),
    ("stabilityai/sd-vae-ft-mse", {}, "encoder.vae_revision is required"),
    ("s3://bucket/vae", {"vae_sha256": "0" * 64, "vae_revision": "main"}, "vae_revision is for hub ids"),
    ("not a vae", {}, "neither a storage URI or path"),
    ("s3://bucket/vae", {"vae_sha256": "abc"}, "vae_sha256"),
])
def test_an_unpinned_vae_fails_validation(vae, fields, message):
    with pytest.raises(ValidationError, match=message):
        EncoderConfig(kind="latent", vae=vae, **fields)


def test_pinned_or_random_vaes_validate():
    EncoderConfig(kind="latent", vae="s3://bucket/vae", vae_sha256="a" * 64)
    EncoderConfig(kind="latent", vae="stabilityai/sd-vae-ft-mse", vae_revision="31f26fd")
    EncoderConfig(kind="latent", vae_config=TINY_VAE)
    EncoderConfig(kind="pixel")  # the pixel encoder has no VAE to pin


def test_resolution_must_divide(tmp_path):
    enc = LatentEncoder(EncoderConfig(kind="latent", vae_config=TINY_VAE))
    with pytest.raises(ValueError, match="data.resolution"):
        enc.resolution(15)
