"""The training loop shared by train-base and finetune-aux: EDM2 loss, Adam, power EMA, resumable, distributed.

Every random draw of step s comes from a generator seeded by (seed, s), so a run resumed from a checkpoint
takes exactly the same steps as one that was never interrupted. Each rank draws the whole global batch and
keeps its share (batches.py), so the steps do not depend on the world size either. One process with the
plain engine is the original single-process loop, bit for bit.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sims_platform.config.schema import OptimizerConfig, TrainConfig
from sims_platform.data.stream import ShardStream
from sims_platform.models.ema import PowerFunctionEMA
from sims_platform.models.precond import Precond
from sims_platform.models.pretrained import model_record
from sims_platform.storage import fsio
from sims_platform.training import distributed
from sims_platform.training.batches import (
    StreamRows,
    draw_batch,
    draw_stream_batch,
    micro_slices,
    per_sample_loss,
    plan_batches,
)
from sims_platform.training.checkpoints import (
    Checkpoint,
    fetch_native,
    latest,
    read_state,
    save_checkpoint,
    save_sharded,
)
from sims_platform.training.engines import Engine, PlainEngine
from sims_platform.utils.progress import Progress


def learning_rate(opt: OptimizerConfig, images: int, offset: int = 0) -> float:
    """EDM2 schedule: warm-up over rampup_images, then 1/sqrt decay after ref_images. A fine-tune that starts where
    another run's schedule ended (`offset` images) decays from there, and warms up over its own images."""
    lr = opt.lr
    if opt.ref_images > 0:
        lr /= math.sqrt(max((offset + images) / opt.ref_images, 1))
    if opt.rampup_images > 0:
        lr *= min(images / opt.rampup_images, 1)
    return lr


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def noise_generator(seed: int, step: int, device: torch.device, host: torch.Generator) -> torch.Generator:
    """The generator of step `step`'s normals on `device`: `host` itself on the CPU (the original draws, in the
    original order), a device generator seeded alike elsewhere."""
    if device.type == "cpu":
        return host
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


@dataclass(frozen=True)
class Start:
    """Where a run starts while its own folder holds no checkpoint (a fine-tune; stages/training.py).

    checkpoint: another run's checkpoint to continue (weights, Adam moments, EMA, image and step counters: with the
    same seed, the steps are the ones that run would have taken next). offset: images the run counts as already
    seen: its learning-rate decay and its EMA's averaging length start there (its warm-up at 0), so the EMA's first
    update keeps most of the starting weights instead of replacing them.
    """

    checkpoint: Checkpoint | None = None
    offset: int = 0


@dataclass
class TrainResult:
    ema: Precond | None  # the EMA network on rank 0; None on the other ranks
    images: int
    resumed_from: str | None
    losses: list[tuple[int, float]]


class StopTraining(Exception):
    """Raised by a callback to stop after a checkpoint (used to simulate preemption in tests)."""


# ----------------------------------------------------------------------------
# Start or resume


def _native_resume(ckpt: Checkpoint | None, cfg: TrainConfig, world: int) -> bool:
    """DeepSpeed's own files can be loaded only by the same ZeRO layout (stage, precision, world size)."""
    if ckpt is None or ckpt.commit is None or not cfg.distributed.uses_deepspeed():
        return False
    c, d = ckpt.commit, cfg.distributed
    return (c.get("engine"), c.get("world_size"), c.get("zero_stage"), c.get("precision")) == \
        ("deepspeed", world, d.zero_stage, d.precision)


def _start(net: Precond, cfg: TrainConfig, ckpt: Checkpoint | None, plan, device: torch.device,
           main: bool) -> tuple[Engine, PowerFunctionEMA[Precond] | None, int, int]:
    """The engine and EMA (rank 0), resumed from `ckpt` if given; returns (engine, ema, images, step)."""
    native = _native_resume(ckpt, cfg, plan.world_size)
    # Native DeepSpeed resumes need the consolidated state only for the EMA (rank 0); others need it all.
    state = read_state(ckpt) if ckpt is not None and (main or not native) else None
    ema = PowerFunctionEMA(net, cfg.ema_std) if main else None  # before DeepSpeed partitions the net
    if ema is not None and state is not None:
        ema.load_state_dict(state["ema"])
    if cfg.distributed.uses_deepspeed():
        from sims_platform.training.ds_engine import DeepSpeedEngine

        initial = (state["net"], state["optimizer"]) if state is not None and not native else None
        engine: Engine = DeepSpeedEngine(net, cfg, plan, device, initial=initial)
        if native:
            assert ckpt is not None
            local = fetch_native(ckpt, distributed.rank())
            try:
                engine.load_native(local)  # type: ignore[attr-defined]
            finally:
                shutil.rmtree(local, ignore_errors=True)
    else:
        engine = PlainEngine(net.to(device), cfg, device)
        if state is not None:
            engine.load_consolidated(state["net"], state["optimizer"])
    if ckpt is None:
        return engine, ema, 0, 0
    counters = state if state is not None else ckpt.commit
    assert counters is not None
    return engine, ema, int(counters["images"]), int(counters["step"])


# ----------------------------------------------------------------------------
# The loop


def train(net: Precond, data: torch.Tensor | ShardStream, labels: torch.Tensor | None, cfg: TrainConfig, *, seed: int,
          checkpoints: str, snapshot_uri: Callable[[int], str] | None = None,
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          after_checkpoint: Callable[[int], None] | None = None, desc: str = "train",
          where: str = "train", start: Start = Start()) -> TrainResult:
    """Train `net` on (data, labels) for cfg.images images; resume from the newest checkpoint if any.

    `data` is the training set in memory with its `labels`, or a ShardStream (labels None) that each rank
    reads its own shards of (cfg.loader == "stream").

    Under torchrun or a PyTorchJob every rank calls this with the same arguments. Rank 0 alone keeps the
    EMA, calls `on_log`, writes snapshots and returns the EMA network. `where` names the config section
    in errors (train_base, finetune_aux). While `checkpoints` holds none, the run begins as `start` says (a
    fine-tune continuing the base's checkpoint, or counting the base's images before its first step).
    """
    if (data.num_samples if isinstance(data, ShardStream) else len(data)) == 0:
        raise ValueError(f"{desc}: the training set is empty")
    denv = distributed.init(distributed.detect())
    world, rank, main = denv.world_size, denv.rank, denv.is_main
    plan = plan_batches(cfg, world, where)
    device = distributed.device_for(denv) if denv.launched else next(net.parameters()).device
    net.train()
    # One answer for every rank: the run's own newest checkpoint, else the one it starts from.
    ckpt = distributed.broadcast((latest(checkpoints) or start.checkpoint) if main else None)
    engine, ema, images, step = _start(net, cfg, ckpt, plan, device, main)

    losses: list[tuple[int, float]] = []
    window: list[torch.Tensor] = []
    next_log = (images // cfg.log_images + 1) * cfg.log_images
    next_ckpt = (images // cfg.checkpoint_images + 1) * cfg.checkpoint_images
    pending_snaps = sorted(s for s in cfg.snapshots if s > images)
    progress = Progress(desc, total=cfg.images, done=images, unit="img") if main else None
    stream = StreamRows(data, cfg.loader_workers, images) if isinstance(data, ShardStream) else None
    # The encode stage stores VAE posteriors (mean and std: twice the network's channels); each draw of an
    # image then gets a fresh latent (encoders/latent.py). Feed and generate shards hold exact samples.
    posterior = bool(data.manifest.get("posterior")) if isinstance(data, ShardStream) else \
        data.shape[1] == 2 * net.img_channels
    while images < cfg.images:
        batch = min(cfg.batch_size, cfg.images - images)
        gen = step_generator(seed, step)
        noise_gen = noise_generator(seed, step, device, gen)
        mine = micro_slices(batch, plan, rank)
        span = (mine[0][0], mine[-1][1])
        if isinstance(data, torch.Tensor):
            assert labels is not None  # an in-memory set comes with its labels
            d = draw_batch(data, labels, cfg, net.label_dim, batch, gen, noise_gen, span, posterior)
        else:
            assert stream is not None  # made above for a ShardStream
            d = draw_stream_batch(stream, *span, tuple(data.manifest["shape"]), cfg, net.label_dim, batch, gen,
                                  noise_gen, posterior)
        engine.set_lr(learning_rate(cfg.optimizer, images + batch, start.offset))
        # Summed on the device in float64, in the order a Python float sum would take, and read back only at
        # log points: a per-step .item() would stall the GPU's queue at every micro-batch.
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for lo, hi in mine:
            with engine.autocast():
                per = per_sample_loss(engine.forward, d.rows(lo, hi, device), cfg.p_mean, cfg.p_std)
            loss = per.sum() / batch  # this slice's share of the global batch mean
            engine.backward(loss)
            step_loss = step_loss + loss.detach().to(torch.float64)
        engine.step()
        images += batch
        step += 1
        params = engine.full_params()  # collective under ZeRO: every rank takes part
        if ema is not None:
            ema.update(params, start.offset + images, batch)
        engine.post_step()
        window.append(step_loss)
        if progress is not None:
            progress.update(images, loss=step_loss)  # a 0-d tensor: read only when a line is printed

        if images >= next_log or images >= cfg.images:
            mean_loss = _global_sum(sum(torch.stack(window).tolist()), world) / len(window)  # the one sync
            losses.append((images, mean_loss))
            if on_log and main:
                on_log(images, {"loss": mean_loss, "lr": engine.lr()})
            window.clear()
            next_log = (images // cfg.log_images + 1) * cfg.log_images
        while pending_snaps and images >= pending_snaps[0]:
            if snapshot_uri is not None and ema is not None:
                fsio.save_torch(snapshot_uri(pending_snaps[0]), model_record(ema.ema, images))
            pending_snaps.pop(0)
        if images >= next_ckpt or images >= cfg.images:
            _checkpoint(engine, ema, cfg, checkpoints, images, step, world)
            next_ckpt = (images // cfg.checkpoint_images + 1) * cfg.checkpoint_images
            if after_checkpoint:
                after_checkpoint(images)
    if progress is not None:
        progress.close()
    result_ema = copy.deepcopy(ema.ema).eval() if ema is not None else None
    return TrainResult(ema=result_ema, images=images, resumed_from=ckpt.uri if ckpt else None, losses=losses)


def _global_sum(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t)
    return float(t.item())


def _checkpoint(engine: Engine, ema: PowerFunctionEMA[Precond] | None, cfg: TrainConfig, folder: str, images: int,
                step: int, world: int) -> None:
    def state() -> dict[str, Any] | None:
        net_state, opt_state = engine.consolidated_state(step)  # collective for DeepSpeed
        if ema is None:
            return None
        return {"net": net_state, "ema": ema.state_dict(), "optimizer": opt_state, "images": images,
                "step": step, "engine": engine.kind, "world_size": world}

    if engine.kind == "plain":  # replicated state: rank 0 writes one file
        if ema is not None:
            save_checkpoint(folder, images, state() or {}, cfg.keep_checkpoints)
        distributed.barrier()
        return
    d = cfg.distributed
    save_sharded(folder, images, save_native=engine.save_native, state=state,  # type: ignore[attr-defined]
                 commit={"engine": "deepspeed", "world_size": world, "zero_stage": d.zero_stage,
                         "precision": d.precision, "step": step},
                 keep=cfg.keep_checkpoints)
