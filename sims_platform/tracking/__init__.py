"""Tracking: MLflow lineage of the pipeline's runs, summary.json, the results table and PNG figures."""

from sims_platform.tracking.lineage import Lineage, process_rank
from sims_platform.tracking.store import (
    LineageError,
    default_artifact_location,
    local_store,
    open_client,
    resolve_tracking_uri,
    ui_command,
)
from sims_platform.tracking.results import (
    fid_curves_png,
    fid_plot_png,
    format_iteration,
    format_table,
    image_grid_png,
    read_summary,
    update_summary,
    write_summary,
)
from sims_platform.tracking.summary_metrics import log_iteration_results

__all__ = [
    "Lineage",
    "LineageError",
    "default_artifact_location",
    "fid_curves_png",
    "fid_plot_png",
    "format_iteration",
    "format_table",
    "image_grid_png",
    "local_store",
    "open_client",
    "log_iteration_results",
    "process_rank",
    "read_summary",
    "resolve_tracking_uri",
    "ui_command",
    "update_summary",
    "write_summary",
]
