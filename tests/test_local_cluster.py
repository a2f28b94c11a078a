"""The pipeline as the cluster runs it, on loopback: torchrun training (2 processes), 2 writers, a 2-part
evaluation and its reducer, against a moto S3 endpoint and a real MLflow server (both started and stopped)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline_support import tiny_config_dict

pytestmark = pytest.mark.slow


def test_local_cluster_runs_the_whole_pipeline(tmp_path):
    d = tiny_config_dict("unused")  # the launcher points storage at its S3 bucket
    d["iterations"] = {"count": 2, "train_data": "real+synthetic", "feed_samples": 48}
    # The aux model streams its synthetic set from S3: each of the 2 ranks reads its own shards.
    d["finetune_aux"].update(loader="stream", loader_workers=1, shuffle_buffer=16)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(d))
    out = tmp_path / "cluster"
    proc = subprocess.run([sys.executable, "-m", "sims_platform.cli", "local-cluster", "--config", str(cfg),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("train-base (torchrun x2): ok", "generate (2 parts): ok", "finetune-aux (torchrun x2): ok",
                 "evaluate (2 parts): ok", "evaluate-reduce: ok", "iter 0 feed: ok", "iter 1 evaluate-reduce: ok"):
        assert line in proc.stdout, line
    summary = json.loads((out / "summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    assert all(set(r["fid"]) == {"0.0", "1.0"} for r in summary["iterations"])
    # Each stage ran as its own process (`sims stage`, as a pod does), none of them told of the others, and they
    # all found one run tree in the MLflow server: one pipeline run, its iteration runs, each stage nested in
    # its iteration (the reducer in the run its evaluate parts opened), and every run ended.
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=200)}
    stages = {0: ("train-base", "generate", "finetune-aux", "evaluate", "feed"),
              1: ("train-base", "generate", "finetune-aux", "evaluate")}
    assert set(runs) == {"tiny", "reference", "iter-0", "iter-1"} | {f"iter-{k}/{s}" for k in stages
                                                                      for s in stages[k]}
    parent = {name: r.data.tags.get("mlflow.parentRunId") for name, r in runs.items()}
    assert runs["tiny"].info.run_id == summary["mlflow_run_id"] and parent["tiny"] is None
    assert parent["reference"] == parent["iter-0"] == parent["iter-1"] == summary["mlflow_run_id"]
    for k in stages:
        assert {parent[f"iter-{k}/{s}"] for s in stages[k]} == {runs[f"iter-{k}"].info.run_id}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    # The servers are gone: nothing listens on their ports any more (the launcher always stops them).
    assert (out / "mlflow-server.log").exists() and (out / "moto.log").exists()
