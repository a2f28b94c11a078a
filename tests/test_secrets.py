"""Credentials never sit in a URI: every config field, the driver settings and MLFLOW_TRACKING_URI refuse one,
naming the field and never echoing the secret, so no run.json, MLflow param, artifact or stdout can hold it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sims_platform.cli import main
from sims_platform.config import ConfigError
from sims_platform.config.secrets import credential_in
from sims_platform.k8s.settings import settings_from_dict

SECRET = "hunter2"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,uri", [
    ("tracking.uri", f"https://bob:{SECRET}@mlflow.example.com"),
    ("data.path", f"s3://AKIAEXAMPLE:{SECRET}@bucket/imagenet"),
    ("storage.root", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"),
    ("encoder.vae", f"https://bucket.s3.amazonaws.com/vae?X-Amz-Signature={SECRET}&X-Amz-Expires=60"),
    ("pretrained.base", f"https://host.example.com/edm2.pkl?sig={SECRET}"),
])
def test_validate_refuses_a_uri_with_credentials_naming_the_field(field, uri, capsys):
    assert main(["validate", "pipelines/digits.yaml", "--set", f"{field}={uri}"]) == 2
    out = capsys.readouterr()
    assert f"  {field}: the URI carries" in out.err
    assert "environment" in out.err  # says where credentials go instead
    assert SECRET not in out.err + out.out


def test_a_run_with_credentials_in_a_uri_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["run", "--config", "pipelines/quick.yaml", "--out", str(out_dir),
                 "--set", f"tracking.uri=https://bob:{SECRET}@mlflow.example.com"])
    assert code == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert not out_dir.exists()  # no run.json, pipeline.yaml or MLflow store was started


def test_mlflow_tracking_uri_from_the_environment_is_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{SECRET}@mlflow.example.com")
    out_dir = tmp_path / "run"
    assert main(["run", "--config", "pipelines/quick.yaml", "--out", str(out_dir)]) == 2
    captured = capsys.readouterr()
    assert "MLFLOW_TRACKING_URI: the URI carries a user name or password" in captured.err
    assert SECRET not in captured.out + captured.err
    assert not (out_dir / "run.json").exists()


def test_driver_settings_refuse_credentials():
    settings = {"release": "r", "image": "sims:dev", "configMap": "c",
                "mlflowUri": f"https://bob:{SECRET}@mlflow.example.com"}
    with pytest.raises(ConfigError) as err:
        settings_from_dict(settings)
    assert "mlflow_uri: the URI carries" in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("uri", ["s3://bucket/prefix", "https://mlflow.example.com:5000", "file:///data/x",
                                 "stabilityai/sd-vae-ft-mse", "http://127.0.0.1:9000/bucket?list-type=2",
                                 "image@sha256:abcd"])
def test_ordinary_uris_pass(uri):
    assert credential_in(uri) is None
