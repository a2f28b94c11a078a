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

from sims_platform.k8s import torchrun
from sims_platform.k8s.settings import DriverSettings
from sims_platform.k8s.state import Observed, Phase, settled, true_conditions


def gang_restarts(restarts: int, nodes: int) -> int:
    """The operator's backoffLimit (a sum of container restarts over all pods) for `restarts` gang restarts."""
    return restarts * nodes


class PyTorchJobBackend:
    group, version, plural, kind = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
    container = "pytorch"
    delete_failed = False  # a failed PyTorchJob stays failed; runPolicy.ttlSecondsAfterFinished deletes it

    def launcher(self) -> list[str]:
        # torchrun takes --nnodes/--node-rank/--nproc-per-node/--master-* from the operator's PET_* env
        # (RANK is the pod index and LOCAL_RANK is not injected: torchrun sets LOCAL_RANK for each process).
        return torchrun.command()

    def build(self, name: str, labels: dict[str, str], template: V1PodTemplateSpec, nodes: int, gpus: int,
              settings: DriverSettings, deadline: int | None = None) -> dict[str, Any]:
        # OnFailure, not ExitCode: torchrun exits 1 when a peer is lost (a drained or failed node) or it is
        # signalled, which ExitCode treats as permanent, while ExitCode recreates an OOM-killed (137) pod with
        # no bound (the operator's backoffLimit sums container restartCounts, and a recreated pod starts at 0).
        # OnFailure restarts the container in place, every restart counts, and a pod lost with its node is
        # recreated by the operator; the stage resumes from its newest checkpoint either way.
        policy = "OnFailure"
        replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy=policy, template=template)}
        if nodes > 1:
            replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=nodes - 1, restart_policy=policy,
                                                          template=copy.deepcopy(template))
        scheduling = None
        if settings.gang.enabled:
            scheduling = KubeflowOrgV1SchedulingPolicy(
                # no queue: the Kueue LocalQueue is not a Volcano queue (the PodGroup takes Volcano's default)
                min_available=nodes, priority_class=settings.priority_class,
                schedule_timeout_seconds=settings.gang.schedule_timeout_seconds)
        # backoffLimit counts gang restarts: one lost peer makes every pod's torchrun exit and restart once.
        # cleanPodPolicy Running: a finished job's still-running pods (the survivors of a failure) are deleted,
        # so they stop holding GPUs; failed pods stay for their logs.
        run_policy = KubeflowOrgV1RunPolicy(
            clean_pod_policy="Running", backoff_limit=gang_restarts(settings.backoff_limit, nodes),
            suspend=True if settings.queue else None,  # created suspended: see jobs.batch_job
            ttl_seconds_after_finished=settings.ttl_seconds_after_finished, scheduling_policy=scheduling,
            active_deadline_seconds=deadline)
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
        if seen := settled(conds, "Succeeded", bool((spec.get("runPolicy") or {}).get("suspend"))):
            return seen
        if "Running" in conds:
            return Observed(Phase.RUNNING)
        if "Restarting" in conds:
            return Observed(Phase.RUNNING, "Restarting", conds["Restarting"].get("message") or "")
        return Observed(Phase.WAITING, "Created" if "Created" in conds else "Pending")

    def conflict(self, obj: dict[str, Any]) -> str | None:
        return None  # Kueue adds its flavor's tolerations to the pod templates' own
