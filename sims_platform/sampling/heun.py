"""EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, algorithm 1 with S_churn = 0)."""

from __future__ import annotations

import torch

from sims_platform.config.schema import SamplerConfig
from sims_platform.sampling.guidance import Denoiser
from sims_platform.utils.accel import autocast


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


def call_sigmas(cfg: SamplerConfig) -> list[float]:
    """The noise levels heun_sample calls its denoiser at, as the denoiser sees them (float32): each step's
    start, then each 2nd-order correction's end (every step but the last)."""
    t = sigma_steps(cfg).float().tolist()
    return t[:cfg.steps] + t[1:cfg.steps]


def heun_sample(denoise: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None, cfg: SamplerConfig) -> torch.Tensor:
    """Integrate the probability-flow ODE from sigma_max * noise to sigma = 0 (2N-1 denoiser calls).

    Runs where `noise` is; cfg.precision applies to the denoiser calls only (autocast), while the ODE state
    stays float64. Nothing here reads a value back to the host, so a GPU runs the steps without a sync.
    """
    t = sigma_steps(cfg, noise.device)
    x = noise.to(torch.float64) * t[0]

    def d(x_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with autocast(noise.device, cfg.precision):
            out = denoise(x_.float(), sigma.float(), labels)
        return out.double()

    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        d_cur = (x - d(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < cfg.steps - 1:  # 2nd-order correction everywhere but the last step to sigma = 0
            d_prime = (x_next - d(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x.float()


def seeded_noise(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """One independent generator per seed, so a sample depends only on its seed, not its batch.

    The generators live on `device` and draw there: a GPU gets no host-side draw and no copy. CPU and CUDA
    generators are different algorithms (Mersenne Twister vs Philox), so the same seed gives other noise on a
    GPU than on the CPU; on each device a seed always gives the same noise (docs/devices.md).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    out = torch.empty(len(seed_list), *shape, device=device)
    for j, s in enumerate(seed_list):
        out[j] = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(int(s)), device=device)
    return out


# Labels use a different stream than the noise of the same seed.
_LABEL_STREAM = 2**40


def seeded_labels(seeds: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Class of each sample, drawn uniformly from its own seed (None for unconditional models)."""
    if num_classes == 0:
        return None
    gens = (torch.Generator().manual_seed(_LABEL_STREAM + int(s)) for s in seeds.tolist())
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=g)) for g in gens], dtype=torch.int64)
