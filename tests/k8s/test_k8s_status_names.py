"""`sims status` from a fake cluster and storage; deterministic DNS-1123 names; CLI registration."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fake_kube import PTJ_SUSPENDED, FakeCluster
from k8s_support import docs_of, sims_parser

from sims_platform.k8s.kube import Apis
from sims_platform.steps import Step
from sims_platform.k8s.names import MAX_NAME, is_dns_label, workload_name
from sims_platform.k8s.status import format_rows, run_status, status_rows
from sims_platform.k8s.render import run_specs
from sims_platform.storage.layout import RunLayout


def test_names_are_deterministic_short_dns_labels():
    assert workload_name("digits", Step(0, "train-base")) == "digits-i00-train-base"
    long = workload_name("a" * 60, Step(12, "evaluate-reduce"))
    assert long == workload_name("a" * 60, Step(12, "evaluate-reduce")) and len(long) <= MAX_NAME
    assert long.endswith(tuple(f"-i12-evaluate-reduce-{h}" for h in [long[-8:]]))
    assert workload_name("a" * 60, Step(12, "evaluate")) != workload_name("a" * 61, Step(12, "evaluate"))
    assert is_dns_label(workload_name("9lives", Step(0, "feed")))  # services need a leading letter
    assert is_dns_label(long + "-worker-99", 63)
    with pytest.raises(ValueError):
        workload_name("x", Step(-1, "feed"))


@pytest.fixture
def world(rendered, tmp_path):
    text = rendered("values-digits-dev.yaml").replace("root: /data/digits-dev", f"root: {tmp_path}/run")
    cm = next(d for d in docs_of(text) if d["kind"] == "ConfigMap")
    spec = run_specs(text)[0]
    cluster = FakeCluster(spec.settings.namespace)
    cluster.config_maps.append(cm)
    return spec, cluster, RunLayout.of(spec.cfg.storage.root), tmp_path


def test_status_table_from_cluster_and_storage(world):
    spec, cluster, layout, tmp = world
    from sims_platform.k8s.workloads import plan
    ws = {(w.iteration, w.step): w for w in plan(spec.cfg, spec.settings)}
    gen, aux = ws[(0, "generate")], ws[(0, "finetune-aux")]
    # train-base finished long ago (TTL deleted it; storage remembers), generate is running, finetune queued
    (tmp / "run").mkdir()
    (tmp / "run" / "run.json").write_text(json.dumps(
        {"mlflow_run_id": "abc", "tracking_uri": "http://mlflow:5000", "experiment_id": "7"}))
    marker = layout.done_marker(0, "train-base")[len("file://"):]
    import os
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").write(json.dumps({"mlflow_run_id": "r1", "result": {}}))
    cluster.create("jobs", gen.body)
    cluster.read("jobs", gen.name)
    cluster.read("jobs", gen.name)  # now running
    cluster.scripts[aux.name] = PTJ_SUSPENDED
    cluster.create("pytorchjobs", aux.body)
    cluster.read("pytorchjobs", aux.name)
    cluster.pods.append({"metadata": {"name": "p0", "labels": {"sims.io/run": "digits-dev", "sims.io/iteration": "0",
                                                               "sims.io/step": "generate"}},
                         "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    cluster.pods.append({"metadata": {"name": "p1", "labels": {"sims.io/run": "digits-dev", "sims.io/iteration": "0",
                                                               "sims.io/step": "generate"}}, "status": {}})
    now = dt.datetime(2026, 11, 1, 12, 30, tzinfo=dt.timezone.utc)
    rows, link = status_rows(Apis(cluster.batch, cluster.custom, cluster.core), "default", spec, now=now)
    assert link == "http://mlflow:5000/#/experiments/7/runs/abc"
    by = {(r.iteration, r.step): r for r in rows}
    assert by[(0, "train-base")].state == "Succeeded (storage)"
    assert by[(0, "train-base")].mlflow == "http://mlflow:5000/#/experiments/7/runs/r1"
    assert by[(0, "generate")].state == "Running" and by[(0, "generate")].pods == "1/2"
    assert by[(0, "generate")].age == "2h"
    assert by[(0, "finetune-aux")].state.startswith("Waiting (PyTorchJobSuspended")
    assert by[(0, "feed")].state == "-" and by[(0, "feed")].pods == "-"
    table = format_rows(rows)
    assert table.splitlines()[0].split() == ["ITER", "STAGE", "WORKLOAD", "STATE", "AGE", "PODS", "READY",
                                               "RESTARTS", "PROGRESS", "MLFLOW"]
    assert len(table.splitlines()) == len(ws) + 1


def test_status_of_unknown_run_says_where_it_looked(world):
    spec, cluster, _, _ = world
    from sims_platform.config import ConfigError
    with pytest.raises(ConfigError, match="sims.io/run=nope .* namespace default"):
        run_status(Apis(cluster.batch, cluster.custom, cluster.core), "default", "nope")


def test_cli_registration():
    p = sims_parser()
    assert p.parse_args(["k8s", "render", "-"]).file == "-"
    a = p.parse_args(["k8s", "drive", "--config", "/etc/sims/pipeline.yaml", "--settings", "/etc/sims/driver.yaml"])
    assert a.func.__name__ == "cmd_drive"
    a = p.parse_args(["status", "digits-dev", "-n", "sims"])
    assert (a.run, a.namespace, a.func.__name__) == ("digits-dev", "sims", "cmd_status")


@pytest.mark.parametrize("base", ["k8s/base", "k8s/kueue", "k8s/mlflow"])
def test_cluster_setup_bases_build(kubectl, base):
    import subprocess

    import kubernetes_validate
    from k8s_support import K8S_VERSIONS
    from k8s_support import REPO

    out = subprocess.run([str(kubectl), "kustomize", base], cwd=REPO, check=True, capture_output=True, text=True)
    docs = docs_of(out.stdout)
    assert docs
    for d in docs:
        if d["apiVersion"].startswith("kueue.x-k8s.io"):
            assert d["kind"] in ("ResourceFlavor", "ClusterQueue") and d["apiVersion"].endswith("/v1beta2")
            continue
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(d, v, strict=True)


def test_example_queue_matches_the_imagenet_values():
    import yaml

    from k8s_support import REPO
    queues = docs_of((REPO / "k8s/kueue/queues.yaml").read_text())
    cq = next(d for d in queues if d["kind"] == "ClusterQueue")
    assert not [d for d in queues if d["kind"] == "LocalQueue"]  # namespaced: the chart renders it per release
    values = yaml.safe_load((REPO / "values-imagenet512.yaml").read_text())
    assert values["kueue"]["clusterQueue"] == cq["metadata"]["name"] and values["kueue"]["localQueue"]["create"]
    assert values["priorityClassName"] == docs_of((REPO / "k8s/base/priorityclass.yaml").read_text())[0]["metadata"]["name"]
    assert values["s3"]["secretName"] == docs_of((REPO / "k8s/base/s3-secret.example.yaml").read_text())[0]["metadata"]["name"]
