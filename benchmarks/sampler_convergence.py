"""Benchmark: FID against the Heun step count, for the base and for each guided arm at its w, to sample every stage
at a step count that is converged for every arm that is reported.

A SIMS gain only counts against a base sampled where more steps no longer lower its FID: an aux model fine-tuned
on under-sampled images learns the sampler's error, and guidance then "wins" by undoing it. This trains (or
reuses) the pipeline's iteration-0 base, then for each step count samples `--repeats` disjoint seed sets of the
"tuning" stream (never the evaluation's report seeds) and reports FID (mean ± sd) against the held-out
reference, with the same feature network as the evaluation. Writes JSON, a Markdown table and a PNG plot.

Guided arms (--arms sims=0.25 neon=0.1, or --arms selected: every method of the run's summary.json at the w its
selection set chose, or its preset w in a run without a selection set) need the run's aux and guide models: run
the pipeline in --root first.

  python benchmarks/sampler_convergence.py --config pipelines/digits.yaml --root out/bench-sims/seed-0 \\
      --steps 6 8 10 12 16 20 32 --repeats 3 --num-samples 1000 --doc docs/sampler-convergence.md
  python benchmarks/sampler_convergence.py --root out/digits --arms selected --steps 8 12 16 24 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sims_platform.config import load_config
from sims_platform.config.methods import is_base, parse_w_key, w_key
from sims_platform.config.schema import SamplerConfig
from sims_platform.evaluation.features import feature_extractor
from sims_platform.evaluation.methods import Networks
from sims_platform.evaluation.plan import Arm
from sims_platform.evaluation.reference import in_memory_reference
from sims_platform.metrics import feature_stats, fid_from_stats
from sims_platform.pipeline.runner import open_run
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.stages.seeds import sample_seeds
from sims_platform.stages.sampling import sample_batch
from sims_platform.storage import fsio
from sims_platform.tracking.figures import figure_png, new_figure


def arms(ctx: StageContext, wanted: list[str]) -> list[Arm]:
    """The base, then each METHOD=W of `wanted` ('selected': every method of the run's summary.json at its selected
    or preset w, when that w is not 0)."""
    out = [Arm("base", 0.0)]
    for item in wanted:
        if item == "selected":
            row = fsio.read_json(ctx.layout.summary)["iterations"][0]
            for name, res in row["methods"].items():
                w = parse_w_key(w_key(tuple(res["best_w"]) if isinstance(res["best_w"], list) else res["best_w"]))
                if w is not None and not is_base(w):
                    out.append(Arm(name, w))
            continue
        name, _, w = item.partition("=")
        parsed = parse_w_key(w)
        if parsed is None or name not in [m.name for m in ctx.cfg.evaluate.methods]:
            raise SystemExit(f"--arms {item}: expected METHOD=W with a method of evaluate.methods "
                             f"({', '.join(m.name for m in ctx.cfg.evaluate.methods)})")
        out.append(Arm(name, parsed))
    return out


def curve(ctx: StageContext, steps: list[int], repeats: int, n: int, arm: Arm, networks: Networks,
          extractor, ref) -> dict[int, list[float]]:
    """FID per seed set of `arm` at each step count; every arm and step count samples the same seeds."""
    ev = ctx.cfg.evaluate
    denoise = networks.denoiser(arm)
    out: dict[int, list[float]] = {}
    for s in steps:
        sampler = SamplerConfig(**{**ev.sampler.model_dump(), "steps": s})
        out[s] = []
        for r in range(repeats):
            t0 = time.time()
            images = []
            for start in range(0, n, ev.batch_size):
                seeds = sample_seeds(ctx.cfg.seed, 0, "tuning", min(ev.batch_size, n - start), r * n + start)
                x, _ = sample_batch(ctx, denoise, seeds, sampler)
                images.append(ctx.data.encoder.decode(x))
            fid = fid_from_stats(feature_stats(extractor, torch.cat(images), ev.batch_size), ref)
            out[s].append(fid)
            print(f"{arm.key} steps {s} set {r}: FID {fid:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return out


def report(results: dict[str, dict[int, list[float]]], command: str, repeats: int, n: int,
           seconds: float | None) -> str:
    """Markdown: per arm, FID per step count and its paired difference to the largest step count on the same seed
    sets."""
    lines = [f"# Sampler convergence: FID vs Heun steps, the base and each guided arm", "", "Command:", "",
             f"    {command}", "",
             f"{repeats} disjoint seed sets of {n} samples per step count (the 'tuning' seed stream, disjoint from "
             "every evaluation seed); every step count samples the same seeds, so differences are paired. FID "
             "against the held-out reference with the evaluation's feature network."
             + (f" Wall time {seconds / 60:.1f} min." if seconds else "")]
    for key, result in results.items():
        lines += ["", f"## {key}", ""] + arm_table(result)
    lines += ["", "Converged: more steps change the arm's FID by less than 1% on the same seeds (a small fraction of "
              "the seed-set sd).", "", "![FID vs steps](img/sampler_convergence.png)"]
    return "\n".join(lines)


def arm_table(result: dict[int, list[float]]) -> list[str]:
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")  # noqa: E731
    top = max(result)
    lines = [f"| Heun steps | denoiser calls per sample | FID (mean ± sd over sets) | FID(steps) - FID({top}) on the "
             "same seeds (mean ± sd) | relative | converged (< 1%) |", "|---|---|---|---|---|---|"]
    for s, v in sorted(result.items()):
        diff = [a - b for a, b in zip(v, result[top])]
        m, rel = statistics.fmean(diff), statistics.fmean(diff) / statistics.fmean(result[top])
        lines.append(f"| {s} | {2 * s - 1} | {statistics.fmean(v):.2f} ± {sd(v):.2f} | {m:+.2f} ± {sd(diff):.2f} | "
                     f"{100 * rel:+.1f}% | {'yes' if abs(rel) < 0.01 else 'no'} |")
    return lines


def plot(results: dict[str, dict[int, list[float]]], path: Path) -> None:
    fig = new_figure(figsize=(5.5, 3.8), dpi=100)
    ax = fig.add_subplot()
    for key, result in results.items():
        xs = sorted(result)
        means = [statistics.fmean(result[s]) for s in xs]
        sds = [statistics.stdev(result[s]) if len(result[s]) > 1 else 0.0 for s in xs]
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=key)
    ax.legend(fontsize=8)
    ax.set_xlabel("Heun steps")
    ax.set_ylabel("FID (mean ± sd)")
    ax.set_title("FID vs sampler steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/digits.yaml")
    ap.add_argument("--root", default="out/bench-sims/seed-0", help="run folder (its base is trained if missing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="+", default=[6, 8, 10, 12, 16, 20, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--doc", default=None, help="also write the Markdown report here (e.g. docs/...md)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--arms", nargs="*", default=[], metavar="METHOD=W",
                    help="guided arms besides the base: METHOD=W, or 'selected' (the run's selected w per method)")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"seed={args.seed}", f"storage.root={Path(args.root).resolve()}", *args.set])
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    run_stage(ctx, "train-base")
    t0 = time.time()
    extractor = feature_extractor(cfg, layout.features, ctx.data, ctx.device)
    ref, _ = in_memory_reference(extractor, ctx.data.reference.images, cfg.evaluate.batch_size, max_samples=0)
    networks = Networks(cfg, layout, 0, ctx.models.sampling)
    results = {arm.key: curve(ctx, args.steps, args.repeats, args.num_samples, arm, networks, extractor, ref)
               for arm in arms(ctx, args.arms)}
    out = Path(args.root).resolve()
    (out / "sampler_convergence.json").write_text(json.dumps(
        {key: {str(k): v for k, v in result.items()} for key, result in results.items()}, indent=2))
    command = "python benchmarks/sampler_convergence.py " + " ".join(sys.argv[1:])
    text = report(results, command, args.repeats, args.num_samples, time.time() - t0)
    print(text)
    if args.doc:
        Path(args.doc).write_text(text + "\n")
        plot(results, Path(args.doc).parent / "img" / "sampler_convergence.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
