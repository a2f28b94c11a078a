"""Preflight (driver start and `helm test`): what a run needs in its namespace, named with how to create it.

Checks the training backend's CRD, the TrainingRuntime (TrainJob backend), the S3 Secret, the Kueue
LocalQueue (and that Kueue has not marked it inactive: a missing ClusterQueue), the run's ConfigMap, and that no
other release runs the same pipeline.name in the namespace.
Every problem is collected, so one run of the preflight lists all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sims_platform.k8s import labels as L
from sims_platform.k8s.backend import TrainingBackend, backend_for
from sims_platform.k8s.kube import Apis, is_not_found, to_dict
from sims_platform.k8s.settings import DriverSettings

KUEUE = ("kueue.x-k8s.io", "v1beta2", "localqueues")  # v1beta2: Kueue v0.19 serves and stores it (v1beta1 deprecated)
INSTANCE = "app.kubernetes.io/instance"
INSTALL_HINT = {
    "pytorchjobs": "install the Kubeflow Training Operator v1.9: kubectl apply --server-side -k k8s/operator",
    "trainjobs": "install Kubeflow Trainer v2.3 (and JobSet): kubectl apply --server-side -k k8s/trainer",
}


class PreflightFailed(RuntimeError):
    """Permanent: the namespace lacks what the run needs. The message lists each missing piece and its fix."""


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    config_map: dict[str, Any] | None = None  # the run's ConfigMap (the workloads' owner), when found

    def raise_if_failed(self, namespace: str) -> None:
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise PreflightFailed(f"preflight failed in namespace {namespace}:\n{lines}")


def _exists(call: Any, *args: Any) -> bool:
    try:
        call(*args)
        return True
    except Exception as err:
        if is_not_found(err):
            return False
        raise


def _crd_installed(apis: Apis, ns: str, group: str, version: str, plural: str) -> bool:
    """A namespaced list answers 404 exactly when the API server does not serve the resource (no CRD)."""
    return _exists(lambda: apis.custom.list_namespaced_custom_object(group, version, ns, plural, limit=1))


def check_training(apis: Apis, settings: DriverSettings, backend: TrainingBackend, report: Report) -> None:
    ns = settings.namespace
    if not _crd_installed(apis, ns, backend.group, backend.version, backend.plural):
        report.problems.append(f"the {backend.kind} CRD ({backend.plural}.{backend.group}/{backend.version}) is "
                               f"not installed: {INSTALL_HINT.get(backend.plural, 'install its operator')}")
        return
    if settings.backend == "trainjob" and not _exists(
            apis.custom.get_namespaced_custom_object, backend.group, backend.version, ns, "trainingruntimes",
            settings.training_runtime):
        report.problems.append(f"TrainingRuntime {settings.training_runtime} not found in namespace {ns}: the "
                               "chart renders it with training.backend=trainjob (helm upgrade the release)")


def check_secret(apis: Apis, settings: DriverSettings, report: Report) -> None:
    ns, name = settings.namespace, settings.s3_secret
    if name and not _exists(apis.core.read_namespaced_secret, name, ns):
        report.problems.append(
            f"Secret {name} not found in namespace {ns}: create it there (kubectl -n {ns} create secret generic "
            f"{name} --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=... "
            f"--from-literal=AWS_DEFAULT_REGION=us-east-1; k8s/README.md, step 3): every namespaced piece of a run "
            f"lives in the release's namespace")


def check_queue(apis: Apis, settings: DriverSettings, report: Report) -> None:
    ns, name = settings.namespace, settings.queue
    if not name:
        return
    group, version, plural = KUEUE
    if not _crd_installed(apis, ns, group, version, plural):
        report.problems.append(f"Kueue is not installed (no {plural}.{group}) but queue is '{name}': install "
                               "Kueue v0.19 (docs/kubernetes.md, 'Kueue'), or set queue: \"\"")
        return
    try:
        lq = to_dict(apis.custom.get_namespaced_custom_object(group, version, ns, plural, name))
    except Exception as err:
        if not is_not_found(err):
            raise
        manifest = (f"apiVersion: {group}/{version}\\nkind: LocalQueue\\nmetadata: {{name: {name}}}\\n"
                    "spec: {clusterQueue: sims-gpu}\\n")
        report.problems.append(
            f"LocalQueue {name} not found in namespace {ns}: the chart creates it unless kueue.localQueue.create is "
            f"false (helm upgrade {settings.release} charts/sims -n {ns} --reuse-values --set "
            f"kueue.localQueue.create=true), or create it pointing at your ClusterQueue: "
            f"printf '{manifest}' | kubectl -n {ns} apply -f -")
        return
    _check_queue_active(lq, name, ns, report)


def _check_queue_active(lq: dict[str, Any], name: str, ns: str, report: Report) -> None:
    """Kueue marks a LocalQueue Active=False when its ClusterQueue is missing or inactive (Kueue v0.19
    pkg/controller/core/localqueue_controller.go:194-207); its workloads would wait for ever. A queue Kueue has
    not reconciled yet (no condition) passes."""
    cq = (lq.get("spec") or {}).get("clusterQueue", "?")
    for c in (lq.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Active" and c.get("status") == "False":
            fix = ("create it: kubectl apply -k k8s/kueue (ClusterQueue sims-gpu; adapt its quotas), or point the "
                   "chart at an existing one: --set kueue.clusterQueue=NAME"
                   if c.get("reason") == "ClusterQueueDoesNotExist" else
                   f"see kubectl describe clusterqueue {cq}")
            report.problems.append(f"LocalQueue {name} in namespace {ns} is inactive ({c.get('reason')}: ClusterQueue "
                                   f"{cq}): {fix}")


def check_run(apis: Apis, settings: DriverSettings, run: str, report: Report) -> None:
    """The run's own ConfigMap exists, and no other release in the namespace runs the same pipeline.name."""
    ns = settings.namespace
    cms = to_dict(apis.core.list_namespaced_config_map(ns, label_selector=L.run_selector(run))).get("items") or []
    for cm in cms:
        meta = cm["metadata"]
        if meta["name"] == settings.config_map:
            report.config_map = cm
        theirs = (meta.get("labels") or {}).get(INSTANCE)
        if theirs and theirs != settings.release:
            report.problems.append(
                f"pipeline.name '{run}' is already installed in namespace {ns} by release '{theirs}' (ConfigMap "
                f"{meta['name']}): two releases would adopt each other's workloads. Give this release another "
                f"pipeline.name, or uninstall '{theirs}' (helm uninstall {theirs} -n {ns})")
    if report.config_map is None:
        report.problems.append(f"ConfigMap {settings.config_map} (label {L.run_selector(run)}) not found in "
                               f"namespace {ns}: the chart creates it; is the release installed there?")


def preflight(apis: Apis, settings: DriverSettings, run: str, backend: TrainingBackend | None = None) -> Report:
    """Run every check; the caller raises with report.raise_if_failed(namespace)."""
    report = Report()
    check_training(apis, settings, backend or backend_for(settings), report)
    check_secret(apis, settings, report)
    check_queue(apis, settings, report)
    check_run(apis, settings, run, report)
    return report
