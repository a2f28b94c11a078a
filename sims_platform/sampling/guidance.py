"""Denoisers and their compositions: SIMS negative guidance, classifier-free guidance, autoguidance, Neon.

The first three share one form: D = D_main + w (D_main - D_guide). The guide is the auxiliary model fine-tuned
on the main model's samples (SIMS), the unconditional main model (CFG), or an early/small main model
(autoguidance). In EDM2's notation the guidance scale is 1 + w. w = 0 returns D_main unchanged.
Neon (arXiv 2510.03597) moves the same extrapolation into weight space: one network with
theta = (1 + w) theta_main - w theta_guide, so each step costs one evaluation instead of two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import copy

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
    """D = D_main + w (D_main - D_guide) + sum_j w_j (D_main - D_j) over further (guide_j, w_j) in `more`.

    A guide whose weight is 0 is not evaluated and adds nothing, so w = 0 everywhere is the main denoiser bit for
    bit, and a zero weight among several gives exactly the method of the others."""

    def __init__(self, main: Denoiser, guide: Denoiser, w: float, more: Sequence[tuple[Denoiser, float]] = ()):
        self.main, self.guide, self.w = main, guide, float(w)
        self.more = [(g, float(wj)) for g, wj in more]

    def __call__(self, x, sigma, labels):
        d_main = self.main(x, sigma, labels)
        out = d_main
        for guide, w in [(self.guide, self.w), *self.more]:
            if w != 0:
                out = out + w * (d_main - guide(x, sigma, labels))
        return out


def sims(base: nn.Module, aux: nn.Module, w: float) -> Guided:
    return Guided(NetDenoiser(base), NetDenoiser(aux), w)


def classifier_free(net: nn.Module, w: float) -> Guided:
    return Guided(NetDenoiser(net), Unconditional(net), w)


def autoguidance(main: nn.Module, bad: nn.Module, w: float) -> Guided:
    return Guided(NetDenoiser(main), NetDenoiser(bad), w)


def neon(base: nn.Module, aux: nn.Module, w: float) -> nn.Module:
    """A copy of base whose parameters are (1 + w) theta_base - w theta_aux (computed in float64).

    Buffers (e.g. the fixed Fourier frequencies) are the base's: they are not trained, so both models share
    them. w = 0 returns the base itself, bit for bit.
    """
    if w == 0:
        return base
    aux_params = dict(aux.named_parameters())
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name not in aux_params or aux_params[name].shape != p.shape:
                raise ValueError(f"neon: the aux network has no parameter {name} of shape {list(p.shape)}; "
                                 "base and aux must share an architecture")
            a = aux_params[name].to(torch.float64)
            p.copy_(((1 + w) * p.to(torch.float64) - w * a).to(p.dtype))
    return out
