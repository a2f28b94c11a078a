"""One training step's data: the global batch drawn from the step's generator, then this rank's micro-batches.

Every rank draws the whole global batch (indices, label dropout, noise levels, noise) from the same per-step
generator and keeps its slice, so what a step computes does not depend on the world size or the micro-batch
size, only the order of the float reductions does. The draws come in the order the original loop made them, so one
process with one micro-batch reproduces the original single-process loop bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sims_platform.config.schema import TrainConfig
from sims_platform.encoders.latent import draw_latents, posterior_sample
from sims_platform.models.loss import edm2_loss
from sims_platform.models.precond import Precond


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # images per rank per forward pass (full batches)
    accumulation: int  # forward/backward passes per optimizer step on each rank
    world_size: int


def plan_batches(cfg: TrainConfig, world_size: int, where: str = "train") -> BatchPlan:
    """Split cfg.batch_size over ranks and micro-batches; `where` names the config section in errors."""
    batch, mb = cfg.batch_size, cfg.distributed.micro_batch
    if batch % world_size:
        raise ValueError(f"{where}.batch_size={batch} must be a multiple of the world size {world_size} "
                         "(the global batch is split evenly across ranks)")
    per_rank = batch // world_size
    mb = per_rank if mb is None else mb
    if per_rank % mb:
        raise ValueError(f"{where}.distributed.micro_batch={mb}: {where}.batch_size={batch} must be a multiple "
                         f"of micro_batch x world size = {mb * world_size} (world size {world_size})")
    return BatchPlan(micro_batch=mb, accumulation=per_rank // mb, world_size=world_size)


@dataclass(frozen=True)
class Draw:
    """A global batch with its noise: x (images), y (labels, one-hot rows, or None), ln-sigma normals, noise."""

    x: torch.Tensor
    y: torch.Tensor | None
    rnd: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, lo: int, hi: int, device: torch.device) -> Draw:
        y = None if self.y is None else self.y[lo:hi].to(device)
        return Draw(self.x[lo:hi].to(device), y, self.rnd[lo:hi].to(device), self.noise[lo:hi].to(device))


def draw_batch(data: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, label_dim: int, batch: int,
               gen: torch.Generator, posterior: bool = False) -> Draw:
    """The step's global batch, drawn on the CPU from `gen` (the same draws in the same order as before).
    posterior: data rows are VAE posteriors (mean, std); each drawn row gets a fresh latent from `gen`."""
    idx = torch.randint(len(data), (batch,), generator=gen)
    x = draw_latents(data[idx], gen) if posterior else data[idx].to(torch.float32)
    return _with_noise(x, labels[idx], cfg, label_dim, gen)


class StreamRows:
    """This rank's samples from a ShardStream, epoch after epoch (each rank reads only its own shards)."""

    def __init__(self, stream, workers: int, images: int):
        self.stream, self.workers = stream, workers
        self.epoch = images // max(stream.num_samples, 1)  # a resume restarts the epoch it was in
        self._it = self._epoch_iter()

    def _epoch_iter(self):
        from torch.utils.data import DataLoader

        self.stream.set_epoch(self.epoch)
        return iter(DataLoader(self.stream, batch_size=None, num_workers=self.workers))

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        while len(xs) < n:
            try:
                x, y, _ = next(self._it)
            except StopIteration:
                self.epoch += 1
                self._it = self._epoch_iter()
                continue
            xs.append(x)
            ys.append(y)
        if not xs:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        return torch.stack(xs), torch.stack(ys)


def draw_stream_batch(rows: StreamRows, lo: int, hi: int, shape: tuple[int, ...], cfg: TrainConfig,
                      label_dim: int, batch: int, gen: torch.Generator, posterior: bool = False) -> Draw:
    """The step's global batch with this rank's rows [lo, hi) streamed in (other ranks' rows stay zero:
    this rank never reads them); label dropout and noise still come from `gen` for the whole batch.
    posterior: `shape` is the stored [2C, h, w] of VAE posteriors; the latents' normals are drawn for the
    whole batch too, so a row's latent does not depend on the world size."""
    y = torch.zeros(batch, dtype=torch.int64)
    if posterior:
        eps = torch.randn((batch, shape[0] // 2, *shape[1:]), generator=gen)
        x = torch.zeros(eps.shape)
        if hi > lo:
            stored, y[lo:hi] = rows.take(hi - lo)
            x[lo:hi] = posterior_sample(stored, eps[lo:hi])
        return _with_noise(x, y, cfg, label_dim, gen)
    x = torch.zeros(batch, *shape)
    if hi > lo:
        x[lo:hi], y[lo:hi] = rows.take(hi - lo)
    return _with_noise(x, y, cfg, label_dim, gen)


def _with_noise(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, label_dim: int, gen: torch.Generator) -> Draw:
    batch = x.shape[0]
    if cfg.label_dropout > 0:
        drop = torch.rand(batch, generator=gen) < cfg.label_dropout
        y = torch.nn.functional.one_hot(y, label_dim).float() * (~drop).float()[:, None]
    rnd = torch.randn(batch, 1, 1, 1, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    return Draw(x, y if label_dim else None, rnd, noise)


def micro_slices(batch: int, plan: BatchPlan, rank: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of each of this rank's micro-batches; a short last batch gives uneven (maybe empty) ones.

    The batch is cut into world x accumulation near-equal consecutive chunks; rank r owns chunks
    r*accumulation ... (r+1)*accumulation - 1, so each rank always runs the same number of passes.
    """
    chunks = plan.world_size * plan.accumulation
    bounds = [batch * i // chunks for i in range(chunks + 1)]
    first = rank * plan.accumulation
    return [(bounds[i], bounds[i + 1]) for i in range(first, first + plan.accumulation)]


def per_sample_loss(net: torch.nn.Module, d: Draw, p_mean: float, p_std: float) -> torch.Tensor:
    """The EDM2 loss of a (micro-)batch with its pre-drawn noise; `net` may be a DeepSpeed engine."""
    return edm2_loss(net, d.x, d.y, d.rnd, d.noise, p_mean, p_std, _sigma_data(net))


def _sigma_data(net: torch.nn.Module) -> float:
    inner = getattr(net, "module", net)  # a DeepSpeed engine wraps the Precond
    assert isinstance(inner, Precond), type(inner)
    return inner.sigma_data
