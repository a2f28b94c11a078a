"""How far a fine-tuned aux model moved from its base: the relative weight distance, and the mean squared difference
of the two denoisers per noise level on given images (held-out real, synthetic), with its plot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sims_platform.tracking.figures import figure_png, new_figure

# Noise levels the denoisers are compared at: log-spaced over the range the EDM samplers visit (0.002 to 80).
SIGMAS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


@torch.no_grad()
def weight_distance(base: nn.Module, aux: nn.Module) -> float:
    """||theta_aux - theta_base|| / ||theta_base|| over every parameter (float64 sums)."""
    diff = norm = 0.0
    for (name, p), q in zip(base.named_parameters(), aux.parameters()):
        if p.shape != q.shape:
            raise ValueError(f"parameter {name}: base {list(p.shape)} vs aux {list(q.shape)}: not the same network")
        diff += float((q.double() - p.double()).pow(2).sum())
        norm += float(p.double().pow(2).sum())
    return math.sqrt(diff / norm) if norm > 0 else float("nan")


@torch.no_grad()
def denoiser_gap(base: nn.Module, aux: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                 sigmas: Sequence[float] = SIGMAS, seed: int = 0, batch_size: int = 256) -> list[float]:
    """Mean over images and elements of (D_aux(x + sigma n) - D_base(x + sigma n))^2 at each sigma: the same noise
    n (seeded) for both networks and every sigma, so the numbers of two aux models on one image set are paired."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for sigma in sigmas:
        total = 0.0
        for lo in range(0, len(x), batch_size):
            xb = x[lo:lo + batch_size]
            device = next(base.parameters()).device
            y = (xb + sigma * noise[lo:lo + batch_size]).to(device)
            lb = labels[lo:lo + batch_size].to(device) if labels is not None else None
            d = aux(y, sigma, lb).double() - base(y, sigma, lb).double()
            total += float(d.pow(2).sum())
        out.append(total / x.numel())
    return out


def drift_png(title: str, sigmas: Sequence[float], curves: Mapping[str, Sequence[float]]) -> bytes:
    """The per-sigma denoiser gap of each image set (log-log)."""
    fig = new_figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, values in curves.items():
        ax.plot(sigmas, values, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise level sigma")
    ax.set_ylabel("mean (D_aux - D_base)^2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)
