"""EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, algorithm 1 with S_churn = 0)."""

from __future__ import annotations

import torch

from sims_platform.config.schema import SamplerConfig
from sims_platform.sampling.guidance import Denoiser


def sigma_steps(cfg: SamplerConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rho-spaced noise levels sigma_0 > ... > sigma_{N-1}, followed by 0."""
    n = cfg.steps
    i = torch.arange(n, dtype=torch.float64, device=device)
    if n == 1:
        t = torch.tensor([cfg.sigma_max], dtype=torch.float64, device=device)
    else:
        a, b = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
        t = (a + i / (n - 1) * (b - a)) ** cfg.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def heun_sample(denoise: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None, cfg: SamplerConfig) -> torch.Tensor:
    """Integrate the probability-flow ODE from sigma_max * noise to sigma = 0 (2N-1 denoiser calls)."""
    t = sigma_steps(cfg, noise.device)
    x = noise.to(torch.float64) * t[0]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        d_cur = (x - denoise(x.float(), t_cur.float(), labels).double()) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < cfg.steps - 1:  # 2nd-order correction everywhere but the last step to sigma = 0
            d_prime = (x_next - denoise(x_next.float(), t_next.float(), labels).double()) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x.float()


def seeded_noise(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """One independent generator per seed, so a sample depends only on its seed, not its batch."""
    out = torch.empty(len(seeds), *shape)
    for j, s in enumerate(seeds.tolist()):
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device) if device is not None else out


# Labels use a different stream than the noise of the same seed.
_LABEL_STREAM = 2**40


def seeded_labels(seeds: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Class of each sample, drawn uniformly from its own seed (None for unconditional models)."""
    if num_classes == 0:
        return None
    gens = (torch.Generator().manual_seed(_LABEL_STREAM + int(s)) for s in seeds.tolist())
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=g)) for g in gens], dtype=torch.int64)
