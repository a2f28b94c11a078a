"""A simulated cluster: the API calls the k8s layer makes, plus the controllers that act on what it creates.

Each tick (the driver's sleep) runs, in order: garbage collection (ownerReferences), Kueue (LocalQueue Active
condition, queue blockers, the first ResourceFlavor whose quota holds the workload, partial admission of Jobs, its
nodeLabels and tolerations injected, for TrainJobs as a runtime patch), the Job controller (Indexed Jobs,
backoffLimit(PerIndex), podFailurePolicy), the training operator v1.9 (per-replica restartPolicy
OnFailure/ExitCode as pod.go and PastBackoffLimit read them, Running while the Master runs, cleanPodPolicy),
Trainer v2 + JobSet (runtime patches merged as strategic merge patches, backoffLimit 0 node Jobs, failurePolicy
rules and maxRestarts, the JobSet's TTL and Trainer's rebuild of a failed TrainJob's missing JobSet), TTL deletion,
PodGC (Terminating pods on out-of-service nodes), the scheduler (nodeSelector and NoSchedule taints) and the kubelet
(Secrets for envFrom, running each pod's program one step; a dead node's kubelet does nothing). Programs are
Python callables standing in for containers, or the container's real command (sim_world.World.container). A
node lost with its Node object deleted takes its pods with it; a node that dies and stays leaves them Terminating.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

T0 = "2026-11-01T10:00:00Z"
KUEUE_MANAGER = "kueue.x-k8s.io/manager"
Program = Callable[["PodRun"], "int | None"]  # one step of a container: None = still running, else exit code


def _cond(type_: str, reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": T0}


def _matches(labels: dict, selector: str | None) -> bool:
    return not selector or all(labels.get(k) == v for k, v in (t.split("=", 1) for t in selector.split(",")))


def _model(data: Any, klass: str) -> Any:
    return ApiClient()._ApiClient__deserialize(copy.deepcopy(data), klass)


@dataclass
class PodRun:
    """What a program sees: its pod, the cluster, and how many times its container has started."""

    pod: dict
    cluster: SimCluster
    starts: int = 0
    state: dict = field(default_factory=dict)

    @property
    def labels(self) -> dict:
        return self.pod["metadata"]["labels"]


@dataclass
class Node:
    name: str
    labels: dict = field(default_factory=dict)
    taints: list = field(default_factory=list)
    ready: bool = True


class SimCluster:
    def __init__(self, namespace: str, program: Callable[[dict], Program]) -> None:
        self.ns = namespace
        self.program = program                  # pod -> its container program
        self.objects: dict[tuple[str, str], dict] = {}
        self.pods: dict[str, dict] = {}
        self.runs: dict[str, PodRun] = {}
        self.nodes: dict[str, Node] = {}
        self.crds: set[str] = {"jobs", "pods", "configmaps", "secrets"}
        self.kueue: dict[str, Any] = {}         # clusterQueue flavors: [{name, nodeLabels, tolerations, resources}]
        self.calls: list[tuple[str, str, str]] = []
        self.creates: list[str] = []
        self.now = 0
        self.uids = itertools.count()
        self.batch, self.custom, self.core = SimBatch(self), SimCustom(self), SimCore(self)

    # -- objects -------------------------------------------------------------------------------------------
    def put(self, resource: str, body: Any) -> dict:
        obj = copy.deepcopy(ApiClient().sanitize_for_serialization(body))
        name = obj["metadata"]["name"]
        if (resource, name) in self.objects:
            raise ApiException(status=409, reason=f"{resource} {name} already exists")
        obj["metadata"].update(creationTimestamp=T0, uid=f"uid-{next(self.uids)}", namespace=self.ns)
        obj.setdefault("status", {})
        if (obj["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name") and self._integrated(resource):
            self._suspend(resource, obj, True)  # Kueue's webhook: queued workloads start suspended
        self.objects[(resource, name)] = obj
        return obj

    def get(self, resource: str, name: str) -> dict:
        if resource not in self.crds:
            raise ApiException(status=404, reason=f"the server could not find the requested resource ({resource})")
        if (resource, name) not in self.objects:
            raise ApiException(status=404, reason=f"{resource} {name} not found")
        return self.objects[(resource, name)]

    def listed(self, resource: str, selector: str | None) -> list[dict]:
        if resource not in self.crds:
            raise ApiException(status=404, reason=f"the server could not find the requested resource ({resource})")
        return [o for (r, _), o in self.objects.items() if r == resource
                and _matches(o["metadata"].get("labels") or {}, selector)]

    def delete(self, resource: str, name: str) -> None:
        """The object goes at once; what it owns is left to the garbage collector (background propagation)."""
        self.objects.pop((resource, name), None)

    # -- helm ----------------------------------------------------------------------------------------------
    KINDS = {"ConfigMap": "configmaps", "Job": "jobs", "TrainingRuntime": "trainingruntimes",
             "LocalQueue": "localqueues"}

    def helm_apply(self, docs: list[dict], previous: list[dict] | None = None) -> None:
        """install (previous None) or upgrade: create what is new, delete what the new manifest dropped. As helm,
        it refuses a manifest whose kind the cluster does not serve, before creating anything."""
        for d in docs:
            if d["kind"] in self.KINDS and self.KINDS[d["kind"]] not in self.crds:
                raise ApiException(status=404, reason=f'no matches for kind "{d["kind"]}" in version '
                                   f'"{d["apiVersion"]}": ensure CRDs are installed first')
        keep = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for d in previous or []:
            if (d["kind"], d["metadata"]["name"]) not in keep and d["kind"] in self.KINDS:
                self.delete(self.KINDS[d["kind"]], d["metadata"]["name"])
        for d in docs:
            if d["kind"] in self.KINDS and (self.KINDS[d["kind"]], d["metadata"]["name"]) not in self.objects:
                self.put(self.KINDS[d["kind"]], d)

    def helm_uninstall(self, docs: list[dict]) -> None:
        for d in docs:
            if d["kind"] in self.KINDS:
                self.delete(self.KINDS[d["kind"]], d["metadata"]["name"])
        self.tick_gc()

    # -- the controllers -----------------------------------------------------------------------------------
    def tick(self, _seconds: float = 0) -> None:
        self.now += 1
        self.tick_gc()
        self.tick_kueue()
        for (resource, name), obj in list(self.objects.items()):
            if (resource, name) not in self.objects:
                continue
            if resource == "jobs" and "podFailurePolicy" in obj["spec"] and not self._is_driver(obj):
                self.tick_job(obj)
            elif resource == "pytorchjobs":
                self.tick_pytorchjob(obj)
            elif resource == "trainjobs":
                self.tick_trainjob(obj)
        self.tick_ttl()
        self.tick_podgc()
        self.tick_scheduler()
        self.tick_kubelet()

    @staticmethod
    def _is_driver(obj: dict) -> bool:
        return obj["metadata"]["labels"].get("app.kubernetes.io/component") == "driver"

    def tick_gc(self) -> None:
        """The garbage collector, in the background: each pass deletes the dependents whose owners are gone (the
        objects one level down, and the pods of workloads deleted before), so a chain of owners takes a pass per
        level, as kube-controller-manager's garbagecollector works through its graph."""
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        for pname in [p for p, pod in self.pods.items() if pod["owner"] not in self.objects]:
            self._remove_pod(pname)
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(r["uid"] in uids for r in refs):
                self.delete(*key)

    # Kueue ------------------------------------------------------------------------------------------------
    def _suspend(self, resource: str, obj: dict, value: bool) -> None:
        if resource == "pytorchjobs":
            obj["spec"].setdefault("runPolicy", {})["suspend"] = value
        else:
            obj["spec"]["suspend"] = value

    def _suspended(self, resource: str, obj: dict) -> bool:
        spec = obj["spec"]
        return bool(spec.get("runPolicy", {}).get("suspend") if resource == "pytorchjobs" else spec.get("suspend"))

    def templates(self, resource: str, obj: dict) -> list[dict]:
        if resource == "pytorchjobs":
            return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
        if resource == "trainjobs":
            return [self._trainjob_pod(obj)]
        return [obj["spec"]["template"]]

    KUEUE_KINDS = {"jobs": "Job", "pytorchjobs": "PyTorchJob", "trainjobs": "TrainJob"}

    def _workload(self, resource: str, obj: dict, *conds: dict) -> None:
        """Kueue's Workload for a queued job (owned by it, so collected with it), with its admission conditions."""
        name = f"{self.KUEUE_KINDS[resource].lower()}-{obj['metadata']['name']}-{obj['metadata']['uid'][-5:]}"
        wl = self.objects.get(("workloads", name)) or {"metadata": {"name": name, "uid": f"uid-{next(self.uids)}",
            "labels": {"kueue.x-k8s.io/job-uid": obj["metadata"]["uid"]}, "creationTimestamp": T0,
            "ownerReferences": [{"kind": self.KUEUE_KINDS[resource], "name": obj["metadata"]["name"],
                                 "uid": obj["metadata"]["uid"], "controller": True}]}, "status": {}}
        wl["status"]["conditions"] = [dict(c, status=c.get("status", "True")) for c in conds]
        self._new_workloads.append((("workloads", name), wl))

    def _queue_blocker(self, queue: str) -> str | None:
        """Why Kueue holds every workload of a queue: kueue v0.19.2 pkg/controller/core/workload_controller.go:2081-2089
        (getQueueBlocker: a missing LocalQueue, then a missing ClusterQueue). kueue["clusterQueues"] lists the
        ClusterQueues that exist (absent: any name does)."""
        lq = self.objects.get(("localqueues", queue))
        if lq is None:
            return f"LocalQueue {queue} doesn't exist"
        cq = (lq.get("spec") or {}).get("clusterQueue")
        known = self.kueue.get("clusterQueues")
        if known is not None and cq not in known:
            return f"ClusterQueue {cq} doesn't exist"
        return None

    def tick_localqueues(self) -> None:
        """The LocalQueue controller's Active condition: kueue v0.19.2 pkg/controller/core/localqueue_controller.go:
        199-207 (False with reason ClusterQueueDoesNotExist when its ClusterQueue is missing, else True/Ready)."""
        known = self.kueue.get("clusterQueues")
        for (resource, _), lq in self.objects.items():
            if resource != "localqueues":
                continue
            cq = (lq.get("spec") or {}).get("clusterQueue")
            if known is not None and cq not in known:
                cond = dict(_cond("Active", "ClusterQueueDoesNotExist", "Can't submit new workloads to clusterQueue"),
                            status="False")
            else:
                cond = _cond("Active", "Ready", "Can submit new workloads to localQueue")
            lq.setdefault("status", {})["conditions"] = [cond]

    def _pod_count(self, resource: str, obj: dict) -> int:
        spec = obj["spec"]
        if resource == "pytorchjobs":
            return sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())
        if resource == "trainjobs":
            return spec["trainer"]["numNodes"]
        return min(spec.get("parallelism") or 1, spec.get("completions") or spec.get("parallelism") or 1)

    def _per_pod(self, resource: str, obj: dict) -> dict[str, Any]:
        """Requests of one pod (the largest template's), as quantities."""
        from kubernetes.utils import parse_quantity

        out: dict[str, Any] = {}
        reqs = [c.get("resources") or {} for t in self.templates(resource, obj) for c in t["spec"]["containers"]]
        if resource == "trainjobs":
            reqs.append(obj["spec"]["trainer"].get("resourcesPerNode") or {})
        for r in reqs:
            for k, v in (r.get("requests") or {}).items():
                out[k] = max(out.get(k, 0), parse_quantity(v))
        return out

    def _in_use(self, flavor: str) -> dict[str, Any]:
        """Quota held by the admitted workloads of a flavor that have not finished."""
        used: dict[str, Any] = {}
        for (resource, _), o in self.objects.items():
            ann = o["metadata"].get("annotations") or {}
            done = any(c["type"] in ("Complete", "Succeeded", "Failed") for c in o["status"].get("conditions") or [])
            if resource in self.KUEUE_KINDS and ann.get("sims.test/flavor") == flavor and not done:
                for k, v in o["_usage"].items():
                    used[k] = used.get(k, 0) + v
        return used

    def _assign_flavor(self, resource: str, obj: dict) -> tuple[dict | None, str]:
        """The first flavor whose resources cover the pods' requests and whose quota (nominalQuota, when the flavor
        lists amounts) has room for all of them, as kueue v0.19.2 pkg/scheduler/flavorassigner/flavorassigner.go:
        1330-1360 (fitsResourceQuota) decides. A Job with kueue.x-k8s.io/job-min-parallelism may be admitted with
        fewer pods (partial admission, Beta and on by default): Kueue lowers its parallelism
        (pkg/controller/jobs/job/job_controller.go:384-390). (None, why) when nothing fits."""
        per_pod, count = self._per_pod(resource, obj), self._pod_count(resource, obj)
        min_count = (obj["metadata"].get("annotations") or {}).get("kueue.x-k8s.io/job-min-parallelism")
        why = f"resource {sorted(per_pod)[0] if per_pod else 'cpu'} unavailable in ClusterQueue"
        for f in self.kueue["flavors"]:
            if not set(per_pod) <= set(f["resources"]):
                missing = sorted(set(per_pod) - set(f["resources"]))
                why = f"resource {missing[0]} unavailable in ClusterQueue"
                continue
            quota, used = f.get("quota"), self._in_use(f["name"])
            lowest = int(min_count) if min_count and resource == "jobs" else count
            for n in range(count, lowest - 1, -1):
                over = [k for k, v in per_pod.items() if quota and k in quota
                        and used.get(k, 0) + v * n > quota[k]]
                if not over:
                    if n < count:
                        obj["spec"]["parallelism"] = n
                    obj["_usage"] = {k: v * n for k, v in per_pod.items()}
                    return f, ""
            k = over[0]
            need = per_pod[k] * lowest
            why = (f"insufficient quota for {k} in flavor {f['name']}, previously considered podsets requests (0) + "
                   f"current podset request ({need}) > maximum capacity ({quota[k]})" if need > quota[k] else
                   f"insufficient unused quota for {k} in flavor {f['name']}, {used.get(k, 0) + need - quota[k]} "
                   "more needed")
        return None, why

    def _integrated(self, resource: str) -> bool:
        """Kueue manages this kind: kueue["integrations"] lists the enabled ones (absent: all of them)."""
        enabled = self.kueue.get("integrations")
        return resource in self.KUEUE_KINDS and (enabled is None or resource in enabled)

    def tick_kueue(self) -> None:
        self.tick_localqueues()
        self._new_workloads: list = []
        for (resource, name), obj in self.objects.items():
            queue = (obj["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name")
            if not self._integrated(resource) or not queue or not self._suspended(resource, obj):
                continue
            blocker = self._queue_blocker(queue)
            if blocker:
                obj["status"]["conditions"] = [_cond("Suspended", "Suspended", blocker)]
                self._workload(resource, obj, dict(_cond("QuotaReserved", "Inadmissible", blocker), status="False"))
                continue
            flavor, why = self._assign_flavor(resource, obj)
            if flavor is None:  # nothing fits: stays suspended (pending admission), as Kueue's scheduler says
                self._workload(resource, obj, dict(_cond(
                    "QuotaReserved", "Pending", f"couldn't assign flavors to pod set main: {why}"), status="False"))
                continue
            self._workload(resource, obj, _cond("QuotaReserved", "QuotaReserved"), _cond("Admitted", "Admitted"))
            if resource == "trainjobs":  # Kueue patches TrainJobs through runtimePatches, under its own manager
                obj["spec"].setdefault("runtimePatches", []).append({"manager": KUEUE_MANAGER, "trainingRuntimeSpec": {
                    "template": {"spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {
                        "spec": {"nodeSelector": dict(flavor.get("nodeLabels") or {}),
                                 "tolerations": list(flavor.get("tolerations") or [])}}}}}]}}}})
            else:
                for t in self.templates(resource, obj):
                    t["spec"]["nodeSelector"] = {**(t["spec"].get("nodeSelector") or {}),
                                                 **(flavor.get("nodeLabels") or {})}
                    t["spec"]["tolerations"] = (t["spec"].get("tolerations") or []) + list(flavor.get("tolerations") or [])
            obj["metadata"].setdefault("annotations", {})["sims.test/flavor"] = flavor["name"]
            self._suspend(resource, obj, False)
            obj["status"]["conditions"] = []
        for key, wl in self._new_workloads:
            self.objects[key] = wl

    # pods --------------------------------------------------------------------------------------------------
    def _new_pod(self, name: str, owner: tuple[str, str], template: dict, restart: str, extra: dict) -> dict:
        pod = {"metadata": {"name": name, "labels": {**(template["metadata"].get("labels") or {}), **extra},
                            "uid": f"uid-{next(self.uids)}"},
               "spec": copy.deepcopy(template["spec"]), "restart": restart, "owner": owner,
               "status": {"phase": "Pending", "conditions": [], "containerStatuses": []}, "node": None}
        self.pods[name] = pod
        return pod

    def _remove_pod(self, name: str) -> None:
        self.pods.pop(name, None)
        run = self.runs.pop(name, None)
        if run is not None and run.state.get("stop"):  # a real process in the container: the kubelet kills it
            run.state["stop"]()

    def owned_pods(self, owner: tuple[str, str]) -> list[dict]:
        return [p for p in self.pods.values() if p["owner"] == owner]

    @staticmethod
    def exit_code(pod: dict) -> int | None:
        for cs in pod["status"]["containerStatuses"]:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term["exitCode"]
        return None

    @staticmethod
    def restarts(pod: dict) -> int:
        return sum(cs.get("restartCount", 0) for cs in pod["status"]["containerStatuses"])

    def tick_scheduler(self) -> None:
        for pod in self.pods.values():
            if pod["node"] is not None or pod["status"]["phase"] != "Pending":
                continue
            load = {n: sum(1 for p in self.pods.values() if p["node"] == n) for n in self.nodes}
            for node in sorted(self.nodes.values(), key=lambda n: load[n.name]):  # spread, as a GPU pool would
                sel_ok = all(node.labels.get(k) == v for k, v in (pod["spec"].get("nodeSelector") or {}).items())
                tols = pod["spec"].get("tolerations") or []
                taint_ok = all(any(t.get("key") == taint["key"] and (t.get("operator") == "Exists"
                                   or t.get("value") == taint.get("value")) for t in tols) for taint in node.taints)
                if node.ready and sel_ok and taint_ok:
                    pod["node"] = node.name
                    break
            else:
                pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": "0/%d nodes are available" % len(self.nodes)}]

    def _secret_missing(self, pod: dict) -> str | None:
        for c in pod["spec"]["containers"]:
            for ef in c.get("envFrom") or []:
                ref = ef.get("secretRef") or {}
                if ref and not ref.get("optional") and ("secrets", ref["name"]) not in self.objects:
                    return f'secret "{ref["name"]}" not found'
        return None

    @staticmethod
    def _cs(pod: dict) -> dict:
        """A new container status, with the fields the kubelet always reports."""
        c = pod["spec"]["containers"][0]
        return {"name": c["name"], "image": c["image"], "imageID": "", "restartCount": 0}

    def tick_kubelet(self) -> None:
        for name, pod in list(self.pods.items()):
            if pod["node"] is None or pod["status"]["phase"] in ("Succeeded", "Failed"):
                continue
            if not self.nodes[pod["node"]].ready:  # a dead node's kubelet runs and reports nothing
                continue
            cname = pod["spec"]["containers"][0]["name"]
            missing = self._secret_missing(pod)
            if missing:
                pod["status"]["containerStatuses"] = [{**self._cs(pod), "ready": False, "state": {
                    "waiting": {"reason": "CreateContainerConfigError", "message": missing}}}]
                continue
            run = self.runs.get(name)
            if run is None:
                run = self.runs[name] = PodRun(pod, self, starts=1)
                pod["status"]["phase"] = "Running"
                pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
                pod["status"]["containerStatuses"] = [{**self._cs(pod), "ready": True,
                                                       "state": {"running": {}}}]
            code = self.program(pod)(run)
            if code is None:
                continue
            cs = pod["status"]["containerStatuses"][0]
            term = {"exitCode": code, "reason": {0: "Completed", 137: "OOMKilled"}.get(code, "Error")}
            if code != 0 and pod["restart"] in ("OnFailure", "Always"):  # the kubelet restarts it in place
                cs["restartCount"] += 1
                cs["lastState"] = {"terminated": term}
                run.starts += 1
                continue
            cs["state"] = {"terminated": term}
            cs["ready"] = False
            pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            pod["status"]["conditions"] = []

    def node_dies(self, name: str) -> None:
        """The node stops (power, kernel panic) and its Node object stays: it turns NotReady/unreachable, the taint
        manager deletes its pods once they no longer tolerate the NoExecute taint (kubernetes v1.31
        pkg/controller/tainteviction/taint_eviction.go: DisruptionTarget DeletionByTaintManager, then a graceful
        delete), and with no kubelet to confirm the containers stopped they stay Terminating, still counted by
        their controllers."""
        self.nodes[name].ready = False
        for pod in self.pods.values():
            if pod["node"] == name:
                pod["metadata"]["deletionTimestamp"] = T0
                pod["status"]["conditions"] = [*pod["status"]["conditions"], _cond(
                    "DisruptionTarget", "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint")]

    def taint_out_of_service(self, name: str) -> None:
        """kubectl taint nodes NAME node.kubernetes.io/out-of-service=nodeshutdown:NoExecute."""
        self.nodes[name].taints.append({"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown",
                                        "effect": "NoExecute"})

    def tick_podgc(self) -> None:
        """PodGC force-deletes Terminating pods on a NotReady node tainted out-of-service (kubernetes v1.31
        pkg/controller/podgc/gc_controller.go, gcTerminating); then their controllers replace them."""
        for pname, pod in list(self.pods.items()):
            node = self.nodes.get(pod["node"] or "")
            if (node is not None and not node.ready and pod["metadata"].get("deletionTimestamp")
                    and any(t["key"] == "node.kubernetes.io/out-of-service" for t in node.taints)):
                self._remove_pod(pname)

    def lose_node(self, name: str) -> None:
        """The node dies and its Node object is deleted (e.g. by the cloud's node lifecycle): PodGC deletes its
        pods as orphans (gc_controller.go, gcOrphaned), so their controllers replace them."""
        self.nodes[name].ready = False
        for pname in [p for p, pod in self.pods.items() if pod["node"] == name]:
            self._remove_pod(pname)
        self.lost_nodes = getattr(self, "lost_nodes", 0) + 1

    # the Job controller ------------------------------------------------------------------------------------
    def _pfp_action(self, job: dict, pod: dict) -> str | None:
        code = self.exit_code(pod)
        for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
            if "onExitCodes" in rule and code in rule["onExitCodes"]["values"]:
                return rule["action"]
        return None

    def tick_job(self, job: dict) -> None:
        key = ("jobs", job["metadata"]["name"])
        spec, status = job["spec"], job["status"]
        if spec.get("suspend") or any(c["type"] in ("Complete", "Failed") for c in status.get("conditions") or []):
            return
        indexed = spec.get("completionMode") == "Indexed"
        count = spec.get("completions") or 1
        failures = status.setdefault("_failures", {})
        done = status.setdefault("_done", [])
        failed_indexes = status.setdefault("_failedIndexes", [])
        for pod in self.owned_pods(key):
            i = int(pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])
            if pod["status"]["phase"] == "Succeeded":
                done.append(i) if i not in done else None
                self._remove_pod(pod["metadata"]["name"])
            elif pod["status"]["phase"] == "Failed" and not pod.get("counted"):
                pod["counted"] = True  # failed pods stay (with their exit code) until the Job is deleted
                action = self._pfp_action(job, pod)
                if action == "FailJob":
                    return self._finish_job(job, "Failed", "PodFailurePolicy", "matched a FailJob rule")
                failures[i] = failures.get(i, 0) + 1
                limit = spec["backoffLimitPerIndex"] if indexed else spec.get("backoffLimit", 6)
                if action == "FailIndex" or failures[i] > limit:
                    failed_indexes.append(i)
        status["failed"] = sum(failures.values())
        if failed_indexes:
            return self._finish_job(job, "Failed", "FailedIndexes" if indexed else "BackoffLimitExceeded",
                                    "Job has failed indexes" if indexed else "Job has reached the specified backoff limit")
        if len(done) == count:
            return self._finish_job(job, "Complete", "", "")
        live = [p for p in self.owned_pods(key) if p["status"]["phase"] != "Failed"]
        running = {int(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]) for p in live}
        for i in range(count):
            if i not in done and i not in running:
                self._new_pod(f"{key[1]}-{i}-{failures.get(i, 0)}", key, spec["template"], "Never",
                              {"batch.kubernetes.io/job-completion-index": str(i)})
        status["active"] = sum(1 for p in self.owned_pods(key) if p["status"]["phase"] != "Failed")
        status["startTime"] = T0
        status["ready"] = sum(1 for p in self.owned_pods(key) if p["status"]["phase"] == "Running")

    def _finish_job(self, job: dict, type_: str, reason: str, message: str) -> None:
        job["status"]["conditions"] = [_cond(type_, reason, message)]
        job["status"]["_finishedAt"] = self.now
        for pod in self.owned_pods(("jobs", job["metadata"]["name"])):
            if pod["status"]["phase"] != "Failed":
                self._remove_pod(pod["metadata"]["name"])  # a finished Job's running pods are terminated

    # the driver Job ----------------------------------------------------------------------------------------
    def run_driver(self, job_name: str, drive: Callable[[], tuple[int, str]]) -> dict:
        """One pod of the chart's driver Job, its container being the real driver run in-process (so the kubelet
        leaves it alone): its exit code and log tail become the terminated state (terminationMessagePolicy
        FallbackToLogsOnError), then the Job's podFailurePolicy and backoffLimit decide the Job's fate."""
        key = ("jobs", job_name)
        job = self.get(*key)
        pod = self._new_pod(f"{job_name}-{len(self.owned_pods(key))}", key, job["spec"]["template"], "Never",
                            {"batch.kubernetes.io/job-name": job_name, "job-name": job_name})
        cname = pod["spec"]["containers"][0]["name"]
        pod["status"].update(phase="Running", containerStatuses=[{**self._cs(pod), "ready": True,
                                                                 "state": {"running": {}}}])
        job["status"].update(active=1, startTime=T0)
        code, log = drive()
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["containerStatuses"][0].update(ready=False, state={"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": log[-2048:]}})
        status = job["status"]
        status["active"] = 0
        if code == 0:
            status["succeeded"] = 1
            status["conditions"] = [_cond("Complete")]
            return pod
        status["failed"] = status.get("failed", 0) + 1
        if self._pfp_action(job, pod) == "FailJob":
            status["conditions"] = [_cond("Failed", "PodFailurePolicy", f"Container {cname} for pod "
                                          f"{self.ns}/{pod['metadata']['name']} failed with exit code {code} "
                                          "matching FailJob rule")]
        elif status["failed"] > job["spec"].get("backoffLimit", 6):
            status["conditions"] = [_cond("Failed", "BackoffLimitExceeded",
                                          "Job has reached the specified backoff limit")]
        return pod

    # the training operator v1.9 ----------------------------------------------------------------------------
    def tick_pytorchjob(self, job: dict) -> None:
        key = ("pytorchjobs", job["metadata"]["name"])
        spec, status = job["spec"], job["status"]
        conds = status.setdefault("conditions", [_cond("Created", "PyTorchJobCreated")])
        if spec["runPolicy"].get("suspend") or any(c["type"] in ("Succeeded", "Failed") for c in conds):
            return
        pods = {p["metadata"]["name"]: p for p in self.owned_pods(key)}
        for rtype, r in spec["pytorchReplicaSpecs"].items():
            for i in range(r["replicas"]):
                name = f"{key[1]}-{rtype.lower()}-{i}"
                pod = pods.get(name)
                if pod is None:  # missing (never created, or gone with its node): create it
                    self._new_pod(name, key, r["template"], r["restartPolicy"],
                                  {"training.kubeflow.org/replica-type": rtype.lower()})
                    continue
                if pod["status"]["phase"] == "Failed":  # pod.go: retryable -> delete (recreated next sync)
                    code = self.exit_code(pod)
                    if r["restartPolicy"] in ("OnFailure", "Always") or (
                            r["restartPolicy"] == "ExitCode" and code is not None and code >= 128):
                        self._remove_pod(name)
                        conds[:] = [_cond("Created"), _cond("Restarting", "PyTorchJobRestarting",
                                                            f"PyTorchJob {key[1]} is restarting")]
                    else:
                        return self._finish_pytorchjob(job, "PyTorchJobFailed",
                                                       f"PyTorchJob {key[1]} is failed because 1 {rtype} replica(s) failed.")
        limit = spec["runPolicy"].get("backoffLimit")
        running = [p for p in self.owned_pods(key) if p["status"]["phase"] == "Running"]
        if limit is not None and sum(self.restarts(p) for p in running) >= max(limit, 1):  # core.PastBackoffLimit
            return self._finish_pytorchjob(job, "PyTorchJobFailed",
                                           f"Job {key[1]} has failed because it has reached the specified backoff limit")
        master = pods.get(f"{key[1]}-master-0")
        if master is not None and master["status"]["phase"] == "Succeeded":
            conds[:] = [_cond("Created"), _cond("Succeeded", "PyTorchJobSucceeded")]
            status["_finishedAt"] = self.now
            self._clean(job, key)
        elif master is not None and master["status"]["phase"] == "Running" and master["node"] is not None:
            # Running means the Master runs (training operator v1.9.4 pkg/controller.v1/pytorch/
            # pytorchjob_controller.go:384-387), whatever the Workers do
            conds[:] = [_cond("Created"), _cond("Running", "PyTorchJobRunning")]

    def _finish_pytorchjob(self, job: dict, reason: str, message: str) -> None:
        job["status"]["conditions"] = [_cond("Created"), _cond("Failed", reason, message)]
        job["status"]["_finishedAt"] = self.now
        self._clean(job, ("pytorchjobs", job["metadata"]["name"]))

    def _clean(self, job: dict, key: tuple[str, str]) -> None:
        policy = job["spec"]["runPolicy"].get("cleanPodPolicy", "None")
        for pod in self.owned_pods(key):
            if policy == "All" or (policy == "Running" and pod["status"]["phase"] in ("Running", "Pending")):
                self._remove_pod(pod["metadata"]["name"])

    # Trainer v2 + JobSet -----------------------------------------------------------------------------------
    def _trainjob_pod(self, tj: dict) -> dict:
        """The node pod template: the runtime's, with the trainer fields and every runtime patch applied in order as
        Trainer v2.3.0 does (pkg/runtime/core/trainingruntime.go:251-280, strategic merge patches of the JobSet spec:
        nodeSelector maps merge, volumes merge by name, tolerations are replaced)."""
        rt = self.get("trainingruntimes", tj["spec"]["runtimeRef"]["name"])
        node = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        pod = copy.deepcopy(node)
        pod.setdefault("metadata", {})
        c = pod["spec"]["containers"][0]
        t = tj["spec"]["trainer"]
        c.update({k: t[k] for k in ("image", "command", "args", "env") if k in t})
        if "resourcesPerNode" in t:
            c["resources"] = t["resourcesPerNode"]
        for patch in tj["spec"].get("runtimePatches") or []:
            rj = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
            pod["metadata"].setdefault("labels", {}).update((rj.get("metadata") or {}).get("labels") or {})
            ps = rj.get("spec") or {}
            for k in ("nodeSelector",):
                if k in ps:
                    pod["spec"][k] = {**(pod["spec"].get(k) or {}), **ps[k]}
            if ps.get("tolerations"):  # no merge key: a strategic merge patch replaces the list whole
                pod["spec"]["tolerations"] = list(ps["tolerations"])
            if "volumes" in ps:  # listType=map keyed by name: merge
                by = {v["name"]: v for v in pod["spec"]["volumes"]}
                by.update({v["name"]: {**by.get(v["name"], {}), **v} for v in ps["volumes"]})
                pod["spec"]["volumes"] = list(by.values())
        return pod

    def tick_trainjob(self, tj: dict) -> None:
        key = ("trainjobs", tj["metadata"]["name"])
        spec, status = tj["spec"], tj["status"]
        conds = status.setdefault("conditions", [])
        rt = self.get("trainingruntimes", spec["runtimeRef"]["name"])
        js = rt["spec"]["template"]["spec"]
        jobset = ("jobsets", key[1])
        if any(c["type"] == "Failed" for c in conds) and jobset not in self.objects:
            # Trainer v2.3.0 pkg/controller/trainjob_controller.go:100 drops the Failed condition on every reconcile
            # (kept only for DeadlineExceeded, :246-252), so :107-108 apply the runtime's objects again: a failed
            # TrainJob whose JobSet is gone (its TTL) gets a new JobSet and its gang runs again.
            conds[:] = [c for c in conds if c["type"] != "Failed" or c.get("reason") == "DeadlineExceeded"]
            status.update(_restarts=0, _started=False)
            for p in self.owned_pods(key):
                self._remove_pod(p["metadata"]["name"])
        if spec.get("suspend") or any(c["type"] in ("Complete", "Failed") for c in conds):
            return
        # The JobSet Trainer applies (owned by the TrainJob) with the runtime's ttlSecondsAfterFinished, which JobSet
        # v0.12.0 honours (pkg/controllers/ttl_after_finished.go:47-91: deleted that long after it finished).
        if jobset not in self.objects:
            self.objects[jobset] = {"metadata": {"name": key[1], "uid": f"uid-{next(self.uids)}", "ownerReferences": [
                {"kind": "TrainJob", "name": key[1], "uid": tj["metadata"]["uid"], "controller": True}]},
                "spec": {"ttlSecondsAfterFinished": js.get("ttlSecondsAfterFinished")}, "status": {}}
        node_job = js["replicatedJobs"][0]["template"]["spec"]
        nodes = spec["trainer"]["numNodes"]
        restarts = status.setdefault("_restarts", 0)
        pods = self.owned_pods(key)
        failed = [p for p in pods if p["status"]["phase"] == "Failed"]
        lost = len(pods) < nodes and status.get("_started")  # a node pod vanished with its node
        if failed or lost:
            # the node Job fails (backoffLimit 0); podFailurePolicy decides the reason JobSet's rules match
            reason = "BackoffLimitExceeded"
            for p in failed:
                if self._pfp_action({"spec": node_job}, p) == "FailJob":
                    reason = "PodFailurePolicy"
            rule = next((r for r in js["failurePolicy"].get("rules") or []
                         if not r.get("onJobFailureReasons") or reason in r["onJobFailureReasons"]), None)
            action = rule["action"] if rule else "RestartJobSet"
            for p in pods:
                self._remove_pod(p["metadata"]["name"])
            if action == "FailJobSet" or restarts >= js["failurePolicy"].get("maxRestarts", 0):
                conds[:] = [_cond("Failed", "JobSetFailed" if action != "FailJobSet" else "FailedJobs",
                                  f"jobset failed: {reason} (restarts {restarts})")]
                self.objects[jobset]["status"]["_finishedAt"] = self.now
                return
            status["_restarts"] = restarts + 1
            status["_started"] = False
            return
        if pods and all(p["status"]["phase"] == "Succeeded" for p in pods) and len(pods) == nodes:
            conds[:] = [_cond("Complete", "JobSetCompleted")]
            status["_finishedAt"] = self.now
            self.objects[jobset]["status"]["_finishedAt"] = self.now
            return
        if not pods:
            template = self._trainjob_pod(tj)
            for i in range(nodes):
                self._new_pod(f"{key[1]}-node-0-{i}-r{status['_restarts']}", key, template, "Never",
                              {"jobset.sigs.k8s.io/restart-attempt": str(status["_restarts"])})
            status["_started"] = True
        status["jobsStatus"] = [{"name": "node", "active": sum(1 for p in self.owned_pods(key)
                                                               if p["status"]["phase"] == "Running")}]

    # TTL ---------------------------------------------------------------------------------------------------
    def tick_ttl(self) -> None:
        for (resource, name), obj in list(self.objects.items()):
            done_at = obj.get("status", {}).get("_finishedAt")
            spec = obj.get("spec") or {}
            ttl = (spec.get("ttlSecondsAfterFinished") if resource in ("jobs", "jobsets")
                   else (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished"))
            if done_at is not None and ttl is not None and self.now - done_at >= ttl:
                self.delete(resource, name)


class SimBatch:
    def __init__(self, c: SimCluster) -> None:
        self.c = c

    def read_namespaced_job(self, name, namespace, **kwargs):
        self.c.calls.append(("batch", "jobs", "get"))
        return _model(self.c.get("jobs", name), "V1Job")

    def create_namespaced_job(self, namespace, body, **kwargs):
        self.c.calls.append(("batch", "jobs", "create"))
        obj = self.c.put("jobs", body)
        self.c.creates.append(obj["metadata"]["name"])
        return _model(obj, "V1Job")

    def list_namespaced_job(self, namespace, **kwargs):
        self.c.calls.append(("batch", "jobs", "list"))
        return _model({"items": self.c.listed("jobs", kwargs.get("label_selector"))}, "V1JobList")


class SimCustom:
    def __init__(self, c: SimCluster) -> None:
        self.c = c

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.c.calls.append((group, plural, "get"))
        return copy.deepcopy(self.c.get(plural, name))

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.c.calls.append((group, plural, "create"))
        if plural not in self.c.crds:
            raise ApiException(status=404, reason=f"no {plural}")
        obj = self.c.put(plural, body)
        self.c.creates.append(obj["metadata"]["name"])
        return copy.deepcopy(obj)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.c.calls.append((group, plural, "delete"))
        self.c.get(plural, name)  # 404 if absent
        self.c.delete(plural, name)
        return {"kind": "Status", "status": "Success"}

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        self.c.calls.append((group, plural, "list"))
        return {"items": copy.deepcopy(self.c.listed(plural, kwargs.get("label_selector")))}


class SimCore:
    def __init__(self, c: SimCluster) -> None:
        self.c = c

    def list_namespaced_pod(self, namespace, **kwargs):
        self.c.calls.append(("", "pods", "list"))
        sel = kwargs.get("label_selector")
        items = [{"metadata": {k: v for k, v in p["metadata"].items() if k in ("name", "labels", "deletionTimestamp")},
                  "spec": {"nodeName": p["node"], "containers": [{"name": c["name"], "image": c.get("image", "")}
                                                                 for c in p["spec"]["containers"]]},
                  "status": p["status"]} for p in self.c.pods.values() if _matches(p["metadata"]["labels"], sel)]
        return _model({"items": items}, "V1PodList")

    def list_namespaced_config_map(self, namespace, **kwargs):
        self.c.calls.append(("", "configmaps", "list"))
        return _model({"items": self.c.listed("configmaps", kwargs.get("label_selector"))}, "V1ConfigMapList")

    def read_namespaced_secret(self, name, namespace, **kwargs):
        self.c.calls.append(("", "secrets", "get"))
        return _model(self.c.get("secrets", name), "V1Secret")
