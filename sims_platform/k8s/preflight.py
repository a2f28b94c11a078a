"""Preflight (driver start and `helm test`): what a run needs in its namespace, named with how to create it.

Checks the training backend's CRD, the TrainingRuntime (TrainJob backend), the S3 Secret, the Kueue
LocalQueue, the run's ConfigMap, and that no other release runs the same pipeline.name in the namespace.
Every problem is collected, so one run of the preflight lists all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sims_platform.k8s import labels as L
from sims_platform.k8s.backend import TrainingBackend, backend_for
from sims_platform.k8s.kube import Apis, is_not_found, to_dict
from sims_platform.k8s.settings import DriverSettings

KUEUE = ("kueue.x-k8s.io", "v1beta1", "localqueues")
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
            f"{name} --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=..., see "
            f"k8s/base/s3-secret.example.yaml), or install the release in the namespace that has it (helm install "
            f"... -n sims)")


def check_queue(apis: Apis, settings: DriverSettings, report: Report) -> None:
    ns, name = settings.namespace, settings.queue
    if not name:
        return
    group, version, plural = KUEUE
    if not _crd_installed(apis, ns, group, version, plural):
        report.problems.append(f"Kueue is not installed (no {plural}.{group}) but queue is '{name}': install "
                               "Kueue v0.19 (docs/kubernetes.md, 'Kueue'), or set queue: \"\"")
    elif not _exists(apis.custom.get_namespaced_custom_object, group, version, ns, plural, name):
        report.problems.append(f"LocalQueue {name} not found in namespace {ns}: kubectl apply -k k8s/kueue "
                               f"(its LocalQueue is in namespace sims; copy it for {ns}), or install the release "
                               "with -n sims")


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
