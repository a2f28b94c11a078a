"""PyTorchJob (kubeflow.org/v1, Training Operator v1.9) backend: Master + Workers running torchrun."""

from __future__ import annotations

import copy
from typing import Any

from kubeflow.training import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
    KubeflowOrgV1SchedulingPolicy,
)
from kubernetes.client import ApiClient, V1ObjectMeta, V1PodTemplateSpec

from sims_platform.k8s.settings import DriverSettings
from sims_platform.k8s.state import Observed, Phase, true_conditions


class PyTorchJobBackend:
    group, version, plural, kind = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
    container = "pytorch"

    def launcher(self) -> list[str]:
        # torchrun takes --nnodes/--node-rank/--nproc-per-node/--master-* from the operator's PET_* env
        # (RANK is the pod index and LOCAL_RANK is not injected: torchrun sets LOCAL_RANK for each process).
        return ["torchrun", "--no-python", "sims"]

    def build(self, name: str, labels: dict[str, str], template: V1PodTemplateSpec, nodes: int, gpus: int,
              settings: DriverSettings) -> dict[str, Any]:
        # ExitCode: exit 1-127 (a bug, a bad config) fails now; 128-255 (SIGKILL, preemption) restarts.
        replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
        if nodes > 1:
            replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=nodes - 1, restart_policy="ExitCode",
                                                          template=copy.deepcopy(template))
        scheduling = None
        if settings.gang.enabled:
            scheduling = KubeflowOrgV1SchedulingPolicy(
                min_available=nodes, queue=settings.queue, priority_class=settings.priority_class,
                schedule_timeout_seconds=settings.gang.schedule_timeout_seconds)
        run_policy = KubeflowOrgV1RunPolicy(
            clean_pod_policy="None", backoff_limit=settings.backoff_limit,
            ttl_seconds_after_finished=settings.ttl_seconds_after_finished, scheduling_policy=scheduling)
        job = KubeflowOrgV1PyTorchJob(
            api_version=f"{self.group}/{self.version}", kind=self.kind,
            metadata=V1ObjectMeta(name=name, namespace=settings.namespace, labels=labels),
            spec=KubeflowOrgV1PyTorchJobSpec(nproc_per_node=str(gpus) if gpus else "1",
                                             pytorch_replica_specs=replicas, run_policy=run_policy))
        return ApiClient().sanitize_for_serialization(job)

    def observe(self, obj: dict[str, Any]) -> Observed:
        """Conditions Created, Running, Restarting, Succeeded, Suspended, Failed (Training Operator v1)."""
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        conds = true_conditions(status)
        if "Succeeded" in conds:
            return Observed(Phase.SUCCEEDED)
        if "Failed" in conds:
            c = conds["Failed"]
            return Observed(Phase.FAILED, c.get("reason") or "", c.get("message") or "")
        if "Suspended" in conds or (spec.get("runPolicy") or {}).get("suspend"):
            reason = conds.get("Suspended", {}).get("reason") or "Suspended"
            return Observed(Phase.WAITING, reason, "waiting for admission (Kueue) or resume")
        if "Running" in conds:
            return Observed(Phase.RUNNING)
        if "Restarting" in conds:
            return Observed(Phase.RUNNING, "Restarting", conds["Restarting"].get("message") or "")
        return Observed(Phase.WAITING, "Created" if "Created" in conds else "Pending")
