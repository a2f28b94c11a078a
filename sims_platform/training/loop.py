"""The training loop shared by train-base and finetune-aux: EDM2 loss, Adam, power EMA, resumable.

Every random draw of step s comes from a generator seeded by (seed, s), so a run resumed from a checkpoint
takes exactly the same steps as one that was never interrupted.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sims_platform.config.schema import OptimizerConfig, TrainConfig
from sims_platform.models.ema import PowerFunctionEMA
from sims_platform.models.loss import edm2_loss
from sims_platform.models.precond import Precond
from sims_platform.training.checkpoints import latest_checkpoint, save_checkpoint
from sims_platform.storage import fsio
from sims_platform.utils.progress import Progress


def learning_rate(opt: OptimizerConfig, images: int) -> float:
    """EDM2 schedule: warm-up over rampup_images, then 1/sqrt decay after ref_images."""
    lr = opt.lr
    if opt.ref_images > 0:
        lr /= math.sqrt(max(images / opt.ref_images, 1))
    if opt.rampup_images > 0:
        lr *= min(images / opt.rampup_images, 1)
    return lr


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class TrainResult:
    ema: Precond
    images: int
    resumed_from: str | None
    losses: list[tuple[int, float]]


class StopTraining(Exception):
    """Raised by a callback to stop after a checkpoint (used to simulate preemption in tests)."""


def train(net: Precond, data: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *, seed: int,
          checkpoints: str, snapshot_uri: Callable[[int], str] | None = None,
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          after_checkpoint: Callable[[int], None] | None = None, desc: str = "train") -> TrainResult:
    """Train `net` on (data, labels) for cfg.images images; resume from the newest checkpoint if any."""
    if len(data) == 0:
        raise ValueError(f"{desc}: the training set is empty")
    net.train()
    ema = PowerFunctionEMA(net, cfg.ema_std)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=1e-8)
    images, step = 0, 0
    resumed = latest_checkpoint(checkpoints)
    if resumed is not None:
        state = fsio.load_torch(resumed)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        images, step = state["images"], state["step"]

    losses: list[tuple[int, float]] = []
    window: list[float] = []
    next_log = (images // cfg.log_images + 1) * cfg.log_images
    next_ckpt = (images // cfg.checkpoint_images + 1) * cfg.checkpoint_images
    pending_snaps = sorted(s for s in cfg.snapshots if s > images)
    progress = Progress(desc, total=cfg.images, done=images, unit="img")
    n = len(data)
    while images < cfg.images:
        batch = min(cfg.batch_size, cfg.images - images)
        gen = step_generator(seed, step)
        idx = torch.randint(n, (batch,), generator=gen)
        x, y = data[idx].to(torch.float32), labels[idx]
        if cfg.label_dropout > 0:
            drop = torch.rand(batch, generator=gen) < cfg.label_dropout
            y = torch.nn.functional.one_hot(y, net.label_dim).float() * (~drop).float()[:, None]
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg.optimizer, images + batch)
        loss = edm2_loss(net, x, y if net.label_dim else None, cfg.p_mean, cfg.p_std, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():  # EDM2 zeroes non-finite gradients rather than skipping the step
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        opt.step()
        images += batch
        step += 1
        ema.update(net, images, batch)
        window.append(loss.item())
        progress.update(images, loss=window[-1])

        if images >= next_log or images >= cfg.images:
            mean_loss = sum(window) / len(window)
            losses.append((images, mean_loss))
            if on_log:
                on_log(images, {"loss": mean_loss, "lr": opt.param_groups[0]["lr"]})
            window.clear()
            next_log = (images // cfg.log_images + 1) * cfg.log_images
        while pending_snaps and images >= pending_snaps[0]:
            if snapshot_uri is not None:
                fsio.save_torch(snapshot_uri(pending_snaps[0]), {"ema": ema.state_dict(), "images": images})
            pending_snaps.pop(0)
        if images >= next_ckpt or images >= cfg.images:
            save_checkpoint(checkpoints, images, {"net": net.state_dict(), "ema": ema.state_dict(),
                                                  "optimizer": opt.state_dict(), "images": images,
                                                  "step": step}, cfg.keep_checkpoints)
            next_ckpt = (images // cfg.checkpoint_images + 1) * cfg.checkpoint_images
            if after_checkpoint:
                after_checkpoint(images)
    progress.close()
    return TrainResult(ema=copy.deepcopy(ema.ema).eval(), images=images, resumed_from=resumed, losses=losses)
