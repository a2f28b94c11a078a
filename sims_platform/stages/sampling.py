"""generate and feed: sample a model (plain or SIMS-guided) into WebDataset shards, resumable per shard."""

from __future__ import annotations

import torch

from sims_platform.config.schema import SamplerConfig
from sims_platform.data import ShardWriter
from sims_platform.sampling.guidance import Denoiser, NetDenoiser
from sims_platform.sampling.heun import heun_sample, seeded_labels, seeded_noise
from sims_platform.stages.context import StageContext
from sims_platform.stages.seeds import sample_seeds
from sims_platform.stages.shard_parts import write_owned_shards
from sims_platform.storage import fsio


def sample_batch(ctx: StageContext, denoise: Denoiser, seeds: torch.Tensor, sampler: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model-space samples for these seeds (on the CPU, with their labels); each depends only on its seed.

    Noise and labels are made on ctx.device, where ctx.models.load put the networks; sampler.precision sets the
    autocast dtype of the network calls.
    """
    noise = seeded_noise(seeds, ctx.data.shape(), ctx.device)
    labels = seeded_labels(seeds, ctx.cfg.data.label_dim)
    on_device = labels.to(ctx.device) if labels is not None else None
    return heun_sample(denoise, noise, on_device, sampler).cpu(), labels


def write_samples(ctx: StageContext, denoise: Denoiser, uri: str, stream: str, total: int, batch_size: int,
                  shard_size: int, sampler: SamplerConfig, meta: dict, desc: str) -> dict | None:
    """Sample this part's shards of a seed stream into uri (see write_owned_shards); the manifest or None."""

    def make(j: int, rng: range, advance) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seeds = sample_seeds(ctx.cfg.seed, ctx.iteration, stream, len(rng), rng.start)
        xs, ys = [], []
        for chunk in seeds.split(batch_size):
            x, y = sample_batch(ctx, denoise, chunk, sampler)
            xs.append(x)
            ys.append(y if y is not None else torch.zeros(len(chunk), dtype=torch.int64))
            advance(len(chunk))
        return torch.cat(xs), torch.cat(ys), seeds

    writer = ShardWriter(uri, shard_size=shard_size, total=total, meta=meta)
    return write_owned_shards(ctx.job_part, writer, desc, make)


def generate(ctx: StageContext, run_id: str) -> dict:
    """The synthetic set: n_s plain samples of iteration k's base model."""
    k, layout, g = ctx.iteration, ctx.layout, ctx.cfg.generate
    base_uri, out = layout.model(k, "train-base"), layout.shards(k, "generate")
    ctx.lineage.log_params(run_id, {"num_samples": g.num_samples, "steps": g.sampler.steps,
                                    "shard_size": g.shard_size})
    ctx.lineage.link(run_id, inputs={"base_model": base_uri}, outputs={"synthetic": out})
    net = ctx.models.sampling(base_uri)
    manifest = write_samples(ctx, NetDenoiser(net), out, "generate", g.num_samples, g.batch_size, g.shard_size,
                             g.sampler, {"source_model": base_uri, "iteration": k}, f"iter {k} generate")
    return {"synthetic": out, "complete": manifest is not None,
            "samples": manifest["total"] if manifest else None}


def feed_source(ctx: StageContext) -> tuple[str, float | None]:
    """(method, fixed w or None for the selected w) the feed samples with; ('base', 0.0) for the plain base.

    A loop's arm decides: standard feeds its plain base, sims its base guided by loop.method at the w its
    generation's evaluation selected. Otherwise iterations.feed_sampler / feed_method / feed_weight."""
    cfg = ctx.cfg
    if ctx.loop is not None:
        assert cfg.loop is not None
        return ("base", 0.0) if ctx.loop.arm == "standard" else (cfg.loop.method, None)
    it = cfg.iterations
    if it.feed_sampler == "plain":
        return "base", 0.0
    return it.feed_method or cfg.evaluate.primary.name, it.feed_weight


def feed(ctx: StageContext, run_id: str) -> dict:
    """Samples that feed the next iteration's training set (self-consuming loops), from the plain base or a
    guided sampler (feed_source) at a fixed w or its method's best w, selected by this iteration's evaluation."""
    from sims_platform.evaluation.methods import Networks, model_inputs
    from sims_platform.evaluation.plan import BASE, Arm
    from sims_platform.config.methods import Weights, is_base

    k, layout, g = ctx.iteration, ctx.layout, ctx.cfg.generate
    out = layout.shards(k, "feed")
    method, fixed = feed_source(ctx)
    w: Weights
    if fixed is None:
        results = fsio.read_json(fsio.join(layout.stage(k, "evaluate"), "results.json"))
        best = results["row"]["methods"][method]["best_w"]  # a list for a method with several guides
        w = tuple(float(x) for x in best) if isinstance(best, list) else float(best)
    else:
        w = fixed
    arm = BASE if is_base(w) else Arm(method, w)
    total = ctx.data.feed_samples()
    nets = Networks(ctx.cfg, layout, k, ctx.models.sampling)
    inputs = model_inputs(ctx.cfg, layout, k, [] if arm.method == "base" else [method])
    ctx.lineage.log_params(run_id, {"feed_samples": total, "feed_method": arm.method, "w": w}
                           | ({"loop": ctx.loop.name, "feed_fraction": ctx.loop.fraction} if ctx.loop else
                              {"feed_sampler": ctx.cfg.iterations.feed_sampler}))
    ctx.lineage.link(run_id, inputs=inputs, outputs={"feed": out})
    manifest = write_samples(ctx, nets.denoiser(arm), out, "feed", total, g.batch_size, g.shard_size,
                             g.sampler, {"source_model": inputs["base_model"], "iteration": k, "method": arm.method,
                                         "w": w}, f"iter {k} feed")
    return {"feed": out, "complete": manifest is not None, "method": arm.method, "w": w,
            "samples": manifest["total"] if manifest else None}
