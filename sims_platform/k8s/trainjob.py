"""TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2.3) backend: N torchrun nodes on the chart's
TrainingRuntime, with the stage's resources, placement and /dev/shm size as runtime patches."""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient, V1PodTemplateSpec

from sims_platform.k8s import torchrun
from sims_platform.k8s.settings import DriverSettings
from sims_platform.k8s.state import Observed, Phase, settled, true_conditions

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
NODE = "node"             # the torch runtime's replicated job and container, where Trainer injects PET_*
PATCH_MANAGER = "sims.io/driver"  # owner of our runtimePatches entry
KUEUE_MANAGER = "kueue.x-k8s.io/manager"  # owner of Kueue's (its flavor's node labels and tolerations)


class TrainJobBackend:
    group, version, plural, kind = GROUP, VERSION, "trainjobs", "TrainJob"
    container = NODE
    # A failed TrainJob runs again once its JobSet is gone (the runtime's ttlSecondsAfterFinished): Trainer v2.3
    # drops the Failed condition on every reconcile and re-applies the JobSet of an unfinished TrainJob
    # (pkg/controller/trainjob_controller.go:100-108), outside Kueue, whose Workload has finished. TrainJob has no
    # TTL of its own in v2.3, so the driver deletes it after recording its failure.
    delete_failed = True

    def launcher(self) -> list[str]:
        # Trainer's torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and PET_MASTER_ADDR/PORT,
        # which torchrun reads, exactly as under the training operator.
        return torchrun.command()

    def build(self, name: str, labels: dict[str, str], template: V1PodTemplateSpec, nodes: int, gpus: int,
              settings: DriverSettings, deadline: int | None = None) -> dict[str, Any]:
        """The TrainJob: trainer (command, args, env, resources) plus the pod's per-stage placement as a patch.

        The runtime (the chart's TrainingRuntime) holds what every training pod shares: image pull secrets,
        security context, the config and S3 Secret, priority, and the JobSet failure policy.
        """
        if not settings.training_runtime:
            raise ValueError("backend trainjob needs trainingRuntime in the driver settings")
        pod = ApiClient().sanitize_for_serialization(template)
        spec = pod["spec"]
        (main,) = spec["containers"]
        pod_patch: dict[str, Any] = {
            "volumes": [v for v in spec["volumes"] if v["name"] == "dshm"],  # the stage's /dev/shm size
        }
        for key in ("nodeSelector", "tolerations", "affinity", "serviceAccountName"):
            if spec.get(key):
                pod_patch[key] = spec[key]
        trainer: dict[str, Any] = {
            "image": main["image"],
            "command": main["command"],
            "args": main["args"],
            "env": main.get("env") or [],
            "numNodes": nodes,
            "numProcPerNode": max(gpus, 1),
        }
        if main.get("resources"):
            trainer["resourcesPerNode"] = main["resources"]
        extra = {"activeDeadlineSeconds": deadline} if deadline else {}  # Trainer v2.3 fails the TrainJob past it
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": self.kind,
            "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
            "spec": {
                "runtimeRef": {"name": settings.training_runtime, "apiGroup": GROUP, "kind": "TrainingRuntime"},
                "trainer": trainer,
                "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                    "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {
                        "metadata": {"labels": pod["metadata"]["labels"]},
                        "spec": pod_patch}}}}]}}}}],
                **extra,
                **({"suspend": True} if settings.queue else {}),  # created suspended: see jobs.batch_job
            },
        }

    def observe(self, obj: dict[str, Any]) -> Observed:
        """Conditions Suspended, Complete, Failed (metav1.Condition); JobSet's jobsStatus tells running pods."""
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if seen := settled(true_conditions(status), "Complete", bool(spec.get("suspend"))):
            return seen
        jobs = status.get("jobsStatus") or []
        if any((j.get("active") or 0) > 0 for j in jobs):
            return Observed(Phase.RUNNING)
        return Observed(Phase.WAITING, "Pending")

    def conflict(self, obj: dict[str, Any]) -> str | None:
        """The stage's tolerations that Kueue's runtime patch drops. Trainer v2.3 applies runtimePatches in order as
        strategic merge patches of the JobSet spec (pkg/runtime/core/trainingruntime.go:251-280), where a pod's
        toleration list has no merge key and is replaced whole; Kueue's patch (kueue v0.19
        pkg/controller/jobs/trainjob/trainjob_controller.go:243-283) comes last and carries only its flavor's
        tolerations. So a toleration of the stage that the flavor lacks never reaches the pods."""
        patches = (obj.get("spec") or {}).get("runtimePatches") or []
        ours = _tolerations(next((p for p in patches if p.get("manager") == PATCH_MANAGER), None))
        theirs = _tolerations(next((p for p in patches if p.get("manager") == KUEUE_MANAGER), None))
        if ours is None or not theirs:  # not admitted yet, or a flavor without tolerations: ours stand
            return None
        dropped = [t for t in ours if t not in theirs]
        if not dropped:
            return None
        return (f"Kueue's admission replaces the stage's tolerations with its flavor's {theirs}, dropping {dropped} "
                "(Trainer replaces toleration lists when it merges runtime patches): add them to the "
                "ResourceFlavor's tolerations (k8s/kueue/queues.yaml) or remove them from the stage's "
                "placement.tolerations")



def _tolerations(patch: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The node pods' tolerations a runtime patch sets (None: no patch)."""
    if patch is None:
        return None
    for rj in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
            "replicatedJobs") or []:
        if rj.get("name") == NODE:
            pod = ((((rj.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {})
            return list(pod.get("tolerations") or [])
    return []
