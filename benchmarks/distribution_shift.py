"""Benchmark: does SIMS with a selected aux set move an unconditional model's class histogram to a target?

Each seed runs the whole shift pipeline (pipelines/digits-shift.yaml: a base trained on a class-imbalanced digits
subset, a uniform target, select-aux, the aux fine-tune, the w sweep). From each seed's results.json it records,
per w, the class histogram measured by the judging classifier (never the selecting one), its total-variation
distance to the target and the FID against the target-reweighted held-out reference (mean ± sd over the report
seed sets), and the gain fitted from what was achieved.

The baseline is rejection sampling of the same base: its generate samples, classified by the selecting
classifier, are accepted with probability (t_c / pi_base_c) / max_c (t_c / pi_base_c), which targets t exactly if
that classifier were right; the accepted set is judged by the same second classifier and FID'd against the same
reweighted reference, at the base's cost per sample divided by the acceptance rate (SIMS costs two networks per
step at any w). The accepted set is cut to evaluate.num_samples (FID is biased by the sample count) and the
comparison is reported as not applicable where fewer were accepted.

--calibrate runs the first seed as a pilot with the config's shift.gain, reads the gain fitted at shift.w and
runs the other seeds with it (the pilot seed is reported separately, since its aux was not designed with it).

  python benchmarks/distribution_shift.py --config pipelines/digits-shift.yaml --seeds 0 1 2 --out out/bench-shift
  python benchmarks/distribution_shift.py --seeds 0 1 2 3 --calibrate --out out/bench-shift-cal

Each seed's folder keeps its completed stages, so an interrupted benchmark resumes where it stopped. Writes
records.json and report.md; a negative result is reported like any other (exit code 0).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sims_platform.config import PipelineConfig, load_config
from sims_platform.data import read_shards
from sims_platform.evaluation.plan import w_key
from sims_platform.metrics import fid_from_stats
from sims_platform.metrics.stats import FeatureStats
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.shift.classifiers import classify, shift_classifier
from sims_platform.shift.reference import per_class_stats, reweighted_stats
from sims_platform.shift.selection import class_histogram, total_variation
from sims_platform.stages.context import StageContext
from sims_platform.stages.evaluate import _extractor
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

# Offset of the rejection sampler's acceptance draws from the run's seed.
_REJECT_SALT = 8_191


def run_seed(config: str, root: Path, seed: int, extra: list[str]) -> tuple[PipelineConfig, dict]:
    """One pipeline run (complete stages in `root` are skipped); its config and iteration-0 results.json."""
    cfg = load_config(config, [f"seed={seed}", f"storage.root={root}", "iterations.count=1", *extra])
    if cfg.shift is None:
        raise SystemExit(f"{config}: no shift section; this benchmark needs a distribution-shifting pipeline")
    run_pipeline(cfg)
    layout = RunLayout.of(cfg.storage.root)
    return cfg, fsio.read_json(fsio.join(layout.stage(0, "evaluate"), "results.json"))


def rejection_baseline(cfg: PipelineConfig) -> dict:
    """Rejection sampling of the base's generate samples toward the target (see the module doc)."""
    assert cfg.shift is not None
    layout = RunLayout.of(cfg.storage.root)
    # The stage helpers need a context for data, features and device; nothing here writes lineage.
    ctx = StageContext(cfg, layout, 0, lineage=None)  # type: ignore[arg-type]
    k, ev = cfg.data.num_classes, cfg.evaluate
    x, _, _ = read_shards(layout.shards(0, "generate"))
    images = ctx.encoder.decode(x)
    selected = classify(shift_classifier(ctx, "select"), images, ev.batch_size)
    base = class_histogram(selected, k)
    target = torch.tensor(cfg.shift.target_probs(k), dtype=torch.float64)
    ratio = torch.where(base > 0, target / base.clamp_min(1e-300), torch.zeros_like(base))
    accept_p = ratio / ratio.max()
    draws = torch.rand(len(selected), generator=torch.Generator().manual_seed(cfg.seed + _REJECT_SALT),
                       dtype=torch.float64)
    accepted = torch.nonzero(draws < accept_p[selected]).flatten()
    rate = len(accepted) / len(selected)
    out = {"acceptance_rate": rate, "accepted": len(accepted), "nfe_per_sample":
           (2 * cfg.generate.sampler.steps - 1) / rate if rate else float("inf")}
    if len(accepted) < ev.num_samples:
        return out | {"histogram": None, "tv": None, "fid_target": None,
                      "note": f"{len(accepted)} accepted < evaluate.num_samples {ev.num_samples}"}
    kept = images[accepted[:ev.num_samples]]
    judged = class_histogram(classify(shift_classifier(ctx, "judge"), kept, ev.batch_size), k)
    extractor = _extractor(ctx)
    held = ctx.reference
    ref = reweighted_stats(per_class_stats(extractor, held.images, held.labels, k, ev.batch_size), target)
    stats = FeatureStats(extractor.dim)
    for i in range(0, len(kept), ev.batch_size):
        with torch.no_grad():
            stats.update(extractor(kept[i:i + ev.batch_size]))
    return out | {"histogram": judged.tolist(), "tv": total_variation(judged, target),
                  "fid_target": fid_from_stats(stats, ref)}


def _f(x: float | None, d: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def report(records: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "TV: total-variation distance of the judged class histogram to the target (0 = on target); FID_t: "
             "FID against the target-reweighted held-out reference; mean ± sd over the report seed sets.", "",
             "| seed | gain | arm | TV | FID_t | gain fitted | NFE / sample |", "|---|---|---|---|---|---|---|"]
    for r in records:
        steps = r["steps"]
        for w, row in r["sims"].items():
            arm = "base" if float(w) == 0 else f"sims w={w}"
            nfe = (2 * steps - 1) * (1 if float(w) == 0 else 2)
            lines.append(f"| {r['seed']} | {r['gain']} | {arm} | {_f(row['tv'])} ± {_f(row['tv_sd'])} | "
                         f"{_f(row['fid_target'], 2)} ± {_f(row['fid_target_sd'], 2)} | {_f(row['gain_fit'])} | "
                         f"{nfe} |")
        rej = r["rejection"]
        lines.append(f"| {r['seed']} | - | rejection ({rej['accepted']} accepted, rate {_f(rej['acceptance_rate'])}) "
                     f"| {_f(rej['tv'])} | {_f(rej['fid_target'], 2)} | - | {_f(rej['nfe_per_sample'], 1)} |")
    design = records[0]["design_w"]
    at_w = [r["sims"][w_key(design)]["tv"] for r in records if not r["pilot"]]
    base = [r["sims"][w_key(0.0)]["tv"] for r in records if not r["pilot"]]
    rej = [r["rejection"]["tv"] for r in records if not r["pilot"] and r["rejection"]["tv"] is not None]
    if at_w:
        lines += ["", f"Across {len(at_w)} seed(s) (pilot excluded): mean TV base {_f(statistics.fmean(base))}, "
                  f"sims at the design w {design} {_f(statistics.fmean(at_w))}, rejection sampling "
                  f"{_f(statistics.fmean(rej)) if rej else 'n/a'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pipelines/digits-shift.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/bench-shift")
    p.add_argument("--calibrate", action="store_true", help="first seed is a pilot: later seeds use its fitted gain")
    p.add_argument("--set", action="append", default=[], help="extra config overrides (key=value)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, extra = [], list(args.set)
    for i, seed in enumerate(args.seeds):
        t0 = time.time()
        cfg, results = run_seed(args.config, out / f"seed-{seed}", seed, extra)
        assert cfg.shift is not None
        sims = results["shift"]["methods"]["sims"]
        records.append({"seed": seed, "pilot": args.calibrate and i == 0, "gain": cfg.shift.gain,
                        "design_w": cfg.shift.w, "steps": cfg.evaluate.sampler.steps, "sims": sims,
                        "base_histogram": results["shift"]["base_histogram"],
                        "rejection": rejection_baseline(cfg), "seconds": time.time() - t0})
        if args.calibrate and i == 0:
            fitted = sims.get(w_key(cfg.shift.w), {}).get("gain_fit")
            if fitted is None or not math.isfinite(fitted) or fitted <= 0:
                raise SystemExit(f"pilot seed {seed}: no usable gain fitted at w={cfg.shift.w} ({fitted}); "
                                 "add shift.w to the sims weights or run without --calibrate")
            extra.append(f"shift.gain={fitted}")
        (out / "records.json").write_text(json.dumps(records, indent=2))
    (out / "report.md").write_text(report(records, " ".join(sys.argv)))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
