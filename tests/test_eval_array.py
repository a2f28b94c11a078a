"""evaluate as a job array plus a reducer: same FID as one process, and incomplete/duplicated parts are errors."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sims_platform.steps import Step
from sims_platform.config import config_from_dict
from sims_platform.pipeline.runner import open_run
from sims_platform.pipeline.execute import is_done, run_stage
from sims_platform.stages.context import StageContext
from sims_platform.config.schema import EvaluateConfig, MethodConfig
from sims_platform.evaluation.plan import owner, part_block, work_units
from sims_platform.stages.evaluate import EvaluatePartsError
from sims_platform.storage import fsio

from pipeline_support import tiny_config_dict

UPSTREAM = ("train-base", "generate", "finetune-aux")
ev_mod = importlib.import_module("sims_platform.stages.evaluate")  # the package re-exports a function of that name


def array_config(root: Path):
    data = tiny_config_dict(str(root))
    # 2 arms (base, sims w=1) x 2 seed sets (selection, report) x 3 batches = 12 units: 3 parts get 4 each,
    # and sims w=1's report-set grid (seeds 0..39) spans parts 2's units of batches 0..2.
    # More samples than feature dims (64): a full-rank covariance keeps FID's sqrtm well conditioned, so
    # float64 rounding differences of the merged sums stay at rounding level in the FID too.
    data["evaluate"].update(num_samples=96, batch_size=32, grid_size=40)
    return config_from_dict(data)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A run folder whose iteration 0 has the models evaluate needs (trained once for the module)."""
    root = tmp_path_factory.mktemp("eval-array") / "run"
    cfg = array_config(root)
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    for stage in UPSTREAM:
        run_stage(ctx, stage)
    return root


@pytest.fixture
def fresh(upstream, tmp_path, monkeypatch):
    """A copy of the upstream folder with its own MLflow store; returns a factory of stage contexts."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "run"
    shutil.copytree(upstream, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "run.json"))
    cfg = array_config(root)
    layout, lineage, _ = open_run(cfg)

    def ctx(part: int = 0, parts: int = 1) -> StageContext:
        return StageContext(cfg, layout, 0, lineage, part=part, parts=parts)
    return ctx


def run_array(ctx, parts: int = 3) -> None:
    for i in range(parts):
        result = run_stage(ctx(i, parts), "evaluate")
        assert result["complete"] is False and result["parts"] == parts


def evaluate_dir(ctx) -> Path:
    return Path(ctx().layout.stage(0, "evaluate")[len("file://"):])


# ----------------------------------------------------------------------------
# The split


@pytest.mark.parametrize("units,parts", [(8, 3), (8, 1), (2, 3), (10, 4), (7, 7)])
def test_split_is_balanced_disjoint_and_complete(units, parts):
    blocks = [part_block(units, i, parts) for i in range(parts)]
    assert sorted(u for b in blocks for u in b) == list(range(units))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert all(owner(u, units, parts) == i for i, b in enumerate(blocks) for u in b)


def test_units_cover_every_seed_of_every_set_for_every_arm():
    ev = EvaluateConfig(methods=[MethodConfig(name="sims", weights=[0.0, 1.0])], num_samples=70, batch_size=16,
                        repeats=1)
    units = work_units(ev)
    assert [(u.arm.key, u.seed_set, u.start, u.count) for u in units[:6]] == [
        ("base", 0, 0, 16), ("base", 0, 16, 16), ("base", 0, 32, 16), ("base", 0, 48, 16), ("base", 0, 64, 6),
        ("base", 1, 0, 16)]
    assert sum(u.count for u in units) == 2 * 2 * 70


# ----------------------------------------------------------------------------
# Array == single process


@pytest.mark.slow
def test_array_matches_single_process(fresh):
    ctx = fresh
    single = run_stage(ctx(), "evaluate")
    assert single["complete"] is True
    out = evaluate_dir(ctx)
    client = MlflowClient(ctx().lineage.tracking_uri)
    run_id = ctx().lineage.stage_run(Step(0, "evaluate"))
    grid_single = Path(client.download_artifacts(run_id, "samples/sims_w-1.0.png", str(out.parent / "a"))).read_bytes()
    stats_single = {a: torch.load(out / "per-arm" / f"{a}.stats.pt") for a in ("base", "sims_w-1.0")}
    results_single = fsio.read_json(fsio.join(ctx().layout.stage(0, "evaluate"), "results.json"))
    shutil.rmtree(out)  # the array recomputes the whole stage in the same folder

    run_array(ctx)
    assert not is_done(ctx(), "evaluate")
    assert not (out / "fid.json").exists()
    reduced = run_stage(ctx(), "evaluate-reduce")
    assert reduced["complete"] is True and reduced["parts"] == 3
    # The reducer's record is the evaluate stage's: the local runner, feed and the k8s driver find it.
    assert is_done(ctx(), "evaluate")
    assert fsio.read_json(ctx().layout.done_marker(0, "evaluate"))["stage"] == "evaluate-reduce"
    results = fsio.read_json(fsio.join(ctx().layout.stage(0, "evaluate"), "results.json"))
    for arm, metrics in results_single["per_arm"].items():
        for name, by_set in metrics.items():
            for s, value in by_set.items():  # FID up to float64 rounding; precision/recall exactly
                assert results["per_arm"][arm][name][s] == pytest.approx(value, rel=1e-9, abs=0), (arm, name, s)
    assert results["row"]["best_w"] == results_single["row"]["best_w"]
    for arm, sets in stats_single.items():
        merged = torch.load(out / "per-arm" / f"{arm}.stats.pt")
        assert merged.keys() == sets.keys() == {"0", "1"}
        for key, st in sets.items():
            assert merged[key]["count"] == st["count"] == 96
            torch.testing.assert_close(merged[key]["sum"], st["sum"], rtol=1e-12, atol=0)
            torch.testing.assert_close(merged[key]["sum_outer"], st["sum_outer"], rtol=1e-12, atol=0)
    # Same seeds, same batches: the grid is pixel-identical.
    metrics = client.get_run(run_id).data.metrics
    assert metrics["sims.fid_best"] == pytest.approx(single["row"]["fid_best"], rel=1e-9)
    grid_array = Path(client.download_artifacts(run_id, "samples/sims_w-1.0.png", str(out.parent / "b"))).read_bytes()
    assert grid_array == grid_single
    # Parts logged part-level metrics only, into the same stage run as the reducer.
    history = client.get_metric_history(run_id, "part_units")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (1, 4.0), (2, 4.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    # Done: a rerun of a part or of the reducer skips.
    assert run_stage(ctx(1, 3), "evaluate")["complete"] is True


# ----------------------------------------------------------------------------
# Incomplete and duplicated parts


@pytest.mark.slow
def test_missing_part_is_named(fresh):
    ctx = fresh
    for i in (0, 2):  # part 1 never ran
        run_stage(ctx(i, 3), "evaluate")
    with pytest.raises(EvaluatePartsError, match=r"part\(s\) 1 of 3 have no completion record"):
        run_stage(ctx(), "evaluate-reduce")
    assert not is_done(ctx(), "evaluate")

    run_stage(ctx(1, 3), "evaluate")
    lost = evaluate_dir(ctx) / "parts" / "sims_w-1.0" / "part-00002-of-00003.pt"
    lost.unlink()  # a part that recorded completion but whose statistics vanished
    with pytest.raises(EvaluatePartsError,
                       match=r"sims_w-1.0: part 2 of 3 lacks \(set, batch\) \[\(0, 2\), \(1, 0\), \(1, 1\), \(1, 2\)\]"):
        run_stage(ctx(), "evaluate-reduce")


@pytest.mark.slow
def test_duplicated_parts_are_named(fresh):
    ctx = fresh
    run_array(ctx)
    parts = evaluate_dir(ctx) / "parts"

    # An extra file claiming units part 0 holds (e.g. a stray copy): both claimants are named.
    extra = parts / "base" / "part-00001-of-00003.pt"
    rec = torch.load(parts / "base" / "part-00000-of-00003.pt")
    own = torch.load(extra)
    torch.save({**own, "units": own["units"] + [[0, 1]]}, extra)
    with pytest.raises(EvaluatePartsError, match=r"base: unit \(set 0, batch 1\) is claimed by part 0 and part 1 of 3"):
        run_stage(ctx(), "evaluate-reduce")
    torch.save(own, extra)
    assert rec["units"] == [[0, 0], [0, 1], [0, 2], [1, 0]]

    # A part record written twice with different counts (part 0 also ran with --count 4).
    stale = parts / "part-00000-of-00004.json"
    shutil.copy(parts / "part-00000-of-00003.json", stale)
    with pytest.raises(EvaluatePartsError, match=r"different --count values.*--count 4: part-00000-of-00004.json"):
        run_stage(ctx(), "evaluate-reduce")
    with pytest.raises(EvaluatePartsError, match=r"--count 4 \(part-00000-of-00004.json\).*--count 3"):
        run_stage(ctx(0, 3), "evaluate", force=True)
    stale.unlink()
    assert run_stage(ctx(), "evaluate-reduce")["complete"] is True


@pytest.mark.slow
def test_restarted_part_skips_done_units(fresh, monkeypatch):
    ctx = fresh
    calls: list[int] = []
    real = ev_mod.sample_batch

    def flaky(c, denoise, seeds, sampler):
        if len(calls) == 2:
            raise KeyboardInterrupt("pod killed")  # after two of part 0's four units
        calls.append(int(seeds[0]))
        return real(c, denoise, seeds, sampler)

    monkeypatch.setattr(ev_mod, "sample_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx(0, 3), "evaluate")
    saved = torch.load(evaluate_dir(ctx) / "parts" / "base" / "part-00000-of-00003.pt")
    assert saved["units"] == [[0, 0], [0, 1]] and saved["stats"]["0"]["count"] == 64

    calls.clear()
    monkeypatch.setattr(ev_mod, "sample_batch", lambda *a: (calls.append(int(a[2][0])), real(*a))[1])
    assert run_stage(ctx(0, 3), "evaluate")["units"] == 2
    assert len(calls) == 2  # only the last two units were sampled again
    saved = torch.load(evaluate_dir(ctx) / "parts" / "base" / "part-00000-of-00003.pt")
    assert saved["units"] == [[0, 0], [0, 1], [0, 2], [1, 0]]
    assert saved["stats"]["0"]["count"] == 96 and saved["stats"]["1"]["count"] == 32
