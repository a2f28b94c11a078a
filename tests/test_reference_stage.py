"""The reference stage: held-out images streamed through the feature network as a job array plus a reducer."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from webdataset import TarWriter

from sims_platform.config import config_from_dict
from sims_platform.data import holdout_split, load_images
from sims_platform.data.index import SourceIndex
from sims_platform.evaluation.features import feature_extractor
from sims_platform.evaluation.reference import ReferenceFiles, read_result
from sims_platform.metrics import FeatureStats, feature_stats
from sims_platform.pipeline.runner import open_run, stages_for
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.stages.evaluate import reference as evaluate_reference
from sims_platform.stages.reference import ReferencePartsError
from sims_platform.stages.run_data import RunData

from pipeline_support import tiny_config_dict
from s3_support import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)
from test_encoders import TINY_VAE

MAX_SAMPLES = 50  # features kept for precision/recall: part 0's block (33 images) plus part of part 1's


def ref_config(root: Path, batch_size: int = 16):
    d = tiny_config_dict(str(root))
    # 400 images, a quarter held out: 100 held-out images, batches of 16 (the last of each part is partial).
    d["evaluate"].update(batch_size=batch_size, precision_recall={"max_samples": MAX_SAMPLES})
    return config_from_dict(d)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Stage contexts of a fresh run folder (its own MLflow store)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(root: Path, batch_size: int = 16):
        cfg = ref_config(root, batch_size)
        layout, lineage, _ = open_run(cfg)
        return lambda part=0, parts=1: StageContext(cfg, layout, 0, lineage, part=part, parts=parts)
    return make


@pytest.fixture
def loaded(monkeypatch) -> list[int]:
    """Every source index SourceIndex.load decodes from now on."""
    seen: list[int] = []
    original = SourceIndex.load

    def load(self, indices):
        seen.extend(int(i) for i in indices)
        return original(self, indices)
    monkeypatch.setattr(SourceIndex, "load", load)
    return seen


def assert_stats_close(a: FeatureStats, b: FeatureStats, rtol: float = 1e-9) -> None:
    assert a.count == b.count
    for x, y in ((a.sum, b.sum), (a.sum_outer, b.sum_outer)):
        assert float((x - y).abs().max()) <= rtol * float(y.abs().max())


def test_three_parts_equal_one_process_and_the_direct_statistics(run, tmp_path, loaded):
    # One image per feature-network call: float32 features then do not depend on how images are batched,
    # so any difference left is the merge's (float64 rounding, 1e-9).
    ctx = run(tmp_path / "a", batch_size=1)
    for i in (2, 0, 1):  # any order: the reducer merges in block order
        result = run_stage(ctx(i, 3), "reference")
        assert result["complete"] is False and result["parts"] == 3

    # The parts decoded only held-out images, each exactly once: never a training image.
    cfg = ctx().cfg
    train, held = holdout_split(load_images(cfg.data).labels, cfg.data.holdout_fraction, cfg.data.holdout_seed)
    assert sorted(loaded) == held.tolist()
    assert not set(loaded) & set(train.tolist())

    loaded.clear()
    reduced = run_stage(ctx(), "reference-reduce")
    assert reduced["complete"] and reduced["images"] == 100 and reduced["parts"] == 3
    # The reducer decodes only the real-vs-real floor's set (repeats = 1) of training images, never a reference one.
    assert len(loaded) == len(set(loaded)) == cfg.evaluate.num_samples
    assert set(loaded) <= set(train.tolist())

    extractor = feature_extractor(ctx().cfg, ctx().layout.features, ctx().data, ctx().device)
    streamed = read_result(ReferenceFiles.of(ctx().layout, cfg, extractor))
    assert streamed is not None
    stats, features = streamed
    # The direct statistics of the held-out set, all in memory (what evaluate computed before this stage).
    direct = ctx().data.reference.images
    assert_stats_close(stats, feature_stats(extractor, direct, batch_size=1))
    torch.testing.assert_close(features, extractor(direct[:MAX_SAMPLES]).float(), rtol=1e-5, atol=1e-5)
    assert features.shape == (MAX_SAMPLES, extractor.dim)

    # One process (another run folder, same classifier): the same statistics up to float64 rounding.
    shutil.copytree(tmp_path / "a" / "features", tmp_path / "b" / "features",
                    ignore=shutil.ignore_patterns("reference"))
    one = run(tmp_path / "b", batch_size=1)
    assert run_stage(one(), "reference")["complete"]
    single, single_features = read_result(ReferenceFiles.of(one().layout, cfg, extractor))
    assert_stats_close(stats, single)
    assert torch.equal(features, single_features)


def test_evaluate_uses_the_streamed_statistics(run, tmp_path, monkeypatch):
    ctx = run(tmp_path / "a")
    assert run_stage(ctx(), "reference")["complete"]
    extractor = feature_extractor(ctx().cfg, ctx().layout.features, ctx().data, ctx().device)
    stored = read_result(ReferenceFiles.of(ctx().layout, ctx().cfg, extractor))

    def no_images(self):
        raise AssertionError("evaluate loaded the held-out images although the reference stage ran")
    monkeypatch.setattr(RunData, "reference", property(no_images))
    stats, features = evaluate_reference(ctx(), extractor)
    assert_stats_close(stats, stored[0], rtol=0)
    assert torch.equal(features, stored[1])


def test_evaluate_without_the_stage_reads_each_reference_image_once(run, tmp_path):
    """The in-process fallback (no reference stage ran): one pass over the reference, the stage's result."""
    ctx = run(tmp_path / "a")
    extractor = feature_extractor(ctx().cfg, ctx().layout.features, ctx().data, ctx().device)
    seen: list[int] = []

    class Counting:
        name, dim, fingerprint = extractor.name, extractor.dim, extractor.fingerprint

        def __call__(self, images):
            seen.append(len(images))
            return extractor(images)
    stats, features = evaluate_reference(ctx(), Counting())
    assert sum(seen) == len(ctx().data.reference.images) == 100
    assert run_stage(ctx(), "reference")["complete"]  # same batches, same order: the same sums
    stored = read_result(ReferenceFiles.of(ctx().layout, ctx().cfg, extractor))
    assert_stats_close(stats, stored[0], rtol=0)
    assert torch.equal(features, stored[1]) and features.shape == (MAX_SAMPLES, extractor.dim)


def test_reducer_names_missing_and_duplicated_parts(run, tmp_path):
    ctx = run(tmp_path / "a")
    for i in (0, 2):
        run_stage(ctx(i, 3), "reference")
    with pytest.raises(ReferencePartsError, match=r"part\(s\) 1 of 3 have no completion record"):
        run_stage(ctx(), "reference-reduce")

    run_stage(ctx(1, 3), "reference")
    files = ReferenceFiles.of(ctx().layout, ctx().cfg, feature_extractor(ctx().cfg, ctx().layout.features, ctx().data, ctx().device))
    part1 = Path(files.part(1, 3)[len("file://"):])
    moved = part1.with_suffix(".bak")
    part1.rename(moved)
    with pytest.raises(ReferencePartsError, match=r"part 1 of 3: no file \(expected .*part-00001-of-00003.pt\)"):
        run_stage(ctx(), "reference-reduce")
    moved.rename(part1)

    stale = Path(files.part(0, 2)[len("file://"):])
    shutil.copy(Path(files.part(0, 3)[len("file://"):]), stale)
    with pytest.raises(ReferencePartsError, match="different --count values .*duplicated"):
        run_stage(ctx(), "reference-reduce")
    stale.unlink()
    assert run_stage(ctx(), "reference-reduce")["complete"]


def test_runner_runs_the_stage_once_unless_published_statistics_are_named(tmp_path):
    cfg = ref_config(tmp_path)
    assert stages_for(cfg, 0)[0] == "reference" and "reference" not in stages_for(cfg, 1)
    d = tiny_config_dict(str(tmp_path))
    d["evaluate"].update(features="inception", inception_weights="/w.pth", reference="s3://refs/img512.pkl")
    assert "reference" not in stages_for(config_from_dict(d), 0)


# ----------------------------------------------------------------------------
# A separate reference set (data.reference_path): all of it is the reference, all of data.path trains


def digit_shards(where: str, first: int, count: int, per_shard: int) -> str:
    """Digits [first, first + count) as WebDataset shards (png + cls) in the folder URI `where` (file://, s3://);
    returns their brace pattern."""
    d = load_digits()
    shards = -(-count // per_shard)
    for j in range(shards):
        with fsspec.open(f"{where}/digits-{j:02d}.tar", "wb") as f, TarWriter(f) as tar:
            for i in range(first + j * per_shard, first + min((j + 1) * per_shard, count)):
                buf = io.BytesIO()
                Image.fromarray((d.images[i] * 15).astype(np.uint8)).save(buf, format="PNG")
                tar.write({"__key__": f"d{i:05d}", "png": buf.getvalue(), "cls": int(d.target[i])})
    return f"{where}/digits-{{00..{shards - 1:02d}}}.tar"


def separate_config(root: Path, path: str, reference_path: str | None, batch_size: int = 16) -> dict:
    d = tiny_config_dict(str(root))
    d["data"] = {"source": "webdataset", "path": path, "reference_path": reference_path, "resolution": 8,
                 "channels": 1, "num_classes": 10}
    d["train_base"]["images"] = 256
    d["evaluate"].update(batch_size=batch_size, precision_recall={"max_samples": MAX_SAMPLES})
    return d


@pytest.fixture
def opened(monkeypatch) -> dict[str, list[str]]:
    """Every tar shard opened from now on, by who opened it: load_images (whole sets in memory: training data,
    the digits classifier's cache check) or SourceIndex (what the stages stream)."""
    from sims_platform.data import index, shards, sources

    seen: dict[str, list[str]] = {"load_images": [], "SourceIndex": []}
    for module, who in ((sources, "load_images"), (index, "SourceIndex")):
        def spy(uri: str, who: str = who):
            seen[who].append(uri)
            return shards.iter_tar(uri)
        monkeypatch.setattr(module, "iter_tar", spy)
    return seen


def test_a_separate_reference_set_streams_from_s3_in_three_parts(tmp_path, s3_bucket, monkeypatch, loaded,
                                                                   opened):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train = digit_shards(f"file://{tmp_path}/train", 0, 300, 100)
    val = digit_shards(f"{s3_bucket}/val", 300, 100, 25)  # 4 shards of 25: the 3 part blocks straddle them
    d = separate_config(tmp_path / "a", train, val, batch_size=1)
    cfg = config_from_dict(d)
    layout, lineage, _ = open_run(cfg)

    def ctx(part=0, parts=1):
        return StageContext(cfg, layout, 0, lineage, part=part, parts=parts)
    extractor = feature_extractor(ctx().cfg, ctx().layout.features, ctx().data, ctx().device)  # the digits classifier: trained on all 300 training images
    direct = load_images(cfg.data.reference_data())
    assert len(direct) == 100 and len(ctx().data.real) == 300
    # evaluate without the stage (in process) measures against the same images
    fallback = evaluate_reference(ctx(), extractor)

    opened["SourceIndex"].clear()
    for i in (2, 0, 1):
        assert run_stage(ctx(i, 3), "reference")["complete"] is False
    # Every reference image decoded exactly once, streamed from the S3 shards; data.path never opened.
    assert sorted(loaded) == list(range(100))
    streamed = opened["SourceIndex"]
    assert streamed and all(u.startswith(f"{s3_bucket}/val/") for u in streamed), sorted(set(streamed))
    loaded.clear()
    opened["SourceIndex"].clear()
    reduced = run_stage(ctx(), "reference-reduce")
    assert reduced["complete"] and reduced["images"] == 100 and reduced["parts"] == 3
    # The reducer decodes only the real-vs-real floor's training images (one set), streamed from data.path's
    # shards (it indexes the reference shards to count them, decoding none).
    assert len(loaded) == len(set(loaded)) == cfg.evaluate.num_samples and set(loaded) <= set(range(300))
    assert any(u.startswith(f"file://{tmp_path}/train/") for u in opened["SourceIndex"])

    files = ReferenceFiles.of(layout, cfg, extractor)
    stats, features = read_result(files)
    assert_stats_close(stats, feature_stats(extractor, direct.images, batch_size=1))
    torch.testing.assert_close(features, extractor(direct.images[:MAX_SAMPLES]).float(), rtol=1e-5, atol=1e-5)
    assert_stats_close(fallback[0], stats)
    torch.testing.assert_close(fallback[1], features, rtol=0, atol=0)

    # Another reference source never reuses these files: the held-out split of data.path, or another set.
    held_out = config_from_dict(separate_config(tmp_path / "a", train, None, batch_size=1))
    other = config_from_dict(separate_config(tmp_path / "a", train, f"{s3_bucket}/other/x-{{0..1}}.tar", 1))
    roots = {ReferenceFiles.of(layout, c, extractor).root for c in (cfg, held_out, other)}
    assert len(roots) == 3


def test_training_stages_never_read_the_separate_reference(tmp_path, monkeypatch, opened):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train = digit_shards(f"file://{tmp_path}/train", 0, 300, 100)
    val = digit_shards(f"file://{tmp_path}/val", 300, 100, 50)
    cfg = config_from_dict(separate_config(tmp_path / "run", train, val))
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    for stage in ("train-base", "finetune-aux", "finetune-real-aux"):
        if stage == "finetune-aux":  # the synthetic set the aux model trains on
            run_stage(ctx, "generate")
        run_stage(ctx, stage)
    x, _, _ = ctx.data.real_training_data()
    assert len(x) == 300  # nothing is held out of data.path: the reference is a separate set
    feature_extractor(ctx.cfg, ctx.layout.features, ctx.data, ctx.device)  # the digits classifier trains on the training images too

    # encode (latent models): all of data.path, nothing of the reference
    d = separate_config(tmp_path / "latent", train, val)
    d["data"].update(resolution=16, channels=3)
    d["encoder"] = {"kind": "latent", "vae_config": TINY_VAE, "shard_size": 100, "batch_size": 50}
    latent = config_from_dict(d)
    llayout, llineage, _ = open_run(latent)
    assert run_stage(StageContext(latent, llayout, 0, llineage), "encode")["images"] == 300

    every = opened["load_images"] + opened["SourceIndex"]
    assert opened["SourceIndex"] and all(u.startswith(f"file://{tmp_path}/train/") for u in every), sorted(set(every))
