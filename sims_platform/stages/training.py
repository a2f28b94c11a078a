"""train-base, train-guide, finetune-aux and finetune-real-aux: the same loop, different data and starting point."""

from __future__ import annotations

import torch

from sims_platform.config.schema import RESUMED_SETTINGS, TrainConfig
from sims_platform.data import ShardStream
from sims_platform.stages.context import StageContext
from sims_platform.steps import row
from sims_platform.training import distributed
from sims_platform.training.loop import Start, train


def _run_training(ctx: StageContext, stage: str, run_id: str, net, x, y, tcfg, inputs: dict[str, str],
                  seed_of: str | None = None, **train_kwargs) -> dict:
    """Every rank of a torchrun/PyTorchJob launch runs this; rank 0 alone logs to MLflow and writes model.pt.
    seed_of: the stage whose batch seeds the steps take (a resumed fine-tune's are the base's)."""
    lin, layout, k = ctx.lineage, ctx.layout, ctx.iteration
    out_uri = layout.model(k, stage)
    main = distributed.detect().is_main
    if main:
        lin.log_params(run_id, {"images": tcfg.images, "batch_size": tcfg.batch_size, "lr": tcfg.optimizer.lr,
                                "ema_std": tcfg.ema_std, "loader": tcfg.loader,
                                "train_set_size": len(x) if y is not None else x.num_samples,
                                "distributed": tcfg.distributed.model_dump_json()})
        lin.link(run_id, inputs=inputs, outputs={"model": out_uri})
    salt = row(seed_of or stage).seed_salt
    if ctx.cfg.runtime.channels_last and not tcfg.distributed.uses_deepspeed():
        # oneDNN/cuDNN convolutions run faster on channels-last weights (the demo's train-base: 285 -> 305 img/s
        # on this project's CPU); DeepSpeed flattens parameters into its own buffers, so it keeps the default layout.
        net = net.to(memory_format=torch.channels_last)
    result = train(net, x, y, tcfg, seed=ctx.cfg.seed + 7919 * k + salt,
                   checkpoints=layout.checkpoints(k, stage),
                   on_log=lambda images, m: lin.log_metrics(run_id, m, step=images),
                   desc=f"iter {k} {stage}", where=row(stage).training_section(),
                   **train_kwargs)
    if result.ema is not None:
        ctx.models.save(out_uri, result.ema, result.images, stage=stage, iteration=k)
    distributed.barrier()  # no rank reports the stage done before model.pt exists
    return {"model": out_uri, "images": result.images, "resumed_from": result.resumed_from}


def _stream(ctx: StageContext, uri: str, tcfg, salt: int):
    """The shard set at uri as a per-rank stream (train.loader == 'stream'); manifest checked on open."""
    return ShardStream(uri, seed=ctx.cfg.seed + salt, buffer_size=tcfg.shuffle_buffer)


def _base_data(ctx: StageContext, tcfg, salt: int = 0):
    """Iteration k's base training data (x, labels, lineage sources): what train-base and train-guide train on."""
    k = ctx.iteration
    if tcfg.loader == "stream":  # one shard set: the encoded latents, or the previous feed (validated)
        uri = ctx.layout.encoded if k == 0 or ctx.cfg.iterations.train_data == "real" \
            else ctx.layout.shards(k - 1, "feed")
        return _stream(ctx, uri, tcfg, 7919 * k + salt), None, {"data": uri}
    return ctx.data.base_training_data()


def train_base(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """Train iteration k's base model from scratch on the data its config names (with pretrained.base, iteration
    0's base is import-base's instead: stages.import_base)."""
    k = ctx.iteration
    x, y, sources = _base_data(ctx, ctx.cfg.train_base)
    snap = lambda images: ctx.layout.snapshot(k, "train-base", images)  # noqa: E731
    return _run_training(ctx, "train-base", run_id, ctx.models.build(), x, y, ctx.cfg.train_base, sources,
                         snapshot_uri=snap, **train_kwargs)


def train_guide(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """Train autoguidance's guide (EDM2's recipe: the guide section's smaller network, a fraction of the base's
    images, a shorter EMA) from scratch on the base's data; its model record carries its own architecture."""
    k, gcfg = ctx.iteration, ctx.cfg.guide
    if gcfg is None:
        raise ValueError("stage train-guide needs a guide section in the config")
    x, y, sources = _base_data(ctx, gcfg, row("train-guide").seed_salt)
    snap = lambda images: ctx.layout.snapshot(k, "train-guide", images)  # noqa: E731
    return _run_training(ctx, "train-guide", run_id, ctx.models.build(gcfg.network), x, y, gcfg, sources,
                         snapshot_uri=snap, **train_kwargs)


def _resumed(ctx: StageContext, start_images: int) -> TrainConfig:
    """finetune_aux's settings for a fine-tune that continues the base's training state: the base's training
    hyperparameters, B images more than the base's final count."""
    tcfg, base = ctx.cfg.finetune_aux, ctx.cfg.train_base
    return tcfg.model_copy(update={name: getattr(base, name) for name in RESUMED_SETTINGS} | {
        "images": start_images + tcfg.images, "snapshots": [start_images + n for n in tcfg.snapshots]})


def _base_images(ctx: StageContext, record_images: int | None) -> int:
    """The image count where the base's training ended (transfer's schedule and EMA start there)."""
    if record_images:
        return record_images
    given = ctx.cfg.finetune_aux.init.base_images
    if given is None:
        raise ValueError(f"finetune_aux.init.base_images is required: the base model "
                         f"{ctx.layout.model(ctx.iteration, 'train-base')} does not record how many images it was "
                         "trained on (an imported checkpoint); init.mode 'transfer' starts its schedule and EMA there")
    return given


def _finetune(ctx: StageContext, stage: str, run_id: str, data_uri: str | None, **train_kwargs) -> dict:
    """Fine-tune a copy of the base for the budget B, starting as finetune_aux.init.mode says (README: "Fine-tuning
    the aux model"). data_uri: shards to train on (the synthetic set); None: the real training split."""
    from sims_platform.data import read_shards
    from sims_platform.training.checkpoints import latest

    k, layout = ctx.iteration, ctx.layout
    tcfg: TrainConfig = ctx.cfg.finetune_aux
    mode = ctx.cfg.finetune_aux.init.mode
    base_uri = layout.model(k, "train-base")
    inputs = {"base_model": base_uri}
    seed_of, start = stage, Start()
    if mode == "resume":
        ckpt = latest(layout.checkpoints(k, "train-base"))
        if ckpt is None:
            raise FileNotFoundError(f"finetune_aux.init.mode 'resume' continues the base's training state, but "
                                    f"{layout.checkpoints(k, 'train-base')} holds no checkpoint (use 'transfer')")
        tcfg, start, seed_of = _resumed(ctx, ckpt.images), Start(checkpoint=ckpt), "train-base"
        net = ctx.models.build()  # the checkpoint's raw weights replace these
        inputs["base_checkpoint"] = ckpt.uri
    else:
        net, base_images = ctx.models.read(base_uri)  # the base's EMA weights
        net.train().requires_grad_(True)
        if mode == "transfer":
            start = Start(offset=_base_images(ctx, base_images))
    if data_uri is not None:
        inputs["synthetic"] = data_uri
        if tcfg.loader == "stream":
            x, y = _stream(ctx, data_uri, tcfg, 7919 * k + 1), None
        else:
            x, y, _ = read_shards(data_uri)
    elif tcfg.loader == "stream":  # the real training split as the encode stage wrote it
        x, y = _stream(ctx, ctx.layout.encoded, tcfg, 7919 * k + 2), None
        inputs["real"] = ctx.layout.encoded
    else:
        x, y, sources = ctx.data.real_training_data()
        inputs |= sources
    ctx.lineage.log_params(run_id, {"init.mode": mode, "start_images": start.checkpoint.images
                                    if start.checkpoint is not None else start.offset})
    return _run_training(ctx, stage, run_id, net, x, y, tcfg, inputs, start=start, seed_of=seed_of,
                         **train_kwargs)


def finetune_aux(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """The SIMS auxiliary model: the base fine-tuned on its own synthetic set (with shift: on the set select-aux
    resampled from it)."""
    data = "select-aux" if ctx.cfg.shift is not None else "generate"
    return _finetune(ctx, "finetune-aux", run_id, ctx.layout.shards(ctx.iteration, data), **train_kwargs)


def finetune_real_aux(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """The control: the same fine-tune (budget, optimizer, start) on the real training split instead, so a gain of
    SIMS over it can be attributed to the synthetic set rather than to guidance away from any fine-tuned copy."""
    return _finetune(ctx, "finetune-real-aux", run_id, None, **train_kwargs)
