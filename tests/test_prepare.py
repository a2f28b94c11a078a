"""`sims prepare`: a class folder of JPEGs -> WebDataset shards of prepared images, resumable, as a job array."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from s3_support import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)
from test_crop import _noise, edm2_dhariwal, previous_center

from sims_platform.cli import main
from sims_platform.config.schema import DataConfig
from sims_platform.data import DataError, SourceIndex, load_images
from sims_platform.data.prepare import PrepareSpec, run_part
from sims_platform.data.shards import iter_tar

SIMS = [sys.executable, "-m", "sims_platform.cli"]
RES = 16
# Odd sizes; 97x41 and 41x97 have a short side over twice RES, so dhariwal halves them first.
SIZES = [(37, 23), (23, 37), (50, 31), (97, 41), (41, 97), (33, 33), (19, 45)]
CLASSES = {"n01": 4, "n02": 3, "n03": 5}  # 12 images: shards of 5 hold 5, 5, 2


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def jpeg_folder(tmp_path) -> tuple[Path, list[tuple[bytes, int]]]:
    """3 class folders of odd-sized JPEGs; returns the root and (jpeg bytes, class) in the sorted file order."""
    root, files, k = tmp_path / "train", [], 0
    for label, (name, n) in enumerate(sorted(CLASSES.items())):
        (root / name).mkdir(parents=True)
        for i in range(n):
            data = _jpeg(_noise(SIZES[k % len(SIZES)], "RGB", seed=k))
            (root / name / f"{name}_{i:04d}.JPEG").write_bytes(data)
            files.append((data, label))
            k += 1
    return root, files


def _decoded(data: bytes, mode: str = "RGB") -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert(mode)


def _as_float(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(a.copy())
    return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)).float() / 127.5 - 1


def _run(src, dst, index=0, count=1, **kw) -> dict:
    spec = PrepareSpec(src=str(src), dst=str(dst), resolution=RES, shard_size=5, **kw)
    return run_part(spec, index, count, log=lambda m: None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_writes_shards_the_webdataset_source_reads_back_exactly(jpeg_folder, tmp_path):
    root, files = jpeg_folder
    result = _run(root, tmp_path / "out")
    assert result["complete"] and result["shards"] == 3 and result["images"] == 12 and result["written"] == 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2] and manifest["total"] == 12
    assert manifest["classes"] == sorted(CLASSES) and manifest["crop"] == "dhariwal"
    assert manifest["shape"] == [3, RES, RES] and manifest["dtype"] == "uint8" and manifest["format"] == "png"
    # each sample: a PNG, its class and its source file, keyed by its position in the sorted list
    samples = [s for j in range(3) for s in iter_tar(f"file://{tmp_path}/out/shard-{j:06d}.tar")]
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(12)]
    assert samples[3]["src"].decode() == "n01/n01_0003.JPEG" and int(samples[3]["cls"]) == 0
    assert samples[4]["src"].decode() == "n02/n02_0000.JPEG" and int(samples[4]["cls"]) == 1
    # the stored pixels are EDM2's preparation of each JPEG, exactly
    expected = [edm2_dhariwal(_decoded(data), RES) for data, _ in files]
    for s, e in zip(samples, expected):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), e)
    # data.source webdataset reads back exactly those pixels and labels, whatever data.crop says (identity)
    for crop in ("dhariwal", "center", "none"):
        cfg = DataConfig(source="webdataset", path=result["data_path"], resolution=RES, channels=3, num_classes=3,
                         crop=crop)
        got = load_images(cfg)
        assert torch.equal(got.images, torch.stack([_as_float(e) for e in expected]))
        assert got.labels.tolist() == [label for _, label in files]
        assert torch.equal(SourceIndex(cfg).load([11, 0, 6]).images, got.images[[11, 0, 6]])
    # and the folder source, reading the JPEGs directly with the default crop, gives the same training data
    direct = load_images(DataConfig(source="folder", path=str(root), resolution=RES, channels=3, num_classes=3))
    assert torch.equal(direct.images, got.images)


def test_center_and_grayscale_are_stored_as_training_would_read_them(jpeg_folder, tmp_path):
    root, files = jpeg_folder
    result = _run(root, tmp_path / "gray", crop="center", channels=1)
    got = load_images(DataConfig(source="webdataset", path=result["data_path"], resolution=RES, channels=1,
                                 num_classes=3, crop="center"))
    # center scales in float; the PNG holds the nearest uint8 of what training reads from the JPEG directly
    want = torch.stack([previous_center(_decoded(data, "L"), RES) for data, _ in files])
    assert got.images.shape == (12, 1, RES, RES)
    assert torch.equal(got.images, ((want + 1) * 127.5).round() / 127.5 - 1)


def test_parts_write_the_same_bytes_as_one_process(jpeg_folder, tmp_path):
    root, _ = jpeg_folder
    one = _run(root, tmp_path / "one")
    # part 1 first: it cannot finish the set; part 0 then finds every shard committed and writes the manifest
    first = _run(root, tmp_path / "two", index=1, count=2, workers=3)
    assert first["written"] == 1 and not first["complete"]
    assert not (tmp_path / "two" / "manifest.json").exists()
    second = _run(root, tmp_path / "two", index=0, count=2, workers=1)
    assert second["written"] == 2 and second["complete"] and one["complete"]
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    # a rerun of any part afterwards writes nothing and leaves the set as it was (idempotent)
    assert _run(root, tmp_path / "two", index=1, count=2)["written"] == 0
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_a_killed_run_resumes_to_the_same_result(jpeg_folder, tmp_path):
    root, _ = jpeg_folder
    _run(root, tmp_path / "ref")
    out = tmp_path / "out"
    _run(root, out)
    reference = _files(tmp_path / "ref")
    # as a kill leaves it: no manifest, shard 1 half-written under its temporary name, shard 2 truncated
    (out / "manifest.json").unlink()
    partial = (out / "shard-000001.tar").read_bytes()[:3000]
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar.tmp-0123abcd").write_bytes(partial)
    (out / "shard-000002.tar").write_bytes((out / "shard-000002.tar").read_bytes()[:1024])
    logged: list[str] = []
    result = run_part(PrepareSpec(src=str(root), dst=str(out), resolution=RES, shard_size=5), log=logged.append)
    assert result["complete"] and result["written"] == 2
    assert any("shard-000002.tar" in m and "truncated" in m for m in logged)
    assert _files(out) == reference  # the temporary file is gone too


def test_verify_rereads_committed_shards(jpeg_folder, tmp_path):
    root, _ = jpeg_folder
    out = tmp_path / "out"
    _run(root, out)
    reference = _files(out)
    data = bytearray((out / "shard-000000.tar").read_bytes())
    data[2000] ^= 0xFF  # same size, other bytes: only the checksum can tell
    (out / "shard-000000.tar").write_bytes(bytes(data))
    assert _run(root, out)["written"] == 0  # the cheap check keeps it
    assert _run(root, out, verify=True)["written"] == 1
    assert _files(out) == reference


def test_other_settings_never_mix_into_a_set(jpeg_folder, tmp_path):
    root, _ = jpeg_folder
    out = tmp_path / "out"
    _run(root, out)
    with pytest.raises(DataError, match=r"--dst: .* already holds a prepared set .*differs in crop"):
        _run(root, out, crop="center")
    # without a manifest (an unfinished set), shards from other settings are rewritten, not kept
    (out / "manifest.json").unlink()
    result = _run(root, out, crop="center")
    assert result["written"] == 3 and json.loads((out / "manifest.json").read_text())["crop"] == "center"


def test_prepare_to_s3_in_two_parts(jpeg_folder, tmp_path, s3_bucket):
    root, _ = jpeg_folder
    local = _run(root, tmp_path / "local")
    dst = f"{s3_bucket}/imagenet/train-{RES}"
    assert not _run(root, dst, index=0, count=2)["complete"]
    remote = _run(root, dst, index=1, count=2)
    assert remote["complete"] and remote["data_path"] == f"{dst}/shard-{{000000..000002}}.tar"
    import fsspec

    for name, data in _files(tmp_path / "local").items():
        with fsspec.open(f"{dst}/{name}", "rb") as f:
            assert f.read() == data, name
    got = load_images(DataConfig(source="webdataset", path=remote["data_path"], resolution=RES, channels=3,
                                 num_classes=3))
    assert torch.equal(got.images, load_images(DataConfig(source="webdataset", path=local["data_path"],
                                                          resolution=RES, channels=3, num_classes=3)).images)


def test_bad_input_is_one_line_naming_the_file_and_commits_nothing_half_written(jpeg_folder, tmp_path, capsys):
    root, files = jpeg_folder
    bad = root / "n02" / "n02_0001.JPEG"  # image 5: the first of shard 1
    bad.write_bytes(files[5][0][:400])    # a truncated JPEG
    env = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    out = tmp_path / "out"
    proc = subprocess.run(SIMS + ["prepare", "--src", str(root), "--dst", str(out), "--resolution", str(RES),
                                  "--shard-size", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot decode as an image"), proc.stderr
    # shard 0 was committed before; shard 1 was abandoned whole (no shard, record or temporary file)
    assert sorted(os.listdir(out)) == ["shard-000000.json", "shard-000000.tar"]

    # the other bad inputs, through the same entry point in this process (a subprocess costs seconds)
    (root / "n02" / "n02_0001.JPEG").write_bytes(files[5][0])
    (root / "n03" / "notes.txt").write_text("not an image")
    for argv, what in ((["--src", str(tmp_path / "missing")], f"error: --src: folder file://{tmp_path}/missing "
                        "does not exist"),
                       (["--src", str(root), "--crop", "none"], f"error: {root}/n01/n01_0000.JPEG: image is 37x23, "
                        "not square"),
                       (["--src", str(root)], f"error: {root}/n03/notes.txt: cannot decode as an image")):
        assert main(["prepare", *argv, "--dst", str(tmp_path / "other"), "--resolution", str(RES)]) == 2
        err = capsys.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("error:")][0].startswith(what), err


def test_the_webdataset_index_of_a_prepared_set_reads_its_manifest_not_its_shards(jpeg_folder, tmp_path,
                                                                                  monkeypatch):
    import shutil

    from sims_platform.data import index as index_mod

    root, files = jpeg_folder
    result = _run(root, tmp_path / "out")
    shutil.copytree(tmp_path / "out", tmp_path / "bare", ignore=shutil.ignore_patterns("*.json"))  # no manifest
    bare = result["data_path"].replace("/out/", "/bare/")
    opened: list[str] = []

    def spy(uri: str):
        opened.append(uri)
        return iter_tar(uri)
    monkeypatch.setattr(index_mod, "iter_tar", spy)
    for cap in (None, 7):
        cfg = DataConfig(source="webdataset", path=result["data_path"], resolution=RES, channels=3, num_classes=3,
                         max_images=cap)
        scanned = SourceIndex(cfg.model_copy(update={"path": bare}))
        opened.clear()
        index = SourceIndex(cfg)
        assert opened == []  # indexed from manifest.json alone
        assert len(index) == len(scanned) == (cap or 12)
        assert index.labels.tolist() == scanned.labels.tolist() == [label for _, label in files][: cap or 12]
        picked = [6, 0, len(index) - 1]
        want = scanned.load(picked).images
        opened.clear()
        assert torch.equal(index.load(picked).images, want)
        # it reads only the shards that hold those samples (5 a shard)
        assert sorted(opened) == [f"file://{tmp_path}/out/shard-{j:06d}.tar" for j in sorted({i // 5 for i in picked})]
