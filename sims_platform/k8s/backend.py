"""The training workload kind behind one small interface: PyTorchJob (Training Operator v1) or TrainJob (Trainer v2)."""

from __future__ import annotations

from typing import Any, Protocol

from kubernetes.client import V1PodTemplateSpec

from sims_platform.k8s.settings import DriverSettings
from sims_platform.k8s.state import Observed


class TrainingBackend(Protocol):
    """Builds and reads one custom resource kind that runs a multi-node torchrun training stage."""

    group: str
    version: str
    plural: str
    kind: str
    container: str  # the container name the operator expects
    delete_failed: bool  # the driver deletes a failed workload once it has recorded why (else it could run again)

    def launcher(self) -> list[str]:
        """The container command; the sims argv follows as the container args."""
        ...

    def build(self, name: str, labels: dict[str, str], template: V1PodTemplateSpec, nodes: int, gpus: int,
              settings: DriverSettings, deadline: int | None = None) -> dict[str, Any]:
        """The serialised object (apiVersion, kind, metadata, spec) ready for create_namespaced_custom_object;
        deadline: the stage's activeDeadlineSeconds (the whole workload fails past it)."""
        ...

    def observe(self, obj: dict[str, Any]) -> Observed:
        ...

    def conflict(self, obj: dict[str, Any]) -> str | None:
        """Why the workload as admitted cannot run as the stage asked (its placement overwritten), or None."""
        ...


def default_backend() -> TrainingBackend:
    from sims_platform.k8s.pytorchjob import PyTorchJobBackend

    return PyTorchJobBackend()


def backend_for(settings: DriverSettings) -> TrainingBackend:
    """The backend the chart's `training.backend` names (driver settings `backend`)."""
    if settings.backend == "trainjob":
        from sims_platform.k8s.trainjob import TrainJobBackend

        return TrainJobBackend()
    return default_backend()
