"""evaluate: guided sampling over the w sweep and FID per w (same seeds, sampler and features for every w)."""

from __future__ import annotations

import torch

from sims_platform.metrics import FeatureStats, build_feature_extractor, fid_from_stats, reference_stats
from sims_platform.sampling.guidance import Guided, NetDenoiser, Unconditional
from sims_platform.stages.context import StageContext, sample_seeds
from sims_platform.stages.sampling import sample_batch
from sims_platform.storage import fsio
from sims_platform.tracking import fid_plot_png, image_grid_png
from sims_platform.utils.progress import Progress


def w_key(w: float) -> str:
    return str(float(w))


def guide_for(ctx: StageContext, base) -> tuple[object, dict[str, str]]:
    """The guide network of the configured method and the URI it came from."""
    k, layout, ev = ctx.iteration, ctx.layout, ctx.cfg.evaluate
    if ev.method == "sims":
        uri = layout.model(k, "finetune-aux")
        return NetDenoiser(ctx.load_model(uri)), {"aux_model": uri}
    if ev.method == "cfg":
        return Unconditional(base), {}
    uri = layout.snapshot(k, "train-base", ev.autoguidance_images)
    net = ctx.build_net()
    net.load_state_dict(fsio.load_torch(uri)["ema"])
    return NetDenoiser(net.eval().requires_grad_(False)), {"guide_model": uri}


def evaluate(ctx: StageContext, run_id: str) -> dict:
    k, layout, ev, lin = ctx.iteration, ctx.layout, ctx.cfg.evaluate, ctx.lineage
    out = layout.stage(k, "evaluate")
    base_uri = layout.model(k, "train-base")
    base = ctx.load_model(base_uri)
    guide, guide_inputs = guide_for(ctx, base)
    lin.log_params(run_id, {"method": ev.method, "weights": ",".join(map(w_key, ev.weights)),
                            "num_samples": ev.num_samples, "steps": ev.sampler.steps, "features": ev.features})
    lin.link(run_id, inputs={"base_model": base_uri, **guide_inputs}, outputs={"fid": fsio.join(out, "fid.json")})

    extractor = build_feature_extractor(ev.features, cache_uri=layout.features, real=ctx.real, seed=ctx.cfg.seed,
                                        inception_weights=ev.inception_weights)
    ref = reference_stats(extractor, ctx.real.images, layout.features, ev.batch_size)
    seeds = sample_seeds(ctx.cfg.seed, k, "evaluate", ev.num_samples)

    fid: dict[str, float] = {}
    for w in ev.weights:
        part = fsio.join(out, "per-w", f"w-{w_key(w)}.json")
        if fsio.exists(part):  # resumed: this w was finished before the interruption
            fid[w_key(w)] = fsio.read_json(part)["fid"]
            continue
        denoise = Guided(NetDenoiser(base), guide, w)
        stats, grid = FeatureStats(extractor.dim), []
        progress = Progress(f"iter {k} evaluate w={w}", total=ev.num_samples, unit="img")
        done = 0
        for chunk in seeds.split(ev.batch_size):
            x, _ = sample_batch(ctx, denoise, chunk, ev.sampler)
            images = ctx.encoder.decode(x)
            with torch.no_grad():
                stats.update(extractor(images))
            if len(grid) * ev.batch_size < ev.grid_size:
                grid.append(images[: ev.grid_size])
            done += len(chunk)
            progress.update(done)
        progress.close()
        value = fid_from_stats(stats, ref)
        fid[w_key(w)] = value
        fsio.save_torch(fsio.join(out, "per-w", f"w-{w_key(w)}.stats.pt"), stats.to_dict())
        fsio.write_json(part, {"w": w, "fid": value, "num_samples": ev.num_samples})
        lin.log_metrics(run_id, {"fid": value}, step=int(round(w * 1000)))
        lin.log_metrics(run_id, {f"fid_w_{w_key(w)}": value}, step=0)
        lin.log_artifact_bytes(run_id, f"samples/w-{w_key(w)}.png",
                               image_grid_png(torch.cat(grid)[: ev.grid_size], nrow=8))
        print(f"[iter {k} evaluate] w={w}: FID {value:.3f}", flush=True)

    fsio.write_json(fsio.join(out, "fid.json"), fid)
    lin.log_artifact_bytes(run_id, "fid_vs_w.png",
                           fid_plot_png({float(w): v for w, v in fid.items()}, f"iteration {k}: FID vs w"))
    best = min(fid, key=lambda key: fid[key])
    lin.log_metrics(run_id, {"fid_base": fid.get("0.0", float("nan")), "fid_best": fid[best],
                             "best_w": float(best)}, step=0)
    return {"fid": fid, "best_w": float(best)}
