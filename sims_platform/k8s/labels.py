"""Labels on every object: app.kubernetes.io/* plus run, iteration and stage, and the Kueue queue."""

from __future__ import annotations

from sims_platform.k8s.settings import DriverSettings
from sims_platform.steps import Step, stage_of

RUN = "sims.io/run"
ITERATION = "sims.io/iteration"
STAGE = "sims.io/stage"
STEP = "sims.io/step"
LOOP = "sims.io/loop"  # a self-consuming loop's workloads only
QUEUE = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "sims-driver"


def run_selector(run: str) -> str:
    """The label selector that shows the whole pipeline: kubectl get pytorchjobs,jobs,pods -l <this>."""
    return f"{RUN}={run}"


def workload_labels(settings: DriverSettings, run: str, at: Step) -> dict[str, str]:
    """Labels of a workload the driver creates (its pods get the same, minus the Kueue queue); `stage` is the
    stage whose folder the step completes (a reducer's is its array's)."""
    iteration, stage, step, loop = at.iteration, stage_of(at.stage), at.stage, at.loop
    labels = {
        "app.kubernetes.io/name": "sims",
        "app.kubernetes.io/instance": settings.release,
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/part-of": "sims",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        RUN: run,
        ITERATION: str(iteration),
        STAGE: stage,
        STEP: step,
    }
    if loop:
        labels[LOOP] = loop
    if settings.queue:
        labels[QUEUE] = settings.queue
    return labels


def pod_labels(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != QUEUE}
