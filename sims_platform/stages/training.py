"""train-base and finetune-aux: the same loop, different data and starting point."""

from __future__ import annotations

from sims_platform.data import ShardStream
from sims_platform.models.pretrained import mismatches, read_network
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
                                "ema_std": tcfg.ema_std, "loader": tcfg.loader,
                                "train_set_size": len(x) if y is not None else x.num_samples,
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


def _stream(ctx: StageContext, uri: str, tcfg, salt: int):
    """The shard set at uri as a per-rank stream (train.loader == 'stream'); manifest checked on open."""
    return ShardStream(uri, seed=ctx.cfg.seed + salt, buffer_size=tcfg.shuffle_buffer)


def adopt_pretrained(ctx: StageContext, run_id: str, uri: str) -> dict:
    """Iteration 0's base from an existing network (pretrained.base) instead of training; rank 0 only."""
    out_uri = ctx.layout.model(0, "train-base")
    if not distributed.detect().is_main:
        distributed.barrier()
        return {"model": out_uri, "pretrained": uri}
    rec = read_network(uri)
    if rec.kwargs is not None:  # a file that names its architecture must name ours
        diff = mismatches(rec.kwargs, ctx.network_kwargs())
        if diff:
            raise ValueError(f"pretrained.base: {uri} is not the network this config describes (network, "
                             f"data): {'; '.join(diff)}")
    net = ctx.build_net()
    try:
        net.load_state_dict(rec.state_dict)
    except RuntimeError as err:
        raise ValueError(f"pretrained.base: the weights in {uri} do not fit the config's network: {err}") from None
    images = rec.images or 0
    ctx.lineage.log_params(run_id, {"pretrained": uri, "images": images})
    ctx.lineage.link(run_id, inputs={"pretrained": uri}, outputs={"model": out_uri})
    ctx.save_model(out_uri, net, images, stage="train-base", iteration=0, source=uri)
    distributed.barrier()
    return {"model": out_uri, "images": images, "pretrained": uri}


def train_base(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """Train iteration k's base model from scratch on the data its config names (or adopt pretrained.base)."""
    k, tcfg = ctx.iteration, ctx.cfg.train_base
    if k == 0 and ctx.cfg.pretrained.base:
        return adopt_pretrained(ctx, run_id, ctx.cfg.pretrained.base)
    if tcfg.loader == "stream":  # one shard set: the encoded latents, or the previous feed (validated)
        uri = ctx.layout.encoded if k == 0 or ctx.cfg.iterations.train_data == "real" \
            else ctx.layout.shards(k - 1, "feed")
        x, y, sources = _stream(ctx, uri, tcfg, 7919 * k), None, {"data": uri}
    else:
        x, y, sources = ctx.base_training_data()
    snap = lambda images: ctx.layout.snapshot(k, "train-base", images)  # noqa: E731
    return _run_training(ctx, "train-base", run_id, ctx.build_net(), x, y, ctx.cfg.train_base, sources,
                         snapshot_uri=snap, **train_kwargs)


def finetune_aux(ctx: StageContext, run_id: str, **train_kwargs) -> dict:
    """Fine-tune a copy of the base (its EMA weights) on the synthetic set for the budget B."""
    from sims_platform.data import read_shards

    k, layout = ctx.iteration, ctx.layout
    base_uri, shards_uri = layout.model(k, "train-base"), layout.shards(k, "generate")
    net = ctx.load_model(base_uri).train().requires_grad_(True)
    tcfg = ctx.cfg.finetune_aux
    if tcfg.loader == "stream":
        x, y = _stream(ctx, shards_uri, tcfg, 7919 * k + 1), None
    else:
        x, y, _ = read_shards(shards_uri)
    return _run_training(ctx, "finetune-aux", run_id, net, x, y, ctx.cfg.finetune_aux,
                         {"base_model": base_uri, "synthetic": shards_uri}, **train_kwargs)
