"""The process group a training stage runs in: detected from torchrun's or a PyTorchJob's env, or a single process.

Launchers set MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and LOCAL_RANK (torchrun does all five). A bare
PyTorchJob pod without torchrun gets RANK = pod index and no LOCAL_RANK: then LOCAL_RANK is 0 (one process per
pod). Without WORLD_SIZE this is one process and no process group is needed for the plain path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # WORLD_SIZE was set: a launcher (torchrun, the operator) started this process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r}: expected an integer") from None


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size and local rank from the environment (torchrun, PyTorchJob, or nothing)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return DistEnv()
    world, rank = _int(env, "WORLD_SIZE", 1), _int(env, "RANK", 0)
    local = _int(env, "LOCAL_RANK", 0)  # a bare PyTorchJob injects none: one process per pod
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    if world > 1 and not env.get("MASTER_ADDR"):
        raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun or a PyTorchJob")
    return DistEnv(rank=rank, world_size=world, local_rank=local, launched=True)


def device_for(denv: DistEnv) -> torch.device:
    """One GPU per process (cuda:LOCAL_RANK) when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", denv.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(denv: DistEnv, *, need_group: bool = False, timeout_s: float = 1800) -> DistEnv:
    """Join the process group (gloo on CPU, nccl on CUDA) when there are several ranks or `need_group` asks.

    Also completes the env DeepSpeed checks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK): when
    one is missing, deepspeed.init_distributed falls back to mpi4py discovery, which fails in a pod.
    """
    if dist.is_initialized():
        return denv
    os.environ.setdefault("RANK", str(denv.rank))
    os.environ.setdefault("WORLD_SIZE", str(denv.world_size))
    os.environ.setdefault("LOCAL_RANK", str(denv.local_rank))
    if denv.world_size == 1 and not need_group:
        return denv
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device_for(denv))
    timeout = timedelta(seconds=timeout_s)
    if denv.world_size == 1:
        # One process still needs a group for DeepSpeed: an in-memory store, so no port is taken.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=denv.rank, world_size=denv.world_size,
                                timeout=timeout)
    return denv


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active() and world_size() > 1:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (small picklable objects: names, flags)."""
    if not active() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small picklable objects)."""
    if not active() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def teardown() -> None:
    """Leave the process group (idempotent); launchers call it once training is done."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
