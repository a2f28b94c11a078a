"""Distribution shifting results: per arm and seed set, the judged class histogram, its total-variation distance
to the target and the FID against the target-reweighted reference; per method and w, their report-set summary.

The histograms come from the judging classifier (shift/classifiers.py), never the selecting one. For the method
whose guidance formula the aux set's design assumes (its row is shift_calibrated: sims), each w > 0 also gets the gain fitted from what was achieved (selection.fit_gain
on the base arm's and that arm's report-set histograms and the aux set's designed histogram): the calibration
shift.gain would need for the next run to reach the target at that w.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from sims_platform.config.schema import EvaluateConfig
from sims_platform.evaluation.plan import BASE, method_arms, report_sets, w_key
from sims_platform.config.methods import method as method_row
from sims_platform.shift.selection import ShiftError, fit_gain, total_variation

def _normalised(counts: torch.Tensor) -> list[float]:
    c = counts.to(torch.float64)
    return (c / c.sum()).tolist()


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def arm_shift_metrics(classes: dict[int, torch.Tensor], target: list[float],
                      fid_target: dict[int, float]) -> dict[str, dict[int, Any]]:
    """histogram, tv and fid_target per seed set of one arm."""
    hist = {s: _normalised(c) for s, c in sorted(classes.items())}
    return {"histogram": hist, "tv": {s: total_variation(h, target) for s, h in hist.items()},
            "fid_target": dict(sorted(fid_target.items()))}


def method_shift_summary(ev: EvaluateConfig, method: str, classes: dict[str, dict[int, torch.Tensor]],
                         per_arm: dict[str, dict[str, dict[int, Any]]], target: list[float],
                         aux_set: list[float] | None) -> dict[str, dict[str, Any]]:
    """w -> report-set histogram (pooled counts), tv and fid_target mean/sd, and (sims) the fitted gain."""
    reps = report_sets(ev)
    pooled = {key: _normalised(torch.stack([c[s] for s in reps]).sum(0)) for key, c in classes.items()}
    out: dict[str, dict[str, Any]] = {}
    for arm in method_arms(ev, method):
        m = per_arm[arm.key]
        tv, tv_sd = _mean_sd([m["tv"][s] for s in reps])
        fid, fid_sd = _mean_sd([m["fid_target"][s] for s in reps])
        row: dict[str, Any] = {"histogram": pooled[arm.key], "tv": tv, "tv_sd": tv_sd,
                               "tv_pooled": total_variation(pooled[arm.key], target),
                               "fid_target": fid, "fid_target_sd": fid_sd, "gain_fit": None}
        # Only the method whose formula the aux set's design assumes (its row says so) gets a fitted gain.
        if method_row(method).shift_calibrated and arm != BASE and aux_set is not None:
            try:
                assert not isinstance(arm.w, tuple)  # a calibrated method has one guide, so one w
                row["gain_fit"] = fit_gain(pooled[BASE.key], aux_set, pooled[arm.key], arm.w)
            except ShiftError:
                row["gain_fit"] = float("nan")  # no tilt to fit (aux equals base on the measured classes)
        out[w_key(arm.w)] = row
    return out


def shift_results(ev: EvaluateConfig, target: list[float], classes: dict[str, dict[int, torch.Tensor]],
                  fid_target: dict[str, dict[int, float]], aux_set: list[float] | None) -> dict[str, Any]:
    """results.json's `shift` section; classes and fid_target are keyed by arm key, then seed set."""
    per_arm = {key: arm_shift_metrics(classes[key], target, fid_target[key]) for key in classes}
    methods = {m.name: method_shift_summary(ev, m.name, classes, per_arm, target, aux_set) for m in ev.methods}
    base = methods[ev.primary.name][w_key(0.0)]
    return {"target": target, "aux_set_histogram": aux_set, "base_histogram": base["histogram"],
            "base_tv": base["tv"], "methods": methods,
            "per_arm": {k: {name: {str(s): v for s, v in vals.items()} for name, vals in m.items()}
                        for k, m in per_arm.items()}}

