"""`helm install` refuses a URI that carries credentials anywhere in the values, before any manifest holds it."""

from __future__ import annotations

import pytest

from k8s_support import RELEASE

SECRET = "hunter2"


@pytest.mark.parametrize("key,uri", [
    ("mlflow.trackingUri", f"https://bob:{SECRET}@mlflow.example.com"),
    ("pipeline.tracking.uri", f"https://bob:{SECRET}@mlflow.example.com"),
    ("pipeline.data.path", f"s3://bucket/imagenet?X-Amz-Signature={SECRET}"),
])
def test_values_with_credentials_in_a_uri_render_nothing(helm, key, uri):
    proc = helm("template", RELEASE, "charts/sims", "-f", "values-imagenet512.yaml", "--set", f"{key}={uri}",
                check=False)
    assert proc.returncode != 0
    assert "/" + key.replace(".", "/") in proc.stderr  # the field is named
    assert SECRET not in proc.stdout


def test_ordinary_values_still_render(helm):
    proc = helm("template", RELEASE, "charts/sims", "-f", "values-imagenet512.yaml",
                "--set", "mlflow.trackingUri=https://mlflow.example.com:5000")
    assert "mlflow.example.com" in proc.stdout


def _protected(helm, *sets: str) -> list[dict]:
    from k8s_support import docs_of

    from sims_platform.k8s.render import render_objects

    text = helm("template", RELEASE, "charts/sims", "-f", "values-digits-dev.yaml", "--set", "mlflow.server.enabled=true",
                "--set", "mlflow.auth.secretName=mlflow-auth", *(a for s in sets for a in ("--set", s))).stdout
    return docs_of(text) + render_objects(text)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_mlflow_server_admits_only_the_releases_pods_and_clients_authenticate(helm, backend):
    from k8s_support import K8S_VERSIONS, containers, validate_strictly

    objs = _protected(helm, f"training.backend={backend}")
    for obj in objs:
        validate_strictly(obj, K8S_VERSIONS[-1])
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
    server = next(o for o in objs if o["kind"] == "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed == {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "sims"}
    clients = [o for o in objs if o["kind"] in ("Job", "PyTorchJob", "TrainingRuntime")]
    assert {o["kind"] for o in clients} >= {"Job"}
    for obj in clients:
        spec = obj["spec"]
        if obj["kind"] == "TrainingRuntime":
            pods = [j["template"]["spec"]["template"]["spec"] for j in spec["template"]["spec"]["replicatedJobs"]]
            ctrs = [c for p in pods for c in p["containers"]]
        else:
            ctrs = containers(obj)
        for c in ctrs:
            # every pod that talks to MLflow: its labels pass the policy, its credentials come from the Secret
            assert any((e.get("secretRef") or {}).get("name") == "mlflow-auth" for e in c.get("envFrom") or []), \
                (obj["metadata"]["name"], c["name"])
            assert not any(e["name"].startswith("MLFLOW_TRACKING_") and e["name"] != "MLFLOW_TRACKING_URI"
                           for e in c.get("env") or [])
    for obj in (o for o in objs if o["kind"] in ("Job", "PyTorchJob")):
        labels = next(t for t in [obj["spec"].get("template")] + [r["template"] for r in (
            obj["spec"].get("pytorchReplicaSpecs") or {}).values()] if t)["metadata"]["labels"]
        assert allowed.items() <= labels.items(), obj["metadata"]["name"]


def test_the_network_policy_can_be_switched_off(helm):
    assert not [o for o in _protected(helm, "mlflow.server.networkPolicy.enabled=false") if o["kind"] == "NetworkPolicy"]
