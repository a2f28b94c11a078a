"""`sims status RUN`: a run's driver and each workload: state, restarts, progress, and why it waits."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from sims_platform.config import ConfigError
from sims_platform.k8s import labels as L
from sims_platform.k8s import podstatus
from sims_platform.k8s.backend import TrainingBackend, backend_for
from sims_platform.k8s.exit_codes import EXIT_NOT_READY, EXIT_STAGE_FAILED
from sims_platform.k8s.kube import Apis, is_not_found, to_dict
from sims_platform.k8s.preflight import INSTANCE
from sims_platform.k8s.progress import progress
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
    restarts: str = "-"
    progress: str = ""
    notes: tuple[str, ...] = ()  # what the pods and Kueue say (waiting reasons, restarts, admission)


@dataclass(frozen=True)
class DriverRow:
    """The current revision's driver Job: its state, counts, and what its newest pod said."""

    name: str
    revision: int
    state: str
    counts: str
    notes: tuple[str, ...] = ()


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


# ----------------------------------------------------------------------------
# The driver row

# What the driver's exit codes mean (sims_platform/k8s/exit_codes.py; the driver Job's podFailurePolicy fails at once
# on both); any other non-zero exit is a crash its Job retries up to driver.backoffLimit.
DRIVER_EXITS = {
    0: "every stage succeeded",
    EXIT_STAGE_FAILED: "a stage failed (see its row below)",
    EXIT_NOT_READY: "cannot start: preflight, storage owned by another run, or a changed pipeline",
}
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")  # set on a Job's pods by the Job controller
_REVISION = re.compile(r"-r(\d+)$")


def _error_lines(message: str) -> list[str]:
    """The driver's error from its termination message (the tail of its log): from the last 'error:' on."""
    lines = [ln.rstrip() for ln in (message or "").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    return lines[starts[-1]:] if starts else lines[-1:]


def driver_row(jobs: list[dict[str, Any]], pods: list[dict[str, Any]], release: str) -> DriverRow | None:
    """The driver Job of the newest Helm revision still in the cluster (`<fullname>-driver-r<N>`)."""
    mine = []
    for job in jobs:
        labels = job["metadata"].get("labels") or {}
        m = _REVISION.search(job["metadata"]["name"])
        if labels.get("app.kubernetes.io/component") == "driver" and labels.get(INSTANCE) == release and m:
            mine.append((int(m.group(1)), job))
    if not mine:
        return None
    revision, job = max(mine, key=lambda t: t[0])
    name, status = job["metadata"]["name"], job.get("status") or {}
    counts = ", ".join(f"{k} {int(status.get(k) or 0)}" for k in ("active", "succeeded", "failed"))
    theirs = sorted((p for p in pods if any((p["metadata"].get("labels") or {}).get(k) == name
                                           for k in JOB_NAME_LABELS)),
                    key=lambda p: p["metadata"].get("creationTimestamp") or "")
    notes: list[str] = []
    if theirs:
        pod = theirs[-1]
        pname, phase = pod["metadata"]["name"], (pod.get("status") or {}).get("phase") or "Unknown"
        term = podstatus.termination(pod)
        if term is not None:
            code = int(term.get("exitCode") or 0)
            meaning = DRIVER_EXITS.get(code, f"crashed ({term.get('reason') or 'Error'}); its Job retries it "
                                              "up to driver.backoffLimit")
            notes.append(f"pod {pname}: exit {code}: {meaning}")
            if code:
                notes += _error_lines(term.get("message") or "")
        else:
            notes.append(f"pod {pname}: {phase}")
        notes += [f"pod {pname}: {r}" for r in podstatus.waiting_reasons(pod)]
    elif not status.get("succeeded"):
        notes.append("no driver pod yet")
    return DriverRow(name, revision, job_observed(job).describe(), counts, tuple(notes))


# ----------------------------------------------------------------------------
# Kueue admission

KUEUE_WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")  # v1beta1 is deprecated in Kueue v0.19
INTEGRATIONS = {"Job": "batch/job", "PyTorchJob": "kubeflow.org/pytorchjob",
                "TrainJob": "trainer.kubeflow.org/trainjob"}  # Kueue's integrations.frameworks names


def kueue_workloads(apis: Apis, namespace: str) -> dict[str, dict[str, Any]] | None:
    """Kueue's Workload objects in the namespace by the uid of the job they admit (their ownerReference);
    None when they cannot be listed (no rights: the rest of the status is still worth printing)."""
    group, version, plural = KUEUE_WORKLOADS
    try:
        items = to_dict(apis.custom.list_namespaced_custom_object(group, version, namespace, plural)).get("items")
    except ApiException as err:
        return {} if is_not_found(err) else None  # 404: Kueue is not installed
    return {ref["uid"]: wl for wl in items or [] for ref in wl["metadata"].get("ownerReferences") or []}


def suspended(kind: str, obj: dict[str, Any]) -> bool:
    spec = obj.get("spec") or {}
    return bool((spec.get("runPolicy") or {}).get("suspend") if kind == "PyTorchJob" else spec.get("suspend"))


def admission_note(kind: str, obj: dict[str, Any], workloads: dict[str, dict[str, Any]] | None) -> str:
    """Why Kueue holds a suspended workload: its Workload's QuotaReserved/Admitted condition message."""
    if workloads is None:
        return ("cannot list workloads.kueue.x-k8s.io to say why: bind your user to the chart's "
                "status Role, e.g. sims-run-status for release sims-run (docs/kubernetes.md, 'sims status RUN')")
    wl = workloads.get(obj["metadata"].get("uid", ""))
    if wl is None:
        return (f"no Kueue Workload for it yet: is Kueue running, with its {INTEGRATIONS.get(kind, kind)} "
                "integration enabled? (docs/kubernetes.md, 'Kueue v0.19 set-up')")
    conds = {c["type"]: c for c in (wl.get("status") or {}).get("conditions") or []}
    for type_ in ("Admitted", "QuotaReserved"):
        c = conds.get(type_)
        if c and str(c.get("status")) == "False":
            detail = ": ".join(p for p in (c.get("reason"), c.get("message")) if p)
            return f"Kueue Workload {wl['metadata']['name']} not admitted: {detail or type_ + ' False'}"
    if str(conds.get("Admitted", {}).get("status")) == "True":
        return f"Kueue Workload {wl['metadata']['name']} admitted; starting"
    return f"Kueue Workload {wl['metadata']['name']} pending (no admission decision yet)"


# ----------------------------------------------------------------------------
# One row per workload

def status_rows(apis: Apis, namespace: str, spec: RunSpec, backend: TrainingBackend | None = None,
                now: dt.datetime | None = None) -> tuple[list[Row], str]:
    """One row per workload of the plan, and the link of the pipeline's MLflow run."""
    rows, link, _ = workload_status(apis, namespace, spec, backend, now)
    return rows, link


def workload_status(apis: Apis, namespace: str, spec: RunSpec, backend: TrainingBackend | None = None,
                    now: dt.datetime | None = None) -> tuple[list[Row], str, DriverRow | None]:
    """status_rows, and the driver Job's row (None when no driver Job of the release is in the cluster)."""
    backend = backend or backend_for(spec.settings)
    now = now or dt.datetime.now(dt.timezone.utc)
    selector = L.run_selector(spec.cfg.name)
    all_jobs = to_dict(apis.batch.list_namespaced_job(namespace, label_selector=selector)).get("items") or []
    jobs = {j["metadata"]["name"]: j for j in all_jobs}
    customs = {j["metadata"]["name"]: j for j in to_dict(apis.custom.list_namespaced_custom_object(
        backend.group, backend.version, namespace, backend.plural, label_selector=selector)).get("items") or []}
    pods = to_dict(apis.core.list_namespaced_pod(namespace, label_selector=selector)).get("items") or []
    workloads = kueue_workloads(apis, namespace) if spec.settings.queue else {}
    layout = RunLayout.of(spec.cfg.storage.root)
    record = _read_json(layout.run_record)
    uri, exp = record.get("tracking_uri"), record.get("experiment_id")
    rows = []
    for w in plan(spec.cfg, spec.settings, backend):
        obj = (jobs if w.is_job else customs).get(w.name)
        marker = _read_json(layout.in_loop(w.loop).done_marker(w.iteration, w.stage))
        done = bool(marker)
        notes: list[str] = []
        if obj is not None:
            state = (job_observed(obj) if w.is_job else backend.observe(obj)).describe()
            if spec.settings.queue and suspended(w.kind, obj):
                state = "Waiting for Kueue admission"
                notes.append(admission_note(w.kind, obj, workloads))
        else:
            state = f"{Phase.SUCCEEDED.value} (storage)" if marker else "-"
        mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(L.STEP) == w.step
                and (p["metadata"].get("labels") or {}).get(L.ITERATION) == str(w.iteration)
                and (p["metadata"].get("labels") or {}).get(L.LOOP) == w.loop]
        ready = sum(1 for p in mine if any(c.get("type") == "Ready" and c.get("status") == "True"
                                           for c in (p.get("status") or {}).get("conditions") or []))
        notes += podstatus.pod_notes(mine)
        restarts = sum(podstatus.restarts(p) for p in mine) + podstatus.failed_pods(obj)
        rows.append(Row(w.iteration, w.stage, f"{w.loop}/{w.step}" if w.loop else w.step, w.name, state,
                        _age((obj or {}).get("metadata", {}).get("creationTimestamp"), now),
                        f"{ready}/{len(mine)}" if mine else "-",
                        mlflow_link(uri, exp, marker.get("mlflow_run_id")),
                        str(restarts) if obj is not None or mine else "-",
                        progress(spec.cfg, spec.settings, layout.in_loop(w.loop), w.iteration, w.stage, w.step,
                                 done),
                        tuple(notes)))
    link = mlflow_link(uri, exp, record.get("mlflow_run_id")) or f"(no run.json under {layout.root} yet)"
    return rows, link, driver_row(all_jobs, pods, spec.settings.release)


def format_driver(d: DriverRow | None, release: str) -> str:
    if d is None:
        return (f"driver: no driver Job of release {release} (finished and deleted by ttlSecondsAfterFinished, or "
                f"not installed); helm upgrade {release} charts/sims --reuse-values starts one")
    lines = [f"driver: Job {d.name} (revision {d.revision}): {d.state}; {d.counts}"]
    return "\n".join(lines + [f"  {n}" for n in d.notes])


def format_rows(rows: list[Row]) -> str:
    header = ("ITER", "STAGE", "WORKLOAD", "STATE", "AGE", "PODS READY", "RESTARTS", "PROGRESS", "MLFLOW")
    table = [header] + [(str(r.iteration), r.step, r.name, r.state, r.age, r.pods, r.restarts, r.progress,
                         r.mlflow) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = []
    for i, row in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i:  # what the pods and Kueue say, under the workload's row
            out += [f"    ! {n}" for n in rows[i - 1].notes]
    return "\n".join(out)


def run_status(apis: Apis, namespace: str, run: str) -> str:
    spec = find_run(apis, namespace, run)
    rows, link, driver = workload_status(apis, namespace, spec)
    return (f"run {run} (namespace {namespace}); MLflow: {link}\n{format_driver(driver, spec.settings.release)}\n"
            f"{format_rows(rows)}")
