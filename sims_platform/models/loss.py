"""The EDM2 training loss: log-normal noise levels, EDM weighting, learned uncertainty."""

from __future__ import annotations

import torch


def edm2_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, rnd: torch.Tensor,
              noise: torch.Tensor, p_mean: float, p_std: float, sigma_data: float) -> torch.Tensor:
    """Per-sample loss (summed over pixels): weight(sigma)/exp(u) * ||D(x+n) - x||^2 + u.

    The randomness comes in drawn beforehand (the training loop draws it from the step's generator so that
    every rank shares one draw): rnd [N,1,1,1] standard normals give ln(sigma) = p_mean + p_std * rnd, and
    noise, standard normal like images, is scaled by sigma.
    """
    sigma = (rnd * p_std + p_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
    loss = (weight / logvar.exp()) * (denoised - images) ** 2 + logvar
    return loss.flatten(1).sum(dim=1)
