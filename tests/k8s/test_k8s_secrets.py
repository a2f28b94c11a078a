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
