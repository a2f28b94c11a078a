"""Self-consuming loops' results (config `loop`): per loop (arm x |D_p|) and generation, the FID, precision and
recall of that generation's model; a table, one plot (FID vs generation, a line per loop), and MLflow metrics.

A generation's model is the arm's: standard = the plain base (w = 0); sims = the base guided by loop.method at the
w selected on the selection seeds. Generation 0 is shared (the pipeline's summary row 0); generations >= 1 are in
each loop's own summary (loops/<loop>/summary.json). Numbers are the report seed sets' mean ± sd, against the
held-out reference, as every evaluation reports them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from sims_platform.config.schema import PipelineConfig
from sims_platform.storage.fsio import exists, read_json, write_bytes, write_json
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking.lineage import Lineage
from sims_platform.tracking.figures import figure_png, new_figure
from sims_platform.tracking.json_safe import json_safe

METRIC_PREFIX = "mad."


def arm_point(row: Mapping[str, Any], arm: str, method: str) -> dict[str, Any]:
    """The numbers of an arm's model in one evaluation row: the base at w = 0, or `method` at its selected w."""
    m = row["methods"][method]
    w = 0.0 if arm == "standard" else float(m["best_w"])
    key = str(w)
    return {"w": w, "fid": m["fid"][key], "fid_sd": m["fid_sd"][key], "precision": m["precision"][key],
            "recall": m["recall"][key], "fid_base": m["fid_base"]}


def _rows_of(summary_uri: str) -> dict[int, dict[str, Any]]:
    return {int(r["iteration"]): r for r in read_json(summary_uri)["iterations"]} if exists(summary_uri) else {}


def loop_rows(cfg: PipelineConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """One row per loop and evaluated generation (generation 0 from the shared evaluation), in plan order."""
    assert cfg.loop is not None
    shared = _rows_of(layout.summary).get(0)
    out = []
    for loop in cfg.loop.loops():
        rows = _rows_of(layout.in_loop(loop.name).summary)
        if shared is not None:
            rows[0] = shared
        for g in range(cfg.loop.generations):
            if g in rows:
                out.append({"loop": loop.name, "arm": loop.arm, "feed_fraction": loop.fraction, "generation": g,
                            **arm_point(rows[g], loop.arm, cfg.loop.method)})
    return out


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def format_loop_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per loop and generation, the model's w, FID (mean ± sd), precision and recall, and its base's FID."""
    lines = ["| loop | arm | D_p / D_r | generation | w | FID (mean ± sd) | precision | recall | FID of the base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loop']} | {r['arm']} | {r['feed_fraction']:g} | {r['generation']} | {r['w']:g} | "
                     f"{_f(r['fid'])} ± {_f(r['fid_sd'])} | {_f(r['precision'], 3)} | {_f(r['recall'], 3)} | "
                     f"{_f(r['fid_base'])} |")
    return "\n".join(lines)


def generation_plot_png(curves: Mapping[tuple[str, float], Mapping[int, tuple[float, float]]], title: str,
                        ylabel: str = "FID") -> bytes:
    """FID (mean, error bar) vs generation, a line per (arm, |D_p| fraction): one colour per fraction, solid for
    sims, dashed for standard."""
    fig = new_figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    fractions = sorted({f for _, f in curves})
    colors = {f: f"C{i}" for i, f in enumerate(fractions)}
    for (arm, frac), points in curves.items():
        pts = sorted((g, m, e) for g, (m, e) in points.items() if m is not None and math.isfinite(m))
        if not pts:
            continue
        gs, ms, es = zip(*pts)
        errs = [e if e is not None and math.isfinite(e) else 0.0 for e in es]
        ax.errorbar(gs, ms, yerr=errs if any(errs) else None, marker="o", capsize=3, color=colors[frac],
                    linestyle="-" if arm == "sims" else "--", label=f"{arm}, |D_p| = {frac:g} |D_r|")
    ax.set_xlabel("generation")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(sorted({g for points in curves.values() for g in points}))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def loop_plot_png(rows: list[dict[str, Any]], title: str) -> bytes:
    curves: dict[tuple[str, float], dict[int, tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault((r["arm"], r["feed_fraction"]), {})[r["generation"]] = (r["fid"], r["fid_sd"])
    return generation_plot_png(curves, title)


def write_loop_results(cfg: PipelineConfig, layout: RunLayout, lineage: Lineage) -> list[dict[str, Any]]:
    """Write loops/results.json, results.md and fid_vs_generation.png; log them on the pipeline run and each
    generation's numbers on its loop's run (mad.fid, ... at step = generation). Idempotent."""
    assert cfg.loop is not None
    layout = layout.in_loop(None)
    rows = loop_rows(cfg, layout)
    lp = cfg.loop
    what = (f"{lp.train_data} loop, {'accumulating' if lp.accumulate else 'previous generation only'}, "
            f"{lp.generations} generations")
    table = format_loop_table(rows)
    png = loop_plot_png(rows, f"FID vs generation ({lp.train_data}{', accumulate' if lp.accumulate else ''})")
    write_json(layout.loop_results, json_safe({"loop": lp.model_dump(mode="json"), "rows": rows}))
    write_bytes(layout.loop_table, f"# Self-consuming loops: {cfg.name}, seed {cfg.seed}\n\n{what}; FID, precision "
                                   f"and recall of each generation's model on the report seed sets (mean ± sd)."
                                   f"\n\n{table}\n".encode())
    write_bytes(layout.loop_plot, png)
    pipeline = lineage.pipeline_id
    lineage.log_artifact_bytes(pipeline, "loops/results.json", json.dumps(json_safe(rows), indent=2).encode())
    lineage.log_artifact_bytes(pipeline, "loops/results.md", table.encode())
    lineage.log_png(pipeline, "loops/fid_vs_generation.png", png)
    for loop in lp.loops():
        run = lineage.loop_run(loop.name)
        lineage.log_params(run, {"arm": loop.arm, "feed_fraction": loop.fraction, "method": lp.method,
                                 "generations": lp.generations, "accumulate": lp.accumulate,
                                 "train_data": lp.train_data})
        for r in (r for r in rows if r["loop"] == loop.name):
            metrics = {METRIC_PREFIX + k: r[k] for k in ("fid", "fid_sd", "precision", "recall", "w", "fid_base")
                       if r[k] is not None and math.isfinite(r[k])}
            lineage.log_metrics(run, metrics, step=r["generation"])
    return rows


__all__ = ["arm_point", "format_loop_table", "generation_plot_png", "loop_plot_png", "loop_rows",
           "write_loop_results"]
