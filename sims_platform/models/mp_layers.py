"""Magnitude-preserving building blocks of the EDM2 network (Karras et al. 2024, section 3).

Each function keeps unit-variance inputs at unit variance, so the network needs no normalisation layers
in its residual path; tests/test_mp_layers.py checks each one alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Pure functions


def normalize(x: torch.Tensor, dim: list[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Scale x so that the mean square over `dim` (all but the first axis by default) is 1."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS under a unit normal input (0.596)."""
    return F.silu(x).div_(0.596)  # in place on SiLU's own output (its backward reads the input): same values


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Blend a -> b by t and rescale so two independent unit-variance inputs give unit variance."""
    return a.lerp(b, t).div_(math.sqrt((1 - t) ** 2 + t**2))  # in place on lerp's output, as in mp_silu


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate with weights so that b contributes fraction t of the output's energy."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """2x average-pool down or nearest up (the [1,1] filter of EDM2); both preserve magnitude."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    raise ValueError(f"resample mode must be keep, down or up, got {mode!r}")


# ----------------------------------------------------------------------------
# Layers


class MPFourier(nn.Module):
    """Random Fourier features of a scalar (the noise level) with unit output variance."""

    freqs: torch.Tensor
    phases: torch.Tensor

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class _WeightCache:
    """MPConv's normalised weight in eval mode, keyed on the stored weight's identity and version.

    Any in-place write through the parameter itself (optimizer steps, `load_state_dict`, Neon's `copy_`, EMA
    `lerp_`) bumps `weight._version`; `.to()` or a replaced parameter change `data_ptr`. The source storage is
    held so its address cannot be reused by a new weight while the key names it. A deep copy (Neon copies the
    base) starts empty rather than duplicating the cached tensors. Writes through `weight.data` bypass the
    version counter: nothing in the platform does that to an eval-mode network.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.storage: torch.UntypedStorage | None = None
        self.tensors: dict[tuple | str, torch.Tensor] = {}

    def __deepcopy__(self, memo) -> _WeightCache:
        return _WeightCache()

    def lookup(self, weight: torch.Tensor) -> dict[tuple | str, torch.Tensor]:
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape))
        if key != self.key:
            self.key, self.storage, self.tensors = key, weight.untyped_storage(), {}
        return self.tensors


class MPConv(nn.Module):
    """Convolution (or linear layer when kernel is empty) with forced weight normalisation and no bias.

    The stored weight is re-normalised to unit norm per output channel on every training forward pass,
    so the effective learning rate does not drift as the weights grow (EDM2, section 3.4).
    A DeepSpeed engine turns that in-place copy off (`inplace_normalize = False`): its master weights live
    in the optimizer (partitioned under ZeRO), so it re-normalises those after each step instead
    (sims_platform/training/ds_engine.py); the functional normalisation below keeps the output the same.
    A frozen network (eval mode, no grad: every sampler's) normalises once and reuses the result until its
    weight changes (_WeightCache); the output is bit for bit that of normalising at every call.
    """

    inplace_normalize: bool = True

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._cache = _WeightCache()

    def _scaled(self, w: torch.Tensor, gain: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = w * (gain / math.sqrt(w[0].numel()))
        return w.to(dtype)

    def _frozen_weight(self, x: torch.Tensor, gain: float | torch.Tensor) -> torch.Tensor:
        tensors = self._cache.lookup(self.weight)
        if isinstance(gain, torch.Tensor):  # a learned gain (emb_gain, out_gain): cache the normalisation only
            if "normalized" not in tensors:
                tensors["normalized"] = normalize(self.weight.to(torch.float32))
            return self._scaled(tensors["normalized"], gain, x.dtype)
        # Also cast to what autocast would cast to, so the cast is cached too (the same values).
        dev = x.device.type
        target = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.is_floating_point() \
            else x.dtype
        key = (float(gain), x.dtype, target)
        if key not in tensors:
            tensors[key] = self._scaled(normalize(self.weight.to(torch.float32)), gain, x.dtype).to(target)
        return tensors[key]

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        if not self.training and not self.weight.requires_grad:
            w = self._frozen_weight(x, gain)
        else:
            w = self.weight.to(torch.float32)
            if self.training and self.inplace_normalize:
                with torch.no_grad():
                    self.weight.copy_(normalize(w))
            w = self._scaled(normalize(w), gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))
