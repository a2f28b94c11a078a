"""Where and in what precision a stage computes: the device (cuda:LOCAL_RANK or the CPU), autocast, TF32."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from sims_platform.config.loader import ConfigError
from sims_platform.config.schema import DEVICE_PATTERN

# ----------------------------------------------------------------------------
# Device

_DEVICE_RE = re.compile(DEVICE_PATTERN)


def check_device(spec: str, where: str = "runtime.device") -> str:
    """A device name as the config and --device take it: auto, cpu, cuda or cuda:N."""
    if not isinstance(spec, str) or not _DEVICE_RE.match(spec):
        raise ConfigError(f"{where}: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def _local_rank(env: Mapping[str, str]) -> int:
    raw = env.get("LOCAL_RANK", "")
    try:
        return int(raw) if raw != "" else 0
    except ValueError:
        raise ValueError(f"environment variable LOCAL_RANK={raw!r}: expected an integer") from None


def resolve_device(spec: str = "auto", env: Mapping[str, str] | None = None) -> torch.device:
    """The device a stage runs on.

    auto: cuda:LOCAL_RANK when CUDA is visible (torchrun and the PyTorchJob set LOCAL_RANK; an Indexed Job
    pod has one process and no LOCAL_RANK, so 0), else the CPU. cuda means cuda:LOCAL_RANK too; cuda:N and cpu
    are taken as given. Asking for CUDA where there is none is a ConfigError (the CLI prints it), not a silent
    CPU run.
    """
    check_device(spec)
    env = os.environ if env is None else env
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"runtime.device '{spec}': CUDA is not available in this process "
                         "(no GPU visible); use auto or cpu")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else _local_rank(env)
    if not 0 <= index < count:
        raise ConfigError(f"runtime.device '{spec}' (LOCAL_RANK {env.get('LOCAL_RANK', 'unset')}): this process "
                         f"sees {count} GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """The device as a stage records it: 'cpu', or 'cuda:N (<GPU name>)'."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


class PeakMemory:
    """The peak CUDA memory a stage allocated on its device (GiB); None on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30


# ----------------------------------------------------------------------------
# Precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for a network's body: convolutions and matmuls in bf16/fp16, the rest as written.

    The parts EDM2 keeps in fp32 opt out themselves (Precond's preconditioning and log-variance); the sampler
    integrates outside this context in float64. fp32 is no context at all, so it is bit for bit the plain path.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision: expected fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


_TF32_APPLIED: bool | None = None


def apply_tf32(enabled: bool) -> None:
    """Set the process-wide TF32 policy for CUDA matmuls and cuDNN convolutions (a no-op for the CPU).

    PyTorch's defaults differ per library (matmul off, cuDNN on), so fp32 results would depend on which ops a
    network uses; the config states one policy and every stage applies it once at start.
    """
    global _TF32_APPLIED
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    _TF32_APPLIED = enabled


def tf32_policy() -> bool | None:
    """The policy apply_tf32 last set in this process (None: never applied)."""
    return _TF32_APPLIED
