"""`sims status RUN`: a table of the run's iterations and stages from the cluster and the run's storage."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sims_platform.config import ConfigError
from sims_platform.k8s import labels as L
from sims_platform.k8s.backend import TrainingBackend, backend_for
from sims_platform.k8s.kube import Apis, to_dict
from sims_platform.k8s.render import PIPELINE_KEY, SETTINGS_KEY, RunSpec, run_specs
from sims_platform.k8s.state import Phase, job_observed
from sims_platform.k8s.workloads import plan
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout


@dataclass(frozen=True)
class Row:
    iteration: int
    stage: str
    step: str
    name: str
    state: str
    age: str
    pods: str
    mlflow: str


def find_run(apis: Apis, namespace: str, run: str) -> RunSpec:
    """The run's pipeline config and driver settings, from the chart's ConfigMap labelled with the run."""
    cms = to_dict(apis.core.list_namespaced_config_map(namespace, label_selector=L.run_selector(run)))
    docs = [dict(cm, kind="ConfigMap") for cm in cms.get("items") or []
            if PIPELINE_KEY in (cm.get("data") or {}) and SETTINGS_KEY in (cm.get("data") or {})]
    if not docs:
        raise ConfigError(f"no ConfigMap labelled {L.run_selector(run)} with {PIPELINE_KEY} in namespace "
                          f"{namespace}: is the release installed there? (helm list -n {namespace})")
    import yaml

    return run_specs(yaml.safe_dump_all(docs))[0]


def _age(created: str | None, now: dt.datetime) -> str:
    if not created:
        return "-"
    t = dt.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    s = int((now - t).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{max(s, 0)}s"


def mlflow_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    if not run_id:
        return ""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id}"


def _read_json(uri: str) -> dict[str, Any]:
    try:
        return fsio.read_json(uri) if fsio.exists(uri) else {}
    except Exception:  # storage unreachable from here: the cluster's view is still worth printing
        return {}


def status_rows(apis: Apis, namespace: str, spec: RunSpec, backend: TrainingBackend | None = None,
                now: dt.datetime | None = None) -> tuple[list[Row], str]:
    """One row per workload of the plan, and the link of the pipeline's MLflow run."""
    backend = backend or backend_for(spec.settings)
    now = now or dt.datetime.now(dt.timezone.utc)
    selector = L.run_selector(spec.cfg.name)
    jobs = {j["metadata"]["name"]: j for j in
            to_dict(apis.batch.list_namespaced_job(namespace, label_selector=selector)).get("items") or []}
    customs = {j["metadata"]["name"]: j for j in to_dict(apis.custom.list_namespaced_custom_object(
        backend.group, backend.version, namespace, backend.plural, label_selector=selector)).get("items") or []}
    pods = to_dict(apis.core.list_namespaced_pod(namespace, label_selector=selector)).get("items") or []
    layout = RunLayout.of(spec.cfg.storage.root)
    record = _read_json(layout.run_record)
    uri, exp = record.get("tracking_uri"), record.get("experiment_id")
    rows = []
    for w in plan(spec.cfg, spec.settings, backend):
        obj = (jobs if w.is_job else customs).get(w.name)
        marker = _read_json(layout.done_marker(w.iteration, w.stage))
        if obj is not None:
            state = (job_observed(obj) if w.is_job else backend.observe(obj)).describe()
        else:
            state = f"{Phase.SUCCEEDED.value} (storage)" if marker else "-"
        mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(L.STEP) == w.step
                and (p["metadata"].get("labels") or {}).get(L.ITERATION) == str(w.iteration)]
        ready = sum(1 for p in mine if any(c.get("type") == "Ready" and c.get("status") == "True"
                                           for c in (p.get("status") or {}).get("conditions") or []))
        rows.append(Row(w.iteration, w.stage, w.step, w.name, state,
                        _age((obj or {}).get("metadata", {}).get("creationTimestamp"), now),
                        f"{ready}/{len(mine)}" if mine else "-",
                        mlflow_link(uri, exp, marker.get("mlflow_run_id"))))
    return rows, mlflow_link(uri, exp, record.get("mlflow_run_id")) or f"(no run.json under {layout.root} yet)"


def format_rows(rows: list[Row]) -> str:
    header = ("ITER", "STAGE", "WORKLOAD", "STATE", "AGE", "PODS READY", "MLFLOW")
    table = [header] + [(str(r.iteration), r.step, r.name, r.state, r.age, r.pods, r.mlflow) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def run_status(apis: Apis, namespace: str, run: str) -> str:
    spec = find_run(apis, namespace, run)
    rows, link = status_rows(apis, namespace, spec)
    return f"run {run} (namespace {namespace}); MLflow: {link}\n{format_rows(rows)}"
