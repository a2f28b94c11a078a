"""Create-if-absent records on file:// and S3 (moto): of writers racing for one name exactly one wins, so two
drivers claiming one storage root make exactly one owner."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from s3_support import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)

from sims_platform.k8s.ownership import OwnershipError, claim, owner_uri
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "file":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_create_refuses_an_existing_name(root):
    uri = fsio.join(root, "record.json")
    fsio.create_json(uri, {"writer": 1})
    with pytest.raises(FileExistsError):
        fsio.create_json(uri, {"writer": 2})
    assert fsio.read_json(uri) == {"writer": 1}
    assert fsio.listdir(root) == ["record.json"]  # no temporary file left behind


def test_two_concurrent_claims_make_exactly_one_owner(root, monkeypatch):
    layout = RunLayout.of(root)
    real_exists = fsio.exists

    def slow_exists(uri: str) -> bool:
        # Widen the window between looking and writing: a claim that checks, then writes, loses it every time.
        found = real_exists(uri)
        time.sleep(0.3)
        return found

    monkeypatch.setattr(fsio, "exists", slow_exists)
    start, results = threading.Barrier(2), {}

    def contend(release: str) -> None:
        start.wait()
        try:
            results[release] = claim(layout, "ns", release, "run")
        except OwnershipError as err:
            results[release] = err

    threads = [threading.Thread(target=contend, args=(r,)) for r in ("blue", "green")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    owners = [r for r, v in results.items() if isinstance(v, dict)]
    assert len(owners) == 1, results
    owner = owners[0]
    loser = next(r for r in results if r != owner)
    assert isinstance(results[loser], OwnershipError)
    assert f"belongs to release '{owner}'" in str(results[loser]) and f"this is release '{loser}'" in str(results[loser])
    assert fsio.read_json(owner_uri(layout)) == {"namespace": "ns", "release": owner, "run": "run"}
    assert claim(layout, "ns", owner, "run")["release"] == owner  # the owner's restart keeps it


def _writer(root: str, meta: dict):
    from sims_platform.data import ShardWriter

    return ShardWriter(fsio.join(root, "set"), shard_size=2, total=4, meta=meta)


def _fill(writer, offset: float = 0.0) -> None:
    import torch

    for j in range(writer.num_shards):
        x = torch.full((2, 3), float(j) + offset)
        writer.write_shard(j, x, torch.zeros(2, dtype=torch.int64), torch.arange(2 * j, 2 * j + 2))


def test_concurrent_finalizes_of_one_set_make_one_manifest(root):
    writer = _writer(root, {"w": 1})
    _fill(writer)
    start, results = threading.Barrier(2), []

    def finalize() -> None:
        start.wait()
        results.append(_writer(root, {"w": 1}).finalize())

    threads = [threading.Thread(target=finalize) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1]  # the same content from either: both succeed
    assert fsio.read_json(fsio.join(root, "set", "manifest.json")) == results[0]
    assert not [n for n in fsio.listdir(fsio.join(root, "set")) if ".tmp-" in n]


def test_a_second_writer_with_other_content_is_refused(root):
    from sims_platform.data import read_manifest, read_shards

    first = _writer(root, {"w": 1})
    _fill(first)
    manifest = first.finalize()
    other = _writer(root, {"w": 2})  # the same set made under other settings
    with pytest.raises(fsio.ConflictingWriteError, match=r"set/manifest\.json: another writer"):
        other.finalize()
    assert read_manifest(fsio.join(root, "set")) == manifest  # the first writer's manifest stands
    record = first.read_record(0)
    with pytest.raises(fsio.ConflictingWriteError, match=r"set/shard-000000\.json: another writer"):
        _fill(other, offset=0.5)  # other samples for shard 0: its committed record is not replaced
    assert first.read_record(0) == record
    # Nor its tar: the loser's samples are never published, and the set still reads whole and verified.
    assert hashlib.sha256(fsio.read_bytes(fsio.join(root, "set", "shard-000000.tar"))).hexdigest() == record["sha256"]
    assert sorted(fsio.listdir(fsio.join(root, "set"))) == ["manifest.json", "shard-000000.json", "shard-000000.tar",
                                                           "shard-000001.json", "shard-000001.tar"]
    assert read_shards(fsio.join(root, "set"))[0][:2].unique().tolist() == [0.0]


def test_a_killed_writers_staged_shard_is_never_read_and_is_cleaned_at_finalize(root):
    from sims_platform.data import read_manifest

    writer = _writer(root, {"w": 1})
    staged = fsio.stage_name(fsio.join(root, "set", "shard-000000.tar"))
    fsio.write_bytes(staged, b"a writer killed after staging, before its record")
    assert writer.missing_shards() == [0, 1]
    _fill(writer)
    writer.finalize()
    assert read_manifest(fsio.join(root, "set"))["total"] == 4
    assert not [n for n in fsio.listdir(fsio.join(root, "set")) if ".staged-" in n]


def test_a_record_another_process_committed_after_this_one_listed_the_folder_is_read(s3_bucket):
    # Two parts finalize one shard set: this process listed the folder before the other part's manifest landed
    # (s3fs keeps listings for the process's life), so its own create fails and it must compare with what S3
    # holds now, not with its old listing.
    from s3_support import s3_client

    folder = fsio.join(s3_bucket, "set")
    fsio.write_json(fsio.join(folder, "shard-000000.json"), {"n": 1})
    assert fsio.listdir(folder) == ["shard-000000.json"]  # cached
    record = fsio._json_bytes({"samples": 2})
    s3_client().put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="set/manifest.json", Body=record)
    fsio.commit_json(fsio.join(folder, "manifest.json"), {"samples": 2})  # the same content: kept
    with pytest.raises(fsio.ConflictingWriteError, match="manifest.json: another writer"):
        fsio.commit_json(fsio.join(folder, "manifest.json"), {"samples": 3})
