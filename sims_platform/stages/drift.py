"""How far each aux model moved from its base, measured when the iteration is evaluated."""

from __future__ import annotations

import torch

from sims_platform.data import iter_shards
from sims_platform.evaluation.drift import SIGMAS, denoiser_gap, drift_png, weight_distance
from sims_platform.stages.context import StageContext
from sims_platform.stages.reference import reference_images
from sims_platform.storage import fsio

# The training stages whose models are aux models (fine-tuned copies of the base).
AUX_STAGES = ("finetune-aux", "finetune-real-aux")
# Images per set: enough for a stable mean at every sigma, few enough to cost seconds even for ImageNet latents.
DRIFT_IMAGES = 256


def _held_out(ctx: StageContext, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n held-out real images (never trained on) in model space."""
    index, held = reference_images(ctx)
    real = index.load(held[:n].tolist())
    return ctx.data.encoder.encode(real.images), real.labels if ctx.cfg.data.label_dim else None


def _synthetic(ctx: StageContext, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n samples of the iteration's synthetic set (only the shards they are in are read)."""
    xs, ys, have = [], [], 0
    for x, y, _ in iter_shards(ctx.layout.shards(ctx.iteration, "generate")):
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n] if ctx.cfg.data.label_dim else None


def log_drift(ctx: StageContext, run_id: str, stages: list[str]) -> dict:
    """Weight distance and per-sigma denoiser gaps from the iteration's base of each aux model `stages` wrote, on
    held-out real images and on the synthetic set (the same images and noise for every aux: paired): MLflow metrics
    of `run_id` (drift.<stage>.*; per sigma at step = index into SIGMAS), one plot, and drift.json in the evaluate
    folder. Measured at evaluation, the one stage that reads the held-out images (no training stage does)."""
    k = ctx.iteration
    base = ctx.models.load(ctx.layout.model(k, "train-base"))
    seed = ctx.cfg.seed + 7919 * k
    sets = {"real": _held_out(ctx, DRIFT_IMAGES), "synthetic": _synthetic(ctx, DRIFT_IMAGES)}
    models: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    for stage in stages:
        aux = ctx.models.load(ctx.layout.model(k, stage))
        gaps = {name: denoiser_gap(base, aux, x, y, SIGMAS, seed) for name, (x, y) in sets.items()}
        distance = weight_distance(base, aux)
        models[stage] = {"weight_distance": distance, "mse": gaps}
        ctx.lineage.log_metrics(run_id, {f"drift.{stage}.weight_distance": distance})
        for i in range(len(SIGMAS)):
            ctx.lineage.log_metrics(run_id, {f"drift.{stage}.mse_{name}": v[i] for name, v in gaps.items()}, step=i)
        curves |= {f"{stage}, {name} images": v for name, v in gaps.items()}
        print(f"[drift] {stage}: weight distance {distance:.4f}; mean (D_aux - D_base)^2 at sigma "
              f"{SIGMAS[0]:g}..{SIGMAS[-1]:g}: " + "; ".join(f"{name} " + " ".join(f"{x:.2e}" for x in v)
                                                        for name, v in gaps.items()), flush=True)
    ctx.lineage.log_params(run_id, {"drift.sigmas": ",".join(f"{s:g}" for s in SIGMAS)})
    ctx.lineage.log_png(run_id, "drift.png", drift_png(f"iteration {k}: each aux model against the base", SIGMAS,
                                                       curves))
    record = {"sigmas": list(SIGMAS), "images": DRIFT_IMAGES, "models": models}
    fsio.write_json(ctx.layout.drift(k), record)
    return record
