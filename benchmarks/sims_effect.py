"""Benchmark: does SIMS beat its base over several training seeds, measured as a sceptic would?

Each seed runs the whole pipeline (its own base, synthetic set, aux and real-data aux) with the config's
evaluation protocol: a converged sampler, the held-out reference, one selection seed set on which each method's w
is chosen, and `evaluate.repeats` report seed sets. Per seed and method it records the paired gap
FID(base) - FID(method at its selected w) on the report sets (mean ± sd); across seeds, the mean gap with a 95%
confidence interval (t distribution, n - 1 degrees of freedom). A method "holds" when that interval excludes 0.
With several fine-tune modes (--modes resume transfer), the aux methods are measured once per mode over the same
base (named 'sims [transfer]'), and the paired gap FID(real-data control) - FID(sims) is given per mode, at each w
and at the selected w: what the synthetic set adds over fine-tuning on real data the same way. Every row also
carries the real-vs-real floor (fid_floor) of the shared feature network.
Writes records.json and report.md; a negative result is reported like any other (exit code 0).

  python benchmarks/sims_effect.py --config pipelines/digits.yaml --seeds 0 1 2 3 4 --out out/bench-sims
  python benchmarks/sims_effect.py --seeds 0 1 2 3 4 --reuse 0=out/digits   # seed 0 = a finished `make demo`
  python benchmarks/sims_effect.py --seeds 0 1 2 3 4 --jobs 2   # two seeds at a time, one thread each
  python benchmarks/sims_effect.py --seeds 0 1 2 3 4 --modes resume transfer   # the aux fine-tuned both ways

Each seed's folder keeps its completed stages, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sims_platform.config import load_config
from sims_platform.config.methods import method
from sims_platform.evaluation.intervals import confidence_interval, excludes_zero
from sims_platform.pipeline.runner import StaleStageError, run_pipeline
from sims_platform.stages.drift import AUX_STAGES
from sims_platform.tracking.results import fid_curves_png


def mode_overrides(config: str, mode: str, extra: list[str]) -> list[str]:
    """The overrides that make `config` fine-tune its aux models in `mode` (finetune_aux.init.mode): resume takes
    the base's optimizer; transfer and restart take it too (lr, betas, ref_images), transfer warmed up over a tenth
    of the budget B, restart without warm-up (as the platform fine-tuned before the modes existed)."""
    cfg = load_config(config, extra)
    opt = cfg.train_base.optimizer.model_dump(mode="json")
    if mode != "resume":
        opt["rampup_images"] = cfg.finetune_aux.images // 10 if mode == "transfer" else 0
    return [f"finetune_aux.init.mode={mode}", f"finetune_aux.optimizer={json.dumps(opt)}",
            f"finetune_aux.batch_size={cfg.train_base.batch_size}", f"finetune_aux.ema_std={cfg.train_base.ema_std}"]


def uses_aux(name: str) -> bool:
    """Whether a method guides with an aux model (the models a fine-tune mode changes)."""
    return any(getattr(g.source, "stage", None) in AUX_STAGES for g in method(name).guides)


def aux_methods(config: str, extra: list[str]) -> list[dict]:
    """The config's evaluate.methods that guide with an aux model."""
    cfg = load_config(config, extra)
    return [m.model_dump(mode="json", exclude_none=True) for m in cfg.evaluate.methods if uses_aux(m.name)]


def run_seed(config: str, root: Path, seed: int, extra: list[str], modes: tuple[str, ...] = ("resume",)) -> dict:
    """One seed's pipeline runs (complete stages in `root` are skipped); returns its iteration-0 summary row per
    fine-tune mode. The first mode runs every method of the config; each further mode refits only the aux models
    and evaluates only the methods that use them, in the same folder over the same base, synthetic set, guide and
    reference (run first, then the first mode redoes finetune-aux and what reads it). Every stage runs in this
    process (the seeds are the parallelism)."""
    # The protocol chooses each method's w on a selection seed set, whatever the config does (the demo reports one
    # preset w per method, chosen on this benchmark's sets).
    common = [f"seed={seed}", f"storage.root={root}", "iterations.count=1", "runtime.local_parts=1",
              "evaluate.selection=true", *extra]
    t0, rows = time.time(), {}
    for mode in [*modes[1:], modes[0]]:
        saved = root / f"row-{mode}.json"
        if not saved.exists():
            only = [] if mode == modes[0] else \
                [f"evaluate.methods={json.dumps(aux_methods(config, common))}", "guide=null"]
            cfg = load_config(config, [*common, *mode_overrides(config, mode, common), *only])
            saved.write_text(json.dumps(_run_mode(cfg)["iterations"][0]))
        rows[mode] = json.loads(saved.read_text())
    return {"seed": seed, "root": str(root), "seconds": time.time() - t0, "row": merged_row(rows, modes)}


def _run_mode(cfg):
    """The pipeline in cfg's fine-tune mode: the aux models (and what reads them) are redone when the folder's were
    fine-tuned in another mode; anything else stale still stops the run."""
    try:
        return run_pipeline(cfg)
    except StaleStageError:
        return run_pipeline(cfg, redo_from=["finetune-aux", "finetune-real-aux"])


def merged_row(rows: dict[str, dict], modes: tuple[str, ...]) -> dict:
    """One summary row whose methods are every mode's: an aux method is named with its mode ('sims [transfer]')
    when more than one mode ran."""
    first = rows[modes[0]]
    out = {**first, "methods": {}, "modes": list(modes)}
    for mode in modes:
        for name, res in rows[mode]["methods"].items():
            aux = uses_aux(name)
            if mode != modes[0] and not aux:
                continue
            out["methods"][f"{name} [{mode}]" if aux and len(modes) > 1 else name] = res
    return out


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # --jobs workers share the cores: one thread each avoids oversubscription


def run_seeds(run: Callable[[str, Path, int, list[str]], dict], config: str, roots: dict[int, Path],
              extra: list[str], jobs: int) -> list[dict]:
    """run(config, root, seed, extra) for every seed of `roots`, `jobs` at a time in worker processes of one thread
    each; the records in seed order, each printed with its time."""
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_one_thread) as pool:
            futures = {seed: pool.submit(run, config, root, seed, extra) for seed, root in roots.items()}
            records = [futures[seed].result() for seed in roots]
    else:
        records = [run(config, root, seed, extra) for seed, root in roots.items()]
    for r in records:
        print(json.dumps({k: r[k] for k in ("seed", "root", "seconds")}), flush=True)
    return records


def _f(x: float | None, d: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def report(records: list[dict], command: str) -> tuple[str, dict]:
    methods = list(records[0]["row"]["methods"])
    row0 = records[0]["row"]
    lines = [f"Command: `{command}`", "",
             f"Sampler: Heun {row0['sampler_steps']} steps; {row0['repeats']} report seed sets x "
             f"{row0.get('num_samples', '?')} samples per arm; w chosen per method on a separate selection set.", "",
             "## Per seed: paired gap on the report sets (FID base - FID at the selected w; mean ± sd over sets)", "",
             "| seed | method | selected w | FID base | FID at w | gap (mean ± sd) | gap > 2 sd | precision (w) | recall (w) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines_floor = ["", "## The ruler's floor: FID of real training images against the held-out reference", "",
                   "| seed | fid_floor (mean ± sd) | sets x images |", "|---|---|---|"]
    for r in records:
        floor = r["row"].get("fid_floor") or {}
        lines_floor.append(f"| {r['seed']} | {_f(floor.get('mean'))} ± {_f(floor.get('sd'))} | {floor.get('sets', 'n/a')} "
                           f"x {floor.get('samples', 'n/a')} |")
        for m in methods:
            res = r["row"]["methods"][m]
            w = str(res["best_w"])
            lines.append(f"| {r['seed']} | {m} | {res['best_w']} | {_f(res['fid_base'])} | {_f(res['fid_best'])} | "
                         f"{_f(res['gain'])} ± {_f(res['gain_sd'])} | {'yes' if res['significant'] else 'no'} | "
                         f"{_f(res['precision'].get(w), 3)} | {_f(res['recall'].get(w), 3)} |")
    lines += lines_floor
    lines += ["", "## Across seeds at the selected w: mean gap with a 95% confidence interval (t, n - 1 dof)", "",
              "A seed whose selection set chose w = 0 contributes a gap of exactly 0 (the base itself); the last "
              "column counts them.", "",
              "| method | seeds | mean gap | 95% CI | interval excludes 0 | seeds with gap > 2 sd | mean FID base | "
              "mean FID at w | seeds at w = 0 |", "|---|---|---|---|---|---|---|---|---|"]
    verdict = {}
    for m in methods:
        gaps = [r["row"]["methods"][m]["gain"] for r in records]
        mean, lo, hi = confidence_interval(gaps)
        holds = excludes_zero(lo, hi)
        verdict[m] = {"mean_gap": float(mean), "ci95": [float(lo), float(hi)], "holds": bool(holds and lo > 0),
                      "gaps": gaps}
        sig = sum(r["row"]["methods"][m]["significant"] for r in records)
        base = statistics.fmean(r["row"]["methods"][m]["fid_base"] for r in records)
        best = statistics.fmean(r["row"]["methods"][m]["fid_best"] for r in records)
        zeros = sum(float(r["row"]["methods"][m]["best_w"]) == 0 for r in records)
        lines.append(f"| {m} | {len(gaps)} | {_f(mean)} | [{_f(lo)}, {_f(hi)}] | "
                     f"{'yes' if holds else 'no'}{' (worse)' if holds and hi < 0 else ''} | {sig}/{len(gaps)} | "
                     f"{_f(base)} | {_f(best)} | {zeros}/{len(gaps)} |")
    lines += fixed_w_table(records, methods)
    lines += control_gap_table(records, methods)
    lines += selection_table(records, methods)
    return "\n".join(lines), verdict


def _pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(sims, its real-data control) in the same fine-tune mode: 'sims [m]' with 'sims-real-aux [m]'."""
    out = []
    for m in methods:
        if m.split(" [")[0] == "sims":
            control = m.replace("sims", "sims-real-aux", 1)
            if control in methods:
                out.append((m, control))
    return out


def _control_minus_sims(records: list[dict], sims: str, control: str, w: str, key: str) -> list[float] | None:
    """Per seed FID(control) - FID(sims) at w, from each row's `key` ('fid': the report sets, 'fid_selection': the
    selection set); None when some seed's control was not sampled at w."""
    pairs = [(r["row"]["methods"][control][key].get(w), r["row"]["methods"][sims][key][w]) for r in records]
    return None if any(c is None for c, _ in pairs) else [c - x for c, x in pairs]


def control_gap_table(records: list[dict], methods: list[str]) -> list[str]:
    """FID(control) - FID(sims), paired per seed (> 0: the synthetic set beats real data as the aux's training
    set), across seeds with a 95% interval: at each w both grids share, and at each method's selected w."""
    pairs = _pairs(methods)
    if not pairs:
        return []
    lines = ["", "## SIMS against its real-data control: FID(control) - FID(sims), paired per seed (95% CI)", "",
             "| fine-tune | w | mean | 95% CI | interval excludes 0 | seeds with sims better |", "|---|---|---|---|---|---|"]
    for sims, control in pairs:
        label = sims[len("sims "):].strip("[]") if " [" in sims else "as configured"
        grid = [w for w in records[0]["row"]["methods"][sims]["fid"] if w in records[0]["row"]["methods"][control]["fid"]
                and float(w) != 0]
        for w in [*grid, "selected"]:
            diffs = [r["row"]["methods"][control]["fid_best"] - r["row"]["methods"][sims]["fid_best"] for r in records] \
                if w == "selected" else _control_minus_sims(records, sims, control, w, "fid")
            if diffs is None:
                continue
            mean, lo, hi = confidence_interval(diffs)
            lines.append(f"| {label} | {w} | {_f(mean)} | [{_f(lo)}, {_f(hi)}] | {'yes' if excludes_zero(lo, hi) else 'no'} "
                         f"| {sum(d > 0 for d in diffs)}/{len(diffs)} |")
    return lines


def selection_table(records: list[dict], methods: list[str]) -> list[str]:
    """What the settings (fine-tune mode, w) may be chosen on: the selection set, never reported elsewhere. Per
    method, the across-seed mean of the selection-set gap FID(base) - FID(w) at each w and at the selected w, and
    for SIMS the selection-set FID(control) - FID(sims) at each shared w."""
    if not all("fid_selection" in r["row"]["methods"][m] for r in records for m in methods):
        return []
    lines = ["", "## The selection sets (what modes and w are chosen on): mean over seeds", "",
             "| method | w | mean selection-set gap FID(base) - FID(w) | seeds better than the base | "
             "mean FID(control) - FID(sims) at w |", "|---|---|---|---|---|"]
    controls = dict(_pairs(methods))
    for m in methods:
        sel = [r["row"]["methods"][m]["fid_selection"] for r in records]
        for w in [w for w in sel[0] if float(w) != 0] + ["selected"]:
            if w == "selected":
                picks = [str(r["row"]["methods"][m]["best_w"]) for r in records]
                gaps = [s["0.0"] - s[p] for s, p in zip(sel, picks)]
            else:
                gaps = [s["0.0"] - s[w] for s in sel]
            diffs = _control_minus_sims(records, m, controls[m], w, "fid_selection") \
                if m in controls and w != "selected" else None
            vs = _f(statistics.fmean(diffs)) if diffs else ""
            lines.append(f"| {m} | {w} | {_f(statistics.fmean(gaps))} | {sum(g > 0 for g in gaps)}/{len(gaps)} | "
                         f"{vs} |")
    return lines


def fixed_w_table(records: list[dict], methods: list[str]) -> list[str]:
    """The curves behind the selection: per method and w, the across-seed mean of each seed's paired gap
    FID(base) - FID(w) on the report sets, with its 95% interval, and how often the selection set chose that w."""
    lines = ["", "## Across seeds at each w: mean paired gap on the report sets (95% CI), precision and recall", "",
             "| method | w | mean gap | 95% CI | mean FID | precision | recall | chosen by selection |",
             "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for w in records[0]["row"]["methods"][m]["fid"]:
            res = [r["row"]["methods"][m] for r in records]
            mean, lo, hi = confidence_interval([x["fid"]["0.0"] - x["fid"][w] for x in res])
            chosen = sum(str(x["best_w"]) == w for x in res)
            lines.append(f"| {m} | {w} | {_f(mean)} | [{_f(lo)}, {_f(hi)}] | "
                         f"{_f(statistics.fmean(x['fid'][w] for x in res))} | "
                         f"{_f(statistics.fmean(x['precision'][w] for x in res), 3)} | "
                         f"{_f(statistics.fmean(x['recall'][w] for x in res), 3)} | {chosen}/{len(res)} |")
    return lines


def gap_plot(records: list[dict], methods: list[str]) -> bytes:
    """Mean paired gap vs w per method, error bars = 95% CI half-widths; a star at the w chosen most often."""
    curves: dict[str, dict[float, float | tuple[float, float]]] = {}
    chosen: dict[str, float] = {}
    for m in methods:
        res = [r["row"]["methods"][m] for r in records]
        curves[m] = {}
        for w in res[0]["fid"]:
            mean, lo, hi = confidence_interval([x["fid"]["0.0"] - x["fid"][w] for x in res])
            curves[m][float(w)] = (mean, (hi - lo) / 2)
        picks = [float(x["best_w"]) for x in res]
        chosen[m] = max(set(picks), key=picks.count)
    return fid_curves_png(curves, title=f"FID(base) - FID(w), {len(records)} seeds (95% CI)", best=chosen,
                          ylabel="paired FID gap (> 0: better than base)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/digits.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="out/bench-sims")
    ap.add_argument("--reuse", action="append", default=[], metavar="SEED=ROOT",
                    help="take this seed's run from an existing folder (e.g. 0=out/digits after `make demo`)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process (one thread)")
    ap.add_argument("--modes", nargs="+", default=["resume"], choices=["resume", "transfer", "restart"],
                    help="fine-tune modes of the aux models (finetune_aux.init.mode); the first runs every method")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    reuse = {int(k): Path(v).resolve() for k, v in (item.split("=", 1) for item in args.reuse)}
    roots = {seed: reuse.get(seed, out / f"seed-{seed}") for seed in args.seeds}
    records = run_seeds(functools.partial(run_seed, modes=tuple(args.modes)), args.config, roots, args.set, args.jobs)
    command = "python benchmarks/sims_effect.py " + " ".join(sys.argv[1:])
    table, verdict = report(records, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.json").write_text(json.dumps({"records": records, "verdict": verdict}, indent=2))
    (out / "gap_vs_w.png").write_bytes(gap_plot(records, list(records[0]["row"]["methods"])))
    (out / "report.md").write_text(f"# SIMS effect: {args.config}, seeds {args.seeds}\n\n{table}\n")
    print(table)
    for m, v in verdict.items():
        print(f"{m}: mean gap {v['mean_gap']:.3f}, 95% CI [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] -> "
              f"{'HOLDS' if v['holds'] else 'DOES NOT HOLD'}")
    print(f"\nrecords: {out / 'records.json'}\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
