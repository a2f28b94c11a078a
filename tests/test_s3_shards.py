"""Shard sets on a real S3 endpoint (moto on loopback): atomic shards, killed and parallel writers, streaming."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import fsspec
import pytest
import s3fs
import torch
from s3_support import fake_samples, s3_bucket, s3_client, s3_endpoint, s3_env  # noqa: F401 (fixtures)
from torch.utils.data import DataLoader

import sims_platform.data.shards as shards_mod
from sims_platform.data import ShardError, ShardStream, ShardWriter, read_manifest, read_shard, read_shards
from sims_platform.data.stream import assigned_shards
from sims_platform.storage.fsio import exists, read_json

SCRIPT = Path(__file__).with_name("s3_support.py")
SMALL = (1, 4, 4)


def _keys(bucket_uri: str, prefix: str = "") -> dict[str, int]:
    """What S3 itself lists (not s3fs's cache): key -> size."""
    bucket = bucket_uri.removeprefix("s3://")
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _uploads(bucket_uri: str) -> list[str]:
    """Keys of multipart uploads started and neither completed nor aborted."""
    out = s3_client().list_multipart_uploads(Bucket=bucket_uri.removeprefix("s3://"))
    return [u["Key"] for u in out.get("Uploads", [])]


def _write_set(uri: str, total: int, shard_size: int, shape=SMALL) -> ShardWriter:
    w = ShardWriter(uri, shard_size=shard_size, total=total)
    for j in range(w.num_shards):
        w.write_shard(j, *fake_samples(list(w.shard_range(j)), shape))
    w.finalize()
    return w


def _writer(uri: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), uri, *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


# ----------------------------------------------------------------------------
# Endpoint and atomic shards


def test_endpoint_comes_from_standard_aws_env(s3_bucket, s3_endpoint, monkeypatch):
    _write_set(s3_bucket + "/env", total=3, shard_size=3)
    # AWS_ENDPOINT_URL_S3 (service-specific) wins over AWS_ENDPOINT_URL; botocore reads both, no hook needed.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    assert exists(s3_bucket + "/env/manifest.json")


def test_round_trip_and_idempotent_rewrite_on_s3(s3_bucket):
    uri = s3_bucket + "/set"
    w = _write_set(uri, total=10, shard_size=4)
    x, y, seeds = read_shards(uri)
    x0, y0, s0 = fake_samples(list(range(10)), SMALL)
    assert torch.equal(x, x0.half().float()) and torch.equal(y, y0) and torch.equal(seeds, s0)
    before = read_manifest(uri)
    w.write_shard(1, *fake_samples(list(w.shard_range(1)), SMALL))  # a retried write of the same shard
    assert w.finalize() == before and read_manifest(uri) == before
    assert sorted(_keys(s3_bucket)) == [f"set/{n}" for n in (
        "manifest.json", "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar",
        "shard-000002.json", "shard-000002.tar")]


@pytest.mark.parametrize("multipart", [False, True], ids=["one-shot-put", "multipart"])
def test_exception_mid_shard_publishes_nothing(s3_bucket, monkeypatch, multipart):
    monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": 5 * 2**20})
    s3fs.S3FileSystem.clear_instance_cache()
    fail_after = 6 * 2**20 if multipart else 10_000
    real, seen = shards_mod.atomic_open, {}

    @contextlib.contextmanager
    def failing(uri: str, mode: str = "wb"):
        with real(uri, mode) as f:
            class Boom:
                def write(self, b: bytes) -> int:
                    n = f.write(b)
                    if f.tell() >= fail_after:
                        seen["mpu"] = f.mpu is not None  # a part was already uploaded
                        raise OSError("disk on fire")
                    return n
            yield Boom()

    monkeypatch.setattr(shards_mod, "atomic_open", failing)
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    w = ShardWriter(s3_bucket + "/set", shard_size=200, total=200)
    with pytest.raises(OSError, match="disk on fire"):
        w.write_shard(0, *fake_samples(list(range(200))))
    gc.collect()  # the dropped file object must not commit (or try to) when collected
    assert seen["mpu"] is multipart
    assert _keys(s3_bucket) == {} and _uploads(s3_bucket) == [] and unraisable == []
    assert w.missing_shards() == [0]


# ----------------------------------------------------------------------------
# Writers in subprocesses: killed mid-shard, and two in parallel


def test_writer_killed_mid_shard_then_restarted(s3_bucket, s3_endpoint, tmp_path):
    uri, total, size = s3_bucket + "/gen", 720, 240  # shards of ~8 MiB: multipart with 5 MiB parts
    env = s3_env(s3_endpoint)
    sizes: dict[str, set[int]] = defaultdict(set)
    stop = threading.Event()

    def watch() -> None:  # what any reader could have listed while the writer ran
        while not stop.is_set():
            for k, n in _keys(s3_bucket, "gen/").items():
                sizes[k].add(n)
            time.sleep(0.02)

    marker = tmp_path / "stalled"
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc = _writer(uri, env, "--total", str(total), "--shard-size", str(size), "--stall-shard", "1",
                   "--stall-after", str(6 * 2**20), "--marker", str(marker))
    try:
        deadline = time.monotonic() + 40
        while not marker.exists():
            assert proc.poll() is None, f"writer exited early:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "writer never reached the middle of shard 1"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = _keys(s3_bucket, "gen/")
    assert "gen/shard-000001.tar" not in killed and "gen/manifest.json" not in killed
    assert {"gen/shard-000000.tar", "gen/shard-000000.json"} <= set(killed)
    # Killed mid multipart upload of its staged copy: invisible, and never under the shard's own name.
    assert [u.split(".staged-")[0] for u in _uploads(s3_bucket)] == ["gen/shard-000001.tar"]
    shape = list(fake_samples([0])[0].shape[1:])
    record = read_json(uri + "/shard-000000.json")
    assert read_shard(uri, record, shape)[2].tolist() == list(range(size))  # what was visible is whole

    restarted = _writer(uri, env, "--total", str(total), "--shard-size", str(size))
    out = restarted.communicate(timeout=60)[0].decode()
    stop.set()
    watcher.join()
    assert restarted.returncode == 0, out[-3000:]
    final = _keys(s3_bucket, "gen/")
    assert all(sizes[k] == {final[k]} for k in final if k.endswith(".tar")), "a shard was visible half-written"
    m = read_manifest(uri)
    assert m["total"] == total and [e["count"] for e in m["shards"]] == [size] * 3
    assert [e["first_seed"] for e in m["shards"]] == [0, size, 2 * size]
    assert m["shards"][0]["sha256"] == record["sha256"]  # the committed shard was kept, not rewritten
    _, _, seeds = read_shards(uri)  # verifies every checksum and count against the manifest
    assert sorted(seeds.tolist()) == list(range(total))


def test_two_workers_write_disjoint_shards_then_manifest(s3_bucket, s3_endpoint):
    uri, env = s3_bucket + "/par", s3_env(s3_endpoint)
    args = ["--total", "95", "--shard-size", "10", "--parts", "2", "--shape", "1", "16", "16"]
    procs = [_writer(uri, env, *args, "--part", str(p)) for p in (0, 1)]
    outs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    m = read_manifest(uri)
    assert m["total"] == 95 and [e["count"] for e in m["shards"]] == [10] * 9 + [5] and m["shape"] == [1, 16, 16]
    x, _, seeds = read_shards(uri)
    assert seeds.tolist() == list(range(95))
    assert torch.equal(x, fake_samples(list(range(95)), (1, 16, 16))[0].half().float())


# ----------------------------------------------------------------------------
# Streaming reader


def _epoch(uri: str, epoch: int, world_size: int, num_workers: int, **kw) -> list[list[int]]:
    """Seeds each simulated rank sees in one epoch, in order, through a real DataLoader with workers."""
    out = []
    for rank in range(world_size):
        ds = ShardStream(uri, rank=rank, world_size=world_size, buffer_size=16, seed=3, **kw)
        ds.set_epoch(epoch)
        dl = DataLoader(ds, batch_size=4, num_workers=num_workers)
        out.append([int(s) for _, _, seeds in dl for s in seeds])
    return out


def test_stream_sees_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    uri = str(tmp_path / "set")
    _write_set(uri, total=62, shard_size=5)  # 13 shards: uneven over 4 slots on purpose
    e0, e1, e0_again = (_epoch(uri, e, world_size=2, num_workers=2) for e in (0, 1, 0))
    for ranks in (e0, e1):
        seen = ranks[0] + ranks[1]
        assert sorted(seen) == list(range(62))  # exactly once across 2 ranks x 2 workers
        assert not set(ranks[0]) & set(ranks[1])
    assert e0 == e0_again  # deterministic given seed and epoch
    assert e0 != e1  # reshuffled between epochs
    assert [s for r in _epoch(uri, 0, 1, 1, shuffle=False) for s in r] == list(range(62))


def test_stream_takes_rank_from_the_environment(tmp_path, monkeypatch):
    uri = str(tmp_path / "set")
    _write_set(uri, total=20, shard_size=5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # webdataset's default nodesplitter would refuse this
    ds = ShardStream(uri, seed=3)
    got = sorted(int(s) for _, _, s in ds)
    want = sorted(s for j in assigned_shards(4, 3, 0, True, 1, 2, 0, 1) for s in range(5 * j, 5 * j + 5))
    assert got == want and len(got) == 10
    with pytest.raises(ShardError, match=f"{uri}: 4 shards cannot feed 5 ranks"):
        next(iter(ShardStream(uri, rank=4, world_size=5)))


# StreamRows.take for every rank of a world_size x loader_workers layout, in a process of its own (so a hang
# is a timeout, not a stuck test run); prints each rank's row count.
_TAKE = """
import json, sys
from sims_platform.data import ShardStream
from sims_platform.training.batches import StreamRows
uri, world, workers, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = [StreamRows(ShardStream(uri, rank=r, world_size=world, buffer_size=4, seed=3), workers, 0).take(n)[0]
        for r in range(world)]
print(json.dumps([len(x) for x in rows]))
"""


def test_every_rank_gets_shards_when_slots_outnumber_them(tmp_path):
    """2 shards, 2 ranks x 2 loader workers: 4 slots for 2 shards, yet both ranks read one, and training
    takes rows across epochs instead of spinning through empty ones."""
    uri = str(tmp_path / "set")
    _write_set(uri, total=8, shard_size=4)
    ranks = _epoch(uri, 0, world_size=2, num_workers=2)
    assert all(ranks) and sorted(ranks[0] + ranks[1]) == list(range(8))
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-c", _TAKE, uri, "2", "2", "6"], env=env, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("StreamRows.take for 2 ranks x 2 loader workers on 2 shards did not return in 120 s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [6, 6]  # 4 rows a rank and epoch: crosses one


def test_stream_rows_fail_on_an_epoch_without_samples():
    """Should a rank's epoch ever come up empty, training fails naming the set instead of spinning."""
    from torch.utils.data import IterableDataset

    from sims_platform.data import DataError
    from sims_platform.training.batches import StreamRows

    class Empty(IterableDataset):
        uri, num_samples = "s3://bucket/set", 8

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            return iter(())

    with pytest.raises(DataError, match=r"s3://bucket/set: epoch 0 gave this rank no samples"):
        StreamRows(Empty(), 0, 0).take(2)


def test_stream_from_s3_with_workers_matches_the_set(s3_bucket):
    uri = s3_bucket + "/stream"
    _write_set(uri, total=30, shard_size=4, shape=(2, 8, 8))
    ds = ShardStream(uri, seed=1, buffer_size=8)
    batches = list(DataLoader(ds, batch_size=5, num_workers=2))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    seeds = torch.cat([b[2] for b in batches])
    order = seeds.argsort()
    assert seeds[order].tolist() == list(range(30)) and ds.num_samples == 30
    x0, y0, _ = fake_samples(list(range(30)), (2, 8, 8))
    assert torch.equal(x[order], x0.half().float()) and torch.equal(y[order], y0)


def test_stream_refuses_missing_manifest_and_tampered_shard(s3_bucket):
    with pytest.raises(ShardError, match=f"{s3_bucket}/none: no manifest.json"):
        ShardStream(s3_bucket + "/none")
    uri = s3_bucket + "/bad"
    _write_set(uri, total=8, shard_size=4)
    fs = fsspec.filesystem("s3")
    path = uri.removeprefix("s3://") + "/shard-000001.tar"
    data = bytearray(fs.cat_file(path))
    data[1000] ^= 0xFF  # one flipped byte inside a sample
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ShardError, match=f"{uri}/shard-000001.tar: sha256 checksum mismatch"):
        list(ShardStream(uri, shuffle=False))
    fs.rm(path)
    with pytest.raises(ShardError, match=rf"{uri}: shards \['shard-000001.tar'\] are listed in manifest.json"):
        ShardStream(uri)
    m = read_json(uri + "/manifest.json")
    m["total"] += 1
    fs.pipe_file(uri.removeprefix("s3://") + "/manifest.json", json.dumps(m).encode())
    with pytest.raises(ShardError, match=f"{uri}/manifest.json: not a valid shard manifest"):
        ShardStream(uri)
