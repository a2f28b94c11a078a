"""The EDM2 training loss: log-normal noise levels, EDM weighting, learned uncertainty."""

from __future__ import annotations

import torch

from sims_platform.models.precond import Precond


def edm2_loss(net: Precond, images: torch.Tensor, labels: torch.Tensor | None, p_mean: float, p_std: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample loss (summed over pixels): weight(sigma)/exp(u) * ||D(x+n) - x||^2 + u."""
    n = images.shape[0]
    rnd = torch.randn(n, 1, 1, 1, generator=generator, device=images.device)
    sigma = (rnd * p_std + p_mean).exp()
    sd = net.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma
    denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
    loss = (weight / logvar.exp()) * (denoised - images) ** 2 + logvar
    return loss.flatten(1).sum(dim=1)
