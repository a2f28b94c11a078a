"""Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) via the prdc library."""

from __future__ import annotations

import contextlib
import io

import torch


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """prdc's k-NN manifold metrics of fake features [N, D] against real features [M, D] (equal N, M advised).

    precision: share of fakes inside the real manifold (fidelity); recall: share of reals inside the fake
    manifold (diversity); density and coverage are their outlier-robust variants.
    """
    from prdc import compute_prdc  # lazy: imports scikit-learn

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: expected features [N, D] with the same D, got {list(real.shape)} and "
                         f"{list(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} real and fake features, got {len(real)} and "
                         f"{len(fake)}")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
        out = compute_prdc(real.detach().cpu().float().numpy(), fake.detach().cpu().float().numpy(), nearest_k=k)
    return {name: float(value) for name, value in out.items()}
