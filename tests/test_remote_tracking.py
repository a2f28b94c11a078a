"""MLflow at a distance: a real tracking server whose artifacts live in S3 (moto), with an s3:// storage root.

The server proxies artifacts (`--artifacts-destination s3://...`, served by default): clients upload over
HTTP to the server and need no artifact-store credentials; only the server talks to S3.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pipeline_support import tiny_config_dict
from mlflow.tracking import MlflowClient
from s3_support import s3_client, s3_endpoint, s3_env  # noqa: F401 (fixture)

from sims_platform.steps import Step
from sims_platform.config import config_from_dict
from sims_platform.launch.servers import mlflow_server
from sims_platform.pipeline.runner import open_run
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import Lineage, resolve_tracking_uri

SIMS = [sys.executable, "-m", "sims_platform.cli"]
ARTIFACTS_BUCKET = "mlflow-artifacts"


# ----------------------------------------------------------------------------
# A tracking server with S3 artifacts


@pytest.fixture(scope="module")
def remote(s3_endpoint, tmp_path_factory) -> Iterator[str]:  # noqa: F811 (fixture from s3_support)
    """(tracking URL) of a server whose artifact bucket exists on the module's S3 endpoint."""
    with _s3_environ(s3_endpoint):
        s3_client().create_bucket(Bucket=ARTIFACTS_BUCKET)
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), f"s3://{ARTIFACTS_BUCKET}/runs",
                       env={**s3_env(s3_endpoint), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}) as url:
        yield url


@contextlib.contextmanager
def _s3_environ(endpoint: str) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(s3_env(endpoint))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def env(s3_endpoint, remote, monkeypatch) -> dict[str, str]:  # noqa: F811
    """This process's and the pods' environment: S3 endpoint and credentials, and the tracking server."""
    import s3fs

    values = {**s3_env(s3_endpoint), "MLFLOW_TRACKING_URI": remote}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "SIMS_MLFLOW_RUN_ID", "RANK"):
        monkeypatch.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    return values


def _keys(bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _new_bucket() -> str:
    name = f"sims-{os.urandom(6).hex()}"
    s3_client().create_bucket(Bucket=name)
    return name


# ----------------------------------------------------------------------------
# Lineage with an s3:// storage root and a tracking server


@pytest.mark.slow
def test_s3_root_with_tracking_server(env, tmp_path):
    bucket = _new_bucket()
    data = tiny_config_dict(f"s3://{bucket}/run") | {"tracking": {"experiment": "remote-lineage"}}
    cfg = config_from_dict(data)
    layout = RunLayout.of(cfg.storage.root)
    assert resolve_tracking_uri(cfg, layout) == env["MLFLOW_TRACKING_URI"]  # from the environment
    lin = Lineage.from_config(cfg, layout)
    pipe = lin.pipeline_run(cfg)
    assert fsio.read_json(layout.run_record)["mlflow_run_id"] == pipe  # run.json lives in the bucket
    assert "run/run.json" in _keys(bucket)

    # Several pods creating the same stage run at once converge on one run.
    ids: list[str] = []
    barrier = threading.Barrier(4)

    def pod() -> None:
        other = Lineage.from_config(cfg, layout)  # its own client, as in another process
        barrier.wait()
        ids.append(other.stage_run(Step(0, "generate")))

    threads = [threading.Thread(target=pod) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 4
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([lin.experiment_id], "tags.`sims.stage` = 'generate'")
    assert [r.info.run_id for r in runs] == ids[:1]

    stage = ids[0]
    lin.log_artifact_bytes(stage, "notes/hello.txt", b"hello")
    run = client.get_run(stage)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never touches S3
    assert any(k.endswith(f"{stage}/artifacts/notes/hello.txt") for k in _keys(ARTIFACTS_BUCKET))


# ----------------------------------------------------------------------------
# Two evaluate pods and the reducer log into one stage run; PNGs land in the artifact bucket


@pytest.mark.slow
def test_evaluate_pods_and_reducer_share_one_run(env, tmp_path):
    bucket = _new_bucket()
    data = tiny_config_dict(f"s3://{bucket}/run")
    # Models only need to exist: train briefly (FID quality is not under test here).
    data["train_base"].update(images=512, checkpoint_images=256)
    data["finetune_aux"].update(images=128, checkpoint_images=128, log_images=128)
    data["generate"].update(num_samples=48)
    data["evaluate"].update(num_samples=96, batch_size=16, grid_size=16)
    data["tracking"] = {"experiment": "remote-eval"}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = config_from_dict(data)
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    for stage in ("train-base", "generate", "finetune-aux"):
        run_stage(ctx, stage)

    pod_env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    argv = [*SIMS, "stage", "evaluate", "--config", str(config), "--iteration", "0", "--count", "2"]
    logs = [open(tmp_path / f"pod-{i}.log", "wb") for i in range(2)]
    pods = [subprocess.Popen(argv, env={**pod_env, "JOB_COMPLETION_INDEX": str(i)}, stdout=logs[i],
                             stderr=subprocess.STDOUT) for i in range(2)]
    try:
        for i, p in enumerate(pods):
            assert p.wait(timeout=300) == 0, (tmp_path / f"pod-{i}.log").read_text()[-3000:]
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    assert not fsio.exists(layout.done_marker(0, "evaluate"))
    reduce = subprocess.run([*SIMS, "stage", "evaluate-reduce", "--config", str(config), "--iteration", "0"],
                            env=pod_env, capture_output=True, text=True, timeout=300)
    assert reduce.returncode == 0, reduce.stdout[-2000:] + reduce.stderr[-3000:]

    # Storage: the evaluate stage is complete in the bucket, fid.json where feed and the runner read it.
    fid = fsio.read_json(fsio.join(layout.stage(0, "evaluate"), "fid.json"))
    assert set(fid) == {"0.0", "1.0"}
    assert fsio.read_json(layout.done_marker(0, "evaluate"))["result"]["parts"] == 2

    # Tracking: one evaluate run holds both pods' part metrics and the reducer's FIDs.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("remote-eval")
    runs = client.search_runs([exp.experiment_id], "tags.`sims.stage` = 'evaluate'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "part_units")) == [0, 1]
    sims_fid = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "sims.fid")}
    assert sims_fid[1000] == pytest.approx(fid["1.0"]) and sims_fid[0] == pytest.approx(fid["0.0"])
    assert run.data.metrics["eval_parts"] == 2
    assert not client.search_runs([exp.experiment_id], "tags.`sims.stage` = 'evaluate-reduce'")

    # Artifacts: the PNGs are objects in the artifact bucket, under this run.
    keys = [k for k in _keys(ARTIFACTS_BUCKET) if f"/{run.info.run_id}/artifacts/" in k]
    names = {k.split("/artifacts/", 1)[1] for k in keys}
    assert {"samples/base.png", "samples/sims_w-1.0.png", "fid_vs_w.png"} <= names


# ----------------------------------------------------------------------------
# Only rank 0 writes


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = config_from_dict(tiny_config_dict(str(tmp_path / "run")))
    layout = RunLayout.of(cfg.storage.root)
    rank0 = Lineage.from_config(cfg, layout)
    rank0.pipeline_run(cfg)
    monkeypatch.setenv("RANK", "1")
    rank1 = Lineage.from_config(cfg, layout)
    stage = rank1.stage_run(Step(0, "train-base"))
    assert rank0.stage_run(Step(0, "train-base")) == stage  # same run for every rank
    rank1.log_metrics(stage, {"loss": 1.0})
    rank1.log_artifact_bytes(stage, "x.txt", b"x")
    rank1.finish(stage)
    rank0.log_metrics(stage, {"loss": 0.5})
    run = MlflowClient(rank0.tracking_uri).get_run(stage)
    assert run.data.metrics == {"loss": 0.5} and run.info.status == "RUNNING"
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(Exception, match="RANK='one'"):
        Lineage.from_config(cfg, layout)


def test_run_level_stage_hangs_under_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = config_from_dict(tiny_config_dict(str(tmp_path / "run")))
    lin = Lineage.from_config(cfg, RunLayout.of(cfg.storage.root))
    pipe = lin.pipeline_run(cfg)
    encode = lin.stage_run(Step(0, "encode"))
    assert lin.stage_run(Step(3, "encode")) == encode  # one per pipeline, whatever the iteration
    run = MlflowClient(lin.tracking_uri).get_run(encode)
    assert run.info.run_name == "encode" and run.data.tags["mlflow.parentRunId"] == pipe
    assert lin.stage_run(Step(0, "evaluate-reduce")) == lin.stage_run(Step(0, "evaluate"))  # the reducer's run is evaluate's
    assert [(s["iteration"], s["stage"]) for s in lin.stage_runs()] == [(None, "encode"), (0, "evaluate")]
