"""The real-vs-real floor: what FID real training images get against the reference at the report-set size.

m = min(evaluate.repeats, n_train // evaluate.num_samples) disjoint sets of evaluate.num_samples images of the
training split (never a reference image), drawn by one fixed-seed permutation of the split's positions, each
measured against the reference statistics exactly as a method's seed set is (evaluation/report.py set_metrics).
No sampler reproduces the real distribution better than real images do, so a method's FID cannot meaningfully go
below the floor's mean, and FID gaps smaller than its sd are sampling noise. Computed once per run where the
reference statistics are made (the reference stage, or its reducer) and stored beside them as fid_floor.json;
only the sets' images are decoded (SourceIndex), never the whole training split.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from sims_platform.config.schema import DataConfig, EvaluateConfig
from sims_platform.data import SourceIndex, training_indices
from sims_platform.evaluation.reference import ReferenceFiles, ReferencePartsError
from sims_platform.evaluation.report import set_metrics
from sims_platform.metrics import FeatureExtractor, FeatureStats
from sims_platform.storage import fsio
from sims_platform.tracking.json_safe import json_safe
from sims_platform.utils.progress import Progress

# The sets' permutation seed. Fixed: every run seed, and every feature network, measures the same real images.
FLOOR_SEED = 0
# What a summary row carries of the record (evaluation/report.py iteration_row), plus `reason` when not computed.
ROW_KEYS = ("mean", "sd", "sets", "samples", "precision", "recall")


def floor_sets(n_train: int, num_samples: int, repeats: int) -> list[torch.Tensor]:
    """The floor's sets as sorted positions 0..n_train-1 of the training split: min(repeats, n_train //
    num_samples) disjoint blocks of num_samples of one seeded permutation (none when a set does not fit)."""
    m = min(repeats, n_train // num_samples)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(FLOOR_SEED))
    return [perm[i * num_samples:(i + 1) * num_samples].sort().values for i in range(m)]


def training_source(d: DataConfig) -> tuple[SourceIndex, torch.Tensor]:
    """data.path indexed (nothing decoded) and the sorted source indices of its training split."""
    index = SourceIndex(d)
    return index, training_indices(index.labels, d)


def not_computed(reason: str, num_samples: int) -> dict[str, Any]:
    """The record of a floor that could not be measured, and why."""
    return {"mean": None, "sd": None, "sets": 0, "samples": num_samples, "precision": None, "recall": None,
            "reason": reason}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else float("nan")


def compute_floor(extractor: FeatureExtractor, index: SourceIndex, train: torch.Tensor, ref_stats: FeatureStats,
                  ref_features: torch.Tensor | None, ev: EvaluateConfig) -> dict[str, Any]:
    """The floor of the training split `train` (source indices of `index`) against the reference: per set FID
    (and precision/recall when the reference keeps feature vectors), their mean and sd over the sets."""
    sets = floor_sets(len(train), ev.num_samples, ev.repeats)
    if not sets:
        return not_computed(f"the training split has {len(train)} images, fewer than one report set "
                            f"(evaluate.num_samples = {ev.num_samples})", ev.num_samples)
    keep = min(ev.precision_recall.max_samples, ev.num_samples)  # as a method's seed set keeps (evaluation/parts.py)
    progress = Progress("real-vs-real floor", total=len(sets) * ev.num_samples, unit="img")
    per_set: list[dict[str, float]] = []
    for positions in sets:
        source = train[positions]
        stats, kept = FeatureStats(extractor.dim), torch.zeros(0, extractor.dim)
        for i in range(0, len(source), ev.batch_size):
            with torch.no_grad():
                features = extractor(index.load(source[i:i + ev.batch_size].tolist()).images)
            stats.update(features)
            kept = torch.cat([kept, features[:keep - len(kept)].detach().cpu().float()])
            progress.update(len(per_set) * ev.num_samples + i + len(features))
        per_set.append(set_metrics(stats, kept, ref_stats, ref_features, ev.precision_recall.k))
    progress.close()
    fids = [s["fid"] for s in per_set]
    return json_safe({
        "mean": _mean(fids), "sd": statistics.stdev(fids) if len(fids) > 1 else None, "sets": len(sets),
        "samples": ev.num_samples, "precision": _mean([s["precision"] for s in per_set]),
        "recall": _mean([s["recall"] for s in per_set]), "fid_per_set": fids, "training_images": len(train)})


def write_floor(files: ReferenceFiles, record: dict[str, Any]) -> None:
    fsio.write_json(files.floor, {"key": files.key, **json_safe(record)})


def read_floor(files: ReferenceFiles) -> dict[str, Any] | None:
    """The stored floor of this reference (its key names the floor's settings too), or None if not computed yet."""
    if not fsio.exists(files.floor):
        return None
    rec = fsio.read_json(files.floor)
    if not isinstance(rec, dict) or rec.get("key") != files.key or set(ROW_KEYS) - set(rec):
        raise ReferencePartsError(f"{files.floor} is not the real-vs-real floor of this feature network, reference "
                                  "and evaluate.num_samples/repeats: remove it and rerun `sims stage reference`")
    return rec


def floor_row(record: dict[str, Any]) -> dict[str, Any]:
    """A summary row's fid_floor: mean and sd of the sets' FIDs, how many sets of how many images, precision and
    recall (null without reference feature vectors), and `reason` when it was not computed."""
    return {key: record[key] for key in ROW_KEYS} | ({"reason": record["reason"]} if record.get("reason") else {})


def floor_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The floor as MLflow metrics: fid_floor (the mean) and fid_floor_sd, those that are numbers."""
    named = {"fid_floor": record.get("mean"), "fid_floor_sd": record.get("sd")}
    return {name: float(v) for name, v in named.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def describe_floor(record: dict[str, Any]) -> str:
    """One line: the floor's FID mean ± sd over how many sets of how many images, or why there is none."""
    if record.get("mean") is None:
        return f"not computed ({record.get('reason') or 'a set FID is not finite'})"
    sd = f" ± {record['sd']:.3f}" if record.get("sd") is not None else ""
    return f"FID {record['mean']:.3f}{sd} over {record['sets']} set(s) of {record['samples']} training images"


__all__ = ["FLOOR_SEED", "compute_floor", "describe_floor", "floor_metrics", "floor_row", "floor_sets",
           "not_computed", "read_floor", "training_source", "write_floor"]
