"""reference and reference-reduce: stream the reference images through the feature network, once per run.

The reference images are every image of data.reference_path (a separate set, e.g. ImageNet val shards) or, when it
is null, the held-out split of data.path. Part i of N (an Indexed Job pod) loads only its block of them,
evaluate.batch_size images at a time (SourceIndex decodes just those, reading shards through fsspec), so no process
ever holds the reference set in memory; it keeps float64 feature sums and the features of the first
precision_recall.max_samples reference images, and rewrites its part file every SAVE_SECONDS, so a restarted part
resumes where it was (the sums then add the same batches in the same order: the result is unchanged). The reducer
merges the parts into ROOT/features/reference/<net>-<key>/reference.pt, which evaluate reads, and measures the
real-vs-real floor beside it (fid_floor.json, evaluation/floor.py: sets of training images, only those decoded).
With one part, `reference` does both. Not run when evaluate.reference names published EDM2 statistics
(pipeline/runner.py).
"""

from __future__ import annotations

import time

import torch

from sims_platform.data import SourceIndex, holdout_split
from sims_platform.evaluation import floor as F
from sims_platform.evaluation import reference as R
from sims_platform.stages.context import StageContext
from sims_platform.evaluation.features import feature_extractor
from sims_platform.storage import fsio
from sims_platform.utils.progress import Progress

# How often a part rewrites its file: bounds the work a killed pod repeats without writing a 2048x2048 float64
# matrix after every batch.
SAVE_SECONDS = 60.0

ReferencePartsError = R.ReferencePartsError


def reference_images(ctx: StageContext) -> tuple[SourceIndex, torch.Tensor]:
    """The reference source (indexed, nothing decoded) and the sorted indices of its reference images: every
    image of data.reference_path, else the held-out split of data.path. The only images this stage reads."""
    d = ctx.cfg.data
    if d.reference_path is not None:
        index = SourceIndex(d.reference_data())
        return index, torch.arange(len(index))
    index = SourceIndex(d)
    _, held = holdout_split(index.labels, d.holdout_fraction, d.holdout_seed)
    return index, held


def _log(ctx: StageContext, run_id: str, files: R.ReferenceFiles, count: int) -> None:
    ev, d = ctx.cfg.evaluate, ctx.cfg.data
    source = {"reference_path": d.reference_path} if d.reference_path is not None else \
        {"holdout_fraction": d.holdout_fraction}
    ctx.lineage.log_params(run_id, {"features": ev.features, "reference_images": count,
                                    "batch_size": ev.batch_size, "max_samples": ev.precision_recall.max_samples,
                                    **source})
    inputs = {"reference": d.reference_path} if d.reference_path is not None else {"real": ctx.data.real_uri()}
    ctx.lineage.link(run_id, inputs=inputs, outputs={"reference": files.result})


def compute_part(ctx: StageContext, extractor, files: R.ReferenceFiles, index: SourceIndex,
                 indices: torch.Tensor) -> int:
    """Feature statistics of this part's block of the reference images (source indices `indices`); returns how
    many it computed now."""
    ev = ctx.cfg.evaluate
    uri = files.part(ctx.part, ctx.parts)
    rec = R.load_part(uri, files.key) if fsio.exists(uri) else \
        R.new_part(files.key, ctx.part, ctx.parts, len(indices), extractor.dim)
    total = rec["stop"] - rec["start"]
    if rec["done"] == total and fsio.exists(uri):
        return 0
    progress = Progress(f"reference part {ctx.part}/{ctx.parts}", total=total, done=rec["done"], unit="img")
    computed, saved = 0, time.monotonic()
    while rec["done"] < total:
        first = rec["start"] + rec["done"]
        batch = indices[first:min(first + ev.batch_size, rec["stop"])]
        images = index.load(batch.tolist()).images
        with torch.no_grad():
            R.add_batch(rec, extractor(images), ev.precision_recall.max_samples)
        computed += len(batch)
        progress.update(rec["done"])
        if rec["done"] == total or time.monotonic() - saved >= SAVE_SECONDS:
            fsio.save_torch(uri, rec)
            saved = time.monotonic()
    if computed == 0:  # an empty block still records that it is done
        fsio.save_torch(uri, rec)
    progress.close()
    return computed


def reduce_parts(ctx: StageContext, run_id: str, extractor, files: R.ReferenceFiles, count: int,
                 parts: int) -> dict:
    stats, features = R.merge_parts(files, parts, count)
    if stats.count != count:
        raise ReferencePartsError(f"reference parts under {files.parts_dir} hold {stats.count} images, the "
                                  f"reference set has {count}: remove them and rerun every part")
    floor = F.read_floor(files)  # a reducer killed after the floor keeps it
    if floor is None:
        index, train = F.training_source(ctx.cfg.data)
        floor = F.compute_floor(extractor, index, train, stats, features, ctx.cfg.evaluate)
        F.write_floor(files, floor)
    R.write_result(files, extractor, parts, stats, features)  # last: its presence says the reference is whole
    ctx.lineage.log_metrics(run_id, {"reference_images": float(stats.count), "reference_parts": float(parts)}
                            | F.floor_metrics(floor), step=0)
    print(f"[reference] {count} reference images, {parts} part(s) -> {files.result}; real-vs-real floor: "
          f"{F.describe_floor(floor)}", flush=True)
    return {"reference": files.result, "images": count, "parts": parts, "floor": files.floor, "complete": True}


# ----------------------------------------------------------------------------
# The stage functions


def reference(ctx: StageContext, run_id: str) -> dict:
    """Part ctx.part of ctx.parts; with one part, also the reduction."""
    t0 = time.time()
    extractor = feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)
    files = R.ReferenceFiles.of(ctx.layout, ctx.cfg, extractor)
    index, indices = reference_images(ctx)
    _log(ctx, run_id, files, len(indices))
    computed = compute_part(ctx, extractor, files, index, indices)
    if ctx.parts == 1:
        return reduce_parts(ctx, run_id, extractor, files, len(indices), 1)
    ctx.lineage.log_metrics(run_id, {"part_images": float(computed), "part_seconds": time.time() - t0},
                            step=ctx.part)
    return {"part": ctx.part, "parts": ctx.parts, "images": computed, "complete": False}


def reference_reduce(ctx: StageContext, run_id: str) -> dict:
    """Merge the reference array's parts; its completion record is the reference stage's."""
    if ctx.parts != 1:
        raise ValueError(f"reference-reduce runs as one process, got --count {ctx.parts}")
    extractor = feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)
    files = R.ReferenceFiles.of(ctx.layout, ctx.cfg, extractor)
    _, indices = reference_images(ctx)
    parts = R.infer_parts(files)
    missing = [i for i in range(parts) if not fsio.exists(ctx.layout.part_marker(0, "reference", i, parts))]
    if missing:
        raise ReferencePartsError(
            f"reference part(s) {', '.join(map(str, missing))} of {parts} have no completion record (expected "
            f"{ctx.layout.part_marker(0, 'reference', missing[0], parts)}): rerun `sims stage reference --index "
            f"{missing[0]} --count {parts}`")
    return reduce_parts(ctx, run_id, extractor, files, len(indices), parts)


__all__ = ["ReferencePartsError", "compute_part", "reference", "reference_images", "reference_reduce"]
