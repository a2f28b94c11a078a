"""Benchmark: do self-consuming loops go MAD with standard training but not with SIMS, over several seeds?

Each seed runs the config's `loop` experiment (pipelines/digits-mad.yaml): one shared generation 0, then for every
arm (standard: the plain base feeds and is measured; sims: the SIMS-guided sampler at its selected w) and every
|D_p| its own generations, each trained on the real split plus the previous generation's samples. Per seed it
records FID, precision and recall per loop and generation (report seed sets, held-out reference). Across seeds,
with 95% t intervals (n - 1 dof): the paired gap FID(standard) - FID(sims) per generation and |D_p| (> 0: SIMS
better), and each loop's drift FID(g) - FID(0) (> 0: worse than generation 0, i.e. MAD). Writes records.json,
report.md and fid_vs_generation.png; a negative result is reported like any other (exit code 0).

  python benchmarks/mad_loop.py --config pipelines/digits-mad.yaml --seeds 0 1 2 --jobs 3 --out out/bench-mad
  python benchmarks/mad_loop.py --seeds 0 --set loop.accumulate=true --out out/bench-mad-acc
  python benchmarks/mad_loop.py --seeds 0 1 2 --set loop.train_data=synthetic --out out/bench-mad-synth

Each seed's folder keeps its completed stages, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from sims_effect import _f, run_seeds

from sims_platform.config import load_config
from sims_platform.evaluation.intervals import confidence_interval
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.tracking.loops import generation_plot_png


def run_seed(config: str, root: Path, seed: int, extra: list[str]) -> dict:
    """One loop experiment (complete stages in `root` are skipped); its rows per loop and generation."""
    cfg = load_config(config, [f"seed={seed}", f"storage.root={root}", *extra])
    if cfg.loop is None:
        raise SystemExit(f"{config}: no loop section; this benchmark runs self-consuming loops "
                         "(see pipelines/digits-mad.yaml)")
    t0 = time.time()
    rows = run_pipeline(cfg)["loops"]
    return {"seed": seed, "root": str(root), "seconds": time.time() - t0, "loop": cfg.loop.model_dump(mode="json"),
            "rows": rows}


def _by(records: list[dict]) -> dict[tuple[str, float, int], list[dict]]:
    """(arm, fraction, generation) -> that cell's row of every seed, in seed order."""
    out: dict[tuple[str, float, int], list[dict]] = {}
    for r in records:
        for row in r["rows"]:
            out.setdefault((row["arm"], row["feed_fraction"], row["generation"]), []).append(row)
    return out


def _diffs(a: list[dict], b: list[dict]) -> list[float]:
    """Per seed a's FID - b's FID, leaving out seeds where either is missing (null: a diverged sampler)."""
    return [x["fid"] - y["fid"] for x, y in zip(a, b) if x["fid"] is not None and y["fid"] is not None]


def _drift(cells: dict[tuple[str, float, int], list[dict]], arm: str, frac: float, g: int) -> list[float]:
    """Per seed FID(g) - FID(0) of one loop (empty at generation 0)."""
    return _diffs(cells.get((arm, frac, g), []), cells.get((arm, frac, 0), [])) if g > 0 else []


def _ci(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, lo, hi = confidence_interval(values)
    return f"{_f(mean)} [{_f(lo)}, {_f(hi)}]"


def report(records: list[dict], command: str) -> tuple[str, dict]:
    lp = records[0]["loop"]
    cells = _by(records)
    arms, fractions = lp["arms"], lp["feed_fractions"]
    gens = range(lp["generations"])
    fed = "accumulating every earlier feed" if lp["accumulate"] else "the previous generation's feed only"
    lines = [f"Command: `{command}`", "",
             f"{lp['train_data']} loop, {fed}; {lp['generations']} generations; sims arm = {lp['method']} at the w "
             "selected on the selection seed set each generation. FID, precision and recall of each generation's "
             "model: mean ± sd over the report seed sets, against the held-out reference.", "",
             "## Per seed", "",
             "| seed | arm | D_p / D_r | generation | w | FID (mean ± sd) | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        for row in r["rows"]:
            lines.append(f"| {r['seed']} | {row['arm']} | {row['feed_fraction']:g} | {row['generation']} | "
                         f"{row['w']:g} | {_f(row['fid'])} ± {_f(row['fid_sd'])} | {_f(row['precision'], 3)} | "
                         f"{_f(row['recall'], 3)} |")
    lines += ["", "## Across seeds: mean (95% CI) per arm, |D_p| and generation", "",
              "| arm | D_p / D_r | generation | seeds | FID | precision | recall | FID(g) - FID(0) |",
              "|---|---|---|---|---|---|---|---|"]
    verdict: dict = {"gap": {}, "drift": {}}
    for arm in arms:
        for frac in fractions:
            for g in gens:
                rows = cells.get((arm, frac, g), [])
                if not rows:
                    continue
                drift = _drift(cells, arm, frac, g)
                if drift:
                    verdict["drift"][f"{arm}-dp{round(frac * 100)}/g{g}"] = _interval(drift)
                lines.append(f"| {arm} | {frac:g} | {g} | {len(rows)} | {_ci([x['fid'] for x in rows])} | "
                             f"{_ci([x['precision'] for x in rows])} | {_ci([x['recall'] for x in rows])} | "
                             f"{_ci(drift) if drift else '-'} |")
    if {"standard", "sims"} <= set(arms):
        lines += ["", "## Paired gap FID(standard) - FID(sims) per |D_p| and generation (> 0: SIMS better)", "",
                  "| D_p / D_r | generation | seeds | mean gap | 95% CI | interval excludes 0 |",
                  "|---|---|---|---|---|---|"]
        for frac in fractions:
            for g in gens:
                std, sims = cells.get(("standard", frac, g), []), cells.get(("sims", frac, g), [])
                gaps = _diffs(std, sims)
                if not gaps:
                    continue
                v = _interval(gaps)
                verdict["gap"][f"dp{round(frac * 100)}/g{g}"] = v
                lines.append(f"| {frac:g} | {g} | {len(gaps)} | {_f(v['mean'])} | [{_f(v['ci95'][0])}, "
                             f"{_f(v['ci95'][1])}] | {'yes' if v['excludes_0'] else 'no'} |")
    return "\n".join(lines), verdict


def _interval(values: list[float]) -> dict:
    mean, lo, hi = confidence_interval(values)
    return {"mean": float(mean), "ci95": [float(lo), float(hi)],
            "excludes_0": bool(math.isfinite(lo) and (lo > 0 or hi < 0)), "values": [float(v) for v in values]}


def plot(records: list[dict]) -> bytes:
    """Each loop's drift FID(g) - FID(0), paired within a seed, mean over seeds vs generation (error bars: 95% CI
    half-widths). Absolute FIDs differ between seeds by more than any loop moves them (each seed trains its own
    base), so their across-seed intervals would hide the effect; the per-seed FIDs are in the report."""
    cells = _by(records)
    curves: dict[tuple[str, float], dict[int, tuple[float, float]]] = {}
    for arm, frac, g in sorted(cells):
        if g == 0:
            curves.setdefault((arm, frac), {})[0] = (0.0, 0.0)
        elif drift := _drift(cells, arm, frac, g):
            mean, lo, hi = confidence_interval(drift)
            curves.setdefault((arm, frac), {})[g] = (mean, (hi - lo) / 2 if math.isfinite(lo) else float("nan"))
    return generation_plot_png(curves, f"Drift from generation 0, {len(records)} seed(s) (95% CI)",
                               ylabel="FID(g) - FID(0)  (> 0: worse)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/digits-mad.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="out/bench-mad")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process (one thread)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite report.md and the plot from --out's records.json, running nothing")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    if args.report_only:
        saved = out / "records.json"
        if not saved.is_file():
            raise SystemExit(f"--report-only: {saved} not found (run the benchmark first)")
        records = json.loads(saved.read_text())["records"]
        command = json.loads(saved.read_text()).get("command", "python benchmarks/mad_loop.py (see records.json)")
    else:
        roots = {seed: out / f"seed-{seed}" for seed in args.seeds}
        records = run_seeds(run_seed, args.config, roots, args.set, args.jobs)
        command = "python benchmarks/mad_loop.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    table, verdict = report(records, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.json").write_text(json.dumps({"records": records, "verdict": verdict, "command": command},
                                                 indent=2))
    (out / "fid_vs_generation.png").write_bytes(plot(records))
    seeds = [r["seed"] for r in records]
    (out / "report.md").write_text(f"# Self-consuming loops: {args.config}, seeds {seeds}\n\n{table}\n")
    print(table)
    print(f"\nrecords: {out / 'records.json'}\nreport: {out / 'report.md'}\nplot: {out / 'fid_vs_generation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
