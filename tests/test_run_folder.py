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
