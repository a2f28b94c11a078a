"""End-to-end tests of the real stages on a tiny pipeline: results, lineage, standalone stages, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from sims_platform.config import config_from_dict
from sims_platform.data import holdout_split, load_images, read_shards
from sims_platform.pipeline.runner import open_run, run_pipeline
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import resolve_tracking_uri
from sims_platform.tracking.results import ROW_KEYS

from pipeline_support import tiny_config_dict

pytestmark = pytest.mark.slow
SIMS = [sys.executable, "-m", "sims_platform.cli"]


def stage_runs(client: MlflowClient, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    return {r.info.run_name: r for r in runs}


def test_pipeline_writes_summary_lineage_and_artifacts(tiny_cfg):
    summary = run_pipeline(tiny_cfg)
    layout = RunLayout.of(tiny_cfg.storage.root)
    on_disk = json.loads(Path(layout.summary[len("file://"):]).read_text())
    assert on_disk == summary
    (row,) = summary["iterations"]
    assert ROW_KEYS <= set(row) and set(row["methods"]) == {"sims"}
    assert set(row["fid"]) == {"0.0", "1.0"} and row["fid_base"] == row["fid"]["0.0"]
    assert str(row["best_w"]) in row["fid"] and row["fid_best"] == row["fid"][str(row["best_w"])]
    assert row["repeats"] == 1 and row["sampler_steps"] == 4
    assert all(0 <= row[m]["0.0"] <= 1 for m in ("precision", "recall"))

    client = MlflowClient(resolve_tracking_uri(tiny_cfg, layout))
    runs = stage_runs(client, "tests")
    parent = runs["tiny"] if "tiny" in runs else client.get_run(summary["mlflow_run_id"])
    assert parent.info.run_id == summary["mlflow_run_id"]
    gen, aux, ev = runs["iter-0/generate"], runs["iter-0/finetune-aux"], runs["iter-0/evaluate"]
    # Lineage: the synthetic set generate wrote is the one the aux model was fine-tuned on.
    assert gen.data.tags["sims.output.synthetic"] == aux.data.tags["sims.input.synthetic"]
    assert aux.data.tags["sims.input.base_model"] == runs["iter-0/train-base"].data.tags["sims.output.model"]
    assert ev.data.tags["sims.input.aux_model"] == aux.data.tags["sims.output.model"]
    iter_run = client.get_run(ev.data.tags["mlflow.parentRunId"])
    assert iter_run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert "loss" in runs["iter-0/train-base"].data.metrics
    # Where each stage ran is on its run and its completion record (a CPU here: no peak GPU memory).
    assert {r.data.tags["sims.device"] for r in (gen, aux, ev)} == {"cpu"}
    marker = json.loads(Path(layout.done_marker(0, "generate")[len("file://"):]).read_text())
    assert (marker["device"], marker["peak_gpu_memory_gib"]) == ("cpu", None)
    assert ev.data.metrics["fid_base"] == pytest.approx(row["fid_base"])
    arts = {a.path for a in client.list_artifacts(ev.info.run_id)} | \
        {a.path for a in client.list_artifacts(ev.info.run_id, "samples")}
    assert {"fid_vs_w.png", "samples/base.png", "samples/sims_w-1.0.png"} <= arts
    png = client.download_artifacts(ev.info.run_id, "samples/sims_w-1.0.png")
    assert Image.open(png).size[0] >= 64

    # Running again does no work: every stage is complete and the same MLflow run is reused.
    t0 = time.time()
    again = run_pipeline(tiny_cfg)
    assert again == summary and time.time() - t0 < 20


def test_a_run_without_a_selection_set_reports_its_preset_w_on_the_same_report_samples(tmp_path):
    """evaluate.selection false samples no selection set; its report sets are the very samples a run with one
    reports (the same FID per set, bit for bit), so a preset-w table reads against a benchmark's fixed-w rows."""
    d = tiny_config_dict(str(tmp_path / "run"))
    d["evaluate"].update(repeats=2, num_samples=32, batch_size=32)
    with_set = run_pipeline(config_from_dict(d))["iterations"][0]
    layout = RunLayout.of(d["storage"]["root"])
    per_arm = json.loads(Path(layout.stage(0, "evaluate")[len("file://"):], "results.json").read_text())["per_arm"]
    d["evaluate"]["selection"] = False
    without = run_pipeline(config_from_dict(d), redo_from=["evaluate"])["iterations"][0]
    again = json.loads(Path(layout.stage(0, "evaluate")[len("file://"):], "results.json").read_text())["per_arm"]
    for arm in ("base", "sims_w-1.0"):
        assert set(again[arm]["fid"]) == {"1", "2"} and set(per_arm[arm]["fid"]) == {"0", "1", "2"}
        assert all(again[arm]["fid"][s] == per_arm[arm]["fid"][s] for s in ("1", "2"))
    assert without["selection"] is False and with_set["selection"] is True
    sims = without["methods"]["sims"]
    assert sims["best_w"] == 1.0 and sims["fid"] == with_set["methods"]["sims"]["fid"]
    assert sims["gain"] == pytest.approx(sims["fid_base"] - sims["fid_best"])  # a loss stays a loss


def write_cfg(tmp_path: Path, **changes) -> Path:
    d = tiny_config_dict(str(tmp_path / "run"))
    for key, value in changes.items():
        node = d
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_interrupted_stage_resumes_from_its_newest_checkpoint(tmp_path):
    cfg = write_cfg(tmp_path, **{"train_base.images": 6144, "train_base.checkpoint_images": 512})
    stage_dir = tmp_path / "run" / "iter-00" / "train-base"
    env = dict(os.environ, SIMS_PROGRESS_INTERVAL="1")
    cmd = SIMS + ["stage", "train-base", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((stage_dir / "checkpoints").glob("ckpt-*.pt")):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # preemption: no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    found = sorted(int(p.stem.split("-")[1]) for p in (stage_dir / "checkpoints").glob("ckpt-*.pt"))
    assert found and found[-1] < 6144, "killed before the stage finished"
    assert not (stage_dir / "_SUCCESS.json").exists()

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resumed = int(out.stderr.split("resumed at ")[1].split("/")[0])
    assert resumed >= found[-1]
    assert (stage_dir / "_SUCCESS.json").exists() and (stage_dir / "model.pt").exists()
    # A complete stage is skipped when run again.
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "already complete" in out.stdout


def test_two_iterations_feed_the_next_generation(tmp_path):
    d = tiny_config_dict(str(tmp_path / "run"))
    d["iterations"] = {"count": 2, "train_data": "real+synthetic", "feed_samples": 80, "feed_sampler": "guided"}
    cfg = config_from_dict(d)
    summary = run_pipeline(cfg)
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    layout = RunLayout.of(cfg.storage.root)
    client = MlflowClient(resolve_tracking_uri(cfg, layout))
    runs = stage_runs(client, "tests")
    feed_out = runs["iter-0/feed"].data.tags["sims.output.feed"]
    assert runs["iter-1/train-base"].data.tags["sims.input.feed_iter_0"] == feed_out
    train, _ = holdout_split(load_images(cfg.data).labels, cfg.data.holdout_fraction, cfg.data.holdout_seed)
    assert runs["iter-1/train-base"].data.params["train_set_size"] == str(len(train) + 80)
    assert "iter-1/feed" not in runs  # the last iteration feeds nothing


def test_feed_samples_with_the_configured_method(tmp_path):
    """feed guides with iterations.feed_method at its w, not always the SIMS aux (here: neon)."""
    from sims_platform.evaluation.methods import Networks
    from sims_platform.evaluation.plan import Arm
    from sims_platform.stages.seeds import sample_seeds
    from sims_platform.stages.sampling import sample_batch

    d = tiny_config_dict(str(tmp_path / "run"))
    d["evaluate"]["methods"] = [{"name": "sims", "weights": [1.0]}, {"name": "neon", "weights": [1.0]}]
    d["iterations"] = {"count": 2, "train_data": "real+synthetic", "feed_samples": 8, "feed_method": "neon",
                       "feed_weight": 1.5}
    d["generate"].update(batch_size=8, shard_size=8)
    cfg = config_from_dict(d)
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    for stage in ("train-base", "generate", "finetune-aux"):
        run_stage(ctx, stage)
    result = run_stage(ctx, "feed")
    assert (result["method"], result["w"]) == ("neon", 1.5)
    fed, _, _ = read_shards(layout.shards(0, "feed"))
    seeds = sample_seeds(cfg.seed, 0, "feed", 8)
    nets = Networks(ctx.cfg, ctx.layout, ctx.iteration, ctx.models.sampling)
    want, _ = sample_batch(ctx, nets.denoiser(Arm("neon", 1.5)), seeds, cfg.generate.sampler)
    sims, _ = sample_batch(ctx, nets.denoiser(Arm("sims", 1.5)), seeds, cfg.generate.sampler)
    assert torch.equal(fed, want.half().float())  # shards store float16
    assert not torch.allclose(fed, sims.half().float())
