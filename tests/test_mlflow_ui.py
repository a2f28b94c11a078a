"""What the MLflow UI shows after a pipeline, against a real `mlflow server` on loopback: the experiment's kind,
true run statuses (after success, failure, a kill and a resume), dataset inputs, and the summary metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from pipeline_support import tiny_config_dict

from sims_platform.steps import Step
from sims_platform.config import config_from_dict
from sims_platform.data import read_manifest
from sims_platform.launch.servers import mlflow_server
from sims_platform.pipeline.runner import end_interrupted_runs, open_run, run_pipeline
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.storage import fsio
from sims_platform.tracking.datasets import content_digest
from sims_platform.tracking.summary_metrics import log_iteration_results, row_metrics

SIMS = [sys.executable, "-m", "sims_platform.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("mlflow-ui")
    with mlflow_server(work, f"file://{work}/artifacts") as url:
        yield url


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "RANK"):
        monkeypatch.delenv(k, raising=False)


def small(root: Path, url: str, experiment: str, **iterations) -> dict:
    """The tiny pipeline, smaller still: the runs' structure is under test, not the models."""
    d = tiny_config_dict(str(root))
    d["train_base"].update(images=512, checkpoint_images=256)
    d["finetune_aux"].update(images=128, checkpoint_images=128, log_images=128)
    d["generate"].update(num_samples=48)
    d["tracking"] = {"uri": url, "experiment": experiment}
    if iterations:
        d["iterations"] = iterations
    return d


def all_runs(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=500)}


# ----------------------------------------------------------------------------
# A finished two-iteration pipeline


@pytest.mark.slow
def test_finished_pipeline_as_the_ui_shows_it(server, tmp_path):
    cfg = config_from_dict(small(tmp_path / "run", server, "ui-finished", count=2, train_data="real+synthetic",
                                 feed_samples=40, feed_sampler="plain"))
    summary = run_pipeline(cfg)
    client = MlflowClient(server)

    # The experiment opens on MLflow 3's model-training views (runs table), not the GenAI ones.
    exp = client.get_experiment_by_name("ui-finished")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # Every run ends FINISHED: pipeline, both iterations, every stage.
    runs = all_runs(client, "ui-finished")
    assert {"tiny", "iter-0", "iter-1", "iter-0/train-base", "iter-0/feed", "iter-1/evaluate"} <= set(runs)
    assert {name: r.info.status for name, r in runs.items()} == {name: "FINISHED" for name in runs}

    # Each stage run lists its inputs as datasets, with their URIs, train-base included.
    for name, r in runs.items():
        if r.data.tags.get("sims.kind") != "stage":
            continue
        inputs = {k.removeprefix("sims.input."): v for k, v in r.data.tags.items() if k.startswith("sims.input.")}
        datasets = {d.dataset.name: d.dataset for d in r.inputs.dataset_inputs}
        assert inputs and set(datasets) == set(inputs), name
        for key, uri in inputs.items():
            assert uri in json.loads(datasets[key].source).values(), (name, key)
    real = {d.dataset.name: d.dataset for d in runs["iter-0/train-base"].inputs.dataset_inputs}["real"]
    assert json.loads(real.source) == {"url": "sklearn://load_digits?resolution=8"}
    trained = {d.dataset.name: d.dataset for d in runs["iter-1/train-base"].inputs.dataset_inputs}
    assert set(trained) == {"real", "feed_iter_0"}
    feed_uri = runs["iter-0/feed"].data.tags["sims.output.feed"]
    manifest = read_manifest(feed_uri)
    assert trained["feed_iter_0"].digest == content_digest(feed_uri, manifest)  # from the shards' checksums
    changed = {**manifest, "shards": [{**manifest["shards"][0], "sha256": "0" * 64}, *manifest["shards"][1:]]}
    assert content_digest(feed_uri, changed) != content_digest(feed_uri, manifest)
    assert json.loads(trained["feed_iter_0"].profile)["num_rows"] == 40

    # The iteration and pipeline runs hold each iteration's results, at step = iteration.
    pipe = runs["tiny"].info.run_id
    for row in summary["iterations"]:
        k = row["iteration"]
        it = runs[f"iter-{k}"]
        for key in ("fid_base", "fid_best", "best_w", "fid_w_0.0", "fid_w_1.0"):
            assert it.data.metrics[key] == pytest.approx(row_metrics(row)[key]), (k, key)
        assert {m.step for m in client.get_metric_history(it.info.run_id, "fid_best")} == {k}
        assert "fid_vs_w.png" in {a.path for a in client.list_artifacts(it.info.run_id)}
    history = sorted((m.step, m.value) for m in client.get_metric_history(pipe, "fid_best"))
    assert history == [(r["iteration"], pytest.approx(r["fid_best"])) for r in summary["iterations"]]
    assert [m.step for m in client.get_metric_history(pipe, "best_w")] == [0, 1]
    plots = {a.path for a in client.list_artifacts(pipe, "fid_vs_w")} | {a.path for a in client.list_artifacts(pipe)}
    assert {"fid_vs_w/iter-0.png", "fid_vs_w/iter-1.png", "fid_vs_w.png"} <= plots


# ----------------------------------------------------------------------------
# Summary rows that compare guidance methods (several methods, repeats, precision/recall)


def methods_row(k: int, shift: float) -> dict:
    per_method = {
        "sims": {"fid": {"0.0": 30.0 - shift, "1.0": 20.0 - shift}, "fid_sd": {"0.0": 0.5, "1.0": 0.4},
                 "precision": 0.7, "recall": 0.6, "best_w": 1.0, "fid_best": 20.0 - shift, "nfe_per_sample": 38},
        "neon": {"fid": {"0.0": 30.0 - shift, "-0.5": 25.0}, "fid_sd": None, "precision": None, "recall": None,
                 "best_w": -0.5, "fid_best": 25.0, "nfe_per_sample": 19},
    }
    return {"iteration": k, "fid": per_method["sims"]["fid"], "fid_sd": {"0.0": 0.5, "1.0": 0.4},
            "precision": 0.7, "recall": 0.6, "best_w": 1.0, "fid_base": 30.0 - shift, "fid_best": 20.0 - shift,
            "sampler_steps": 10, "repeats": 3, "methods": per_method}


def test_rows_comparing_methods_become_metrics_per_method(server, tmp_path):
    cfg = config_from_dict(small(tmp_path / "run", server, "ui-methods", count=2))
    layout, lineage, pipe = open_run(cfg)
    rows = [methods_row(0, 0.0), methods_row(1, 5.0)]
    for k in (0, 1):
        logged = log_iteration_results(lineage, {"iterations": rows[: k + 1]}, k)
        assert logged["sims.fid_best"] == rows[k]["fid_best"] and logged["neon.best_w"] == -0.5
        assert logged["neon.fid_w_-0.5"] == 25.0 and logged["sims.fid_sd_w_1.0"] == 0.4
        assert "neon.precision" not in logged and "iteration" not in logged  # nulls and the step are left out
    client = MlflowClient(server)
    history = client.get_metric_history(pipe, "sims.fid_best")
    assert sorted((m.step, m.value) for m in history) == [(0, 20.0), (1, 15.0)]
    it1 = client.get_run(lineage.iteration_run(1))
    assert it1.data.metrics["fid_base"] == 25.0 and it1.data.metrics["neon.nfe_per_sample"] == 19
    assert {a.path for a in client.list_artifacts(pipe, "fid_vs_w")} == {"fid_vs_w/iter-0.png", "fid_vs_w/iter-1.png"}
    # Today's rows (no methods) give the plain names.
    plain = {"iteration": 0, "fid": {"0.0": 3.0, "1.0": None}, "best_w": 0.0, "fid_base": 3.0, "fid_best": 3.0}
    assert row_metrics(plain) == {"fid_w_0.0": 3.0, "best_w": 0.0, "fid_base": 3.0, "fid_best": 3.0}
    with pytest.raises(ValueError, match="no row for iteration 5"):
        log_iteration_results(lineage, {"iterations": rows}, 5)


# ----------------------------------------------------------------------------
# Failure, kill and resume


def test_failed_stage_fails_its_iteration_and_pipeline(server, tmp_path):
    cfg = config_from_dict(small(tmp_path / "run", server, "ui-failed"))
    layout, lineage, pipe = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    with pytest.raises(FileNotFoundError, match="model not found"):
        run_stage(ctx, "generate")  # no base model yet
    client = MlflowClient(server)
    runs = all_runs(client, "ui-failed")
    assert {n: r.info.status for n, r in runs.items()} == \
        {"tiny": "FAILED", "iter-0": "FAILED", "iter-0/generate": "FAILED"}
    # A retry of the stage carries all three on.
    assert lineage.stage_run(Step(0, "generate")) == runs["iter-0/generate"].info.run_id
    assert {r.info.status for r in all_runs(client, "ui-failed").values()} == {"RUNNING"}


def test_new_attempt_ends_what_a_killed_one_left_running(server, tmp_path):
    cfg = config_from_dict(small(tmp_path / "run", server, "ui-left-over", count=2))
    layout, lineage, pipe = open_run(cfg)
    done = lineage.stage_run(Step(0, "train-base"))   # killed after its completion record, before its status
    fsio.write_json(layout.done_marker(0, "train-base"), {"result": {}})
    cut = lineage.stage_run(Step(0, "generate"))     # killed mid-stage
    later = lineage.stage_run(Step(1, "train-base"))  # e.g. iteration 1 of an attempt with another plan
    end_interrupted_runs(cfg, layout, lineage)
    client = MlflowClient(server)
    status = {n: r.info.status for n, r in all_runs(client, "ui-left-over").items()}
    assert status == {"tiny": "RUNNING", "iter-0": "KILLED", "iter-1": "KILLED", "iter-0/train-base": "FINISHED",
                      "iter-0/generate": "KILLED", "iter-1/train-base": "KILLED"}
    assert {done, cut, later} == {r.info.run_id for n, r in all_runs(client, "ui-left-over").items() if "/" in n}
    # The resumed attempt continues the killed stage's run (and its iteration's).
    assert lineage.stage_run(Step(0, "generate")) == cut
    assert client.get_run(cut).info.status == "RUNNING"
    assert client.get_run(client.get_run(cut).data.tags["mlflow.parentRunId"]).info.status == "RUNNING"


@pytest.mark.slow
def test_kill_and_resume_leaves_no_run_running(server, tmp_path):
    d = small(tmp_path / "run", server, "ui-resume")
    d["train_base"].update(images=4096, checkpoint_images=256)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(d))
    ckpts = tmp_path / "run" / "iter-00" / "train-base" / "checkpoints"
    cmd = SIMS + ["run", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(ckpts.glob("ckpt-*.pt")):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # preempted: no chance to update any run
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    client = MlflowClient(server)
    before = {n: r.info.status for n, r in all_runs(client, "ui-resume").items()}
    assert before["iter-0/train-base"] == "RUNNING" and before["tiny"] == "RUNNING"

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    after = all_runs(client, "ui-resume")
    assert {n: r.info.status for n, r in after.items()} == {n: "FINISHED" for n in after}
    exp = client.get_experiment_by_name("ui-resume")
    trained = client.search_runs([exp.experiment_id], "tags.`sims.stage` = 'train-base'")
    assert len(trained) == 1  # the killed stage's run was continued, not replaced
