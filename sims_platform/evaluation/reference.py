"""Reference statistics of the real reference images as a job array: part records, their merge, the cached result.

The reference images are every image of data.reference_path when it is set, else the held-out split of data.path
(data/split.py). Everything lives under ROOT/features/reference/<feature network>-<key>/, where the key digests the
feature network's fingerprint, the reference source (reference_source), precision_recall.max_samples and the
settings of the real-vs-real floor kept beside the statistics (evaluation/floor.py): another feature network or
another reference never reuses these files. Part i of N owns the contiguous block
part_block(n, i, N) of the reference positions 0..n-1 (sorted source indices) and stores float64 FeatureStats of
its block plus the feature vectors of the positions below max_samples; the reducer checks the blocks tile 0..n
exactly once and merges them in block order (sums: any split equals the single-process statistics up to float64
rounding).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch

from sims_platform.config.schema import DataConfig, PipelineConfig
from sims_platform.evaluation.plan import part_block
from sims_platform.metrics import FeatureExtractor, FeatureStats
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

PART_FILE = re.compile(r"^part-(\d{5})-of-(\d{5})\.pt$")
RESULT = "reference.pt"
FLOOR = "fid_floor.json"  # the real-vs-real floor (evaluation/floor.py)
_PART_KEYS = {"key", "part", "parts", "start", "stop", "done", "stats", "features"}
_RESULT_KEYS = {"key", "extractor", "count", "parts", "stats", "features"}


class ReferencePartsError(RuntimeError):
    """The reference parts in storage are missing, duplicated or from other settings (permanent)."""


def reference_source(d: DataConfig) -> dict:
    """The settings that decide which images the reference is: a separate set (all of data.reference_path) or the
    held-out split of data.path, and how its files are decoded (data.crop changes every pixel; the digits are
    not decoded from files, so their key ignores it)."""
    decoded = {"crop"} if d.source != "digits" else set()
    if d.reference_path is not None:
        return d.model_dump(mode="json", include={"source", "reference_path", "resolution", "channels",
                                                  "num_classes"} | decoded)
    return d.model_dump(mode="json", include={"source", "path", "resolution", "channels", "num_classes",
                                              "max_images", "holdout_fraction", "holdout_seed"} | decoded)


def reference_key(cfg: PipelineConfig, extractor: FeatureExtractor) -> str:
    """What the statistics depend on: the feature network's weights, the reference images, the kept features;
    and what the real-vs-real floor stored beside them depends on besides (evaluation/floor.py): the report-set
    size and count, and precision/recall's k."""
    ev = cfg.evaluate
    what = {"extractor": extractor.name, "fingerprint": extractor.fingerprint,
            "data": reference_source(cfg.data), "max_samples": ev.precision_recall.max_samples,
            "floor": {"num_samples": ev.num_samples, "repeats": ev.repeats, "k": ev.precision_recall.k}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ReferenceFiles:
    """Where one (feature network, reference images) pair's parts and merged statistics live."""

    root: str
    key: str

    @classmethod
    def of(cls, layout: RunLayout, cfg: PipelineConfig, extractor: FeatureExtractor) -> ReferenceFiles:
        key = reference_key(cfg, extractor)
        return cls(fsio.join(layout.features, "reference", f"{extractor.name}-{key[:16]}"), key)

    @property
    def parts_dir(self) -> str:
        return fsio.join(self.root, "parts")

    def part(self, part: int, parts: int) -> str:
        return fsio.join(self.parts_dir, f"part-{part:05d}-of-{parts:05d}.pt")

    @property
    def result(self) -> str:
        return fsio.join(self.root, RESULT)

    @property
    def floor(self) -> str:
        return fsio.join(self.root, FLOOR)


# ----------------------------------------------------------------------------
# One part


def new_part(key: str, part: int, parts: int, count: int, dim: int) -> dict:
    """An empty record of part `part` of `parts` over `count` reference images."""
    block = part_block(count, part, parts)
    return {"key": key, "part": part, "parts": parts, "start": block.start, "stop": block.stop, "done": 0,
            "stats": FeatureStats(dim).to_dict(), "features": torch.zeros(0, dim)}


def load_part(uri: str, key: str) -> dict:
    rec = fsio.load_torch(uri)
    if not isinstance(rec, dict) or _PART_KEYS - set(rec):
        raise ReferencePartsError(f"{uri} is not a reference part record (expected keys {sorted(_PART_KEYS)}): "
                                  "remove it and rerun that part")
    if rec["key"] != key:
        raise ReferencePartsError(f"{uri} was computed with another feature network or reference than this config"
                                  ": remove it and rerun that part")
    return rec


def add_batch(rec: dict, features: torch.Tensor, max_samples: int) -> None:
    """Fold the features of reference positions [start+done, start+done+len) into the part record: the one place
    reference statistics are computed (the streamed parts and in_memory_reference both fold through here)."""
    first = rec["start"] + rec["done"]
    rec["stats"] = FeatureStats.from_dict(rec["stats"]).update(features).to_dict()
    keep = max_samples - first
    if keep > 0:
        rec["features"] = torch.cat([rec["features"], features[:keep].detach().cpu().float()])
    rec["done"] += features.shape[0]


def in_memory_reference(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int,
                        max_samples: int) -> tuple[FeatureStats, torch.Tensor]:
    """Statistics and the first max_samples features of reference images held in memory, computed as one part
    over all of them (the same batches and sums as the reference stage with one part)."""
    rec = new_part("", 0, 1, len(images), extractor.dim)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            add_batch(rec, extractor(images[i:i + batch_size]), max_samples)
    return FeatureStats.from_dict(rec["stats"]), rec["features"]


# ----------------------------------------------------------------------------
# Merging


def infer_parts(files: ReferenceFiles) -> int:
    """The one part count the array ran with, read from the part files' names."""
    counts: dict[int, list[str]] = {}
    for name in fsio.listdir(files.parts_dir):
        if m := PART_FILE.match(name):
            counts.setdefault(int(m[2]), []).append(name)
    if not counts:
        raise ReferencePartsError(f"no reference parts under {files.parts_dir}: run `sims stage reference --index "
                                  "i --count N` for every i first")
    if len(counts) > 1:
        seen = "; ".join(f"--count {n}: {', '.join(sorted(v)[:3])}" for n, v in sorted(counts.items()))
        raise ReferencePartsError(f"reference parts under {files.parts_dir} were written with different --count "
                                  f"values ({seen}): duplicated parts; remove the stale files and rerun")
    return next(iter(counts))


def merge_parts(files: ReferenceFiles, parts: int, count: int) -> tuple[FeatureStats, torch.Tensor]:
    """Merged statistics and kept features, checking each of the count reference positions was computed once."""
    records: dict[int, dict] = {}
    for name in fsio.listdir(files.parts_dir):
        m = PART_FILE.match(name)
        if not m:
            continue
        where = fsio.join(files.parts_dir, name)
        if int(m[2]) != parts:
            raise ReferencePartsError(f"{where} is from part {m[1]} of {m[2]}, but this reduction has {parts} "
                                      "parts: duplicated part; remove the stale file and rerun")
        rec = load_part(where, files.key)
        block = part_block(count, int(m[1]), parts)
        if (rec["part"], rec["parts"], rec["start"], rec["stop"]) != (int(m[1]), parts, block.start, block.stop):
            raise ReferencePartsError(f"{where} holds reference positions {rec['start']}..{rec['stop']} of part "
                                      f"{rec['part']} of {rec['parts']}, not part {int(m[1])}'s block "
                                      f"{block.start}..{block.stop}: remove it and rerun that part")
        records[rec["part"]] = rec
    missing = [i for i in range(parts) if i not in records]
    partial = [i for i, r in sorted(records.items()) if r["done"] != r["stop"] - r["start"]]
    if missing or partial:
        what = "; ".join([f"part {i} of {parts}: no file (expected {files.part(i, parts)})" for i in missing[:4]]
                         + [f"part {i} of {parts}: {records[i]['done']} of "
                            f"{records[i]['stop'] - records[i]['start']} images" for i in partial[:4]])
        raise ReferencePartsError(f"reference parts incomplete: {what}: rerun `sims stage reference --index i "
                                  f"--count {parts}` for those parts")
    ordered = [records[i] for i in range(parts)]  # block order: the sums never depend on listing order
    stats = FeatureStats.merged(FeatureStats.from_dict(r["stats"]) for r in ordered)
    return stats, torch.cat([r["features"] for r in ordered])


def write_result(files: ReferenceFiles, extractor: FeatureExtractor, parts: int, stats: FeatureStats,
                 features: torch.Tensor) -> None:
    fsio.save_torch(files.result, {"key": files.key, "extractor": extractor.name, "count": stats.count,
                                   "parts": parts, "stats": stats.to_dict(), "features": features})


def read_result(files: ReferenceFiles) -> tuple[FeatureStats, torch.Tensor] | None:
    """The merged statistics and kept features, or None when the reference stage has not completed for them."""
    if not fsio.exists(files.result):
        return None
    rec = fsio.load_torch(files.result)
    if not isinstance(rec, dict) or _RESULT_KEYS - set(rec) or rec["key"] != files.key:
        raise ReferencePartsError(f"{files.result} is not the reference statistics of this feature network and "
                                  "reference: remove it and rerun `sims stage reference`")
    return FeatureStats.from_dict(rec["stats"]), rec["features"].float()
