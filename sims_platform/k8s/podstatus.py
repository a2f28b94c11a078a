"""What a pod says about itself: why it is not running, how often its containers restarted, how they ended."""

from __future__ import annotations

from typing import Any

# Waiting reasons every healthy pod passes through on its way to Running: not worth a line in `sims status`.
STARTING = ("ContainerCreating", "PodInitializing")


def _statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])


def waiting_reasons(pod: dict[str, Any]) -> list[str]:
    """Why the pod does not run: the scheduler's Unschedulable message, or a container's waiting reason
    (CreateContainerConfigError naming a missing Secret, ImagePullBackOff, CrashLoopBackOff...)."""
    out = []
    status = pod.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and str(c.get("status")) == "False":
            out.append(f"Pending: {c.get('reason') or 'not scheduled'}: {c.get('message') or ''}".rstrip(": "))
    for cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in STARTING:
            out.append(": ".join(p for p in (waiting.get("reason") or "Waiting", waiting.get("message")) if p))
    return out


def restarts(pod: dict[str, Any]) -> int:
    return sum(int(cs.get("restartCount") or 0) for cs in _statuses(pod))


def last_failure(pod: dict[str, Any]) -> str | None:
    """How the pod's container last ended badly, e.g. 'OOMKilled (exit 137)': the current state first, else
    the one before the last in-place restart."""
    for key in ("state", "lastState"):
        for cs in _statuses(pod):
            term = (cs.get(key) or {}).get("terminated")
            if term and term.get("exitCode"):
                return f"{term.get('reason') or 'Error'} (exit {term['exitCode']})"
    return None


def termination(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The first container's terminated state (exitCode, reason, message), if it has ended."""
    for cs in _statuses(pod):
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def failed_pods(obj: dict[str, Any] | None) -> int:
    """Pods the workload's controller counted as failed (and replaced): Job status.failed, PyTorchJob
    replicaStatuses[*].failed, TrainJob (JobSet) jobsStatus[*].failed."""
    status = (obj or {}).get("status") or {}
    if "replicaStatuses" in status:
        return sum(int(r.get("failed") or 0) for r in (status["replicaStatuses"] or {}).values())
    if "jobsStatus" in status:
        return sum(int(j.get("failed") or 0) for j in status["jobsStatus"] or [])
    return int(status.get("failed") or 0)


OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"


def stuck_on_lost_node(pod: dict[str, Any]) -> str | None:
    """A pod the taint manager deleted from an unreachable node (DisruptionTarget DeletionByTaintManager) that
    stays Terminating: no kubelet confirms its containers stopped, so controllers count it and make no replacement
    until the Node is deleted or tainted out of service. The line names the node and the remedy."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if not meta.get("deletionTimestamp"):
        return None
    if not any(c.get("type") == "DisruptionTarget" and c.get("reason") == "DeletionByTaintManager"
               for c in status.get("conditions") or []):
        return None
    node = (pod.get("spec") or {}).get("nodeName") or "?"
    return (f"Terminating on node {node}, which stopped answering: nothing replaces it until the node is gone. If "
            f"it is really down: kubectl taint nodes {node} {OUT_OF_SERVICE}=nodeshutdown:NoExecute (or kubectl "
            f"delete node {node}); docs/kubernetes.md, 'Node loss'")


def pod_notes(pods: list[dict[str, Any]]) -> list[str]:
    """One line per distinct problem over a workload's pods, naming the first pod that shows it."""
    seen: dict[str, list[str]] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        if lost := stuck_on_lost_node(pod):
            seen.setdefault(lost, []).append(name)
        for reason in waiting_reasons(pod):
            seen.setdefault(reason, []).append(name)
        n, last = restarts(pod), last_failure(pod)
        if n or last:
            what = f"restarted {n}x" if n else "failed"
            seen.setdefault(f"{what}, last {last}" if last else what, []).append(name)
    return [f"pod {names[0]}{f' (+{len(names) - 1} more)' if len(names) > 1 else ''}: {text}"
            for text, names in seen.items()]
