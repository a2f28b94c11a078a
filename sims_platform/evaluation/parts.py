"""Part files of an evaluation job array: one per (arm, part), rewritten after each unit; merged by the reducer.

iter-KK/evaluate/parts/<arm>/part-<i>-of-<N>.pt holds, for the units part i computed for that arm: the float64
feature statistics per seed set (sums: any split merges to the single-process result up to rounding), the
features of each set's first precision_recall.max_samples seeds (precision/recall need the vectors), and the
PNG grid's images. The reducer checks that every unit was computed exactly once, by the part that owns it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sims_platform.config.schema import PipelineConfig
from sims_platform.evaluation.plan import Arm, Unit, arm_by_key, arms, owner, settings_digest, work_units
from sims_platform.metrics import FeatureStats
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

PART_FILE = re.compile(r"^part-(\d{5})-of-(\d{5})\.pt$")
PART_RECORD = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")  # run_stage's per-part completion records
GRID_SET = 1  # grids show the first report set's seeds 0..grid_size-1
_KEYS = {"arm", "part", "parts", "settings", "units", "stats", "features", "grid"}


class PartSite(Protocol):
    """What the part files read of an evaluate process: its config and run folders, its iteration, and which part
    of how many it is (a stage's context has these)."""

    cfg: PipelineConfig
    layout: RunLayout
    iteration: int
    part: int
    parts: int


class EvaluatePartsError(RuntimeError):
    """The evaluate parts in storage are incomplete, duplicated or from other settings (permanent)."""


def parts_dir(ctx: PartSite) -> str:
    return fsio.join(ctx.layout.stage(ctx.iteration, "evaluate"), "parts")


def part_uri(ctx: PartSite, arm: Arm, part: int, parts: int) -> str:
    return fsio.join(parts_dir(ctx), arm.key, f"part-{part:05d}-of-{parts:05d}.pt")


def feature_rows(ctx: PartSite) -> int:
    """How many feature vectors of each seed set are kept for precision/recall."""
    ev = ctx.cfg.evaluate
    return min(ev.precision_recall.max_samples, ev.num_samples)


# ----------------------------------------------------------------------------
# One part's record of one arm


def new_record(ctx: PartSite, arm: Arm) -> dict:
    return {"arm": arm.key, "part": ctx.part, "parts": ctx.parts, "settings": settings_digest(ctx.cfg.evaluate,
            ctx.cfg.seed, arm, ctx.cfg.shift), "units": [], "stats": {}, "features": {}, "grid": []}


def load_record(ctx: PartSite, uri: str, arm: Arm) -> dict:
    rec = fsio.load_torch(uri)
    if not isinstance(rec, dict) or _KEYS - set(rec):
        raise EvaluatePartsError(f"{uri} is not an evaluate part record (expected keys {sorted(_KEYS)}): remove it "
                                 "and rerun that part")
    if rec["settings"] != settings_digest(ctx.cfg.evaluate, ctx.cfg.seed, arm, ctx.cfg.shift):
        raise EvaluatePartsError(f"{uri} was computed with other evaluate settings (seed, num_samples, repeats, "
                                 "batch_size, sampler, features, method settings, ...) than this config: remove "
                                 f"{parts_dir(ctx)} and rerun the evaluate parts")
    return rec


def add_unit(ctx: PartSite, rec: dict, unit: Unit, features: torch.Tensor, images: torch.Tensor,
             classes: torch.Tensor | None = None) -> None:
    """Fold one unit's features (and its grid images, if any) into the record; with shift, also the judging
    classifier's class of each sample (`classes`, int64 [N]), as per-set class counts."""
    key = str(unit.seed_set)
    if classes is not None:
        counts = torch.bincount(classes.cpu(), minlength=ctx.cfg.data.num_classes).to(torch.int64)
        held = rec.setdefault("classes", {})
        held[key] = held[key] + counts if key in held else counts
    stats = FeatureStats.from_dict(rec["stats"][key]) if key in rec["stats"] else FeatureStats(features.shape[1])
    rec["stats"][key] = stats.update(features).to_dict()
    keep = feature_rows(ctx) - unit.start
    if keep > 0:
        rec["features"][f"{unit.seed_set}/{unit.batch}"] = features[:keep].detach().cpu().float().clone()
    grid = ctx.cfg.evaluate.grid_size
    if unit.seed_set == GRID_SET and unit.start < grid:
        rec["grid"] = rec["grid"] + [[unit.batch, images[: grid - unit.start].detach().cpu().float().clone()]]
    rec["units"] = rec["units"] + [[unit.seed_set, unit.batch]]


# ----------------------------------------------------------------------------
# Which part counts wrote files


def part_counts(ctx: PartSite) -> dict[int, list[str]]:
    """count -> names of the part records and part files written by parts of that count."""
    root = parts_dir(ctx)
    counts: dict[int, list[str]] = {}
    for name in fsio.listdir(root):
        if m := PART_RECORD.match(name):
            counts.setdefault(int(m[2]), []).append(name)
        else:  # an arm's folder
            for sub in fsio.listdir(fsio.join(root, name)):
                if m := PART_FILE.match(sub):
                    counts.setdefault(int(m[2]), []).append(f"{name}/{sub}")
    return counts


def infer_parts(ctx: PartSite) -> int:
    """The number of parts the evaluate array ran with, read from its records; one count or an error."""
    counts, where = part_counts(ctx), parts_dir(ctx)
    if not counts:
        raise EvaluatePartsError(f"no evaluate parts under {where}: run `sims stage evaluate --iteration "
                                 f"{ctx.iteration} --index i --count N` for every i first")
    if len(counts) > 1:
        seen = "; ".join(f"--count {n}: {', '.join(sorted(names)[:3])}" for n, names in sorted(counts.items()))
        raise EvaluatePartsError(f"evaluate parts under {where} were written with different --count values "
                                 f"({seen}): a part ran twice with different counts; remove the stale files "
                                 "(or the whole parts folder) and rerun")
    return next(iter(counts))


def check_part_records(ctx: PartSite, parts: int) -> None:
    """Every part 0..parts-1 recorded its completion (run_stage writes the record when a part returns)."""
    layout, k = ctx.layout, ctx.iteration
    missing = [i for i in range(parts) if not fsio.exists(layout.part_marker(k, "evaluate", i, parts))]
    if missing:
        raise EvaluatePartsError(
            f"evaluate part(s) {', '.join(map(str, missing))} of {parts} have no completion record "
            f"(expected {layout.part_marker(k, 'evaluate', missing[0], parts)}): rerun `sims stage evaluate "
            f"--iteration {k} --index {missing[0]} --count {parts}`")


# ----------------------------------------------------------------------------
# Merging: every unit exactly once, from the part that owns it


@dataclass
class ArmData:
    """One arm's merged evaluation: statistics and kept features per seed set, and its grid images; with shift,
    the judging classifier's class counts per seed set."""

    stats: dict[int, FeatureStats]
    features: dict[int, torch.Tensor]
    grid: torch.Tensor
    classes: dict[int, torch.Tensor] = field(default_factory=dict)


def collect(ctx: PartSite, parts: int) -> dict[str, ArmData]:
    """arm key -> merged data, checking each unit appears exactly once and in its owner's file."""
    ev, root = ctx.cfg.evaluate, parts_dir(ctx)
    units = work_units(ev)
    known = arm_by_key(ev)
    for name in fsio.listdir(root):
        if not PART_RECORD.match(name) and name not in known:
            raise EvaluatePartsError(f"{fsio.join(root, name)} holds parts of '{name}', which is not an arm of "
                                     f"evaluate.methods ({', '.join(known)}): remove it or restore that method/w")
    return {arm.key: _collect_arm(ctx, arm, units, parts) for arm in arms(ev)}


def _collect_arm(ctx: PartSite, arm: Arm, units: list[Unit], parts: int) -> ArmData:
    ev, adir = ctx.cfg.evaluate, fsio.join(parts_dir(ctx), arm.key)
    owners = {u.tag: owner(i, len(units), parts) for i, u in enumerate(units) if u.arm == arm}
    claimed: dict[tuple[int, int], int] = {}
    records: list[dict] = []
    for name in fsio.listdir(adir):
        m = PART_FILE.match(name)
        if not m:
            continue
        part, count = int(m[1]), int(m[2])
        where = fsio.join(adir, name)
        if count != parts:
            raise EvaluatePartsError(f"{where} is from part {part} of {count}, but this evaluation has {parts} "
                                     "parts: remove the stale file and rerun")
        rec = load_record(ctx, where, arm)
        if (rec["part"], rec["parts"], rec["arm"]) != (part, count, arm.key):
            raise EvaluatePartsError(f"{where} says it is part {rec['part']} of {rec['parts']} for "
                                     f"{rec['arm']}, not what its name says")
        for s, b in rec["units"]:
            tag = (int(s), int(b))
            if tag in claimed:
                raise EvaluatePartsError(f"{arm.key}: unit (set {s}, batch {b}) is claimed by part {claimed[tag]} "
                                         f"and part {part} of {parts}: duplicated part")
            if tag not in owners:
                raise EvaluatePartsError(f"{arm.key}: part {part} of {parts} holds unit (set {s}, batch {b}), "
                                         "which this evaluation does not have")
            if owners[tag] != part:
                raise EvaluatePartsError(f"{arm.key}: unit (set {s}, batch {b}) belongs to part {owners[tag]} of "
                                         f"{parts}, but part {part} holds it: duplicated part")
            claimed[tag] = part
        records.append(rec)
    missing = sorted(set(owners) - set(claimed))
    if missing:
        by_part: dict[int, list[tuple[int, int]]] = {}
        for tag in missing:
            by_part.setdefault(owners[tag], []).append(tag)
        detail = "; ".join(f"part {p} of {parts} lacks (set, batch) {ts[:4]}" for p, ts in sorted(by_part.items()))
        raise EvaluatePartsError(f"{arm.key}: {detail} (expected in {adir}/part-{min(by_part):05d}-of-"
                                 f"{parts:05d}.pt): rerun that part")
    # Merge in unit order, so the sums do not depend on the order the files were listed in.
    records.sort(key=lambda r: min(tuple(u) for u in r["units"]))
    stats: dict[int, FeatureStats] = {}
    for rec in records:
        for key, d in sorted(rec["stats"].items(), key=lambda kv: int(kv[0])):
            s = int(key)
            stats[s] = stats[s].merge(FeatureStats.from_dict(d)) if s in stats else FeatureStats.from_dict(d)
    pieces = sorted((tuple(map(int, key.split("/"))), f) for rec in records for key, f in rec["features"].items())
    features = {s: torch.cat([f for (ps, _), f in pieces if ps == s]) for s in stats}
    grid = sorted((b, img) for rec in records for b, img in rec["grid"])
    images = torch.cat([img for _, img in grid])[: ev.grid_size] if grid else torch.zeros(0)
    classes: dict[int, torch.Tensor] = {}
    for rec in records:  # counts: sums, like the statistics
        for key, counts in rec.get("classes", {}).items():
            classes[int(key)] = classes[int(key)] + counts if int(key) in classes else counts.clone()
    return ArmData(stats=stats, features=features, grid=images, classes=classes)
