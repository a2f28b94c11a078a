"""EDM preconditioning around the U-Net, plus the learned per-noise-level uncertainty EDM2's loss uses."""

from __future__ import annotations

import torch
from torch import nn

from sims_platform.models.mp_layers import MPConv, MPFourier
from sims_platform.models.unet import UNet


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """c_skip, c_out, c_in, c_noise of EDM (Karras et al. 2022, table 1)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sd2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def one_hot_labels(labels: torch.Tensor | None, label_dim: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """Integer class ids -> one-hot rows; None -> all zeros, the unconditional model."""
    if label_dim == 0:
        return None
    if labels is None:
        return torch.zeros(batch, label_dim, device=device)
    if labels.dtype in (torch.int64, torch.int32):
        # A comparison rather than F.one_hot, whose range check reads the labels back to the host (a GPU sync).
        classes = torch.arange(label_dim, device=labels.device)
        return (labels.long()[:, None] == classes).to(torch.float32)
    return labels.to(torch.float32).reshape(-1, label_dim)


class Precond(nn.Module):
    """Denoiser D(x; sigma, class) = c_skip x + c_out F(c_in x; c_noise, class)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, sigma_data: float = 0.5,
                 logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        # Its constructor arguments, as EDM2's persistence keeps _init_kwargs: a model record carries them, so the
        # network loads with its own architecture (models/pretrained.py model_record).
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                sigma_data=sigma_data, logvar_channels=logvar_channels, **unet_kwargs)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_logvar: bool = False):
        # Under autocast (sampler.precision, distributed.precision bf16) only the U-Net's body runs in reduced
        # precision; the preconditioning and the log-variance stay fp32, as EDM2 keeps them.
        fp32 = torch.autocast(x.device.type, enabled=False)
        with fp32:
            x = x.to(torch.float32)
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
            labels = one_hot_labels(class_labels, self.label_dim, x.shape[0], x.device)
            c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        f_x = self.unet(c_in * x, c_noise.flatten(), labels)
        with fp32:
            d_x = c_skip * x + c_out * f_x.to(torch.float32)
            if not return_logvar:
                return d_x
            logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)
        return d_x, logvar
