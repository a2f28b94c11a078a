"""Strict validation of custom resources against their CRDs' openAPIV3Schema (the Trainer v2.3.0 and Kueue v0.19.2
fixtures).

An API server prunes unknown fields and `kubectl apply --validate=strict` rejects them; jsonschema alone would
accept them, so every object schema without additionalProperties or x-kubernetes-preserve-unknown-fields is
closed here. CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

FIXTURES = Path(__file__).parent / "fixtures"
CRDS = {"TrainJob": "trainer-v2.3.0/trainer.kubeflow.org_trainjobs.yaml",
        "TrainingRuntime": "trainer-v2.3.0/trainer.kubeflow.org_trainingruntimes.yaml",
        "LocalQueue": "kueue-v0.19.2/kueue.x-k8s.io_localqueues.yaml"}
API_VERSIONS = {"TrainJob": "trainer.kubeflow.org/v1alpha1", "TrainingRuntime": "trainer.kubeflow.org/v1alpha1",
                "LocalQueue": "kueue.x-k8s.io/v1beta2"}


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str, version: str = "v1alpha1") -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((FIXTURES / CRDS[kind]).read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _closed(v["schema"]["openAPIV3Schema"])
    # metadata is an ObjectMeta the CRD leaves open; check the fields we set
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "ownerReferences": {"type": "array"}}, "additionalProperties": False}
    return jsonschema.Draft7Validator(schema)


def validate_custom(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError (with the path) if obj does not match its CRD strictly."""
    assert obj["apiVersion"] == API_VERSIONS[obj["kind"]], obj["apiVersion"]
    version = obj["apiVersion"].split("/")[1]
    errors = sorted(crd_validator(obj["kind"], version).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise jsonschema.ValidationError(f"{obj['kind']} {obj['metadata'].get('name')}: at "
                                         f"{'/'.join(map(str, e.absolute_path))}: {e.message}")
