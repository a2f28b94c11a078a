"""Results: summary.json (FID per iteration and guidance weight), a terminal table, and PNG figures."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from sims_platform.storage.fsio import exists, read_json, write_json
from sims_platform.storage.layout import RunLayout

# ----------------------------------------------------------------------------
# summary.json


def w_key(w: float | str) -> str:
    """The JSON key of a guidance weight: str(float(w)), so 0, 0.0 and '0' are all '0.0'."""
    return str(float(w))


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def iteration_result(k: int, fid_by_w: Mapping[float, float]) -> dict[str, Any]:
    """One row of summary.json. Non-finite FIDs (a diverged w) are kept as null and never chosen as best."""
    if not fid_by_w:
        raise ValueError(f"iteration {k}: no FID values")
    fid: dict[str, float | None] = {}
    for w, value in sorted(fid_by_w.items(), key=lambda item: float(item[0])):
        key = w_key(w)
        if key in fid:
            raise ValueError(f"iteration {k}: guidance weight {w} given twice")
        fid[key] = float(value) if _finite(float(value)) else None
    if "0.0" not in fid:
        raise ValueError(f"iteration {k}: FID at w=0 (the base model) was not evaluated; got w = "
                         f"{', '.join(fid)}. Add 0.0 to evaluate.weights")
    finite = {w: v for w, v in fid.items() if v is not None}
    best_w = min(finite, key=lambda w: (finite[w], float(w))) if finite else None
    return {
        "iteration": int(k),
        "fid": fid,
        "best_w": float(best_w) if best_w is not None else None,
        "fid_base": fid["0.0"],
        "fid_best": finite[best_w] if best_w is not None else None,
    }


_ROW_KEYS = {"iteration", "fid", "best_w", "fid_base", "fid_best"}


def write_summary(layout: RunLayout, iterations: list[dict[str, Any]], mlflow_run_id: str | None) -> dict:
    """Write <root>/summary.json from iteration_result rows (sorted by iteration); returns what was written."""
    rows = sorted(iterations, key=lambda r: r["iteration"])
    for row in rows:
        if set(row) != _ROW_KEYS:
            raise ValueError(f"summary row {row.get('iteration', '?')} has keys {sorted(row)}, expected "
                             f"{sorted(_ROW_KEYS)} (build rows with iteration_result)")
    seen = [r["iteration"] for r in rows]
    if len(set(seen)) != len(seen):
        raise ValueError(f"summary has an iteration more than once: {seen}")
    summary = {"iterations": rows, "mlflow_run_id": mlflow_run_id}
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
    return "nan" if v is None else f"{v:.{digits}f}"


def format_table(summary: Mapping[str, Any], digits: int = 2) -> str:
    """Iterations x guidance weights -> FID; '*' marks each row's best, the last column is best vs base."""
    rows = summary["iterations"]
    if not rows:
        return "(no iterations evaluated yet)"
    ws = sorted({w for r in rows for w in r["fid"]}, key=float)
    header = ["iter"] + [f"w={w}" for w in ws] + ["best w", "best vs base"]
    body = []
    for r in rows:
        cells = [str(r["iteration"])]
        for w in ws:
            if w not in r["fid"]:
                cells.append("-")
            else:
                best = r["best_w"] is not None and w == w_key(r["best_w"])
                cells.append(_fmt(r["fid"][w], digits) + ("*" if best else " "))
        base, top = r["fid_base"], r["fid_best"]
        change = f"{100 * (top - base) / base:+.1f}%" if _finite(base) and _finite(top) and base else "n/a"
        cells += ["-" if r["best_w"] is None else str(r["best_w"]), change]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(n) for c, n in zip(row, widths)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * n for n in widths))
    lines.append("FID (lower is better); * = best w per iteration; w=0.0 is the base model")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Figures


def _figure(**kwargs: Any) -> Any:
    # Figure + an explicit Agg canvas instead of pyplot: no global figure registry, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def fid_plot_png(fid_by_w: Mapping[float, float], title: str = "FID vs guidance weight") -> bytes:
    """A line plot of FID against w with the best w marked and the base (w=0) as a dashed line."""
    return fid_curves_png({"": fid_by_w}, title)


def fid_curves_png(curves: Mapping[str, Mapping[float, float]], title: str = "FID vs guidance weight") -> bytes:
    """One FID-vs-w line per label (e.g. per iteration) on shared axes."""
    fig = _figure(figsize=(5, 3.5), dpi=100)
    ax = fig.add_subplot()
    for label, fid_by_w in curves.items():
        pts = sorted((float(w), float(v)) for w, v in fid_by_w.items() if math.isfinite(float(v)))
        if not pts:
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, ys, marker="o", label=label or None)
        bx, by = min(pts, key=lambda p: p[1])
        ax.plot([bx], [by], marker="*", markersize=14, color=line.get_color())
        if 0.0 in xs:
            ax.axhline(ys[xs.index(0.0)], linestyle="--", linewidth=0.8, color=line.get_color())
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel("FID")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend()
    fig.tight_layout()
    return _png(fig)


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
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
