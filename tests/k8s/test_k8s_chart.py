"""The Helm chart: lint, template, dry-run install, schema errors, labels, RBAC, and the pipeline ConfigMap."""

from __future__ import annotations

import json

import pytest
import yaml
from k8s_support import CHART, RELEASE, VALUES_FILES
from k8s_support import docs_of

from sims_platform.cli import main as sims_main
from sims_platform.k8s.chart_schema import with_pipeline, with_stages

ALL_VALUES = (None, *VALUES_FILES)


@pytest.mark.parametrize("values", ALL_VALUES)
def test_helm_lint(helm, values):
    extra = ["-f", values] if values else []
    out = helm("lint", "--strict", "charts/sims", *extra).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("values", ALL_VALUES)
def test_every_object_is_labelled(rendered, values):
    docs = docs_of(rendered(values))
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"}
    for d in docs:
        labels = d["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/version", "app.kubernetes.io/component", "sims.io/run"):
            assert key in labels, f"{d['kind']} {d['metadata']['name']} lacks label {key}"


def test_install_dry_run_from_repo_root(helm):
    out = helm("install", "--dry-run=client", RELEASE, "charts/sims", "-f", "values-imagenet512.yaml").stdout
    assert "kind: PersistentVolumeClaim" not in out  # S3 storage: no PVC
    assert "kubectl -n default get pytorchjobs,jobs,pods -l sims.io/run=imagenet512-edm2-s" in out  # NOTES
    assert "sims status imagenet512-edm2-s" in out and "http://mlflow.mlflow.svc:5000" in out


@pytest.mark.parametrize("bad, field", [
    (["--set", "stages.train-base.gpus=-1"], "/stages/train-base/gpus"),
    (["--set", "queue=Not_A_Queue"], "/queue"),
    (["--set", "pipeline.train_base.distributed.zero_stage=4"], "/pipeline/train_base/distributed/zero_stage"),
    (["--set", "pipeline.train_base.imagez=3"], "/pipeline/train_base"),     # a pipeline key the schema lacks
    (["--set", "pipeline.evaluate.repeats=0"], "/pipeline/evaluate/repeats"),
    (["--set", "stages.sampling.shards=2"], "/stages"),
])
def test_wrong_value_fails_install_naming_the_field(helm, bad, field):
    proc = helm("template", RELEASE, "charts/sims", *bad, check=False)
    assert proc.returncode != 0
    assert f"at '{field}'" in proc.stderr, proc.stderr


def test_values_schema_pipeline_matches_pipeline_config():
    """values.schema.json embeds PipelineConfig's JSON schema (regenerate: python -m sims_platform.k8s.chart_schema)."""
    on_disk = json.loads((CHART / "values.schema.json").read_text())
    assert on_disk == with_pipeline(on_disk), "run: python -m sims_platform.k8s.chart_schema"


def test_values_schema_stages_are_the_stage_tables_steps(helm):
    """The chart's `stages:` accepts every step of the stage table and nothing else (generated from the table)."""
    from sims_platform.steps import STAGE_NAMES

    on_disk = json.loads((CHART / "values.schema.json").read_text())
    assert on_disk == with_stages(on_disk), "run: python -m sims_platform.k8s.chart_schema"
    assert list(on_disk["properties"]["stages"]["properties"]) == list(STAGE_NAMES)
    proc = helm("template", RELEASE, "charts/sims", "--set", "stages.no-such-stage.shards=2", check=False)
    assert proc.returncode != 0 and "no-such-stage" in proc.stderr, proc.stderr


@pytest.mark.parametrize("values", ALL_VALUES)
def test_configmap_pipeline_is_accepted_by_sims_validate(rendered, values, tmp_path, capsys):
    cms = [d for d in docs_of(rendered(values)) if d["kind"] == "ConfigMap"]
    assert len(cms) == 1
    path = tmp_path / "pipeline.yaml"
    path.write_text(cms[0]["data"]["pipeline.yaml"])
    assert sims_main(["validate", str(path)]) == 0, capsys.readouterr().err
    # the chart adds nothing to the user's pipeline mapping
    values_doc = yaml.safe_load((CHART.parent.parent / values).read_text()) if values else \
        yaml.safe_load((CHART / "values.yaml").read_text())
    assert yaml.safe_load(cms[0]["data"]["pipeline.yaml"]) == values_doc["pipeline"]


def test_imagenet_values_configure_the_latent_run(rendered):
    cm = next(d for d in docs_of(rendered("values-imagenet512.yaml")) if d["kind"] == "ConfigMap")
    p = yaml.safe_load(cm["data"]["pipeline.yaml"])
    assert p["network"]["preset"].startswith("edm2-") and p["encoder"]["kind"] == "latent"
    assert p["encoder"]["vae"].startswith("s3://") and len(p["encoder"]["vae_sha256"]) == 64  # pinned, no hub
    assert p["data"]["source"] == "webdataset" and p["data"]["path"].startswith("s3://")
    assert p["storage"]["root"].startswith("s3://") and p["tracking"]["uri"].startswith("http")
    d = yaml.safe_load(cm["data"]["driver.yaml"])
    assert "zeroStage" not in d and d["stages"]["train-base"]["gpus"] == 8 and d["queue"]
    assert p["train_base"]["distributed"]["backend"] in ("plain", "deepspeed")  # the ZeRO stage lives here
    assert d["s3Secret"] == "sims-s3"


def test_driver_job_and_security(rendered):
    docs = docs_of(rendered("values-digits-dev.yaml"))
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["sims"] and c["args"][:2] == ["k8s", "drive"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]  # the driver itself is not queued
    mlflow = [d for d in docs if d["metadata"]["name"].endswith("-mlflow")]
    assert {d["kind"] for d in mlflow} == {"Deployment", "Service", "PersistentVolumeClaim"}


def test_no_secret_in_configmaps_or_command_lines(rendered):
    for values in ALL_VALUES:
        text = rendered(values)
        assert "kind: Secret" not in text
        for word in ("AWS_SECRET_ACCESS_KEY", "password"):
            assert word not in text


def test_mlflow_servers_run_the_clients_major_version():
    """The chart's in-release server and k8s/mlflow's shared one speak the client's protocol (same major)."""
    import re

    import yaml as _yaml
    from k8s_support import REPO

    client = re.search(r"^mlflow==(\d+)\.", (REPO / "constraints-dev.txt").read_text(), re.M).group(1)
    chart = _yaml.safe_load((REPO / "charts/sims/values.yaml").read_text())["mlflow"]["server"]["image"]
    shared = re.search(r"image: (ghcr.io/mlflow/mlflow:\S+)", (REPO / "k8s/mlflow/server.yaml").read_text()).group(1)
    for image in (chart, shared):
        assert re.fullmatch(rf"ghcr.io/mlflow/mlflow:v{client}\.\d+\.\d+", image), (image, client)
    assert chart == shared


def test_docs_name_what_the_chart_renders(helm):
    """docs/kubernetes.md's object names, driver rights and policies are the ones the chart renders."""
    import re

    from k8s_support import REPO, docs_of

    doc = (REPO / "docs/kubernetes.md").read_text()
    text = helm("template", "sims-run", "charts/sims", "-f", "values-imagenet512.yaml", "--set",
                "training.backend=trainjob").stdout
    objs = docs_of(text)
    by = {(d["kind"], d["metadata"]["name"]) for d in objs}
    assert ("Job", "sims-run-driver-r1") in by and "`sims-run-driver-r1`" in doc
    assert ("TrainingRuntime", "sims-run-torch") in by and "`sims-run-torch`" in doc
    assert ("Role", "sims-run-status") in by and "`sims-run-status`" in doc
    assert ("LocalQueue", "sims-gpu") in by and "LocalQueue `queue`" in doc
    (cm,) = [n for k, n in by if k == "ConfigMap"]
    assert re.fullmatch(r"sims-run-config-[0-9a-f]{8}", cm) and "`<fullname>-config-<hash>`" in doc
    role = next(d for d in objs if d["kind"] == "Role" and d["metadata"]["name"] == "sims-run-driver")
    for rule in role["rules"]:
        assert f"`{','.join(rule['verbs'])}`" in doc, rule
    assert "restartPolicy: ExitCode" not in doc and "needs no action" not in doc
    assert "node.kubernetes.io/out-of-service" in doc and "| A config error (exit 2) |" in doc
