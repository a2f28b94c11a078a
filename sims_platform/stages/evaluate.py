"""evaluate and evaluate-reduce: every method's w sweep on shared seeds, in one process or as a job array + reducer.

What is computed is planned in evaluation/plan.py (arms x seed sets x batches), stored by evaluation/parts.py,
and turned into results by evaluation/report.py. Part i of N (an Indexed Job pod) samples its block of units
and rewrites its per-arm file after each one, so a restarted part skips what it holds. The reducer merges
every part (sums: any split gives the single-process result up to float64 rounding), checks each unit was
computed exactly once, and writes fid.json / results.json. With one part, `evaluate` does both.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from sims_platform.evaluation import parts as P
from sims_platform.evaluation.features import feature_extractor
from sims_platform.evaluation.floor import (compute_floor, describe_floor, floor_metrics, floor_row, not_computed,
                                            read_floor, training_source)
from sims_platform.evaluation.methods import Networks, model_inputs
from sims_platform.evaluation.plan import arms, part_block, set_offset, w_key, work_units
from sims_platform.evaluation.reference import ReferenceFiles, in_memory_reference, read_result
from sims_platform.evaluation.report import arm_metrics, iteration_row, method_result
from sims_platform.config.methods import curves as method_curves
from sims_platform.config.methods import metric_tag, parse_w_key, w_metric
from sims_platform.data import read_manifest
from sims_platform.metrics import FeatureExtractor, FeatureStats, fid_from_stats
from sims_platform.metrics.edm2_refs import edm2_reference
from sims_platform.shift.classifiers import classify, shift_classifier
from sims_platform.shift.reference import per_class_stats, reweighted_stats
from sims_platform.shift.report import shift_results
from sims_platform.stages.context import StageContext
from sims_platform.stages.drift import AUX_STAGES, log_drift
from sims_platform.stages.seeds import sample_seeds
from sims_platform.stages.sampling import sample_batch
from sims_platform.steps import row as stage_row
from sims_platform.storage import fsio
from sims_platform.tracking import Lineage, fid_curves_png, image_grid_png, update_summary
from sims_platform.tracking.summary_metrics import log_iteration_results
from sims_platform.utils.progress import Progress

EvaluatePartsError = P.EvaluatePartsError


def _log_inputs(ctx: StageContext, run_id: str) -> None:
    """Params and lineage links of the stage run; identical from every part, so logging them twice is a no-op."""
    k, layout, ev = ctx.iteration, ctx.layout, ctx.cfg.evaluate
    params = {"methods": ",".join(m.name for m in ev.methods), "num_samples": ev.num_samples,
              "repeats": ev.repeats, "steps": ev.sampler.steps, "features": ev.features,
              "holdout_fraction": ctx.cfg.data.holdout_fraction, "pr_k": ev.precision_recall.k,
              "reference": ev.reference or ctx.cfg.data.reference_path or "held-out split"}
    params |= {f"weights.{metric_tag(m.name)}": (";" if m.row.vector else ",").join(map(w_key, m.grid)) for m in ev.methods}
    ctx.lineage.log_params(run_id, params)
    out = layout.stage(k, "evaluate")
    # A method evaluated at w = 0 only (a loop's standard arm) samples the base alone: it reads no guide.
    ctx.lineage.link(run_id, inputs=model_inputs(ctx.cfg, layout, k, [m.name for m in ev.methods if m.guided_weights]),
                     outputs={"fid": fsio.join(out, "fid.json"), "results": fsio.join(out, "results.json")})


# ----------------------------------------------------------------------------
# One part


def compute_part(ctx: StageContext) -> int:
    """Sample this part's units and store their features per arm; returns how many units it sampled now."""
    k, ev = ctx.iteration, ctx.cfg.evaluate
    units = work_units(ev)
    mine = [units[i] for i in part_block(len(units), ctx.part, ctx.parts)]
    held: dict[str, dict] = {}
    for arm in dict.fromkeys(u.arm for u in mine):
        uri = P.part_uri(ctx, arm, ctx.part, ctx.parts)
        held[arm.key] = P.load_record(ctx, uri, arm) if fsio.exists(uri) else P.new_record(ctx, arm)
    todo = [u for u in mine if [u.seed_set, u.batch] not in held[u.arm.key]["units"]]
    if not todo:
        return 0

    extractor = feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)
    judge = shift_classifier(ctx.cfg, ctx.layout.features, ctx.data.labelled, ctx.device, "judge") if ctx.cfg.shift is not None else None
    nets = Networks(ctx.cfg, ctx.layout, k, ctx.models.sampling)
    total = sum(u.count for u in mine)
    done = total - sum(u.count for u in todo)
    progress = Progress(f"iter {k} evaluate part {ctx.part}/{ctx.parts}", total=total, done=done, unit="img")
    for u in todo:
        seeds = sample_seeds(ctx.cfg.seed, k, "evaluate", u.count, set_offset(ev, u.seed_set) + u.start)
        x, _ = sample_batch(ctx, nets.denoiser(u.arm), seeds, ev.sampler)
        images = ctx.data.encoder.decode(x)
        with torch.no_grad():
            features = extractor(images)
        classes = classify(judge, images, ev.batch_size) if judge is not None else None
        rec = held[u.arm.key]
        P.add_unit(ctx, rec, u, features, images, classes)
        fsio.save_torch(P.part_uri(ctx, u.arm, ctx.part, ctx.parts), rec)
        done += u.count
        progress.update(done)
    progress.close()
    return len(todo)


# ----------------------------------------------------------------------------
# Results


def reference(ctx: StageContext, extractor: FeatureExtractor) -> tuple[FeatureStats, torch.Tensor | None]:
    """Statistics and the first precision_recall.max_samples features of the reference images (data.reference_path,
    else the held-out split); published EDM2 statistics (evaluate.reference) carry no features, so
    precision/recall are then left out.

    The reference stage's streamed result is used when it exists for this feature network and reference; without
    it (a stage run alone on small data) they are computed here from the same images (ctx.data.reference), all in
    memory, as the stage's single part would (evaluation/reference.py in_memory_reference)."""
    ev = ctx.cfg.evaluate
    if ev.reference:
        return edm2_reference(ev.reference, ev.features, extractor.dim), None
    streamed = read_result(ReferenceFiles.of(ctx.layout, ctx.cfg, extractor))
    if streamed is not None:
        return streamed
    return in_memory_reference(extractor, ctx.data.reference.images, ev.batch_size, ev.precision_recall.max_samples)


def real_floor(ctx: StageContext, extractor: FeatureExtractor, ref_stats: FeatureStats,
               ref_features: torch.Tensor | None) -> dict:
    """The real-vs-real floor (evaluation/floor.py): as the reference stage stored it beside the statistics; when
    evaluate computed the reference itself (no reference stage ran), measured here the same way; none against
    published statistics."""
    ev = ctx.cfg.evaluate
    if ev.reference:
        return not_computed("evaluate.reference names published statistics: no reference stage runs, so no real "
                            "images are measured against them", ev.num_samples)
    stored = read_floor(ReferenceFiles.of(ctx.layout, ctx.cfg, extractor))
    if stored is not None:
        return stored
    index, train = training_source(ctx.cfg.data)
    return compute_floor(extractor, index, train, ref_stats, ref_features, ev)


def _log_at_w(lineage: Lineage, run_id: str, method: str, key: str, metrics: dict[str, float]) -> None:
    """A method's metrics at one weight setting (its summary.json key) under their MLflow names and step."""
    w = parse_w_key(key)
    assert w is not None
    named = [w_metric(method, metric, w) for metric in metrics]
    lineage.log_metrics(run_id, {name: v for (name, _), v in zip(named, metrics.values())}, step=named[0][1])


def shift_section(ctx: StageContext, run_id: str, extractor: FeatureExtractor,
                  merged: dict[str, P.ArmData]) -> dict:
    """Distribution shifting: judged histograms, TV to the target, FID against the target-reweighted reference.

    The per-class reference statistics are computed here from the held-out images in memory (the reference
    stage streams class-blind statistics only): small data only, as evaluate's in-process reference.
    """
    ev, d, sh = ctx.cfg.evaluate, ctx.cfg.data, ctx.cfg.shift
    assert sh is not None
    target = sh.target_probs(d.num_classes)
    held = ctx.data.reference
    ref = reweighted_stats(per_class_stats(extractor, held.images, held.labels, d.num_classes, ev.batch_size),
                           target)
    fid_target = {key: {s: fid_from_stats(st, ref) for s, st in data.stats.items()} for key, data in merged.items()}
    aux_uri = ctx.layout.shards(ctx.iteration, "select-aux")
    aux_set = read_manifest(aux_uri)["aux_histogram"] if fsio.exists(fsio.join(aux_uri, "manifest.json")) else None
    res = shift_results(ev, target, {key: data.classes for key, data in merged.items()}, fid_target, aux_set)
    for name, by_w in res["methods"].items():
        for w, row in by_w.items():
            metrics = {"shift_tv": row["tv"], "fid_target": row["fid_target"]}
            if row["gain_fit"] is not None:
                metrics["shift_gain_fit"] = row["gain_fit"]
            _log_at_w(ctx.lineage, run_id, name, w, metrics)
        print(f"[iter {ctx.iteration} evaluate] shift {name}: TV to target by w "
              + ", ".join(f"{w}: {row['tv']:.3f}" for w, row in by_w.items()), flush=True)
    return res


def write_results(ctx: StageContext, run_id: str, merged: dict[str, P.ArmData]) -> dict:
    """Metrics per arm and seed set against the reference; each method's selection and gain."""
    k, layout, ev, lin = ctx.iteration, ctx.layout, ctx.cfg.evaluate, ctx.lineage
    out = layout.stage(k, "evaluate")
    extractor = feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)
    ref_stats, ref_features = reference(ctx, extractor)
    floor = real_floor(ctx, extractor, ref_stats, ref_features)
    metrics = {key: arm_metrics(data, ref_stats, ref_features, ev.precision_recall.k, ev.num_samples)
               for key, data in merged.items()}
    methods: dict[str, dict[str, Any]] = {m.name: method_result(ev, m.name, metrics, ev.sampler.steps)
                                          for m in ev.methods}
    row = iteration_row(k, ev, methods, floor_row(floor))
    print(f"[iter {k} evaluate] real vs real (floor): {describe_floor(floor)}", flush=True)

    for arm in arms(ev):
        data, m = merged[arm.key], metrics[arm.key]
        fsio.save_torch(fsio.join(out, "per-arm", f"{arm.key}.stats.pt"),
                        {str(s): st.to_dict() for s, st in data.stats.items()})
        if len(data.grid):
            lin.log_artifact_bytes(run_id, f"samples/{arm.key}.png", image_grid_png(data.grid, nrow=8))
        print(f"[iter {k} evaluate] {arm.key}: FID per set "
              + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(m["fid"].items())), flush=True)
    for name, res in methods.items():
        for w in res["fid"]:
            _log_at_w(lin, run_id, name, w, {m: res[m][w] for m in ("fid", "fid_sd", "precision", "recall")})
        tag = metric_tag(name)
        best = {f"{tag}.best_w": res["best_w"]} if not isinstance(res["best_w"], list) else {}
        lin.log_metrics(run_id, best | {f"{tag}.fid_best": res["fid_best"], f"{tag}.gain": res["gain"],
                                        f"{tag}.gain_sd": res["gain_sd"]}, step=0)
    lin.log_metrics(run_id, {"fid_base": row["fid_base"], "fid_best": row["fid_best"]} | floor_metrics(floor)
                    | ({"best_w": row["best_w"]} if not isinstance(row["best_w"], list) else {}), step=0)
    curves = {label: line for name, res in methods.items()
              for label, line in method_curves(name, {w: (res["fid"][w], res["fid_sd"][w]) for w in res["fid"]}).items()}
    lin.log_artifact_bytes(run_id, "fid_vs_w.png", fid_curves_png(
        curves, f"iteration {k}: FID vs w (mean ± sd, {ev.repeats} seed sets)",
        best={name: res["best_w"] for name, res in methods.items() if not isinstance(res["best_w"], list)}))
    per_arm = {key: {name: {str(s): v for s, v in vals.items()} for name, vals in m.items()}
               for key, m in metrics.items()}
    results = {"row": row, "per_arm": per_arm}
    if ctx.cfg.shift is not None:
        results["shift"] = shift_section(ctx, run_id, extractor, merged)
    # The aux models this step's plan trains (a standard loop arm has none) that its methods guide with.
    aux = [s for s in AUX_STAGES if stage_row(s).when(ctx.pipeline_cfg, k, ctx.loop)
           and any(s in m.row.stages(ctx.cfg) for m in ev.methods)]
    if aux:
        results["drift"] = log_drift(ctx, run_id, aux)
    fsio.write_json(fsio.join(out, "results.json"), results)
    fsio.write_json(fsio.join(out, "fid.json"), row["fid"])
    # The run's summary grows as each iteration's evaluation completes, whichever launcher ran it.
    log_iteration_results(lin, update_summary(layout, row, lin.pipeline_id), k, ctx.loop_name)
    return {"row": row, "best_w": row["best_w"], "complete": True}


# ----------------------------------------------------------------------------
# The stage functions


def evaluate(ctx: StageContext, run_id: str) -> dict:
    """Part ctx.part of ctx.parts; with one part, also the reduction (the local runner's whole stage)."""
    t0 = time.time()
    stale = {n: names for n, names in P.part_counts(ctx).items() if n != ctx.parts}
    if stale:  # fail before sampling: the reducer would refuse to merge them with ours anyway
        n, names = min(stale.items())
        raise EvaluatePartsError(f"{P.parts_dir(ctx)} holds parts written with --count {n} "
                                 f"({', '.join(names[:3])}), but this part runs with --count {ctx.parts}: a part "
                                 "ran with different counts; remove the stale files (or the whole parts folder) "
                                 "and rerun")
    _log_inputs(ctx, run_id)
    sampled = compute_part(ctx)
    if ctx.parts == 1:
        return write_results(ctx, run_id, P.collect(ctx, 1))
    # Part-level only (step = part index): run-level results are the reducer's to log.
    ctx.lineage.log_metrics(run_id, {"part_units": float(sampled), "part_seconds": time.time() - t0},
                            step=ctx.part)
    return {"part": ctx.part, "parts": ctx.parts, "units": sampled, "complete": False}


def evaluate_reduce(ctx: StageContext, run_id: str) -> dict:
    """Merge the evaluate array's parts into results; its completion record is the evaluate stage's."""
    if ctx.parts != 1:
        raise ValueError(f"evaluate-reduce runs as one process, got --count {ctx.parts}")
    parts = P.infer_parts(ctx)
    P.check_part_records(ctx, parts)
    result = write_results(ctx, run_id, P.collect(ctx, parts))
    ctx.lineage.log_metrics(run_id, {"eval_parts": float(parts)}, step=0)
    return {**result, "parts": parts}


__all__ = ["EvaluatePartsError", "compute_part", "evaluate", "evaluate_reduce", "write_results"]
