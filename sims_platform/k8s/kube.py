"""The three Kubernetes API clients the k8s layer uses, how to connect, and how to read their errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from sims_platform.config import ConfigError


@dataclass
class Apis:
    """BatchV1Api, CustomObjectsApi and CoreV1Api (or fakes with the same methods, in tests)."""

    batch: Any
    custom: Any
    core: Any


class NoCredentials(ConfigError):
    """Neither a pod's ServiceAccount nor a usable kubeconfig: nothing to talk to the cluster with."""


def connect() -> Apis:
    """In a pod: the ServiceAccount's token; elsewhere: the current kubeconfig context. Without either,
    NoCredentials says where credentials are looked for and what to do (the CLI prints it as one line)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            where = os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise NoCredentials(
                f"no Kubernetes cluster credentials: not in a pod (no in-cluster ServiceAccount) and no usable "
                f"kubeconfig at {where} ({err}); set KUBECONFIG to your cluster's kubeconfig file or select a "
                "context with `kubectl config use-context`") from None
    return Apis(batch=client.BatchV1Api(), custom=client.CustomObjectsApi(), core=client.CoreV1Api())


def current_namespace(default: str = "default") -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else default."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or default
    except OSError:
        pass
    try:
        from kubernetes import config

        _, ctx = config.list_kube_config_contexts()
        return (ctx or {}).get("context", {}).get("namespace") or default
    except Exception:  # no kubeconfig: the default is the answer
        return default


def to_dict(obj: Any) -> dict[str, Any]:
    """A client model (V1Job, ...) or a dict from CustomObjectsApi, as a plain camelCase dict."""
    if isinstance(obj, dict):
        return obj
    return ApiClient().sanitize_for_serialization(obj)


def is_not_found(err: BaseException) -> bool:
    return isinstance(err, ApiException) and err.status == 404


def is_conflict(err: BaseException) -> bool:
    return isinstance(err, ApiException) and err.status == 409


def is_temporary(err: BaseException) -> bool:
    """Worth retrying: throttled, server-side or network trouble (not 4xx user errors)."""
    if isinstance(err, ApiException):
        return err.status in (0, 429) or (err.status or 0) >= 500
    from urllib3.exceptions import HTTPError

    return isinstance(err, (ConnectionError, TimeoutError, OSError, HTTPError))
