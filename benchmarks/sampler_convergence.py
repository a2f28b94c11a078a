"""Benchmark: the base model's FID against the Heun step count, to sample every stage at a converged step count.

A SIMS gain only counts against a base sampled where more steps no longer lower its FID: an aux model fine-tuned
on under-sampled images learns the sampler's error, and guidance then "wins" by undoing it. This trains (or
reuses) the pipeline's iteration-0 base, then for each step count samples `--repeats` disjoint seed sets of the
"tuning" stream (never the evaluation's report seeds) and reports FID (mean ± sd) against the held-out
reference, with the same feature network as the evaluation. Writes JSON, a Markdown table and a PNG plot.

  python benchmarks/sampler_convergence.py --config pipelines/digits.yaml --root out/bench-sims/seed-0 \\
      --steps 6 8 10 12 16 20 32 --repeats 3 --num-samples 1000 --doc docs/sampler-convergence.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sims_platform.config import load_config
from sims_platform.config.schema import SamplerConfig
from sims_platform.evaluation.features import feature_extractor
from sims_platform.evaluation.reference import in_memory_reference
from sims_platform.metrics import feature_stats, fid_from_stats
from sims_platform.pipeline.runner import open_run
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.stages.seeds import sample_seeds
from sims_platform.stages.sampling import sample_batch
from sims_platform.tracking.figures import figure_png, new_figure


def curve(ctx: StageContext, steps: list[int], repeats: int, n: int) -> dict[int, list[float]]:
    ev = ctx.cfg.evaluate
    extractor = feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)
    ref, _ = in_memory_reference(extractor, ctx.data.reference.images, ev.batch_size, max_samples=0)
    base = ctx.models.load(ctx.layout.model(0, "train-base"))
    from sims_platform.sampling.guidance import NetDenoiser

    out: dict[int, list[float]] = {}
    for s in steps:
        sampler = SamplerConfig(**{**ev.sampler.model_dump(), "steps": s})
        out[s] = []
        for r in range(repeats):
            t0 = time.time()
            images = []
            for start in range(0, n, ev.batch_size):
                seeds = sample_seeds(ctx.cfg.seed, 0, "tuning", min(ev.batch_size, n - start), r * n + start)
                x, _ = sample_batch(ctx, NetDenoiser(base), seeds, sampler)
                images.append(ctx.data.encoder.decode(x))
            import torch

            fid = fid_from_stats(feature_stats(extractor, torch.cat(images), ev.batch_size), ref)
            out[s].append(fid)
            print(f"steps {s} set {r}: FID {fid:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return out


def report(result: dict[int, list[float]], command: str, repeats: int, n: int, seconds: float | None) -> str:
    """Markdown: FID per step count, and its paired difference to the largest step count on the same seed sets."""
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")  # noqa: E731
    top = max(result)
    lines = [f"# Sampler convergence: base FID vs Heun steps", "", "Command:", "", f"    {command}", "",
             f"{repeats} disjoint seed sets of {n} samples per step count (the 'tuning' seed stream, disjoint from "
             "every evaluation seed); every step count samples the same seeds, so differences are paired. FID "
             "against the held-out reference with the evaluation's feature network."
             + (f" Wall time {seconds / 60:.1f} min." if seconds else ""), "",
             f"| Heun steps | NFE per sample | FID (mean ± sd over sets) | FID(steps) - FID({top}) on the same "
             "seeds (mean ± sd) | relative | converged (< 1%) |", "|---|---|---|---|---|---|"]
    for s, v in sorted(result.items()):
        diff = [a - b for a, b in zip(v, result[top])]
        m, rel = statistics.fmean(diff), statistics.fmean(diff) / statistics.fmean(result[top])
        lines.append(f"| {s} | {2 * s - 1} | {statistics.fmean(v):.2f} ± {sd(v):.2f} | {m:+.2f} ± {sd(diff):.2f} | "
                     f"{100 * rel:+.1f}% | {'yes' if abs(rel) < 0.01 else 'no'} |")
    lines += ["", "Converged: more steps change the base's FID by less than 1% on the same seeds (a small fraction of "
              "the seed-set sd).", "", "![FID vs steps](img/sampler_convergence.png)"]
    return "\n".join(lines)


def plot(result: dict[int, list[float]], path: Path) -> None:
    fig = new_figure(figsize=(5.5, 3.8), dpi=100)
    ax = fig.add_subplot()
    xs = sorted(result)
    means = [statistics.fmean(result[s]) for s in xs]
    sds = [statistics.stdev(result[s]) if len(result[s]) > 1 else 0.0 for s in xs]
    ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3)
    ax.set_xlabel("Heun steps")
    ax.set_ylabel("base FID (mean ± sd)")
    ax.set_title("Base model: FID vs sampler steps")
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
    args = ap.parse_args()

    cfg = load_config(args.config, [f"seed={args.seed}", f"storage.root={Path(args.root).resolve()}", *args.set])
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    run_stage(ctx, "train-base")
    t0 = time.time()
    result = curve(ctx, args.steps, args.repeats, args.num_samples)
    out = Path(args.root).resolve()
    (out / "sampler_convergence.json").write_text(json.dumps({str(k): v for k, v in result.items()}, indent=2))
    command = "python benchmarks/sampler_convergence.py " + " ".join(sys.argv[1:])
    text = report(result, command, args.repeats, args.num_samples, time.time() - t0)
    print(text)
    if args.doc:
        Path(args.doc).write_text(text + "\n")
        plot(result, Path(args.doc).parent / "img" / "sampler_convergence.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
