"""Matplotlib figures drawn off screen, and their PNG bytes (results and loop plots, benchmarks)."""

from __future__ import annotations

import io
from typing import Any


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib Figure (kwargs as Figure's) on its own Agg canvas."""
    # Figure + an explicit Agg canvas instead of pyplot: no global figure registry, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
