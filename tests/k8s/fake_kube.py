"""A fake Kubernetes API: exactly the client methods the k8s layer calls, with scripted status transitions.

Each created workload follows a script: a list of statuses, one more per read (the last one repeats). The
special entry DELETE removes the object at that read (a user's `kubectl delete`). Every call is recorded as
(apiGroup, resource, verb) so the tests can check the chart's Role covers it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

DELETE = "DELETE"
T0 = "2026-11-01T10:00:00Z"


def cond(type_: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T0}


JOB_OK = [{}, {"active": 1, "ready": 1, "startTime": T0},
          {"succeeded": 1, "startTime": T0, "completionTime": T0, "conditions": [cond("Complete")]}]
JOB_SUSPENDED = [{"conditions": [cond("Suspended", "JobSuspended", "Job suspended")]}] * 3 + JOB_OK[1:]
JOB_FAILED = [{"active": 1, "startTime": T0}, {"failed": 3, "startTime": T0, "conditions": [
    cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]}]
PTJ_OK = [{"conditions": [cond("Created")]}, {"conditions": [cond("Created"), cond("Running")]},
          {"conditions": [cond("Created"), cond("Succeeded", "PyTorchJobSucceeded")]}]
PTJ_SUSPENDED = [{"conditions": [cond("Created"), cond("Suspended", "PyTorchJobSuspended")]}] * 3 + PTJ_OK[1:]
PTJ_FAILED = [{"conditions": [cond("Created"), cond("Running")]}, {"conditions": [
    cond("Created"), cond("Failed", "PyTorchJobFailed", "PyTorchJob digits-i00-train-base is failed because 1 "
         "Master replica(s) failed.")]}]


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",")))


def _model(data: Any, klass: str) -> Any:
    return ApiClient()._ApiClient__deserialize(copy.deepcopy(data), klass)


class FakeCluster:
    def __init__(self, namespace: str = "default",
                 on_success: Callable[[dict[str, str]], None] | None = None) -> None:
        self.namespace = namespace
        self.objects: dict[tuple[str, str], dict] = {}   # (resource, name) -> object
        self.progress: dict[tuple[str, str], int] = {}
        self.scripts: dict[str, list] = {}                 # workload name -> script (else the default)
        self.pods: list[dict] = []
        self.config_maps: list[dict] = []
        self.calls: list[tuple[str, str, str]] = []
        self.creates: list[str] = []
        self.on_success = on_success
        self.batch, self.custom, self.core = FakeBatchV1Api(self), FakeCustomObjectsApi(self), FakeCoreV1Api(self)

    # -- driving the scripts ----------------------------------------------------
    def _check_ns(self, namespace: str) -> None:
        assert namespace == self.namespace, f"call in namespace {namespace}, expected {self.namespace}"

    def create(self, resource: str, body: Any) -> dict:
        body = ApiClient().sanitize_for_serialization(body)
        name = body["metadata"]["name"]
        if (resource, name) in self.objects:
            raise ApiException(status=409, reason=f"{resource} {name} already exists")
        obj = copy.deepcopy(body)
        obj["metadata"].update(creationTimestamp=T0, uid=f"uid-{len(self.creates)}")
        obj["status"] = {}
        self.objects[(resource, name)] = obj
        self.progress[(resource, name)] = 0
        self.creates.append(name)
        return obj

    def read(self, resource: str, name: str) -> dict:
        key = (resource, name)
        if key not in self.objects:
            raise ApiException(status=404, reason=f"{resource} {name} not found")
        default = JOB_OK if resource == "jobs" else PTJ_OK
        script = self.scripts.get(name, default)
        step = script[min(self.progress[key], len(script) - 1)]
        self.progress[key] += 1
        if step == DELETE:
            del self.objects[key]
            self.scripts.pop(name, None)  # a recreated workload runs the default script
            raise ApiException(status=404, reason=f"{resource} {name} not found")
        obj = self.objects[key]
        obj["status"] = copy.deepcopy(step)
        suspended = any(c["type"] == "Suspended" for c in step.get("conditions", []))
        if resource == "jobs":
            obj["spec"]["suspend"] = suspended  # what Kueue's webhook and admission do
        else:
            obj["spec"]["runPolicy"]["suspend"] = suspended
        if self.on_success and any(c["type"] in ("Complete", "Succeeded") for c in step.get("conditions", [])):
            self.on_success(obj["metadata"]["labels"])
        return obj

    def listed(self, resource: str, selector: str | None) -> list[dict]:
        return [o for (r, _), o in self.objects.items() if r == resource
                and _matches(o["metadata"].get("labels") or {}, selector)]


class FakeBatchV1Api:
    """kubernetes.client.BatchV1Api: the methods the driver and `sims status` call."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.c = cluster

    def read_namespaced_job(self, name, namespace, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append(("batch", "jobs", "get"))
        return _model(self.c.read("jobs", name), "V1Job")

    def create_namespaced_job(self, namespace, body, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append(("batch", "jobs", "create"))
        return _model(self.c.create("jobs", body), "V1Job")

    def list_namespaced_job(self, namespace, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append(("batch", "jobs", "list"))
        return _model({"items": self.c.listed("jobs", kwargs.get("label_selector"))}, "V1JobList")


class FakeCustomObjectsApi:
    """kubernetes.client.CustomObjectsApi (returns plain dicts, as the real one does)."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.c = cluster

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append((group, plural, "get"))
        return copy.deepcopy(self.c.read(plural, name))

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append((group, plural, "create"))
        assert body["apiVersion"] == f"{group}/{version}", body["apiVersion"]
        return copy.deepcopy(self.c.create(plural, body))

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append((group, plural, "delete"))
        if self.c.objects.pop((plural, name), None) is None:
            raise ApiException(status=404, reason=f"{plural} {name} not found")
        return {"kind": "Status", "status": "Success"}

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append((group, plural, "list"))
        return {"items": copy.deepcopy(self.c.listed(plural, kwargs.get("label_selector")))}


class FakeCoreV1Api:
    """kubernetes.client.CoreV1Api: pods (failure reasons, readiness) and the chart's ConfigMap."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.c = cluster

    def list_namespaced_pod(self, namespace, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append(("", "pods", "list"))
        sel = kwargs.get("label_selector")
        return _model({"items": [p for p in self.c.pods if _matches(p["metadata"]["labels"], sel)]}, "V1PodList")

    def list_namespaced_config_map(self, namespace, **kwargs):
        self.c._check_ns(namespace)
        self.c.calls.append(("", "configmaps", "list"))
        sel = kwargs.get("label_selector")
        items = [c for c in self.c.config_maps if _matches(c["metadata"].get("labels") or {}, sel)]
        return _model({"items": items}, "V1ConfigMapList")
