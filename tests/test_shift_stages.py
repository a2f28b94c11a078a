"""Distribution shifting in the pipeline: config validation, the class-imbalanced subset, the select-aux stage
(on a stand-in synthetic set) and evaluate's shift section (on untrained networks: the wiring, not the effect)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pipeline_support import tiny_config_dict

from sims_platform.config import ConfigError, config_from_dict
from sims_platform.data import ShardWriter, class_subset, read_manifest, read_shards
from sims_platform.pipeline.runner import open_run, stages_for
from sims_platform.shift.classifiers import classify, halves, shift_classifier
from sims_platform.shift.selection import class_histogram, stratified_counts
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.stages.seeds import sample_seeds
from sims_platform.storage import fsio

FRACTIONS = {5: 0.25, 6: 0.25, 7: 0.25, 8: 0.25, 9: 0.25}


def shift_dict(root: str, **shift) -> dict:
    d = tiny_config_dict(root)
    d["data"].update(conditional=False, class_fractions=FRACTIONS)
    d["shift"] = {"target": "uniform", "w": 1.0, "aux_samples": 120} | shift
    return d


# ----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("change,expected", [
    ({"shift": {"target": {c: 0.1 for c in range(9)} | {9: 0.2}}}, r"shift\.target: .*sum to 1"),
    ({"shift": {"target": {c: 0.1 for c in range(9)} | {9: 0.0}}}, r"shift\.target: .*must be > 0"),
    ({"shift": {"target": {c: 0.1 for c in range(9)} | {10: 0.1}}}, r"classes \[10\] are not in 0\.\.9"),
    ({"shift": {"target": {c: 0.125 for c in range(8)}}}, r"classes \[8, 9\] have no proportion"),
    ({"shift": {"w": 0.0}}, r"shift\.w: .*greater than 0"),
    ({"shift": {"gain": -1.0}}, r"shift\.gain: .*greater than 0"),
    ({"data": {"class_fractions": {3: 1.5}}}, r"data\.class_fractions: fractions must be in \(0, 1\]"),
    ({"data": {"class_fractions": {12: 0.5}}}, r"data\.class_fractions: classes \[12\] are not in 0\.\.9"),
    ({"data": {"num_classes": 0, "class_fractions": None}}, r"shift needs labelled data"),
])
def test_bad_shift_settings_name_the_field(tmp_path, change, expected):
    d = shift_dict(str(tmp_path))
    for section, values in change.items():
        d[section] = {**d[section], **values}
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(d)


def test_unconditional_models_keep_the_labels_for_classifiers(tmp_path):
    cfg = config_from_dict(shift_dict(str(tmp_path)))
    assert cfg.data.label_dim == 0 and cfg.data.num_classes == 10
    assert stages_for(cfg, 0) == ["reference", "train-base", "generate", "select-aux", "finetune-aux", "evaluate"]
    assert cfg.shift.target_probs(4) == [0.25] * 4
    plain = config_from_dict(tiny_config_dict(str(tmp_path)))
    assert "select-aux" not in stages_for(plain, 0) and plain.data.label_dim == 10


def test_class_subset_is_deterministic_and_keeps_the_listed_fractions():
    labels = torch.arange(10).repeat_interleave(40)
    keep = class_subset(labels, FRACTIONS, seed=3)
    counts = torch.bincount(labels[keep], minlength=10).tolist()
    assert counts == [40] * 5 + [10] * 5
    assert torch.equal(keep, class_subset(labels, FRACTIONS, seed=3))
    assert not torch.equal(keep, class_subset(labels, FRACTIONS, seed=4))
    assert torch.equal(class_subset(labels, None, seed=3), torch.arange(400))


# ----------------------------------------------------------------------------
# Stages


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Iterator[StageContext]:
    """One run folder for the stage tests (its MLflow store takes seconds to create). All 1,797 digits: the
    classifiers' halves of a 400-image subset are too small to find every class among imbalanced samples."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        d = shift_dict(str(tmp_path_factory.mktemp("shift") / "run"))
        d["data"]["max_images"] = None
        cfg = config_from_dict(d)
        layout, lineage, _ = open_run(cfg)
        ctx = StageContext(cfg, layout, 0, lineage, requested_device=torch.device("cpu"))
        write_stand_in_synthetic_set(ctx)
        yield ctx


def write_stand_in_synthetic_set(ctx: StageContext) -> torch.Tensor:
    """The imbalanced training images as iteration 0's 'generate' shards (a base that reproduces its data)."""
    x = ctx.data.real.images
    writer = ShardWriter(ctx.layout.shards(0, "generate"), shard_size=ctx.cfg.generate.shard_size, total=len(x),
                         meta={"source_model": "stand-in", "iteration": 0})
    seeds = sample_seeds(ctx.cfg.seed, 0, "generate", len(x))
    for j in range(writer.num_shards):
        r = writer.shard_range(j)
        writer.write_shard(j, x[r.start:r.stop], torch.zeros(len(r), dtype=torch.int64), seeds[r.start:r.stop])
    writer.finalize()
    return x


def test_training_split_is_imbalanced_but_classifiers_see_all_of_it(ctx):
    real, labelled = ctx.data.real, ctx.data.labelled
    per_class = torch.bincount(real.labels, minlength=10)
    assert (per_class[5:] < per_class[:5].min()).all()
    assert len(labelled.labels) > len(real.labels)
    a, b = halves(labelled.labels, ctx.cfg.data.holdout_seed)
    assert not set(a.tolist()) & set(b.tolist()) and len(a) + len(b) == len(labelled.labels)


def test_select_aux_writes_the_designed_resample_and_resumes(ctx):
    x = ctx.data.real.images
    result = run_stage(ctx, "select-aux")
    out = ctx.layout.shards(0, "select-aux")
    manifest = read_manifest(out)
    predicted = classify(shift_classifier(ctx.cfg, ctx.layout.features, ctx.data.labelled, ctx.device, "select"), x, 64)
    base = class_histogram(predicted, 10)
    assert manifest["base_histogram"] == base.tolist()
    assert manifest["counts"] == stratified_counts(manifest["aux_histogram"], 120) == result["counts"]
    sel_x, sel_y, sel_seeds = read_shards(out)
    assert len(sel_x) == 120 and torch.bincount(sel_y, minlength=10).tolist() == manifest["counts"]
    # The aux set over-represents the classes the base over-produces (what guidance should push away from).
    aux = torch.tensor(manifest["aux_histogram"])
    assert aux[:5].sum() > base[:5].sum()
    # Every selected sample is a synthetic sample with its seed and the selecting classifier's label.
    by_seed = {int(s): i for i, s in enumerate(sample_seeds(ctx.cfg.seed, 0, "generate", len(x)))}
    rows = torch.tensor([by_seed[int(s)] for s in sel_seeds])
    assert torch.equal(sel_y, predicted[rows])
    torch.testing.assert_close(sel_x, x[rows].half().float())
    # Complete: skipped. A lost shard is rewritten with the same bytes (the selection is deterministic).
    assert run_stage(ctx, "select-aux")["counts"] == result["counts"]
    first = fsio.read_bytes(fsio.join(out, "shard-000000.tar"))
    fsio.remove(fsio.join(out, "shard-000000.tar"))
    fsio.remove(ctx.layout.done_marker(0, "select-aux"))
    run_stage(ctx, "select-aux")
    assert fsio.read_bytes(fsio.join(out, "shard-000000.tar")) == first


def test_evaluate_records_judged_histograms_tv_and_reweighted_fid(ctx):
    run_stage(ctx, "select-aux")  # skipped when the test above ran
    net = ctx.models.build()  # untrained: the wiring is under test, not the shift
    for stage in ("train-base", "finetune-aux"):
        ctx.models.save(ctx.layout.model(0, stage), net, 0, stage=stage, iteration=0)
    run_stage(ctx, "evaluate")
    res = fsio.read_json(fsio.join(ctx.layout.stage(0, "evaluate"), "results.json"))
    sh = res["shift"]
    assert sh["target"] == [0.1] * 10 and sh["aux_set_histogram"] == read_manifest(
        ctx.layout.shards(0, "select-aux"))["aux_histogram"]
    for key, arm in sh["per_arm"].items():
        for s, hist in arm["histogram"].items():
            assert abs(sum(hist) - 1) < 1e-9
            assert arm["tv"][s] == pytest.approx(0.5 * sum(abs(p - 0.1) for p in hist))
            assert arm["fid_target"][s] > 0
    sims = sh["methods"]["sims"]
    assert set(sims) == {"0.0", "1.0"} and sims["0.0"]["gain_fit"] is None
