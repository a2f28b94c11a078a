"""One training step's data: the global batch drawn from the step's generators, then this rank's micro-batches.

Every rank draws the whole global batch's random numbers (indices, label dropout, noise levels, noise) from the
same per-step generators and keeps its slice, so what a step computes does not depend on the world size or the
micro-batch size, only the order of the float reductions does. The row indices and label dropout come from a
host generator; the normals (noise, noise levels, the latents of VAE posteriors) from a generator on the training
device, where they are drawn in one kernel each instead of ~34 M host normals per step at batch 2048. Only this
rank's rows of data are gathered and copied (pinned, without blocking) to the device.

On the CPU both generators are one, and the draws come in the order the original loop made them, so one process
with one micro-batch reproduces the original single-process loop bit for bit. A CUDA generator is a different
stream from the CPU one (Philox vs Mersenne Twister): the same seed gives another, equally valid run on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sims_platform.config.schema import TrainConfig
from sims_platform.data.errors import DataError
from sims_platform.encoders.latent import posterior_sample
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
    """A global batch's draws, with only this rank's rows of data.

    x: this rank's stored rows [first, first + len(x)) of the global batch (images, or VAE posteriors when `eps`
    is given), still on the host; y: the labels of the whole batch (or None), with `drop` its label-dropout mask
    (or None); rnd (ln-sigma normals), noise and eps (the posteriors' normals) cover the whole global batch and
    live on the training device, drawn there by the step's noise generator.
    """

    x: torch.Tensor
    first: int
    y: torch.Tensor | None
    drop: torch.Tensor | None
    label_dim: int
    rnd: torch.Tensor
    noise: torch.Tensor
    eps: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.rnd.shape[0]

    def rows(self, lo: int, hi: int, device: torch.device) -> Batch:
        """Rows [lo, hi) of the global batch on `device` (they must be this rank's)."""
        if not self.first <= lo <= hi <= self.first + len(self.x):
            raise IndexError(f"rows [{lo}, {hi}) are not this rank's [{self.first}, {self.first + len(self.x)})")
        x = _to(self.x[lo - self.first:hi - self.first], device)
        x = x.to(torch.float32) if self.eps is None else posterior_sample(x, self.eps[lo:hi])
        y = None
        if self.label_dim and self.y is not None:
            y = _to(self.y[lo:hi], device)
            if self.drop is not None:
                y = torch.nn.functional.one_hot(y, self.label_dim).float() * \
                    (~_to(self.drop[lo:hi], device)).float()[:, None]
        return Batch(x, y, self.rnd[lo:hi], self.noise[lo:hi])


@dataclass(frozen=True)
class Batch:
    """A micro-batch on the training device: x (images), y (labels, one-hot rows, or None), rnd, noise."""

    x: torch.Tensor
    y: torch.Tensor | None
    rnd: torch.Tensor
    noise: torch.Tensor


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host rows to the device without blocking the host: a pinned staging copy for CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def draw_batch(data: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, label_dim: int, batch: int,
               gen: torch.Generator, noise_gen: torch.Generator, span: tuple[int, int],
               posterior: bool = False) -> Draw:
    """The step's global batch: the rows drawn on the host from `gen`, the normals on the device from `noise_gen`.

    span: the rows [lo, hi) of the global batch this rank trains on; only those are gathered from `data`.
    posterior: data rows are VAE posteriors (mean, std); each drawn row gets a fresh latent from `noise_gen`.
    On the CPU `noise_gen` is `gen` itself, so the draws come in the order the original loop made them.
    """
    idx = torch.randint(len(data), (batch,), generator=gen)
    lo, hi = span
    shape = _latent_shape(tuple(data.shape[1:]), posterior)
    eps = _normals((batch, *shape), noise_gen) if posterior else None
    return _with_noise(data[idx[lo:hi]], lo, labels[idx], shape, cfg, label_dim, gen, noise_gen, eps)


class StreamRows:
    """This rank's samples from a ShardStream, epoch after epoch (each rank reads only its own shards)."""

    def __init__(self, stream, workers: int, images: int):
        self.stream, self.workers = stream, workers
        self.epoch = images // max(stream.num_samples, 1)  # a resume restarts the epoch it was in
        self._it = self._epoch_iter()

    def _epoch_iter(self):
        from torch.utils.data import DataLoader

        self.stream.set_epoch(self.epoch)
        self._rows_this_epoch = 0
        return iter(DataLoader(self.stream, batch_size=None, num_workers=self.workers))

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        while len(xs) < n:
            try:
                x, y, _ = next(self._it)
            except StopIteration:
                if self._rows_this_epoch == 0:  # the next epoch would be as empty: fail instead of spinning
                    raise DataError(f"{self.stream.uri}: epoch {self.epoch} gave this rank no samples "
                                    f"({self.workers} loader workers); expected at least one shard per rank")
                self.epoch += 1
                self._it = self._epoch_iter()
                continue
            self._rows_this_epoch += 1
            xs.append(x)
            ys.append(y)
        if not xs:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        return torch.stack(xs), torch.stack(ys)


def draw_stream_batch(rows: StreamRows, lo: int, hi: int, shape: tuple[int, ...], cfg: TrainConfig,
                      label_dim: int, batch: int, gen: torch.Generator, noise_gen: torch.Generator,
                      posterior: bool = False) -> Draw:
    """The step's global batch with this rank's rows [lo, hi) streamed in (this rank never reads the others);
    label dropout and the normals still come from the generators for the whole batch, so a row's draws do not
    depend on the world size. posterior: `shape` is the stored [2C, h, w] of VAE posteriors."""
    shape = tuple(shape)
    latent = _latent_shape(shape, posterior)
    eps = _normals((batch, *latent), noise_gen) if posterior else None
    y = torch.zeros(batch, dtype=torch.int64)
    x = torch.zeros(0, *shape)
    if hi > lo:
        x, y[lo:hi] = rows.take(hi - lo)
    return _with_noise(x, lo, y, latent, cfg, label_dim, gen, noise_gen, eps)


def _latent_shape(stored: tuple[int, ...], posterior: bool) -> tuple[int, ...]:
    return (stored[0] // 2, *stored[1:]) if posterior else stored


def _normals(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device)


def _with_noise(x: torch.Tensor, first: int, y: torch.Tensor, shape: tuple[int, ...], cfg: TrainConfig,
                label_dim: int, gen: torch.Generator, noise_gen: torch.Generator, eps: torch.Tensor | None) -> Draw:
    batch = y.shape[0]
    drop = torch.rand(batch, generator=gen) < cfg.label_dropout if cfg.label_dropout > 0 else None
    rnd = _normals((batch, 1, 1, 1), noise_gen)
    noise = _normals((batch, *shape), noise_gen)
    return Draw(x, first, y if label_dim else None, drop, label_dim, rnd, noise, eps)


def micro_slices(batch: int, plan: BatchPlan, rank: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of each of this rank's micro-batches; a short last batch gives uneven (maybe empty) ones.

    The batch is cut into world x accumulation near-equal consecutive chunks; rank r owns chunks
    r*accumulation ... (r+1)*accumulation - 1, so each rank always runs the same number of passes.
    """
    chunks = plan.world_size * plan.accumulation
    bounds = [batch * i // chunks for i in range(chunks + 1)]
    first = rank * plan.accumulation
    return [(bounds[i], bounds[i + 1]) for i in range(first, first + plan.accumulation)]


def per_sample_loss(net: torch.nn.Module, d: Batch, p_mean: float, p_std: float) -> torch.Tensor:
    """The EDM2 loss of a (micro-)batch with its pre-drawn noise; `net` may be a DeepSpeed engine."""
    return edm2_loss(net, d.x, d.y, d.rnd, d.noise, p_mean, p_std, _sigma_data(net))


def _sigma_data(net: torch.nn.Module) -> float:
    inner = getattr(net, "module", net)  # a DeepSpeed engine wraps the Precond
    assert isinstance(inner, Precond), type(inner)
    return inner.sigma_data
