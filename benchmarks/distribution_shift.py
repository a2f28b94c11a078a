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
import functools
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from sims_effect import run_seeds

from sims_platform.config import PipelineConfig, load_config
from sims_platform.data import read_shards
from sims_platform.evaluation.features import feature_extractor
from sims_platform.evaluation.intervals import confidence_interval
from sims_platform.evaluation.plan import w_key
from sims_platform.metrics import feature_stats, fid_from_stats
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.shift.classifiers import classify, shift_classifier
from sims_platform.shift.reference import per_class_stats, reweighted_stats
from sims_platform.shift.selection import class_histogram, total_variation
from sims_platform.stages.context import StageContext
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
    images = ctx.data.encoder.decode(x)
    selected = classify(shift_classifier(ctx.cfg, ctx.layout.features, ctx.data.labelled, ctx.device, "select"), images, ev.batch_size)
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
    judged = class_histogram(classify(shift_classifier(ctx.cfg, ctx.layout.features, ctx.data.labelled, ctx.device, "judge"), kept, ev.batch_size), k)
    extractor = feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)
    held = ctx.data.reference
    ref = reweighted_stats(per_class_stats(extractor, held.images, held.labels, k, ev.batch_size), target)
    stats = feature_stats(extractor, kept, ev.batch_size)
    return out | {"histogram": judged.tolist(), "tv": total_variation(judged, target),
                  "fid_target": fid_from_stats(stats, ref)}


def _f(x: float | None, d: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def report(records: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "TV: total-variation distance of the judged class histogram to the target (0 = on target); FID_t: "
             "FID against the target-reweighted held-out reference; mean ± sd over the report seed sets.", "",
             "## Per seed", "",
             "| seed | gain | arm | TV | FID_t | gain fitted | NFE / sample |", "|---|---|---|---|---|---|---|"]
    for r in records:
        steps = r["steps"]
        seed = f"{r['seed']} (pilot)" if r["pilot"] else str(r["seed"])
        for w, row in r["sims"].items():
            arm = "base" if float(w) == 0 else f"sims w={w}"
            nfe = (2 * steps - 1) * (1 if float(w) == 0 else 2)
            lines.append(f"| {seed} | {_f(r['gain'])} | {arm} | {_f(row['tv'])} ± {_f(row['tv_sd'])} | "
                         f"{_f(row['fid_target'], 2)} ± {_f(row['fid_target_sd'], 2)} | {_f(row['gain_fit'])} | "
                         f"{nfe} |")
        rej = r["rejection"]
        lines.append(f"| {seed} | - | rejection ({rej['accepted']} accepted, rate {_f(rej['acceptance_rate'])}) "
                     f"| {_f(rej['tv'])} | {_f(rej['fid_target'], 2)} | - | {_f(rej['nfe_per_sample'], 1)} |")
    lines += across_seeds(records)
    return "\n".join(lines) + "\n"


def across_seeds(records: list[dict]) -> list[str]:
    """Per arm: the mean over seeds (pilot excluded) of TV and FID_t with 95% t intervals, and the paired
    TV(base) - TV(arm) (> 0: closer to the target than the base)."""
    runs = [r for r in records if not r["pilot"]]
    if not runs:
        return []
    lines = ["", f"## Across {len(runs)} seed(s), pilot excluded: mean and 95% CI (t, n - 1 dof)", "",
             "| arm | TV | 95% CI | TV(base) - TV(arm) | 95% CI | FID_t | 95% CI |", "|---|---|---|---|---|---|---|"]

    def row(name: str, tv: list[float], fid: list[float], base_tv: list[float]) -> str:
        m, lo, hi = confidence_interval(tv)
        g, glo, ghi = confidence_interval([b - t for b, t in zip(base_tv, tv)])
        f, flo, fhi = confidence_interval(fid)
        return (f"| {name} | {_f(m)} | [{_f(lo)}, {_f(hi)}] | {_f(g)} | [{_f(glo)}, {_f(ghi)}] | {_f(f, 2)} | "
                f"[{_f(flo, 2)}, {_f(fhi, 2)}] |")

    base_tv = [r["sims"][w_key(0.0)]["tv"] for r in runs]
    for w in runs[0]["sims"]:
        name = "base" if float(w) == 0 else f"sims w={w}" + (" (design w)" if float(w) == runs[0]["design_w"] else "")
        lines.append(row(name, [r["sims"][w]["tv"] for r in runs], [r["sims"][w]["fid_target"] for r in runs],
                         base_tv))
    rej = [r for r in runs if r["rejection"]["tv"] is not None]
    if rej:
        lines.append(row(f"rejection ({len(rej)} seeds)", [r["rejection"]["tv"] for r in rej],
                         [r["rejection"]["fid_target"] for r in rej], [r["sims"][w_key(0.0)]["tv"] for r in rej]))
    return lines


def plot(records: list[dict]) -> bytes:
    """TV and FID_t vs w, a line per seed (error bars: sd over report sets); rejection sampling as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for (key, label), ax in zip((("tv", "TV to target (judged)"), ("fid_target", "FID vs reweighted reference")),
                                axes):
        for r in records:
            ws = sorted(r["sims"], key=float)
            ys = [r["sims"][w][key] for w in ws]
            sds = [r["sims"][w][f"{key}_sd"] for w in ws]
            line = ax.errorbar([float(w) for w in ws], ys, yerr=sds, marker="o", capsize=3,
                               label=f"seed {r['seed']}" + (" (pilot)" if r["pilot"] else ""))
            if r["rejection"][key] is not None:
                ax.axhline(r["rejection"][key], linestyle="--", linewidth=0.8, color=line.lines[0].get_color())
        ax.set_xlabel("guidance weight w (0 = base)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("SIMS with a selected aux set; dashed: rejection sampling")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_record(config: str, root: Path, seed: int, extra: list[str], pilot: bool) -> dict:
    """One seed: the pipeline, then the rejection-sampling baseline on its base; the benchmark's record."""
    t0 = time.time()
    cfg, results = run_seed(config, root, seed, extra)
    assert cfg.shift is not None
    return {"seed": seed, "root": str(root), "pilot": pilot, "gain": cfg.shift.gain, "design_w": cfg.shift.w,
            "steps": cfg.evaluate.sampler.steps, "sims": results["shift"]["methods"]["sims"],
            "base_histogram": results["shift"]["base_histogram"],
            "aux_set_histogram": results["shift"]["aux_set_histogram"], "target": results["shift"]["target"],
            "rejection": rejection_baseline(cfg), "seconds": time.time() - t0}


def fitted_gain(record: dict) -> float:
    fitted = record["sims"].get(w_key(record["design_w"]), {}).get("gain_fit")
    if fitted is None or not math.isfinite(fitted) or fitted <= 0:
        raise SystemExit(f"pilot seed {record['seed']}: no usable gain fitted at w={record['design_w']} ({fitted}); "
                         "add shift.w to the sims weights or run without --calibrate")
    return fitted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pipelines/digits-shift.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/bench-shift")
    p.add_argument("--calibrate", action="store_true", help="first seed is a pilot: later seeds use its fitted gain")
    p.add_argument("--set", action="append", default=[], help="extra config overrides (key=value)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process (one thread); "
                   "with --calibrate the pilot runs first, alone")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra, seeds, records = list(args.set), list(args.seeds), []
    if args.calibrate:
        records.append(run_record(args.config, out / f"seed-{seeds[0]}", seeds[0], extra, pilot=True))
        extra.append(f"shift.gain={fitted_gain(records[0])}")
        seeds = seeds[1:]
    roots = {s: out / f"seed-{s}" for s in seeds}
    records += run_seeds(functools.partial(run_record, pilot=False), args.config, roots, extra, args.jobs)
    (out / "records.json").write_text(json.dumps(records, indent=2))
    (out / "tv_fid_vs_w.png").write_bytes(plot(records))
    command = "python benchmarks/distribution_shift.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "report.md").write_text(report(records, command))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
