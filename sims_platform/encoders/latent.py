"""Latent space through diffusers' AutoencoderKL with EDM2's conventions (its StabilityVAEEncoder).

EDM2 feeds the VAE pixels in [0, 1] (uint8 / 255), normalises the raw latents per channel (raw_mean, raw_std ->
mean 0, std final_std), and decodes by clamping the VAE's output to [0, 1]. The published checkpoints were trained
on exactly those latents. The project's images are u / 127.5 - 1 in [-1, 1], so the encoder maps [-1, 1] -> [0, 1]
on the way in and back on the way out; quantising a decoded image (metrics/preprocess.py) then gives EDM2's uint8
pixels, except where EDM2 truncates and we round (at most 1 level apart).
"""

from __future__ import annotations

import torch

from sims_platform.config.schema import EncoderConfig
from sims_platform.encoders.vae_source import VaeSourceError, vae_folder


def load_autoencoder(cfg: EncoderConfig):
    """The VAE cfg pins (a folder at a URI or path checked against vae_sha256, or a hub id at vae_revision), or a
    randomly initialised one from cfg.vae_config (no download). Only its safetensors weights are read."""
    from diffusers import AutoencoderKL

    if cfg.vae_config is not None:
        # Seeded, so every process of a run (encode, train, evaluate) builds the same random VAE.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoencoderKL(**cfg.vae_config)
    with vae_folder(cfg.vae, cfg.vae_sha256, cfg.vae_revision) as folder:
        try:
            return AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise VaeSourceError(f"encoder.vae: {cfg.vae} is not a diffusers AutoencoderKL folder ({first})") \
                from None


def posterior_sample(posterior: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Latents from stored posteriors [N, 2C, H, W] (scaled mean, then scaled std) and normals eps [N, C, H, W]:
    as EDM2, training draws a fresh latent each time it uses an image (eps from the step's generators)."""
    mean, std = posterior.float().chunk(2, dim=1)
    return mean + std * eps


class LatentEncoder:
    """Images -> VAE latent posterior (mean and std, scaled to final_std per channel) and back."""

    def __init__(self, cfg: EncoderConfig, vae=None, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.vae = (vae if vae is not None else load_autoencoder(cfg)).eval().requires_grad_(False).to(self.device)
        self.channels = int(self.vae.config.latent_channels)
        if len(cfg.latent_mean) != self.channels:
            raise ValueError(f"encoder.latent_mean has {len(cfg.latent_mean)} values, the VAE has "
                             f"{self.channels} latent channels")
        self.down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (1, self.channels, 1, 1)
        mean = torch.tensor(cfg.latent_mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(cfg.latent_std, dtype=torch.float32).reshape(shape)
        # x = (raw - mean) * scale, with scale = final_std / std (EDM2's normalisation).
        self.mean, self.scale = mean.to(self.device), (cfg.final_std / std).to(self.device)

    def resolution(self, image_resolution: int) -> int:
        if image_resolution % self.down:
            raise ValueError(f"data.resolution {image_resolution} is not divisible by the VAE's factor {self.down}")
        return image_resolution // self.down

    @torch.no_grad()
    def encode_posterior(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 2C, h, w]: the posterior's mean and std, scaled like a latent. x = (raw - mean) * scale is affine,
        so mean' + std' * eps is exactly a scaled posterior sample (what EDM2 draws, then scales)."""
        outs = []
        for chunk in images.split(self.cfg.batch_size):
            if chunk.shape[1] == 1:  # the SD VAE expects RGB
                chunk = chunk.expand(-1, 3, -1, -1)
            pixels01 = (chunk.to(self.device, torch.float32) + 1) * 0.5  # EDM2 feeds the VAE [0, 1]
            dist = self.vae.encode(pixels01).latent_dist
            outs.append(torch.cat([(dist.mean - self.mean) * self.scale, dist.std * self.scale], dim=1).cpu())
        return torch.cat(outs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The scaled posterior mean (deterministic)."""
        return self.encode_posterior(images)[:, : self.channels]

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in x.split(self.cfg.batch_size):
            raw = chunk.to(self.device, torch.float32) / self.scale + self.mean
            pixels01 = self.vae.decode(raw).sample.clamp(0, 1)  # EDM2's range, clamped as it clamps
            outs.append((pixels01 * 2 - 1).cpu())
        return torch.cat(outs)
