"""From merged statistics to results: metrics per arm and seed set, each method's selected w, paired gains.

Protocol (README "Measuring honestly"): each method's best w is the argmin of FID on the selection set (set 0),
which is never reported (with evaluate.selection false, its one preset w, chosen beforehand on other seeds);
FID, precision and recall are reported as mean and sd over the report sets 1..R; the gain of a method is the
paired difference FID(base) - FID(method at its best w) on each report set (the same seeds), summarised as mean
and sd; it counts as significant when the mean exceeds twice that sd.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from sims_platform.config.schema import EvaluateConfig
from sims_platform.evaluation.parts import ArmData
from sims_platform.evaluation.plan import BASE, SELECTION_SET, Arm, method_arms, report_sets, w_key
from sims_platform.config.methods import Weights, is_base
from sims_platform.metrics import FeatureStats, fid_from_stats
from sims_platform.sampling.heun import call_sigmas
from sims_platform.metrics.prdc import precision_recall

METRICS = ("fid", "precision", "recall", "density", "coverage")


def arm_metrics(data: ArmData, ref_stats: FeatureStats, ref_features: torch.Tensor | None, k: int,
                expected: int) -> dict[str, dict[int, float]]:
    """metric -> seed set -> value, for one arm; precision & co. on equal numbers of real and fake features
    (NaN when the reference has no feature vectors, e.g. published statistics)."""
    out: dict[str, dict[int, float]] = {m: {} for m in METRICS}
    for s, stats in sorted(data.stats.items()):
        if stats.count != expected:
            raise ValueError(f"seed set {s}: merged statistics hold {stats.count} samples, expected "
                             f"evaluate.num_samples = {expected}")
        for name, value in set_metrics(stats, data.features[s], ref_stats, ref_features, k).items():
            out[name][s] = value
    return out


def set_metrics(stats: FeatureStats, features: torch.Tensor | None, ref_stats: FeatureStats,
                ref_features: torch.Tensor | None, k: int) -> dict[str, float]:
    """The METRICS of one set of images (its statistics and first feature vectors) against the reference: the one
    place a set is measured (a method's seed set, a real-vs-real floor set)."""
    out = {"fid": fid_from_stats(stats, ref_stats)}
    if ref_features is None or features is None:
        return out | {name: float("nan") for name in METRICS[1:]}
    n = min(len(ref_features), len(features))
    return out | precision_recall(ref_features[:n], features[:n], k)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) != len(values) or not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def _vector(w: Weights) -> tuple[float, ...]:
    return w if isinstance(w, tuple) else (w,)


def method_result(ev: EvaluateConfig, method: str, metrics: dict[str, dict[str, dict[int, float]]],
                  steps: int) -> dict[str, Any]:
    """One method's sweep (w = 0 included): report means/sds per w, its selected w, and its paired gain."""
    sweep: list[Arm] = method_arms(ev, method)
    reps = report_sets(ev)
    cfg = ev.method(method)
    interval = cfg.guidance_interval  # outside it a sampler step evaluates the base alone
    res: dict[str, Any] = {name: {} for name in ("fid", "fid_sd", "precision", "recall", "density", "coverage",
                                                 "nfe_per_w") + (("fid_selection",) if ev.selection else ())}
    for arm in sweep:
        key, m = w_key(arm.w), metrics[arm.key]
        res["fid"][key], res["fid_sd"][key] = _mean_sd([m["fid"][s] for s in reps])
        for name in ("precision", "recall", "density", "coverage"):
            res[name][key] = _mean_sd([m[name][s] for s in reps])[0]
        if ev.selection:
            res["fid_selection"][key] = m["fid"][SELECTION_SET]
        res["nfe_per_w"][key] = arm.nfe_per_sample(steps) if arm == BASE or interval is None else \
            cfg.row.nfe_in_interval(call_sigmas(ev.sampler), arm.w, interval)
    if ev.selection:
        finite = {a: metrics[a.key]["fid"][SELECTION_SET] for a in sweep
                  if math.isfinite(metrics[a.key]["fid"][SELECTION_SET])}
        best = min(finite, key=lambda a: (finite[a], _vector(a.w))) if finite else BASE
    else:  # the one preset w (validated): reported whether or not it beats the base
        best = sweep[-1]
    guided = not is_base(best.w)
    gaps = [metrics[BASE.key]["fid"][s] - metrics[best.key]["fid"][s] for s in reps]
    gain, gain_sd = _mean_sd(gaps)
    res.update({
        "best_w": list(best.w) if isinstance(best.w, tuple) else best.w,
        "fid_base": res["fid"][w_key(0.0)],
        "fid_best": res["fid"][w_key(best.w)],
        "fid_best_sd": res["fid_sd"][w_key(best.w)],
        "gain": gain if guided else 0.0,
        "gain_sd": gain_sd if guided else 0.0,
        "significant": bool(guided and math.isfinite(gain_sd) and gain > 2 * gain_sd),
        "nfe_per_sample": max(res["nfe_per_w"].values()),
    })
    return res


def iteration_row(k: int, ev: EvaluateConfig, methods: dict[str, dict[str, Any]],
                  fid_floor: dict[str, Any]) -> dict[str, Any]:
    """summary.json's row: the primary (first) method's results at the top level, every method under 'methods',
    and the real-vs-real floor the FIDs are read against (evaluation/floor.py floor_row)."""
    primary = methods[ev.primary.name]
    keys = ("fid", "fid_sd", "precision", "recall", "best_w", "fid_base", "fid_best")
    return {"iteration": int(k), **{key: primary[key] for key in keys}, "fid_floor": fid_floor,
            "sampler_steps": ev.sampler.steps,
            "repeats": ev.repeats, "num_samples": ev.num_samples, "selection": ev.selection,
            "primary_method": ev.primary.name,
            "method_order": [m.name for m in ev.methods], "methods": methods}
