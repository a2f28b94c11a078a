"""Denoisers and their compositions: SIMS negative guidance, classifier-free guidance, autoguidance.

All three share one form: D = D_main + w (D_main - D_guide). The guide is the auxiliary model fine-tuned
on the main model's samples (SIMS), the unconditional main model (CFG), or an early/small main model
(autoguidance). In EDM2's notation the guidance scale is 1 + w. w = 0 returns D_main unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor: ...


class NetDenoiser:
    """A network as a denoiser (labels passed through)."""

    def __init__(self, net: nn.Module):
        self.net = net

    @torch.no_grad()
    def __call__(self, x, sigma, labels):
        return self.net(x, sigma, labels)


class Unconditional:
    """The same network with its class input dropped (the guide of classifier-free guidance)."""

    def __init__(self, net: nn.Module):
        self.net = net

    @torch.no_grad()
    def __call__(self, x, sigma, labels):
        return self.net(x, sigma, None)


class Guided:
    """D = D_main + w (D_main - D_guide); w = 0 evaluates only the main denoiser (bit-exact base model)."""

    def __init__(self, main: Denoiser, guide: Denoiser, w: float):
        self.main, self.guide, self.w = main, guide, float(w)

    def __call__(self, x, sigma, labels):
        d_main = self.main(x, sigma, labels)
        if self.w == 0:
            return d_main
        d_guide = self.guide(x, sigma, labels)
        return d_main + self.w * (d_main - d_guide)


def sims(base: nn.Module, aux: nn.Module, w: float) -> Guided:
    return Guided(NetDenoiser(base), NetDenoiser(aux), w)


def classifier_free(net: nn.Module, w: float) -> Guided:
    return Guided(NetDenoiser(net), Unconditional(net), w)


def autoguidance(main: nn.Module, bad: nn.Module, w: float) -> Guided:
    return Guided(NetDenoiser(main), NetDenoiser(bad), w)
