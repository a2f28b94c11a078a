"""How a training step updates the weights: the plain PyTorch engine, or DeepSpeed (ds_engine.py).

Both take the loss of one micro-batch scaled as (sum of per-sample losses) / (global batch), so the summed
gradient over all micro-batches and ranks is the gradient of the global batch mean, whatever the split.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sims_platform.config.schema import TrainConfig
from sims_platform.training import distributed


class Engine(Protocol):
    kind: str  # "plain" or "deepspeed"
    forward: nn.Module  # what to call for the loss (the net, or the DeepSpeed engine wrapping it)

    def autocast(self) -> contextlib.AbstractContextManager[Any]: ...
    def set_lr(self, lr: float) -> None: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def full_params(self) -> list[torch.Tensor]: ...
    def post_step(self) -> None: ...
    def lr(self) -> float: ...
    def consolidated_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...
    def load_consolidated(self, net_state: dict[str, torch.Tensor], opt_state: dict[str, Any]) -> None: ...


def new_adam(net: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=1e-8)


class PlainEngine:
    """Adam on every rank with the gradient summed across ranks (data parallel, replicated state)."""

    kind = "plain"

    def __init__(self, net: nn.Module, cfg: TrainConfig, device: torch.device):
        self.net, self.forward, self.device = net, net, device
        self.opt = new_adam(net, cfg)
        self.precision = cfg.distributed.precision
        self.grad_clip = cfg.distributed.grad_clip

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = list(self.net.parameters())
        if distributed.world_size() > 1:
            # One flat all-reduce; ranks without a gradient for a parameter contribute zeros.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = g
        for p in params:  # EDM2 zeroes non-finite gradients rather than skipping the step
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def full_params(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.net.parameters()]

    def post_step(self) -> None:
        pass  # MPConv re-normalises its stored weight in place at the next forward

    def consolidated_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.net.state_dict(), self.opt.state_dict()

    def load_consolidated(self, net_state: dict[str, torch.Tensor], opt_state: dict[str, Any]) -> None:
        self.net.load_state_dict(net_state)
        self.opt.load_state_dict(opt_state)


