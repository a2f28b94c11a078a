"""Data sources (digits, folder, webdataset) and the sharded synthetic-set writer and reader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

import sims_platform.data.shards as shards_mod
from sims_platform.config.schema import DataConfig
from sims_platform.data import DataError, ShardError, ShardWriter, SourceIndex, load_images, read_shards
from sims_platform.data.shards import iter_tar, read_shard
from sims_platform.storage.fsio import listdir, read_json

# ----------------------------------------------------------------------------
# Sources


def test_digits_load_is_complete_scaled_and_deterministic():
    a = load_images(DataConfig(source="digits", resolution=16, channels=1))
    assert len(a) == 1797 and a.images.shape == (1797, 1, 16, 16)
    assert a.images.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert a.images.min() == -1 and a.images.max() > 0.9
    assert set(a.labels.tolist()) == set(range(10))
    b = load_images(DataConfig(source="digits", resolution=16, channels=1))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_digits_rgb_downsampled_and_capped():
    d = load_images(DataConfig(source="digits", resolution=4, channels=3, max_images=7))
    assert d.images.shape == (7, 3, 4, 4)
    assert torch.equal(d.images[:, 0], d.images[:, 2])
    assert d.labels.tolist() == list(range(7))


def test_digits_labels_beyond_num_classes_are_refused():
    with pytest.raises(ValueError, match="data.num_classes"):
        load_images(DataConfig(source="digits", num_classes=5))
    assert load_images(DataConfig(source="digits", num_classes=0, max_images=20)).labels.eq(0).all()


def _png(color: int, size: tuple[int, int] = (12, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (color,) * len(mode) if mode != "L" else color).save(buf, format="PNG")
    return buf.getvalue()


def _folder(tmp_path, classes=("a", "b", "c"), per_class=2):
    root = tmp_path / "imgs"
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png(40 * c + 10 * i))
    return root


def test_folder_source_labels_by_sorted_folder(tmp_path):
    root = _folder(tmp_path)
    d = load_images(DataConfig(source="folder", path=str(root), resolution=4, channels=3, num_classes=3))
    assert d.images.shape == (6, 3, 4, 4)
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # a uniform image stays uniform through crop and resize: value 40 maps to 40/127.5 - 1
    assert torch.allclose(d.images[2], torch.full((3, 4, 4), 40 / 127.5 - 1), atol=1e-5)
    gray = load_images(DataConfig(source="folder", path=f"file://{root}", resolution=4, channels=1,
                                  num_classes=3, max_images=3))
    assert gray.images.shape == (3, 1, 4, 4) and gray.labels.tolist() == [0, 0, 1]


def test_folder_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_images(DataConfig(source="folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_images(DataConfig(source="folder", path=str(tmp_path / "empty")))
    root = _folder(tmp_path)
    with pytest.raises(ValueError, match="data.num_classes"):
        load_images(DataConfig(source="folder", path=str(root), num_classes=10))
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_images(DataConfig(source="folder", path=str(root), num_classes=3))


def _image_shards(tmp_path, n_shards=2, per_shard=3) -> str:
    for j in range(n_shards):
        with TarWriter(str(tmp_path / f"img-{j:02d}.tar")) as tar:
            for i in range(per_shard):
                k = j * per_shard + i
                ext = "png" if k % 2 == 0 else "jpg"
                img = Image.new("L", (10, 10), 20 * k).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format="PNG" if ext == "png" else "JPEG")
                tar.write({"__key__": f"s{k:04d}", ext: buf.getvalue(), "cls": k % 4})
    return f"file://{tmp_path}/img-{{00..{n_shards - 1:02d}}}.tar"


def test_webdataset_source_reads_shards_in_order(tmp_path):
    uri = _image_shards(tmp_path)
    d = load_images(DataConfig(source="webdataset", path=uri, resolution=8, channels=1, num_classes=4))
    assert d.images.shape == (6, 1, 8, 8)
    assert d.labels.tolist() == [0, 1, 2, 3, 0, 1]
    # the first sample (a lossless png) is uniform at 0
    assert torch.allclose(d.images[0], torch.full((1, 8, 8), -1.0))
    capped = load_images(DataConfig(source="webdataset", path=uri, resolution=8, num_classes=4, max_images=4))
    assert capped.labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="data.num_classes"):
        load_images(DataConfig(source="webdataset", path=uri, resolution=8, num_classes=3))


def test_webdataset_source_missing_image_named(tmp_path):
    with TarWriter(str(tmp_path / "bad.tar")) as tar:
        tar.write({"__key__": "s0", "txt": "hello", "cls": 0})
    with pytest.raises(ValueError, match="s0: no image"):
        load_images(DataConfig(source="webdataset", path=str(tmp_path / "bad.tar")))


def _truncate(path: Path, where: str) -> None:
    """Cut the tar at path after its first sample: at that member boundary ('boundary': the rest of the
    samples and the end-of-archive marker gone) or halfway through the second sample's largest file."""
    with tarfile.open(path) as t:
        members = t.getmembers()
    key = members[0].name.split(".")[0]
    second = [m for m in members if m.name.split(".")[0] != key]
    if where == "boundary":
        size = second[0].offset
    else:
        m = max((m for m in second if m.name.split(".")[0] == second[0].name.split(".")[0]), key=lambda m: m.size)
        size = m.offset_data + m.size // 2
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("where", ["boundary", "mid-member"])
def test_webdataset_source_refuses_a_truncated_tar(tmp_path, where):
    uri = _image_shards(tmp_path)
    _truncate(tmp_path / "img-01.tar", where)
    cfg = DataConfig(source="webdataset", path=uri, resolution=8, channels=1, num_classes=4)
    pattern = r"img-01\.tar: truncated"
    with pytest.raises(DataError, match=pattern):
        load_images(cfg)
    with pytest.raises(DataError, match=pattern):
        SourceIndex(cfg)


# ----------------------------------------------------------------------------
# Synthetic shards


def _batch(idx: range):
    g = torch.Generator().manual_seed(idx.start)
    n = len(idx)
    return torch.randn(n, 2, 4, 4, generator=g), torch.arange(idx.start, idx.stop) % 10, \
        torch.arange(idx.start, idx.stop) + 1000


def _write_all(uri: str, total=7, shard_size=3, meta=None) -> ShardWriter:
    w = ShardWriter(uri, shard_size=shard_size, total=total, meta=meta or {"model": "base"})
    for j in w.missing_shards():
        w.write_shard(j, *_batch(w.shard_range(j)))
    return w


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_shards_round_trip(tmp_path, scheme):
    uri = f"file://{tmp_path}/syn" if scheme == "file" else f"memory://syn-{uuid.uuid4().hex}"
    manifest = _write_all(uri).finalize()
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{j:06d}.tar" for j in range(3)]
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert [s["first_seed"] for s in manifest["shards"]] == [1000, 1003, 1006]
    assert manifest["shape"] == [2, 4, 4] and manifest["dtype"] == "float16" and manifest["model"] == "base"
    x, labels, seeds = read_shards(uri)
    ref = [torch.cat(t) for t in zip(*(_batch(range(a, min(a + 3, 7))) for a in (0, 3, 6)))]
    assert x.dtype == torch.float32 and x.shape == (7, 2, 4, 4)
    assert torch.equal(x, ref[0].half().float())
    assert torch.equal(labels, ref[1]) and torch.equal(seeds, ref[2])


def test_shards_are_reproducible_bytes(tmp_path):
    a = _write_all(f"file://{tmp_path}/a").finalize()
    b = _write_all(f"file://{tmp_path}/b").finalize()
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_restart_skips_committed_shards(tmp_path):
    uri = f"file://{tmp_path}/syn"
    w = ShardWriter(uri, shard_size=3, total=7, meta={})
    assert w.missing_shards() == [0, 1, 2]
    for j in (0, 2):
        w.write_shard(j, *_batch(w.shard_range(j)))
    with pytest.raises(ShardError, match=r"\[1\]"):
        w.finalize()
    again = ShardWriter(uri, shard_size=3, total=7, meta={})
    assert again.missing_shards() == [1]
    again.write_shard(1, *_batch(again.shard_range(1)))
    again.finalize()
    assert len(read_shards(uri)[0]) == 7


def test_failed_write_leaves_no_visible_shard(tmp_path, monkeypatch):
    class Failing(TarWriter):
        def write(self, obj):
            if obj["__key__"].endswith("1001"):
                raise RuntimeError("sampler died")
            return super().write(obj)

    monkeypatch.setattr(shards_mod, "TarWriter", Failing)
    uri = f"file://{tmp_path}/syn"
    w = ShardWriter(uri, shard_size=3, total=7, meta={})
    with pytest.raises(RuntimeError, match="sampler died"):
        w.write_shard(0, *_batch(w.shard_range(0)))
    assert listdir(uri) == []
    assert w.missing_shards() == [0, 1, 2]


def test_wrong_sample_count_is_refused(tmp_path):
    w = ShardWriter(f"file://{tmp_path}/syn", shard_size=3, total=7, meta={})
    with pytest.raises(ValueError, match="shard 2 needs 1 samples"):
        w.write_shard(2, *_batch(range(0, 3)))


def test_missing_manifest_or_shard_is_refused(tmp_path):
    uri = f"file://{tmp_path}/syn"
    w = _write_all(uri)
    with pytest.raises(ShardError, match="no manifest.json"):
        read_shards(uri)
    w.finalize()
    os.remove(tmp_path / "syn" / "shard-000001.tar")
    with pytest.raises(ShardError, match="shard-000001.tar is listed"):
        read_shards(uri)


def test_tampered_shard_is_refused(tmp_path):
    uri = f"file://{tmp_path}/syn"
    _write_all(uri).finalize()
    path = tmp_path / "syn" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY") + 130  # inside the first array's values: still decodes, bytes differ
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000000.tar: sha256 checksum mismatch"):
        read_shards(uri)


def test_manifest_count_mismatch_is_refused(tmp_path):
    uri = f"file://{tmp_path}/syn"
    _write_all(uri).finalize()
    manifest = read_json(f"{uri}/manifest.json")
    manifest["shards"][0]["count"] = 2
    manifest["total"] = 6
    (tmp_path / "syn" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="holds 3 samples, manifest says 2"):
        read_shards(uri)


@pytest.mark.parametrize("damage,problem", [
    (lambda m: m.pop("shape"), "'shape' must be a list of positive integers"),
    (lambda m: m["shards"][0].pop("name"), r"shards\[0\] must have a name shard-N.tar"),
    (lambda m: m["shards"][1].update(name="../../elsewhere.tar"), r"shards\[1\] must have a name shard-N.tar"),
    (lambda m: m.update(total="9"), "'total' must be an integer"),
    (lambda m: m.update(shards={"a": 1}), "'shards' must be a list"),
])
def test_a_malformed_manifest_is_refused_before_any_shard_is_read(tmp_path, damage, problem):
    uri = f"file://{tmp_path}/syn"
    _write_all(uri).finalize()
    manifest = read_json(f"{uri}/manifest.json")
    damage(manifest)
    (tmp_path / "syn" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=rf"manifest.json: not a valid shard manifest \({problem}"):
        read_shards(uri)


def test_a_shard_whose_array_header_is_damaged_is_one_shard_error(tmp_path):
    uri = f"file://{tmp_path}/syn"
    w = _write_all(uri)
    manifest = w.finalize()
    path = tmp_path / "syn" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    at = data.index(b"{'descr'")  # the npy header is a Python literal: cut it open
    data[at:at + 8] = b"(((((((("
    path.write_bytes(bytes(data))
    entry = dict(manifest["shards"][0], sha256=hashlib.sha256(bytes(data)).hexdigest())
    with pytest.raises(ShardError, match=r"shard-000000.tar: unreadable shard"):
        read_shard(uri, entry, manifest["shape"])


@pytest.mark.parametrize("where", ["boundary", "mid-member"])
def test_truncated_synthetic_shard_is_refused(tmp_path, where):
    uri = f"file://{tmp_path}/syn"
    _write_all(uri).finalize()
    _truncate(tmp_path / "syn" / "shard-000001.tar", where)
    with pytest.raises(ShardError, match=r"shard-000001\.tar: truncated"):
        read_shards(uri)
    with pytest.raises(DataError, match=r"shard-000001\.tar: truncated"):
        list(iter_tar(f"{uri}/shard-000001.tar"))
