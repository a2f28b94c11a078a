"""Helpers shared by the k8s tests: paths, YAML documents, and the real `sims` parser with `k8s` registered."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "sims"
VALUES_FILES = ("values-imagenet512.yaml", "values-digits-dev.yaml")
RELEASE = "sims-run"
# Chart.yaml's kubeVersion floor (1.31: podFailurePolicy GA, backoffLimitPerIndex beta and on by default) and
# a current release; kubernetes-validate 1.37.0 ships strict schemas for both.
K8S_VERSIONS = ("1.31.0", "1.35.0")
BACKENDS = ("pytorchjob", "trainjob")


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def sims_parser() -> argparse.ArgumentParser:
    """sims_platform.cli.build_parser(), plus sims_platform.k8s.cli.register if the lead has not wired it yet."""
    from sims_platform.cli import build_parser
    from sims_platform.k8s.cli import register

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "k8s" not in sub.choices:
        register(sub)
    return parser


def containers(obj: dict) -> list[dict]:
    """Every container of a Job, a PyTorchJob (all replicas) or a Deployment."""
    spec = obj.get("spec") or {}
    templates = [r["template"] for r in (spec.get("pytorchReplicaSpecs") or {}).values()]
    if "template" in spec:
        templates.append(spec["template"])
    return [c for t in templates for c in t["spec"]["containers"]]


def validate_strictly(obj: dict, version: str) -> None:
    """Raise if obj is not strictly valid: core objects against Kubernetes `version`'s OpenAPI schema, TrainJob and
    TrainingRuntime against the Trainer v2.3.0 CRDs, LocalQueue against Kueue v0.19.2's, a PyTorchJob's pod
    templates as core PodTemplates."""
    import kubernetes_validate
    from crd_schema import validate_custom

    if obj["apiVersion"].startswith(("trainer.kubeflow.org/", "kueue.x-k8s.io/")):
        validate_custom(obj)
    elif obj["kind"] == "PyTorchJob":  # the kubeflow-training models check the CR; its pod templates are core
        for i, r in enumerate(obj["spec"]["pytorchReplicaSpecs"].values()):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {
                "name": f"{obj['metadata']['name']}-{i}"}, "template": r["template"]}, version, strict=True)
    else:
        kubernetes_validate.validate(obj, version, strict=True)
