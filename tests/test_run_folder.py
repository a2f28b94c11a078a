"""A run folder is self-contained: moved or copied, its MLflow store finds its own artifacts, and a resumed copy
writes only into itself."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_support import tiny_config_dict

from sims_platform.config import config_from_dict
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking.store import local_store, open_client


@pytest.fixture(autouse=True)
def _local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path or None):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _check_self_contained(folder: Path, expected: dict[str, list[str]]) -> None:
    """Every run of the folder's store lists the same artifacts as before, all inside the folder."""
    uri, artifacts = local_store(RunLayout.of(str(folder)))
    client = open_client(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert {r.info.run_id for r in runs} == set(expected)
    for run in runs:
        assert run.info.artifact_uri.startswith(artifacts + "/"), run.info.artifact_uri
        assert _artifacts(client, run.info.run_id) == expected[run.info.run_id]
        for name in expected[run.info.run_id]:
            assert (Path(run.info.artifact_uri[len("file://"):]) / name).is_file()


@pytest.mark.slow
def test_a_copied_and_a_moved_run_folder_keep_their_artifacts(tmp_path):
    first = tmp_path / "first"
    run_pipeline(config_from_dict(tiny_config_dict(str(first))))
    client = open_client(local_store(RunLayout.of(str(first)))[0])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    expected = {r.info.run_id: _artifacts(client, r.info.run_id) for r in runs}
    assert any(any(name.endswith(".png") for name in names) for names in expected.values())
    before = _snapshot(first)

    # A copy, resumed after its evaluation is deleted: it redoes that stage and writes only into itself.
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(copy / "iter-00" / "evaluate")
    run_pipeline(config_from_dict(tiny_config_dict(str(copy))))
    assert _snapshot(first) == before, "the original folder changed"
    assert (copy / "iter-00" / "evaluate" / "_SUCCESS.json").is_file()
    copy_client = open_client(local_store(RunLayout.of(str(copy)))[0])
    copy_runs = copy_client.search_runs([e.experiment_id for e in copy_client.search_experiments()],
                                        max_results=1000)
    assert all(r.info.artifact_uri.startswith(f"file://{copy}/mlartifacts/") for r in copy_runs)

    # The original, moved: every run finds its artifacts where the folder is now.
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), moved)
    _check_self_contained(moved, expected)


@pytest.mark.slow
def test_sims_ui_serves_a_moved_folders_artifacts(tmp_path):
    """`sims ui <folder>` re-roots a moved folder's store and serves it: the artifact is downloadable."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from sims_platform.launch.servers import free_port

    first = tmp_path / "first"
    uri, artifacts = local_store(RunLayout.of(str(first)))
    client = open_client(uri)
    exp = client.create_experiment("ui", artifact_location=artifacts)
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "hello", "notes/readme.txt")
    moved = tmp_path / "moved"
    shutil.move(str(first), moved)

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "sims_platform.cli", "ui", str(moved), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        base, body = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                q = f"run_id={run.info.run_id}&path=notes/readme.txt"
                with urllib.request.urlopen(f"{base}/get-artifact?{q}", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body == "hello", proc.stdout.read() if proc.poll() is not None else "no answer"
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}", timeout=5) as r:
            info = json.load(r)["run"]["info"]
        assert info["artifact_uri"].startswith(f"file://{moved}/mlartifacts/")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_sims_ui_without_a_store_is_one_line(tmp_path, capsys):
    from sims_platform.cli import main

    assert main(["ui", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow store here" in err
