"""train-base and finetune-aux: the same loop, different data and starting point."""

from __future__ import annotations

from sims_platform.stages.context import StageContext
from sims_platform.training import distributed
from sims_platform.training.loop import train


def _run_training(ctx: StageContext, stage: str, run_id: str, net, x, y, tcfg, inputs: dict[str, str],
                  **train_kwargs) -> dict:
    """Every rank of a torchrun/PyTorchJob launch runs this; rank 0 alone logs to MLflow and writes model.pt."""
    lin, layout, k = ctx.lineage, ctx.layout, ctx.iteration
    out_uri = layout.model(k, stage)
    main = distributed.detect().is_main
    if main:
        lin.log_params(run_id, {"images": tcfg.images, "batch_size": tcfg.batch_size, "lr": tcfg.optimizer.lr,
                                "ema_std": tcfg.ema_std, "train_set_size": len(x),
                                "distributed": tcfg.distributed.model_dump_json()})
        lin.link(run_id, inputs=inputs, outputs={"model": out_uri})
    result = train(net, x, y, tcfg, seed=ctx.cfg.seed + 7919 * k + (0 if stage == "train-base" else 104729),
                   checkpoints=layout.checkpoints(k, stage),
                   on_log=lambda images, m: lin.log_metrics(run_id, m, step=images),
                   desc=f"iter {k} {stage}", where=stage.replace("-", "_"), **train_kwargs)
    if result.ema is not None:
        ctx.save_model(out_uri, result.ema, result.images, stage=stage, iteration=k)
    distributed.barrier()  # no rank reports the stage done before model.pt exists
    return {"model": out_uri, "images": result.images, "resumed_from": result.resumed_from}


def train_base(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """Train iteration k's base model from scratch on the data its config names."""
    x, y, sources = ctx.base_training_data()
    k = ctx.iteration
    snap = lambda images: ctx.layout.snapshot(k, "train-base", images)  # noqa: E731
    return _run_training(ctx, "train-base", run_id, ctx.build_net(), x, y, ctx.cfg.train_base, sources,
                         snapshot_uri=snap, **train_kwargs)


def finetune_aux(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """Fine-tune a copy of the base (its EMA weights) on the synthetic set for the budget B."""
    from sims_platform.data import read_shards

    k, layout = ctx.iteration, ctx.layout
    base_uri, shards_uri = layout.model(k, "train-base"), layout.shards(k, "generate")
    net = ctx.load_model(base_uri).train().requires_grad_(True)
    x, y, _ = read_shards(shards_uri)
    return _run_training(ctx, "finetune-aux", run_id, net, x, y, ctx.cfg.finetune_aux,
                         {"base_model": base_uri, "synthetic": shards_uri}, **train_kwargs)
