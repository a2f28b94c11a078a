"""Tracking: MLflow run tree and logging (local SQLite store and a real server), summary.json, table, PNGs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from sims_platform.steps import Step
from sims_platform.config import config_from_dict
from sims_platform.config.schema import EvaluateConfig, MethodConfig
from sims_platform.evaluation.report import iteration_row, method_result
from sims_platform.launch import servers
from sims_platform.storage.fsio import read_json
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import (
    Lineage,
    LineageError,
    fid_curves_png,
    fid_plot_png,
    format_table,
    image_grid_png,
    resolve_tracking_uri,
    ui_command,
    update_summary,
    write_summary,
)
from sims_platform.tracking.results import ROW_KEYS


def make_cfg(root: Path, **extra):
    data = {"name": "demo", "train_base": {"images": 64}, "finetune_aux": {"images": 32},
            "storage": {"root": str(root)}, **extra}
    return config_from_dict(data)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path / "run")
    layout = RunLayout.of(cfg.storage.root)
    return cfg, layout, Lineage.from_config(cfg, layout)


# ----------------------------------------------------------------------------
# Tracking URI


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path / "run")
    layout = RunLayout.of(cfg.storage.root)
    uri = resolve_tracking_uri(cfg, layout)
    assert uri == f"sqlite:///{tmp_path}/run/mlflow.db"
    assert ui_command(uri, layout, ".venv/bin/sims") == f".venv/bin/sims ui {os.path.relpath(tmp_path / 'run')}"
    assert ui_command(uri).startswith("mlflow ui --backend-store-uri sqlite:///")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(cfg, layout) == "http://env:5000"
    cfg.tracking.uri = "http://cfg:5000"
    assert resolve_tracking_uri(cfg, layout) == "http://cfg:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    remote = make_cfg(tmp_path, storage={"root": "s3://bucket/run"})
    with pytest.raises(LineageError, match="tracking.uri"):
        resolve_tracking_uri(remote, RunLayout.of(remote.storage.root))


# ----------------------------------------------------------------------------
# Run tree


def test_pipeline_run_is_created_once(setup):
    cfg, layout, lin = setup
    run_id = lin.pipeline_run(cfg)
    assert read_json(layout.run_record)["mlflow_run_id"] == run_id
    again = Lineage.from_config(cfg, layout)  # e.g. a stage started in another process
    assert again.pipeline_run(cfg) == run_id
    assert again.pipeline_id == run_id
    client = MlflowClient(lin.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["sims.run_name"] == "demo"
    assert run.data.tags["sims.storage_root"] == layout.root
    assert run.data.params["train_base.images"] == "64"
    assert run.data.params["evaluate.repeats"] == "3"
    yaml_path = client.download_artifacts(run_id, "pipeline.yaml")
    assert "finetune_aux:" in Path(yaml_path).read_text()
    # Artifacts live under the storage root, not in the working directory.
    assert run.info.artifact_uri.startswith(f"{layout.root}/mlartifacts/")
    exp = client.get_experiment(lin.experiment_id)
    assert len(client.search_runs([exp.experiment_id], "tags.`sims.kind` = 'pipeline'")) == 1


def test_pipeline_run_found_by_tags_without_record(setup):
    cfg, layout, lin = setup
    run_id = lin.pipeline_run(cfg)
    os.remove(layout.run_record[len("file://"):])
    assert Lineage.from_config(cfg, layout).pipeline_run(cfg) == run_id


def test_record_pointing_elsewhere_is_an_error(setup, tmp_path):
    cfg, layout, lin = setup
    lin.pipeline_run(cfg)
    other = Lineage(f"sqlite:///{tmp_path}/other/mlflow.db", "sims", layout,
                    artifact_location=f"file://{tmp_path}/other/art")
    with pytest.raises(LineageError, match="does not have it"):
        other.pipeline_run(cfg)


def test_stage_before_pipeline_is_an_error(setup):
    _, _, lin = setup
    with pytest.raises(LineageError, match="pipeline_run"):
        lin.stage_run(Step(0, "train-base"))


def test_stage_runs_nest_and_are_reused(setup):
    cfg, layout, lin = setup
    pipe = lin.pipeline_run(cfg)
    client = MlflowClient(lin.tracking_uri)
    stage = lin.stage_run(Step(0, "train-base"))
    run = client.get_run(stage)
    assert run.info.run_name == "iter-0/train-base"
    assert run.data.tags["sims.stage"] == "train-base" and run.data.tags["sims.iteration"] == "0"
    assert run.data.tags["sims.storage_root"] == layout.root
    it = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert it.info.run_name == "iter-0" and it.data.tags["sims.kind"] == "iteration"
    assert it.data.tags["mlflow.parentRunId"] == pipe

    lin.finish(stage)
    assert client.get_run(stage).info.status == "FINISHED"
    other = Lineage.from_config(cfg, layout)  # a re-run in a fresh process
    assert other.stage_run(Step(0, "train-base")) == stage
    assert client.get_run(stage).info.status == "RUNNING"  # running again
    assert other.iteration_run(0) == it.info.run_id
    gen = other.stage_run(Step(0, "generate"))
    assert gen != stage and client.get_run(gen).data.tags["mlflow.parentRunId"] == it.info.run_id
    nxt = other.stage_run(Step(1, "train-base"))
    assert client.get_run(nxt).data.tags["mlflow.parentRunId"] != it.info.run_id
    with pytest.raises(ValueError, match="unknown stage"):
        lin.stage_run(Step(0, "bogus"))
    with pytest.raises(ValueError, match="status"):
        lin.finish(stage, "DONE")


def test_params_raced_by_another_part_of_the_job_array_are_logged_once(setup, monkeypatch):
    """Two evaluate parts log the same params at once: the server refuses the later batch (the key exists now);
    the part reads again, sees them logged and goes on, instead of failing the whole part."""
    from mlflow.exceptions import MlflowException

    cfg, _, lin = setup
    lin.pipeline_run(cfg)
    run = lin.stage_run(Step(0, "evaluate"))
    real_log_batch, raced = lin.client.log_batch, []

    def racing_log_batch(run_id, params=(), **kw):
        if not raced:  # the other part wins the race: its batch lands between our read and our write
            raced.append(True)
            real_log_batch(run_id, params=params, **kw)
            raise MlflowException("UNIQUE constraint failed: params.key, params.run_uuid")
        return real_log_batch(run_id, params=params, **kw)

    monkeypatch.setattr(lin.client, "log_batch", racing_log_batch)
    lin.log_params(run, {"num_samples": 64, "steps": 4})
    assert raced and MlflowClient(lin.tracking_uri).get_run(run).data.params == {"num_samples": "64", "steps": "4"}


def test_logging_and_lineage_links(setup):
    cfg, layout, lin = setup
    lin.pipeline_run(cfg)
    client = MlflowClient(lin.tracking_uri)
    feed = lin.stage_run(Step(0, "feed"))
    shards = layout.shards(0, "feed")
    lin.link(feed, inputs={"model": layout.model(0, "train-base")}, outputs={"shards": shards})
    train = lin.stage_run(Step(1, "train-base"))
    lin.log_params(train, {"lr": 0.01, "note": "x" * 7000})
    lin.log_params(train, {"lr": 0.01})  # same value again: fine
    lin.log_params(train, {"lr": 0.02})  # changed: kept as a tag instead of failing
    lin.log_metrics(train, {"loss": 0.5, "lr": 0.01}, step=3)
    lin.log_metrics(train, {"loss": 0.25}, step=4)
    lin.set_tags(train, {"custom": 1})
    lin.link(train, inputs={"synthetic": shards}, outputs={"model": layout.model(1, "train-base")})
    lin.log_artifact_bytes(train, "notes/readme.txt", b"hello")
    png = image_grid_png(torch.zeros(2, 1, 8, 8), nrow=2)
    lin.log_png(train, "grids/w-1.0", png)

    run = client.get_run(train)
    assert run.data.params["lr"] == "0.01" and run.data.tags["sims.param.lr"] == "0.02"
    assert len(run.data.params["note"]) == 6000  # clipped to MLflow's limit
    history = client.get_metric_history(train, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5), (4, 0.25)]
    assert run.data.tags["custom"] == "1"
    assert run.data.tags["sims.input.synthetic"] == shards
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic"]
    names = {f.path for f in client.list_artifacts(train, "grids")}
    assert names == {"grids/w-1.0.png"}
    assert Path(client.download_artifacts(train, "notes/readme.txt")).read_bytes() == b"hello"
    with pytest.raises(ValueError, match="not a PNG"):
        lin.log_png(train, "x.png", b"nope")

    # The lineage question: which iteration's data fed the iteration-1 model?
    (producer,) = lin.producers_of(shards)
    assert (producer["iteration"], producer["stage"], producer["run_id"]) == (0, "feed", feed)
    stages = [(s["iteration"], s["stage"]) for s in lin.stage_runs()]
    assert stages == [(0, "feed"), (1, "train-base")]


# ----------------------------------------------------------------------------
# summary.json and table


def _row(k: int, base: list[float], guided: list[float], w: float = 1.0) -> dict:
    """A summary row from per-set FIDs (set 0 = selection) of the base and one sims w."""
    ev = EvaluateConfig(methods=[MethodConfig(name="sims", weights=[w])], repeats=len(base) - 1)
    metrics = {key: {"fid": dict(enumerate(v)), **{m: dict.fromkeys(range(len(v)), 0.5)
                                                   for m in ("precision", "recall", "density", "coverage")}}
               for key, v in (("base", base), (f"sims_w-{float(w)}", guided))}
    floor = {"mean": 4.0, "sd": None if ev.repeats == 1 else 0.25, "sets": ev.repeats, "samples": ev.num_samples,
             "precision": 0.7, "recall": 0.7}  # what evaluation/floor.py floor_row gives, m = repeats
    return iteration_row(k, ev, {"sims": method_result(ev, "sims", metrics, steps=8)}, floor)


def test_summary_schema(tmp_path):
    layout = RunLayout.of(str(tmp_path))
    rows = [_row(1, [20.0, 20.0, 22.0], [12.0, 12.0, 13.0]), _row(0, [30.0, 31.0, 29.0], [18.0, 18.0, 18.0])]
    write_summary(layout, rows, "abc123")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [r["iteration"] for r in data["iterations"]] == [0, 1] and data["mlflow_run_id"] == "abc123"
    first = data["iterations"][0]
    assert ROW_KEYS <= set(first)
    assert first["fid"] == {"0.0": 30.0, "1.0": 18.0} and first["fid_sd"]["0.0"] == pytest.approx(2 ** 0.5)
    assert (first["best_w"], first["fid_base"], first["fid_best"]) == (1.0, 30.0, 18.0)
    assert first["methods"]["sims"]["gain"] == 12.0 and first["methods"]["sims"]["nfe_per_sample"] == 30
    update_summary(layout, _row(1, [19.0, 19.0, 19.0], [9.0, 9.0, 9.0]), "abc123")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [r["fid_best"] for r in data["iterations"]] == [18.0, 9.0]
    with pytest.raises(ValueError, match="keys"):
        write_summary(layout, [{"iteration": 0}], None)


def test_nonfinite_fid_is_null_and_never_best(tmp_path):
    row = _row(0, [10.0, 10.0, 11.0], [float("nan"), 8.0, 8.0])
    assert row["best_w"] == 0.0  # a diverged selection FID never wins
    write_summary(RunLayout.of(str(tmp_path)), [_row(0, [10.0, 10.0], [9.0, float("nan")])], None)
    data = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: NaN became null
    assert data["iterations"][0]["fid"]["1.0"] is None


def test_table_contains_every_method_value_and_verdict():
    row = _row(0, [30.0, 30.0, 31.0, 29.0], [18.0, 18.25, 18.5, 18.0])
    table = format_table({"iterations": [row], "mlflow_run_id": None})
    for value in ("30.00 ± 1.00", "18.25 ± 0.25", "1.0*", "11.75 ± 0.75", "yes", "NFE/sample", "precision"):
        assert value in table, value


def test_table_with_one_repeat_shows_no_sd_and_no_significance_verdict():
    # One report seed set (set 0 selects w = 1.0): an sd of one value is undefined, and so is the 2-sd test.
    row = _row(0, [30.0, 31.0], [18.0, 20.0])
    assert row["repeats"] == 1
    table = format_table(json.loads(json.dumps({"iterations": [row], "mlflow_run_id": None})))
    assert "nan" not in table and "±" not in table, table
    assert "n/a (1 repeat)" in table and "repeats >= 2" in table, table
    assert "1.0*" in table and "* = the w each method selected" in table, table


def test_table_with_two_repeats_shows_sd_and_verdict_and_explains_the_star():
    row = _row(0, [30.0, 30.0, 31.0], [18.0, 18.0, 18.5])
    table = format_table({"iterations": [row], "mlflow_run_id": None})
    assert "FID (mean ± sd)" in table and "30.50 ± 0.71" in table and "18.25 ± 0.35" in table, table
    assert "yes" in table and "n/a" not in table and "nan" not in table, table
    assert table.splitlines()[-2].startswith("* = the w each method selected on its selection seed set"), table


# ----------------------------------------------------------------------------
# PNGs


def test_fid_plot_png():
    img = Image.open(io.BytesIO(fid_plot_png({0.0: 30.0, 1.0: 18.0, 2.0: 21.0}, "iter 0")))
    assert img.format == "PNG" and img.size == (550, 380)
    curves = {"sims": {0.0: (30.0, 1.0), 1.0: (18.0, 0.5)}, "neon": {0.0: (30.0, 1.0), 1.0: (25.0, 2.0)}}
    img = Image.open(io.BytesIO(fid_curves_png(curves, "methods", best={"sims": 1.0, "neon": 1.0})))
    assert img.format == "PNG"


def test_plots_star_the_w_chosen_on_selection_seeds_not_the_lowest_report_fid():
    from sims_platform.tracking.summary_metrics import row_best

    row = {"best_w": 0.0, "fid": {"0.0": 20.0, "0.5": 19.0},
           "methods": {"sims": {"best_w": 0.0, "fid": {"0.0": 20.0, "0.5": 19.0}},
                       "neon": {"best_w": 0.5, "fid": {"0.0": 20.0, "0.5": 21.0}}}}
    assert row_best(row) == {"sims": 0.0, "neon": 0.5}
    assert row_best({"best_w": 1.0, "fid": {"0.0": 3.0, "1.0": 2.0}}) == {"": 1.0}


def test_a_star_only_where_the_selected_w_beats_the_base(monkeypatch):
    """sims's selected w beats its base (a star); neon's selected w is worse than the base (none); cfg selected
    the base itself (none)."""
    from matplotlib.axes import Axes

    stars = []
    plot = Axes.plot

    def spy(self, *args, **kwargs):
        if kwargs.get("marker") == "*":
            stars.append((args[0][0], args[1][0]))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    curves = {"sims": {0.0: 20.0, 0.5: 18.0}, "neon": {0.0: 20.0, 0.5: 21.0}, "cfg": {0.0: 20.0, 0.5: 19.0}}
    fid_curves_png(curves, "methods", best={"sims": 0.5, "neon": 0.5, "cfg": 0.0})
    assert stars == [(0.5, 18.0)]


def test_the_pipeline_plot_shows_every_method_of_every_iteration(monkeypatch):
    from sims_platform.tracking import summary_metrics

    drawn = {}
    monkeypatch.setattr(summary_metrics, "fid_curves_png",
                        lambda curves, title, best=None: drawn.setdefault(title, (dict(curves), best)) and b"png")
    logged = []
    lineage = type("L", (), {"pipeline_id": "p", "iteration_run": lambda self, k, loop=None: f"it{k}",
                             "log_metrics": lambda self, *a, **k: None,
                             "log_png": lambda self, run, path, png: logged.append((run, path))})()
    row = {"best_w": 0.5, "fid": {"0.0": 20.0, "0.5": 18.0}, "fid_base": 20.0, "fid_best": 18.0,
           "methods": {"sims": {"best_w": 0.5, "fid": {"0.0": 20.0, "0.5": 18.0}},
                       "neon": {"best_w": 0.0, "fid": {"0.0": 20.0, "0.1": 20.5}}}}
    summary = {"iterations": [dict(row, iteration=0), dict(row, iteration=1)]}
    summary_metrics.log_iteration_results(lineage, summary, 1)
    curves, best = drawn["FID vs guidance weight, every iteration and method"]
    assert set(curves) == {"iter 0 sims", "iter 0 neon", "iter 1 sims", "iter 1 neon"}
    assert best == {"iter 0 sims": 0.5, "iter 0 neon": 0.0, "iter 1 sims": 0.5, "iter 1 neon": 0.0}
    assert ("p", "fid_vs_w.png") in logged


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_png(channels):
    images = torch.linspace(-1, 1, 5 * channels * 16 * 16).reshape(5, channels, 16, 16)
    img = Image.open(io.BytesIO(image_grid_png(images, nrow=3)))
    tile, pad = 64, 2  # 16 px upscaled x4 to reach 64 px
    assert img.format == "PNG" and img.mode == ("L" if channels == 1 else "RGB")
    assert img.size == (3 * tile + 4 * pad, 2 * tile + 3 * pad)
    px = img.getpixel((pad, pad))
    assert (px if channels == 1 else px[0]) == 0  # -1 maps to black
    with pytest.raises(ValueError, match="shape"):
        image_grid_png(torch.zeros(2, 2, 8, 8))


# ----------------------------------------------------------------------------
# A real tracking server


@pytest.fixture
def mlflow_server(tmp_path):
    with servers.mlflow_server(tmp_path, f"file://{tmp_path}/server-artifacts") as url:
        yield url, tmp_path / "server-artifacts"


@pytest.mark.slow
def test_real_server_roundtrip(mlflow_server, tmp_path, monkeypatch):
    url, artifacts = mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path / "run", tracking={"uri": url, "experiment": "server-test"})
    layout = RunLayout.of(cfg.storage.root)
    lin = Lineage.from_config(cfg, layout)
    assert ui_command(lin.tracking_uri, layout) == url
    pipe = lin.pipeline_run(cfg)
    stage = lin.stage_run(Step(0, "evaluate"))
    lin.log_metrics(stage, {"fid/w_0.0": 30.0})
    lin.log_artifact_bytes(stage, "fid.json", b'{"0.0": 30.0}')
    lin.finish(stage)
    assert Lineage.from_config(cfg, layout).stage_run(Step(0, "evaluate")) == stage

    client = MlflowClient(url)
    run = client.get_run(stage)
    assert run.data.metrics["fid/w_0.0"] == 30.0
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["mlflow.parentRunId"] == pipe
    local = client.download_artifacts(stage, "fid.json", str(tmp_path))
    assert Path(local).read_bytes() == b'{"0.0": 30.0}'
    # The server stored it in its own artifacts destination (proxied upload, no client-side credentials).
    assert any(p.name == "fid.json" for p in artifacts.rglob("*"))


# ----------------------------------------------------------------------------
# Several processes opening one new local store (torchrun ranks, evaluate parts of `sims run`)


def _open_store_at_once(uri: str, barrier, errors) -> None:
    from sims_platform.tracking import open_client

    barrier.wait()
    try:
        open_client(uri).search_experiments()
    except Exception as err:  # reported to the test, which names it
        errors.put(f"{type(err).__name__}: {err}"[:300])


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow creates a SQLite store's tables on first connection; racing creators used to fail with
    'table ... already exists' (seen with `torchrun --nproc_per_node 2 -m sims_platform.cli stage train-base`)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"  # a folder that does not exist yet
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_store_at_once, args=(uri, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not failures, failures
    assert [p.exitcode for p in procs] == [0] * 4
    assert MlflowClient(uri).get_experiment_by_name("Default") is not None
