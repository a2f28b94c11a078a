"""The pipeline as workloads: every iteration's stages, each built as the object the driver creates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sims_platform.config import PipelineConfig
from sims_platform.k8s import labels as L
from sims_platform.k8s.backend import TrainingBackend, backend_for
from sims_platform.k8s.jobs import CONTAINER, batch_job
from sims_platform.k8s.names import workload_name
from sims_platform.k8s.pods import pod_template, stage_argv
from sims_platform.k8s.settings import DriverSettings
from sims_platform.pipeline.plan import pipeline_plan, stages_for
from sims_platform.steps import Step, row, stage_of, steps_of


@dataclass(frozen=True)
class Workload:
    """One object the driver creates. `stage` names the done marker; `step` the command it runs (a reducer or
    import-base completes another stage: its row's `completes` in the stage table); `loop` the self-consuming loop it belongs to
    (None: the shared pipeline)."""

    name: str
    iteration: int
    stage: str
    step: str
    api_version: str
    kind: str
    body: dict[str, Any] = field(repr=False)
    loop: str | None = None

    @property
    def is_job(self) -> bool:
        return self.kind == "Job"


def steps_for(cfg: PipelineConfig, k: int) -> list[tuple[str, str]]:
    """(stage, step) pairs of iteration k in dependency order: reference and evaluate run as slices then a
    reducer; import-base completes train-base."""
    return [(stage_of(step), step) for planned in stages_for(cfg, k) for step in steps_of(planned)]


def build_workload(cfg: PipelineConfig, settings: DriverSettings, k: int, stage: str, step: str,
                   backend: TrainingBackend, loop: str | None = None) -> Workload:
    """The step as its row's kind in the stage table says: training as the backend's kind (PyTorchJob or TrainJob), a job
    array as an Indexed Job (each index owns a disjoint slice), a single step (import-base, a reducer, feed) as a
    one-pod Job."""
    name = workload_name(cfg.name, Step(k, step, loop))
    labels = L.workload_labels(settings, cfg.name, Step(k, step, loop))
    st = settings.stage(step)
    pod_labels = L.pod_labels(labels)
    kind = row(step).kind
    if kind == "training":
        template = pod_template(settings, st, container=backend.container, command=backend.launcher(),
                                args=stage_argv(step, k, loop=loop), labels=pod_labels, restart_policy=None)
        body = backend.build(name, labels, template, st.nodes, st.gpus, settings, st.active_deadline_seconds)
        return Workload(name, k, stage, step, f"{backend.group}/{backend.version}", backend.kind, body, loop)
    count = st.shards if kind == "array" else None
    template = pod_template(settings, st, container=CONTAINER, command=["sims"],
                            args=stage_argv(step, k, count, loop), labels=pod_labels, restart_policy="Never")
    body = batch_job(name, labels, template, settings, completions=count, parallelism=st.parallelism,
                     active_deadline_seconds=st.active_deadline_seconds)
    return Workload(name, k, stage, step, "batch/v1", "Job", body, loop)


def owned_by(body: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    """The body with an ownerReference to the run's ConfigMap: uninstalling the release (or an upgrade that
    replaces the config) lets the garbage collector delete the workloads, and their pods with them."""
    if owner is None:
        return body
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"], "blockOwnerDeletion": False}
    out = dict(body, metadata=dict(body["metadata"], ownerReferences=[ref]))
    return out


def plan(cfg: PipelineConfig, settings: DriverSettings, backend: TrainingBackend | None = None,
         owner: dict[str, Any] | None = None) -> list[Workload]:
    """Every workload of the whole pipeline (pipeline.plan.pipeline_plan, each array stage followed by its
    reducer), in the order the driver runs them (owned by `owner` if given)."""
    backend = backend or backend_for(settings)
    out = []
    for st in pipeline_plan(cfg):
        for step in steps_of(st.stage):
            w = build_workload(cfg, settings, st.iteration, stage_of(step), step, backend, st.loop)
            out.append(Workload(w.name, w.iteration, w.stage, w.step, w.api_version, w.kind,
                                owned_by(w.body, owner), w.loop))
    return out


__all__ = ["Workload", "build_workload", "plan", "steps_for"]
