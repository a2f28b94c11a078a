"""batch/v1 Jobs for the stages that are not distributed training: Indexed samplers and single-pod steps."""

from __future__ import annotations

from typing import Any

from kubernetes.client import (
    ApiClient,
    V1Job,
    V1JobSpec,
    V1ObjectMeta,
    V1PodFailurePolicy,
    V1PodFailurePolicyOnExitCodesRequirement,
    V1PodFailurePolicyOnPodConditionsPattern,
    V1PodFailurePolicyRule,
    V1PodTemplateSpec,
)

from sims_platform.k8s.settings import DriverSettings

CONTAINER = "sims"
CONFIG_ERROR_EXIT = 2  # `sims` exits 2 on a bad config: retrying cannot help
# Exit codes of a stage container that no retry can fix: every failure policy fails the stage on them at once
# (Jobs' podFailurePolicy, the TrainingRuntime's, the driver for PyTorchJobs), and the training entrypoint
# (k8s/torchrun.py) carries them out of torchrun.
PERMANENT_EXITS = (CONFIG_ERROR_EXIT,)
MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"  # Kueue's partial admission (Beta, on by default in v0.19)


def _failure_policy(indexed: bool) -> V1PodFailurePolicy:
    return V1PodFailurePolicy(rules=[
        # A preempted or evicted pod does not count against the retries.
        V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
        V1PodFailurePolicyRule(action="FailIndex" if indexed else "FailJob", on_exit_codes=(
            V1PodFailurePolicyOnExitCodesRequirement(container_name=CONTAINER, operator="In",
                                                     values=list(PERMANENT_EXITS)))),
    ])


def batch_job(name: str, labels: dict[str, str], template: V1PodTemplateSpec, settings: DriverSettings, *,
              completions: int | None = None, parallelism: int | None = None,
              active_deadline_seconds: int | None = None) -> dict[str, Any]:
    """A Job; with completions it is an Indexed Job (JOB_COMPLETION_INDEX, retries per index)."""
    indexed = completions is not None
    spec = V1JobSpec(
        template=template, ttl_seconds_after_finished=settings.ttl_seconds_after_finished,
        active_deadline_seconds=active_deadline_seconds, pod_failure_policy=_failure_policy(indexed))
    if settings.queue:
        # Queued workloads are created suspended, so only Kueue starts them: a Kueue whose integration for the kind
        # is off (kubeflow.org/pytorchjob is off by default in v0.19) leaves them waiting, and `sims status` says
        # why, instead of running them outside quota. Kueue's webhook suspends them too where it is on.
        spec.suspend = True
    if completions is not None:  # indexed (tested on completions itself, so its type narrows to int)
        spec.completion_mode = "Indexed"
        spec.completions = completions
        spec.parallelism = min(parallelism or completions, completions)
        spec.backoff_limit_per_index = settings.backoff_limit_per_index
    else:
        spec.backoff_limit = settings.backoff_limit
    # Queued job arrays accept partial admission: Kueue may admit fewer pods at once than the shards (lowering
    # parallelism to what the quota holds) instead of waiting for quota for all of them; every index still runs.
    annotations = {MIN_PARALLELISM: "1"} if indexed and settings.queue else None
    job = V1Job(api_version="batch/v1", kind="Job", metadata=V1ObjectMeta(
        name=name, namespace=settings.namespace, labels=labels, annotations=annotations), spec=spec)
    return ApiClient().sanitize_for_serialization(job)
