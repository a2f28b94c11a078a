"""How far a stage is, from the run's storage: a training stage's newest committed checkpoint against its image
budget, a job-array stage's part markers against its part count."""

from __future__ import annotations

import posixpath

from sims_platform.config import PipelineConfig
from sims_platform.k8s.settings import DriverSettings
from sims_platform.storage import fsio
from sims_platform.steps import row
from sims_platform.storage.layout import RunLayout
from sims_platform.training.checkpoints import latest


def training_progress(cfg: PipelineConfig, layout: RunLayout, k: int, stage: str) -> str:
    budget = getattr(cfg, row(stage).training_section()).images
    ck = latest(layout.checkpoints(k, stage))
    images = ck.images if ck else 0
    return f"{images}/{budget} img ({100 * images // max(budget, 1)}%)"


def parts_progress(layout: RunLayout, k: int, stage: str, count: int) -> str:
    markers = [layout.part_marker(k, stage, i, count) for i in range(count)]
    present = set(fsio.listdir(posixpath.dirname(markers[0])))  # one listing, not one request per part
    return f"{sum(posixpath.basename(m) in present for m in markers)}/{count} parts"


def progress(cfg: PipelineConfig, settings: DriverSettings, layout: RunLayout, k: int, stage: str,
             step: str, done: bool) -> str:
    """'done', '2560/5120 img (50%)', '3/8 parts', or '' when the step has nothing to count (a single step such as
    import-base or a reducer); '?' when the storage cannot be read from here (credentials, network)."""
    if done:
        return "done"
    kind = row(step).kind
    try:
        if kind == "training":
            return training_progress(cfg, layout, k, stage)
        count = settings.stage(step).shards
        if kind == "array" and count > 1:  # a single part writes the stage's own marker only (parts: Indexed Jobs)
            return parts_progress(layout, k, stage, count)
    except Exception:  # storage unreachable from here: the cluster's view is still worth printing
        return "?"
    return ""
