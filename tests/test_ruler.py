"""One ruler for every training seed (evaluate.features_seed) and the real-vs-real floor (fid_floor)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from sims_platform.config import config_from_dict
from sims_platform.data import holdout_split, load_images
from sims_platform.data.index import SourceIndex
from sims_platform.evaluation.features import feature_extractor
from sims_platform.evaluation.floor import compute_floor, floor_sets, read_floor, training_source
from sims_platform.evaluation.reference import ReferenceFiles, read_result
from sims_platform.metrics import feature_stats, fid_from_stats
from sims_platform.pipeline.execute import run_stage
from sims_platform.pipeline.provenance import step_provenance
from sims_platform.pipeline.runner import open_run, run_pipeline
from sims_platform.stages.context import StageContext
from sims_platform.stages.evaluate import real_floor
from sims_platform.stages.run_data import RunData
from sims_platform.steps import Step
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import format_table, resolve_tracking_uri

from pipeline_support import tiny_config_dict

CPU = torch.device("cpu")


def config(root: Path, **evaluate):
    d = tiny_config_dict(str(root))  # 400 digits: 300 training images, 100 held out
    d["evaluate"].update(evaluate)
    return d


def ruler(d: dict, root: Path):
    cfg = config_from_dict(d)
    return feature_extractor(cfg, str(root / "features"), RunData(cfg, RunLayout.of(str(root)), 0, CPU), CPU)


# ----------------------------------------------------------------------------
# One ruler


def test_every_training_seed_is_measured_with_the_same_feature_network(tmp_path):
    seed0 = config(tmp_path / "a")
    seed3 = {**config(tmp_path / "b"), "seed": 3}
    # Each trained from scratch in its own folder: the same network because nothing of the run seed enters it.
    a, b = ruler(seed0, tmp_path / "a"), ruler(seed3, tmp_path / "b")
    assert not a.from_cache and not b.from_cache
    assert a.fingerprint == b.fingerprint
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[name], sb[name]) for name in sa)
    images = load_images(config_from_dict(seed0).data).images[:32]
    assert torch.equal(a(images), b(images))

    # Another features_seed is another network (and another fingerprint, so no cache is shared).
    other = ruler(config(tmp_path / "c", features_seed=1), tmp_path / "c")
    assert other.fingerprint != a.fingerprint
    assert any(not torch.equal(sa[name], other.net.state_dict()[name]) for name in sa)

    # The reference statistics are made with it: their stage reads features_seed, not the run seed.
    settings = step_provenance(config_from_dict(seed0), Step(0, "reference")).settings
    assert "evaluate.features_seed" in settings and "seed" not in settings


def test_features_seed_is_validated():
    with pytest.raises(ValueError, match="features_seed"):
        config_from_dict(config(Path("/nowhere"), features_seed=-1))


# ----------------------------------------------------------------------------
# The floor's sets


def test_floor_sets_are_disjoint_report_sized_and_capped_by_the_training_split():
    sets = floor_sets(1347, 500, 3)  # the demo: 1,347 training digits, report sets of 500
    assert len(sets) == 2 and all(len(s) == 500 for s in sets)
    assert not set(sets[0].tolist()) & set(sets[1].tolist())
    assert all(0 <= int(s.min()) and int(s.max()) < 1347 for s in sets)
    assert [len(s) for s in floor_sets(300, 64, 3)] == [64] * 3  # capped by repeats
    assert floor_sets(300, 301, 3) == []
    # Fixed: the same sets on every call (no run seed enters them).
    assert all(torch.equal(x, y) for x, y in zip(sets, floor_sets(1347, 500, 3)))


def test_no_floor_when_a_report_set_does_not_fit_in_the_training_split(tmp_path):
    cfg = config_from_dict(config(tmp_path, num_samples=301))  # 300 training images
    index, train = training_source(cfg.data)
    never = SimpleNamespace(dim=64)  # no image is measured
    record = compute_floor(never, index, train, None, None, cfg.evaluate)
    assert record["mean"] is None and record["sets"] == 0 and record["samples"] == 301
    assert "300 images, fewer than one report set (evaluate.num_samples = 301)" in record["reason"]


def test_published_reference_statistics_have_no_floor(tmp_path):
    d = config(tmp_path, features="inception", inception_weights="/w.pth", reference="s3://refs/img512.pkl")
    record = real_floor(SimpleNamespace(cfg=config_from_dict(d)), None, None, None)
    assert record["mean"] is None and record["sd"] is None and "published statistics" in record["reason"]


# ----------------------------------------------------------------------------
# The floor as the reference stage measures it


def test_the_reference_stage_measures_the_floor_on_disjoint_training_sets(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict(config(tmp_path / "run", repeats=3, num_samples=64, batch_size=16))
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    extractor = feature_extractor(cfg, layout.features, ctx.data, CPU)
    train, held = holdout_split(load_images(cfg.data).labels, cfg.data.holdout_fraction, cfg.data.holdout_seed)

    loads: list[list[int]] = []
    original = SourceIndex.load

    def load(self, indices):
        loads.append([int(i) for i in indices])
        return original(self, indices)
    monkeypatch.setattr(SourceIndex, "load", load)
    assert run_stage(ctx, "reference")["complete"]

    held_set = set(held.tolist())
    floor_loads = [i for batch in loads for i in batch if i not in held_set]
    assert sorted(i for batch in loads for i in batch if i in held_set) == held.tolist()  # the statistics' pass
    # min(repeats 3, 300 // 64) = 3 disjoint sets of exactly 64 training images; no reference image among them.
    sets = [train[positions] for positions in floor_sets(len(train), 64, 3)]
    assert len(floor_loads) == len(set(floor_loads)) == 3 * 64
    assert set(floor_loads) == set(torch.cat(sets).tolist()) and set(floor_loads) <= set(train.tolist())

    files = ReferenceFiles.of(layout, cfg, extractor)
    record = read_floor(files)
    ref_stats, _ = read_result(files)
    assert record["sets"] == 3 and record["samples"] == 64 and record["training_images"] == 300
    # Each set's FID is the plain FID of those images' features against the reference statistics.
    images = load_images(cfg.data).images
    direct = [fid_from_stats(feature_stats(extractor, images[s], batch_size=16), ref_stats) for s in sets]
    assert record["fid_per_set"] == pytest.approx(direct, rel=1e-6)
    assert record["mean"] == pytest.approx(sum(direct) / 3, rel=1e-6)
    assert record["sd"] == pytest.approx(float(torch.tensor(direct).std()), rel=1e-5)
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1

    # The evaluate stage reads the stored floor; computed in memory (no reference stage) it is the same.
    assert real_floor(ctx, extractor, ref_stats, None) == record
    files_gone = Path(files.floor[len("file://"):])
    files_gone.unlink()
    again = real_floor(ctx, extractor, *read_result(files))
    assert again["fid_per_set"] == pytest.approx(record["fid_per_set"], rel=1e-9)

    # Another report size is another reference key: its floor is recomputed, never reused.
    other = config_from_dict(config(tmp_path / "run", repeats=3, num_samples=32, batch_size=16))
    assert ReferenceFiles.of(layout, other, extractor).key != files.key


# ----------------------------------------------------------------------------
# A pipeline


@pytest.mark.slow
def test_every_iteration_of_the_summary_carries_the_floor(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = config(tmp_path / "run", repeats=2)
    d["iterations"] = {"count": 2}
    cfg = config_from_dict(d)
    summary = run_pipeline(cfg)
    rows = summary["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1]
    floors = [r["fid_floor"] for r in rows]
    assert floors[0] == floors[1]  # one floor per run: the reference is the run's
    floor = floors[0]
    assert set(floor) == {"mean", "sd", "sets", "samples", "precision", "recall"}
    assert (floor["sets"], floor["samples"]) == (2, 64) and floor["mean"] > 0 and floor["sd"] > 0
    layout = RunLayout.of(cfg.storage.root)
    assert json.loads(Path(layout.summary[len("file://"):]).read_text())["iterations"][1]["fid_floor"] == floor

    client = MlflowClient(resolve_tracking_uri(cfg, layout))
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=200)}
    for k in (0, 1):
        metrics = runs[f"iter-{k}/evaluate"].data.metrics
        assert metrics["fid_floor"] == pytest.approx(floor["mean"])
        assert metrics["fid_floor_sd"] == pytest.approx(floor["sd"])
    assert "real vs real (floor)" in format_table(summary)
