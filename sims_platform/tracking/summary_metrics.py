"""The results users compare, on the runs they compare: each summary.json row as metrics of its iteration run
and of the pipeline run (step = iteration, so MLflow's chart view plots them across iterations), and the
FID-vs-w plots as their artifacts.

Metric names (a row's numbers, whatever else it holds):
- ``fid_base``, ``fid_best``, ``best_w`` (and any other number in the row, e.g. ``precision``);
- per guidance weight: ``fid_w_<w>`` (likewise ``fid_sd_w_<w>``, ... for any per-w mapping);
- per method, when the row compares several (``methods``): ``<method>.fid_best``, ``<method>.best_w``,
  ``<method>.fid_w_<w>``, ...

Plots: ``fid_vs_w.png`` on the iteration run; on the pipeline run ``fid_vs_w/iter-<k>.png`` for each
iteration (one curve per method when there are several) and ``fid_vs_w.png`` with every iteration's and method's
curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sims_platform.config.methods import curves as method_curves
from sims_platform.config.methods import metric_tag, parse_w_key, w_key
from sims_platform.tracking.lineage import Lineage
from sims_platform.tracking.results import fid_curves_png

# Row fields that are not metrics of their own: the step, and the nested per-method rows.
_NOT_METRICS = ("iteration", "methods")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def row_metrics(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a summary row as flat metric names; missing or non-finite values are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _NOT_METRICS:
            continue
        if isinstance(value, Mapping):  # per guidance weight, e.g. {"0.0": 30.1, "1.0": 18.2}
            for sub, v in value.items():
                w = parse_w_key(str(sub))
                name = f"{key}.{sub}" if w is None else f"{key}_w_{w_key(w).replace(',', '_')}"
                if (x := _number(v)) is not None:
                    out[prefix + name] = x
        elif (x := _number(value)) is not None:
            out[prefix + key] = x
    for method, sub_row in (row.get("methods") or {}).items():
        if isinstance(sub_row, Mapping):
            out.update(row_metrics(sub_row, f"{prefix}{metric_tag(method)}."))
    return out


def _curves(label: str, fid: Mapping[str, Any] | None) -> dict[str, dict[float, float]]:
    """The finite points of a per-w mapping as plot lines (one for a w; several for a weight vector)."""
    lines = method_curves(label, {w: x for w, v in (fid or {}).items() if (x := _number(v)) is not None})
    return {name: line for name, line in lines.items() if line}


def _curve(fid: Mapping[str, Any] | None) -> dict[float, float]:
    return _curves("", fid).get("", {})


def row_curves(row: Mapping[str, Any]) -> dict[str, dict[float, float]]:
    """FID-vs-w curves of one row: one per method when the row compares methods, else the row's own."""
    curves = {label: line for m, r in (row.get("methods") or {}).items() if isinstance(r, Mapping)
              for label, line in _curves(m, r.get("fid")).items()}
    return curves or {"": _curve(row.get("fid"))}


def row_best(row: Mapping[str, Any]) -> dict[str, float]:
    """The selected w of each of row_curves' lines (chosen on the selection seeds, not the plotted minimum)."""
    methods = {m: r["best_w"] for m, r in (row.get("methods") or {}).items()
               if isinstance(r, Mapping) and _number(r.get("best_w")) is not None}
    if methods:
        return {m: float(w) for m, w in methods.items()}
    return {"": float(row["best_w"])} if _number(row.get("best_w")) is not None else {}


def log_iteration_results(lineage: Lineage, summary: Mapping[str, Any], k: int,
                          loop: str | None = None) -> dict[str, float]:
    """Log iteration k's row of summary.json on its iteration run and on the pipeline run; returns the metrics.

    Called where the row is written (evaluate, or its reducer), so every launcher logs it once per
    evaluation; a re-evaluation logs the new values at the same step. A loop's generation (config `loop`) logs
    on its own iteration run, and on the pipeline run with the loop's name as a prefix (`<loop>.fid_base`) and
    its plots under `loops/<loop>/`.
    """
    rows = {int(r["iteration"]): r for r in summary["iterations"]}
    if k not in rows:
        raise ValueError(f"summary has no row for iteration {k} (rows: {sorted(rows)})")
    row = rows[k]
    metrics = row_metrics(row)
    iteration_run, pipeline_run = lineage.iteration_run(k, loop), lineage.pipeline_id
    lineage.log_metrics(iteration_run, metrics, step=k)
    lineage.log_metrics(pipeline_run, {f"{loop}.{m}" if loop else m: v for m, v in metrics.items()}, step=k)
    where = f"loops/{loop}/" if loop else ""

    curves = row_curves(row)
    if any(curves.values()):
        png = fid_curves_png(curves, f"{loop + ' ' if loop else ''}iteration {k}: FID vs guidance weight",
                             best=row_best(row))
        lineage.log_png(iteration_run, "fid_vs_w.png", png)
        lineage.log_png(pipeline_run, f"{where}fid_vs_w/iter-{k}.png", png)
    # Every iteration so far on shared axes, a line per iteration and method.
    overlay, best = {}, {}
    for j, r in sorted(rows.items()):
        for label, line in row_curves(r).items():
            overlay[f"iter {j} {label}".rstrip()] = line
        for label, w in row_best(r).items():
            best[f"iter {j} {label}".rstrip()] = w
    if any(overlay.values()):
        lineage.log_png(pipeline_run, f"{where}fid_vs_w.png",
                        fid_curves_png(overlay, "FID vs guidance weight, every iteration and method", best=best))
    return metrics
