"""After a fine-tune: how far the aux moved from its base, logged to its MLflow run and written beside its model."""

from __future__ import annotations

import torch

from sims_platform.data import SourceIndex, holdout_split, iter_shards
from sims_platform.evaluation.drift import SIGMAS, denoiser_gap, drift_png, weight_distance
from sims_platform.stages.context import StageContext
from sims_platform.storage import fsio

# Images per set: enough for a stable mean at every sigma, few enough to cost seconds even for ImageNet latents.
DRIFT_IMAGES = 256


def _held_out(ctx: StageContext, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n held-out real images (never trained on) in model space."""
    d = ctx.cfg.data
    index = SourceIndex(d.reference_data() if d.reference_path is not None else d)
    held = torch.arange(len(index)) if d.reference_path is not None else \
        holdout_split(index.labels, d.holdout_fraction, d.holdout_seed)[1]
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


def log_drift(ctx: StageContext, run_id: str, stage: str) -> dict:
    """Weight distance and per-sigma denoiser gaps of the aux `stage` wrote from the iteration's base, on held-out
    real images and on the synthetic set: MLflow metrics (drift.* ; per sigma at step = index into SIGMAS), a plot,
    and drift.json in its folder. Returns the record."""
    k = ctx.iteration
    base, aux = ctx.models.load(ctx.layout.model(k, "train-base")), ctx.models.load(ctx.layout.model(k, stage))
    seed = ctx.cfg.seed + 7919 * k  # the same noise for both aux models of an iteration: paired
    sets = {"real": _held_out(ctx, DRIFT_IMAGES), "synthetic": _synthetic(ctx, DRIFT_IMAGES)}
    gaps = {name: denoiser_gap(base, aux, x, y, SIGMAS, seed) for name, (x, y) in sets.items()}
    distance = weight_distance(base, aux)
    record = {"weight_distance": distance, "sigmas": list(SIGMAS), "images": DRIFT_IMAGES, "mse": gaps}
    ctx.lineage.log_metrics(run_id, {"drift.weight_distance": distance})
    for i, sigma in enumerate(SIGMAS):
        ctx.lineage.log_metrics(run_id, {f"drift.mse_{name}": values[i] for name, values in gaps.items()}, step=i)
    ctx.lineage.log_params(run_id, {"drift.sigmas": ",".join(f"{s:g}" for s in SIGMAS)})
    title = f"iteration {k} {stage}: aux vs base, relative weight distance {distance:.4f}"
    ctx.lineage.log_png(run_id, "drift.png", drift_png(title, SIGMAS, {f"{n} images": v for n, v in gaps.items()}))
    fsio.write_json(ctx.layout.drift(k, stage), record)
    print(f"[drift] {stage}: weight distance {distance:.4f}; mean (D_aux - D_base)^2 at sigma "
          f"{SIGMAS[0]:g}..{SIGMAS[-1]:g}: real " + " ".join(f"{v:.2e}" for v in gaps["real"]) + "; synthetic " +
          " ".join(f"{v:.2e}" for v in gaps["synthetic"]), flush=True)
    return record
