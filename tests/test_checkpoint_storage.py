"""What a DeepSpeed checkpoint folder in storage may contain, and who may write it: a fetch takes only the files
the commit record lists (a planted key, one that climbs out with '..', is refused before anything is written),
and a committed checkpoint is never written again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from s3_support import s3_bucket, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from sims_platform.storage import fsio
from sims_platform.training.checkpoints import (
    COMMIT,
    CheckpointExistsError,
    CheckpointRefused,
    fetch_native,
    latest,
    save_sharded,
)

SHARED = "state/mp_rank_00_model_states.pt"
SHARD = "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _save_native(local: str) -> None:
    """What DeepSpeed's save writes for one rank: tensors in plain containers, under the tag's folder."""
    os.makedirs(os.path.join(local, "state"))
    torch.save({"module": {"w": torch.ones(2)}}, os.path.join(local, SHARED))
    torch.save({"optimizer_state_dict": {"step": 1}}, os.path.join(local, SHARD))


def _commit(folder: str, images: int = 320) -> str:
    return save_sharded(folder, images, save_native=_save_native, state=lambda: {"images": images, "step": 1},
                        commit={"engine": "deepspeed", "world_size": 1, "step": 1}, keep=2)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The node-local fetch folder, nested so that a name with '../..' would land inside tmp_path."""
    root = tmp_path / "node" / "local" / "scratch"
    monkeypatch.setenv("SIMS_LOCAL_CHECKPOINT_DIR", str(root))
    return root


def _stray(tmp_path: Path, name: str) -> list[Path]:
    return [p for p in tmp_path.rglob(name) if "store" not in p.parts]


def test_a_committed_checkpoint_fetches_its_listed_files(tmp_path, scratch):
    folder = str(tmp_path / "store")
    _commit(folder)
    local = fetch_native(latest(folder), rank=0)
    assert sorted(str(p.relative_to(local)) for p in Path(local).rglob("*.pt")) == [SHARED, SHARD]


def test_a_planted_dotdot_key_is_refused_and_nothing_lands_outside(tmp_path, scratch, s3_bucket):
    folder = f"{s3_bucket}/run/checkpoints"
    uri = _commit(folder)
    bucket, prefix = s3_bucket[len("s3://"):], uri[len(s3_bucket) + 1:]
    planted = f"{prefix}/ds/../../../../escape.pth"  # a literal key: S3 does not resolve '..'
    s3_client().put_object(Bucket=bucket, Key=planted, Body=b"not a checkpoint")
    with pytest.raises(CheckpointRefused, match=r"ds/\.\./\.\./\.\./\.\./escape\.pth: not listed in .*COMMIT\.json"):
        fetch_native(latest(folder), rank=0)
    assert not list(tmp_path.rglob("escape.pth"))
    assert not list(scratch.glob("sims-load-*"))  # the refused fetch left no folder behind


def test_an_unlisted_extra_file_is_refused(tmp_path, scratch):
    folder = str(tmp_path / "store")
    uri = _commit(folder)
    (Path(uri) / "ds" / "state" / "evil.pth").write_bytes(b"planted")
    with pytest.raises(CheckpointRefused, match=r"ds/state/evil\.pth: not listed in .*ckpt-0000000320/COMMIT\.json"):
        fetch_native(latest(folder), rank=0)
    assert not _stray(tmp_path, "evil.pth")


@pytest.mark.parametrize("name", ["../../../../escape.pth", "/tmp/escape.pth", "state/x\n.pt", "state/../../x.pt"])
def test_a_commit_record_that_lists_an_odd_name_is_refused(tmp_path, scratch, name):
    folder = str(tmp_path / "store")
    uri = _commit(folder)
    commit = Path(uri) / COMMIT
    record = json.loads(commit.read_text())
    commit.write_text(json.dumps(record | {"native_files": [*record["native_files"], name]}))
    with pytest.raises(CheckpointRefused, match=r"ckpt-0000000320/COMMIT\.json: native_files lists .*; expected"):
        fetch_native(latest(folder), rank=0)
    assert not _stray(tmp_path, "escape.pth")


def test_save_sharded_refuses_to_rewrite_a_committed_checkpoint(tmp_path, scratch):
    folder = str(tmp_path / "store")
    uri = _commit(folder)
    before = fsio.read_json(fsio.join(uri, COMMIT))
    with pytest.raises(CheckpointExistsError, match=r"ckpt-0000000320 is committed .*COMMIT\.json"):
        _commit(folder)
    assert fsio.read_json(fsio.join(uri, COMMIT)) == before
    assert fsio.exists(fsio.join(uri, "ds", SHARED))


def test_a_commit_record_written_meanwhile_is_not_replaced(tmp_path, scratch):
    folder = str(tmp_path / "store")
    theirs = {"engine": "deepspeed", "writer": "the other run"}

    def state() -> dict:  # runs after the upload, before the commit: another writer commits first
        fsio.write_json(fsio.join(folder, "ckpt-0000000320", COMMIT), theirs)
        return {"images": 320, "step": 1}

    with pytest.raises(CheckpointExistsError, match=r"ckpt-0000000320/COMMIT\.json was committed by another writer"):
        save_sharded(folder, 320, save_native=_save_native, state=state, commit={"engine": "deepspeed"}, keep=2)
    assert fsio.read_json(fsio.join(folder, "ckpt-0000000320", COMMIT)) == theirs


def test_save_sharded_replaces_an_uncommitted_leftover(tmp_path, scratch):
    folder = str(tmp_path / "store")
    leftover = tmp_path / "store" / "ckpt-0000000320" / "ds" / "state"
    leftover.mkdir(parents=True)
    (leftover / "stale.pt").write_bytes(b"half an upload")  # a run killed before COMMIT.json
    uri = _commit(folder)
    assert fsio.read_json(fsio.join(uri, COMMIT))["native_files"] == [SHARED, SHARD]
    assert not (leftover / "stale.pt").exists()
