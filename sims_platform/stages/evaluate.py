"""evaluate and evaluate-reduce: FID per w of the guidance sweep, in one process or as a job array plus a reducer.

The work is a list of units, one per (w, batch of evaluate.batch_size seeds); the seeds are the same for
every w. Part i of N (an Indexed Job pod) samples a contiguous, balanced block of units and keeps, per w,
one float64 FeatureStats file under iter-KK/evaluate/parts/w-<w>/part-<i>-of-<N>.pt, rewritten after each
unit so that a restarted part skips the units it already holds. The reducer merges every part's statistics
(sums, so any split gives the single-process result up to float64 rounding), checks that each unit was
computed exactly once, and writes fid.json. With one part, `evaluate` does both in the same process.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

import torch

from sims_platform.metrics import (
    FeatureExtractor,
    FeatureStats,
    build_feature_extractor,
    fid_from_stats,
    reference_stats,
)
from sims_platform.sampling.guidance import Denoiser, Guided, NetDenoiser, Unconditional
from sims_platform.stages.context import StageContext, sample_seeds
from sims_platform.stages.sampling import sample_batch
from sims_platform.storage import fsio
from sims_platform.tracking import fid_plot_png, image_grid_png, iteration_result, update_summary
from sims_platform.tracking.summary_metrics import log_iteration_results
from sims_platform.utils.progress import Progress


class EvaluatePartsError(RuntimeError):
    """The evaluate parts in storage are incomplete, duplicated or from other settings (permanent)."""


def w_key(w: float) -> str:
    return str(float(w))


# ----------------------------------------------------------------------------
# Work units and their split across parts (pure functions of the config and (index, count))


@dataclass(frozen=True)
class Unit:
    """Samples [start, start + count) of the evaluation seed stream, guided with weight w."""

    w: float
    batch: int  # index of this batch of seeds within its w
    start: int
    count: int


def work_units(weights: list[float], num_samples: int, batch_size: int) -> list[Unit]:
    """Every unit, w-major in the order of the sweep; batches match the single-process sampling loop."""
    return [Unit(float(w), b, start, min(batch_size, num_samples - start))
            for w in weights for b, start in enumerate(range(0, num_samples, batch_size))]


def part_block(num_units: int, part: int, parts: int) -> range:
    """Indices of the units part `part` of `parts` computes: contiguous blocks whose sizes differ by <= 1."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is outside 0..{parts - 1}")
    q, r = divmod(num_units, parts)
    start = part * q + min(part, r)
    return range(start, start + q + (part < r))


def owner(unit_index: int, num_units: int, parts: int) -> int:
    """The part whose block holds unit_index (inverse of part_block)."""
    q, r = divmod(num_units, parts)
    return unit_index // (q + 1) if unit_index < r * (q + 1) else r + (unit_index - r * (q + 1)) // max(q, 1)


def settings_digest(ctx: StageContext) -> str:
    """What a part's statistics depend on besides w: parts computed under other settings must not merge."""
    ev = ctx.cfg.evaluate.model_dump(mode="json", exclude={"weights"})
    return hashlib.sha256(json.dumps({"evaluate": ev, "seed": ctx.cfg.seed}, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------
# Where the parts live


PART_FILE = re.compile(r"^part-(\d{5})-of-(\d{5})\.pt$")
PART_RECORD = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")  # run_stage's per-part completion records


def parts_dir(ctx: StageContext) -> str:
    return fsio.join(ctx.layout.stage(ctx.iteration, "evaluate"), "parts")


def part_stats_uri(ctx: StageContext, w: float, part: int, parts: int) -> str:
    return fsio.join(parts_dir(ctx), f"w-{w_key(w)}", f"part-{part:05d}-of-{parts:05d}.pt")


# ----------------------------------------------------------------------------
# Sampling and features


def guide_inputs(ctx: StageContext) -> dict[str, str]:
    """The URI of the configured method's guide network, keyed as the lineage logs it (cfg has none)."""
    k, layout, ev = ctx.iteration, ctx.layout, ctx.cfg.evaluate
    if ev.method == "sims":
        return {"aux_model": layout.model(k, "finetune-aux")}
    if ev.method == "autoguidance":
        return {"guide_model": layout.snapshot(k, "train-base", ev.autoguidance_images)}
    return {}


def guide_for(ctx: StageContext, base: torch.nn.Module) -> Denoiser:
    """The guide denoiser of the configured method: a loaded network, or the base without labels (cfg)."""
    if ctx.cfg.evaluate.method == "cfg":
        return Unconditional(base)
    (uri,) = guide_inputs(ctx).values()
    return NetDenoiser(ctx.load_model(uri))


def _extractor(ctx: StageContext) -> FeatureExtractor:
    ev = ctx.cfg.evaluate
    return build_feature_extractor(ev.features, cache_uri=ctx.layout.features, real=ctx.real, seed=ctx.cfg.seed,
                                   inception_weights=ev.inception_weights)


def _log_inputs(ctx: StageContext, run_id: str) -> None:
    """Params and lineage links of the stage run; identical from every part, so logging them twice is a no-op."""
    k, layout, ev = ctx.iteration, ctx.layout, ctx.cfg.evaluate
    ctx.lineage.log_params(run_id, {"method": ev.method, "weights": ",".join(map(w_key, ev.weights)),
                                    "num_samples": ev.num_samples, "steps": ev.sampler.steps,
                                    "features": ev.features})
    ctx.lineage.link(run_id, inputs={"base_model": layout.model(k, "train-base"), **guide_inputs(ctx)},
                     outputs={"fid": fsio.join(layout.stage(k, "evaluate"), "fid.json")})


def compute_part(ctx: StageContext) -> int:
    """Sample this part's units and store its statistics per w; returns how many units it sampled now.

    Each w's file is rewritten after every unit (atomically), so a restart resumes at the next unit.
    """
    k, ev = ctx.iteration, ctx.cfg.evaluate
    units = work_units(ev.weights, ev.num_samples, ev.batch_size)
    mine = [units[i] for i in part_block(len(units), ctx.part, ctx.parts)]
    digest = settings_digest(ctx)
    held: dict[str, dict] = {}
    for w in dict.fromkeys(u.w for u in mine):
        uri = part_stats_uri(ctx, w, ctx.part, ctx.parts)
        held[w_key(w)] = _load_part(uri, digest) if fsio.exists(uri) else \
            {"w": w, "part": ctx.part, "parts": ctx.parts, "settings": digest, "units": [], "grid": [],
             "stats": None}
    todo = [u for u in mine if u.batch not in held[w_key(u.w)]["units"]]
    if not todo:
        return 0

    extractor = _extractor(ctx)
    base = ctx.load_model(ctx.layout.model(k, "train-base"))
    guide = guide_for(ctx, base)
    seeds = sample_seeds(ctx.cfg.seed, k, "evaluate", ev.num_samples)
    total = sum(u.count for u in mine)
    done = total - sum(u.count for u in todo)
    progress = Progress(f"iter {k} evaluate part {ctx.part}/{ctx.parts}", total=total, done=done, unit="img")
    for u in todo:
        x, _ = sample_batch(ctx, Guided(NetDenoiser(base), guide, u.w), seeds[u.start:u.start + u.count],
                            ev.sampler)
        images = ctx.encoder.decode(x)
        with torch.no_grad():
            unit_stats = FeatureStats(extractor.dim).update(extractor(images))
        rec = held[w_key(u.w)]
        stats = FeatureStats.from_dict(rec["stats"]) if rec["stats"] else FeatureStats(extractor.dim)
        rec["stats"] = stats.merge(unit_stats).to_dict()
        rec["units"] = rec["units"] + [u.batch]
        if u.start < ev.grid_size:  # the PNG grid shows seeds 0..grid_size-1: keep ours among them
            rec["grid"] = rec["grid"] + [(u.batch, images[: ev.grid_size - u.start].detach().cpu().float())]
        fsio.save_torch(part_stats_uri(ctx, u.w, ctx.part, ctx.parts), rec)
        done += u.count
        progress.update(done)
    progress.close()
    return len(todo)


def _load_part(uri: str, digest: str) -> dict:
    rec = fsio.load_torch(uri)
    if not isinstance(rec, dict) or {"w", "part", "parts", "units", "stats", "grid", "settings"} - set(rec):
        raise EvaluatePartsError(f"{uri} is not an evaluate part record (expected keys w, part, parts, units, "
                                 "stats, grid, settings): remove it and rerun that part")
    if rec["settings"] != digest:
        raise EvaluatePartsError(f"{uri} was computed with other evaluate settings (seed, num_samples, "
                                 "batch_size, sampler, features, ...) than this config: remove "
                                 f"{uri.rsplit('/parts/', 1)[0]}/parts and rerun the evaluate parts")
    return rec


# ----------------------------------------------------------------------------
# Collecting the parts: every unit exactly once, from the part that owns it


def _part_counts(ctx: StageContext) -> dict[int, list[str]]:
    """count -> names of the part records and part statistics files written by parts of that count."""
    root = parts_dir(ctx)
    counts: dict[int, list[str]] = {}
    for name in fsio.listdir(root):
        if m := PART_RECORD.match(name):
            counts.setdefault(int(m[2]), []).append(name)
        elif name.startswith("w-"):
            for sub in fsio.listdir(fsio.join(root, name)):
                if m := PART_FILE.match(sub):
                    counts.setdefault(int(m[2]), []).append(f"{name}/{sub}")
    return counts


def infer_parts(ctx: StageContext) -> int:
    """The number of parts the evaluate array ran with, read from its records; one count or an error."""
    counts = _part_counts(ctx)
    where = parts_dir(ctx)
    if not counts:
        raise EvaluatePartsError(f"no evaluate parts under {where}: run `sims stage evaluate --iteration "
                                 f"{ctx.iteration} --index i --count N` for every i first")
    if len(counts) > 1:
        seen = "; ".join(f"--count {n}: {', '.join(sorted(names)[:3])}" for n, names in sorted(counts.items()))
        raise EvaluatePartsError(f"evaluate parts under {where} were written with different --count values "
                                 f"({seen}): a part ran twice with different counts; remove the stale files "
                                 "(or the whole parts folder) and rerun")
    return next(iter(counts))


def check_part_records(ctx: StageContext, parts: int) -> None:
    """Every part 0..parts-1 recorded its completion (run_stage writes the record when a part returns)."""
    layout, k = ctx.layout, ctx.iteration
    missing = [i for i in range(parts) if not fsio.exists(layout.part_marker(k, "evaluate", i, parts))]
    if missing:
        raise EvaluatePartsError(
            f"evaluate part(s) {', '.join(map(str, missing))} of {parts} have no completion record "
            f"(expected {layout.part_marker(k, 'evaluate', missing[0], parts)}): rerun `sims stage evaluate "
            f"--iteration {k} --index {missing[0]} --count {parts}`")


def collect_parts(ctx: StageContext, parts: int) -> dict[str, tuple[FeatureStats, torch.Tensor]]:
    """w -> (merged statistics, grid images) from the parts' files, checking each unit appears exactly once.

    A unit missing names the part that should have computed it; a unit claimed twice names both parts;
    a file from a part of another --count is an error (stale files of an earlier split).
    """
    ev, root = ctx.cfg.evaluate, parts_dir(ctx)
    units = work_units(ev.weights, ev.num_samples, ev.batch_size)
    digest = settings_digest(ctx)
    expected_ws = {w_key(w) for w in ev.weights}
    for name in fsio.listdir(root):
        if name.startswith("w-") and name[2:] not in expected_ws:
            raise EvaluatePartsError(f"{fsio.join(root, name)} holds parts for w={name[2:]}, which is not in "
                                     f"evaluate.weights {ev.weights}: remove it or restore that weight")
    out: dict[str, tuple[FeatureStats, torch.Tensor]] = {}
    for w in ev.weights:
        wdir = fsio.join(root, f"w-{w_key(w)}")
        owners = {u.batch: owner(i, len(units), parts) for i, u in enumerate(units) if u.w == float(w)}
        claimed: dict[int, int] = {}
        records: list[dict] = []
        for name in fsio.listdir(wdir):
            m = PART_FILE.match(name)
            if not m:
                continue
            part, count = int(m[1]), int(m[2])
            if count != parts:
                raise EvaluatePartsError(f"{fsio.join(wdir, name)} is from part {part} of {count}, but this "
                                         f"evaluation has {parts} parts: remove the stale file and rerun")
            rec = _load_part(fsio.join(wdir, name), digest)
            if (rec["part"], rec["parts"], w_key(rec["w"])) != (part, count, w_key(w)):
                raise EvaluatePartsError(f"{fsio.join(wdir, name)} says it is part {rec['part']} of "
                                         f"{rec['parts']} for w={rec['w']}, not what its name says")
            for b in rec["units"]:
                if b in claimed:
                    raise EvaluatePartsError(f"w={w}: unit {b} (seeds from {b * ev.batch_size}) is claimed by "
                                             f"part {claimed[b]} and part {part} of {parts}: duplicated part")
                if b not in owners:
                    raise EvaluatePartsError(f"w={w}: part {part} of {parts} holds unit {b}, but w={w} has only "
                                             f"{len(owners)} units of {ev.batch_size} seeds")
                if owners[b] != part:
                    raise EvaluatePartsError(f"w={w}: unit {b} belongs to part {owners[b]} of {parts}, but "
                                             f"part {part} holds it: duplicated part")
                claimed[b] = part
            records.append(rec)
        missing = sorted(set(owners) - set(claimed))
        if missing:
            by_part: dict[int, list[int]] = {}
            for b in missing:
                by_part.setdefault(owners[b], []).append(b)
            detail = "; ".join(f"part {p} of {parts} lacks unit(s) {bs}" for p, bs in sorted(by_part.items()))
            raise EvaluatePartsError(f"w={w}: {detail} (expected in {wdir}/part-{min(by_part):05d}-of-"
                                     f"{parts:05d}.pt): rerun that part")
        # Merge in unit order, so the sums do not depend on the order the files were listed in.
        records.sort(key=lambda r: min(r["units"]))
        stats = FeatureStats.merged(FeatureStats.from_dict(r["stats"]) for r in records)
        grid = sorted((b, img) for r in records for b, img in r["grid"])
        images = torch.cat([img for _, img in grid])[: ev.grid_size]
        out[w_key(w)] = (stats, images)
    return out


# ----------------------------------------------------------------------------
# Results: one function turns merged statistics into fid.json, per-w files and MLflow logs


def write_results(ctx: StageContext, run_id: str, merged: dict[str, tuple[FeatureStats, torch.Tensor]]) -> dict:
    """FID per w against the real reference statistics; writes the evaluate outputs and logs run-level results."""
    k, layout, ev, lin = ctx.iteration, ctx.layout, ctx.cfg.evaluate, ctx.lineage
    out = layout.stage(k, "evaluate")
    ref = reference_stats(_extractor(ctx), ctx.real.images, layout.features, ev.batch_size)
    fid: dict[str, float] = {}
    for key, (stats, grid) in merged.items():
        w = float(key)
        if stats.count != ev.num_samples:
            raise EvaluatePartsError(f"w={w}: merged statistics hold {stats.count} samples, expected "
                                     f"evaluate.num_samples = {ev.num_samples}")
        value = fid_from_stats(stats, ref)
        fid[key] = value
        fsio.save_torch(fsio.join(out, "per-w", f"w-{key}.stats.pt"), stats.to_dict())
        fsio.write_json(fsio.join(out, "per-w", f"w-{key}.json"), {"w": w, "fid": value,
                                                                    "num_samples": ev.num_samples})
        lin.log_metrics(run_id, {"fid": value}, step=int(round(w * 1000)))
        lin.log_metrics(run_id, {f"fid_w_{key}": value}, step=0)
        lin.log_artifact_bytes(run_id, f"samples/w-{key}.png", image_grid_png(grid, nrow=8))
        print(f"[iter {k} evaluate] w={w}: FID {value:.3f}", flush=True)

    fsio.write_json(fsio.join(out, "fid.json"), fid)
    lin.log_artifact_bytes(run_id, "fid_vs_w.png",
                           fid_plot_png({float(w): v for w, v in fid.items()}, f"iteration {k}: FID vs w"))
    best = min(fid, key=lambda key: fid[key])
    lin.log_metrics(run_id, {"fid_base": fid.get("0.0", float("nan")), "fid_best": fid[best],
                             "best_w": float(best)}, step=0)
    # The run's summary grows as each iteration's evaluation completes, whichever launcher ran it.
    log_iteration_results(lin, update_summary(layout, iteration_result(k, {float(w): v for w, v in fid.items()}),
                                              lin.pipeline_id), k)
    return {"fid": fid, "best_w": float(best), "complete": True}


# ----------------------------------------------------------------------------
# The stage functions


def evaluate(ctx: StageContext, run_id: str) -> dict:
    """Part ctx.part of ctx.parts; with one part, also the reduction (the local runner's whole stage)."""
    t0 = time.time()
    stale = {n: names for n, names in _part_counts(ctx).items() if n != ctx.parts}
    if stale:  # fail before sampling: the reducer would refuse to merge them with ours anyway
        n, names = min(stale.items())
        raise EvaluatePartsError(f"{parts_dir(ctx)} holds parts written with --count {n} ({', '.join(names[:3])}), "
                                 f"but this part runs with --count {ctx.parts}: a part ran with different counts; "
                                 "remove the stale files (or the whole parts folder) and rerun")
    _log_inputs(ctx, run_id)
    sampled = compute_part(ctx)
    if ctx.parts == 1:
        return write_results(ctx, run_id, collect_parts(ctx, 1))
    # Part-level only (step = part index): run-level results are the reducer's to log.
    ctx.lineage.log_metrics(run_id, {"part_units": float(sampled), "part_seconds": time.time() - t0},
                            step=ctx.part)
    return {"part": ctx.part, "parts": ctx.parts, "units": sampled, "complete": False}


def evaluate_reduce(ctx: StageContext, run_id: str) -> dict:
    """Merge the evaluate array's parts into fid.json; its completion record is the evaluate stage's."""
    if ctx.parts != 1:
        raise ValueError(f"evaluate-reduce runs as one process, got --count {ctx.parts}")
    parts = infer_parts(ctx)
    check_part_records(ctx, parts)
    result = write_results(ctx, run_id, collect_parts(ctx, parts))
    ctx.lineage.log_metrics(run_id, {"eval_parts": float(parts)}, step=0)
    return {**result, "parts": parts}
