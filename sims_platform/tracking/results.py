"""Results: summary.json (per iteration and method: FID, precision, recall per w), a terminal table, PNG figures."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from sims_platform.config.methods import is_base, parse_w_key, w_key
from sims_platform.metrics.preprocess import quantize_uint8
from sims_platform.storage.fsio import exists, read_json, write_json
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking.figures import figure_png, new_figure
from sims_platform.tracking.json_safe import json_safe

# ----------------------------------------------------------------------------
# summary.json


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


FLOOR_LABEL = "real vs real (floor)"

# Keys every summary row has (evaluation/report.py iteration_row builds them); the primary method's values.
ROW_KEYS = {"iteration", "fid", "fid_sd", "precision", "recall", "best_w", "fid_base", "fid_best",
            "sampler_steps", "repeats", "methods"}


def write_summary(layout: RunLayout, iterations: list[dict[str, Any]], mlflow_run_id: str | None) -> dict:
    """Write <root>/summary.json from iteration rows (sorted by iteration); returns what was written."""
    rows = sorted(iterations, key=lambda r: r["iteration"])
    for row in rows:
        if ROW_KEYS - set(row):
            raise ValueError(f"summary row {row.get('iteration', '?')} lacks keys {sorted(ROW_KEYS - set(row))} "
                             "(build rows with evaluation.report.iteration_row)")
    seen = [r["iteration"] for r in rows]
    if len(set(seen)) != len(seen):
        raise ValueError(f"summary has an iteration more than once: {seen}")
    summary = json_safe({"iterations": rows, "mlflow_run_id": mlflow_run_id})
    write_json(layout.summary, summary)
    return summary


def read_summary(layout: RunLayout) -> dict[str, Any]:
    if not exists(layout.summary):
        raise FileNotFoundError(f"{layout.summary}: no summary yet (written by the evaluate stage)")
    return read_json(layout.summary)


def update_summary(layout: RunLayout, row: dict[str, Any], mlflow_run_id: str | None) -> dict:
    """Insert or replace one iteration's row in summary.json (evaluate stages run one iteration each)."""
    rows = read_summary(layout)["iterations"] if exists(layout.summary) else []
    rows = [r for r in rows if r["iteration"] != row["iteration"]] + [row]
    return write_summary(layout, rows, mlflow_run_id)


# ----------------------------------------------------------------------------
# Terminal table


def _fmt(v: float | None, digits: int) -> str:
    return "nan" if not _finite(v) else f"{v:.{digits}f}"


def _grid(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(n) for c, n in zip(row, widths)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * n for n in widths))
    return lines


def _one_repeat(row: Mapping[str, Any]) -> bool:
    """One report seed set: there is no sd, so no "± sd" and no significance test (it needs repeats >= 2)."""
    return int(row.get("repeats", 2)) < 2


def _weights(key: str) -> tuple[float, ...]:
    """A summary.json weight key ('0.5', or '0.25,1.0' for a vector) as a tuple that sorts."""
    w = parse_w_key(key)
    assert w is not None, f"{key!r} is no weight setting"
    return w if isinstance(w, tuple) else (w,)


def _best_key(m: Mapping[str, Any]) -> str:
    """A method's selected weights as its summary.json key (best_w is a number, or a list for a vector)."""
    best = m["best_w"]
    return w_key(tuple(best) if isinstance(best, list) else best)


def format_iteration(row: Mapping[str, Any], digits: int = 2) -> str:
    """One iteration: every (method, w) with FID mean ± sd, precision, recall and cost, then each method's verdict.
    With one report seed set the sd and the significance test are left out (an sd of one value is undefined)."""
    order = row.get("method_order") or list(row["methods"])  # summary.json sorts keys; the config's order wins
    methods = {name: row["methods"][name] for name in order}
    one = _one_repeat(row)

    def fid(mean: float | None, sd: float | None) -> str:
        return _fmt(mean, digits) if one else f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}"

    selected = row.get("selection", True)  # rows written before evaluate.selection existed all had the set
    how = "each method's w chosen on a separate selection set" if selected else \
        "each method at its one preset w, chosen beforehand on other seeds (no selection set)"
    lines = [f"iteration {row['iteration']}: Heun {row['sampler_steps']} steps; {row['repeats']} report seed "
             f"set(s) x {row.get('num_samples', '?')} samples; {how}"]
    first = next(iter(methods.values()))
    body = [["base", "0.0", str(first["nfe_per_w"]["0.0"]), fid(first["fid"]["0.0"], first["fid_sd"]["0.0"]),
             _fmt(first["precision"]["0.0"], 3), _fmt(first["recall"]["0.0"], 3)]]
    for name, m in methods.items():
        for w in sorted(m["fid"], key=_weights):
            if is_base(_weights(w)):
                continue
            star = "*" if w == _best_key(m) else " "
            body.append([name, w + star, str(m["nfe_per_w"][w]), fid(m["fid"][w], m["fid_sd"][w]),
                         _fmt(m["precision"][w], 3), _fmt(m["recall"][w], 3)])
    floor: Mapping[str, Any] = row.get("fid_floor") or {}  # absent from rows written before the floor existed
    measured = floor.get("mean") is not None
    if measured:
        body.append([FLOOR_LABEL, "-", "-", _fmt(floor["mean"], digits) if floor.get("sd") is None
                     else f"{_fmt(floor['mean'], digits)} ± {_fmt(floor['sd'], digits)}",
                     _fmt(floor.get("precision"), 3), _fmt(floor.get("recall"), 3)])
    lines += _grid(["method", "w", "NFE/sample", "FID" if one else "FID (mean ± sd)", "precision", "recall"], body)
    if measured:
        sets = f"{floor['sets']} set" if floor["sets"] == 1 else f"{floor['sets']} sets"
        noise = "; FID gaps under its sd are noise" if floor.get("sd") is not None else ""
        lines.append(f"{FLOOR_LABEL}: {sets} of {floor['samples']} real training images vs the same reference: no "
                     f"method can meaningfully go below it{noise}")
    elif floor:
        lines.append(f"{FLOOR_LABEL}: not computed ({floor.get('reason') or 'a set FID is not finite'})")
    lines.append("")
    body = []
    for name, m in methods.items():
        if is_base(_weights(_best_key(m))):
            verdict = "no gain (best w = 0)"
        elif one:
            verdict = "n/a (1 repeat)"
        else:
            verdict = "yes" if m["significant"] else "no"
        body.append([name, _best_key(m) if isinstance(m["best_w"], list) else str(m["best_w"]), _fmt(m["fid_base"], digits), _fmt(m["fid_best"], digits),
                     fid(m["gain"], m["gain_sd"]), verdict])
    which = "best" if selected else "preset"
    lines += _grid(["method", f"{which} w", "FID base", f"FID at {which} w", f"gain (base - {which})",
                    "gain > 2 sd?"], body)
    return "\n".join(lines)


def format_table(summary: Mapping[str, Any], digits: int = 2) -> str:
    """Every iteration's comparison table and a legend; '*' marks each method's selected w."""
    rows = summary["iterations"]
    if not rows:
        return "(no iterations evaluated yet)"
    parts = [format_iteration(r, digits) for r in rows]
    legend = ["* = the w each method selected on its selection seed set (its best w); w = 0 is the base model"
              if any(r.get("selection", True) for r in rows) else
              "* = each method's preset w (evaluate.selection false: reported whether or not it beats the base); "
              "w = 0 is the base model"]
    if any(not _one_repeat(r) for r in rows):
        legend.append("FID (lower is better), mean ± sd over the report seed sets; gain = paired FID(base) - "
                      "FID(best w) on the same seeds, mean ± sd")
    if any(_one_repeat(r) for r in rows):
        legend.append("FID (lower is better) on 1 report seed set: no sd, and whether a gain exceeds 2 sd needs "
                      "evaluate.repeats >= 2")
    parts.append("\n".join(legend))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------
# Figures


def fid_plot_png(fid_by_w: Mapping[float, float], title: str = "FID vs guidance weight") -> bytes:
    """A line plot of FID against w with the best w marked and the base (w=0) as a dashed line."""
    return fid_curves_png({"": fid_by_w}, title)


def fid_curves_png(curves: Mapping[str, Mapping[float, float | tuple[float, float]]],
                   title: str = "FID vs guidance weight", best: Mapping[str, float] | None = None,
                   ylabel: str = "FID") -> bytes:
    """One FID-vs-w line per label (a method, an iteration) on shared axes; values are FIDs or (mean, sd) pairs
    (drawn with error bars). A star marks each line's best w (`best[label]` when given, e.g. chosen on selection
    seeds, else its lowest point) only where it is lower than the line's w = 0 (the base): a selected w that does
    not beat the base gets no star. `ylabel` names another quantity drawn the same way (e.g. a paired gap)."""
    fig = new_figure(figsize=(5.5, 3.8), dpi=100)
    ax = fig.add_subplot()
    for label, fid_by_w in curves.items():
        pts = []
        for w, v in fid_by_w.items():
            mean, sd = (v if isinstance(v, tuple) else (v, float("nan")))
            if mean is not None and math.isfinite(float(mean)):
                pts.append((float(w), float(mean), float(sd) if sd is not None and math.isfinite(sd) else 0.0))
        if not pts:
            continue
        pts.sort()
        xs, ys, sds = zip(*pts)
        line = ax.errorbar(xs, ys, yerr=sds if any(sds) else None, marker="o", capsize=3, label=label or None)
        color = line.lines[0].get_color()
        bw = best.get(label) if best else None
        bx, by = next(((x, y) for x, y, _ in pts if x == bw), min(((x, y) for x, y, _ in pts), key=lambda p: p[1]))
        base = ys[xs.index(0.0)] if 0.0 in xs else None
        if bx != 0.0 and (base is None or by < base):
            ax.plot([bx], [by], marker="*", markersize=14, color=color)
        if base is not None:
            ax.axhline(base, linestyle="--", linewidth=0.8, color=color)
    ax.set_xlabel("guidance weight w\nstar: the selected w, where it beats w = 0; dashed: w = 0", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend()
    fig.tight_layout()
    return figure_png(fig)


def image_grid_png(images: torch.Tensor, nrow: int = 8, min_size: int = 64, padding: int = 2) -> bytes:
    """A PNG grid of images [N, C, H, W] in [-1, 1] (C = 1 or 3), nrow per row; tiles smaller than
    min_size px are upscaled by an integer factor (nearest) so a 16x16 digit stays visible."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("images is empty")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    scale = max(1, math.ceil(min_size / min(h, w)))
    x = quantize_uint8(images.detach().cpu())  # the pixels the feature networks see (EDM2's PNG quantisation)
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    th, tw = h * scale, w * scale
    height, width = rows * th + (rows + 1) * padding, cols * tw + (cols + 1) * padding
    canvas = torch.zeros(c, height, width, dtype=torch.uint8)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (th + padding), padding + q * (tw + padding)
        canvas[:, top:top + th, left:left + tw] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)  # uint8 2-D -> "L", [H, W, 3] -> "RGB"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
