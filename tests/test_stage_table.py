"""The stage table is the one place stages are declared: the plan, the local runner, the local cluster and the
Kubernetes workloads all do what its rows say."""

from __future__ import annotations

import pytest
from pipeline_support import tiny_config_dict
from test_encoders import TINY_VAE

from sims_platform.config import config_from_dict
from sims_platform.k8s.settings import settings_from_dict
from sims_platform.k8s.workloads import plan as k8s_plan
from sims_platform.launch import processes as launch
from sims_platform.pipeline import runner
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.stages import stage_function
from sims_platform.steps import STAGE_NAMES, Step, row, steps_of
from sims_platform.steps.table import TABLE
from sims_platform.storage.layout import RunLayout


@pytest.fixture
def cfg(tmp_path):
    """A pipeline whose plan has every stage but import-base (which replaces train-base: tests/test_import_base)."""
    d = tiny_config_dict(str(tmp_path / "run"))
    d["data"].update(conditional=False, class_fractions={5: 0.25, 6: 0.25, 7: 0.25, 8: 0.25, 9: 0.25})
    d["encoder"] = {"kind": "latent", "vae_config": TINY_VAE, "shard_size": 8, "batch_size": 4}
    d["shift"] = {"target": "uniform", "w": 1.0, "aux_samples": 120}
    d["evaluate"]["methods"] = [{"name": "sims", "weights": [1.0]}, {"name": "sims-real-aux", "weights": [1.0]},
                                {"name": "autoguidance", "weights": [1.0]}]
    d["guide"] = {"network": {"preset": "digits-mini", "channel_mult": [1, 2]}, "images": 256, "batch_size": 64,
                  "checkpoint_images": 256, "log_images": 256}
    d["iterations"] = {"count": 2, "train_data": "real+synthetic", "feed_samples": 40}
    return config_from_dict(d)


def test_every_row_is_whole():
    assert len(set(STAGE_NAMES)) == len(TABLE)
    for r in TABLE:
        assert callable(stage_function(r.name)), r.name
        for name in (*r.reads, *filter(None, (r.reducer, r.completes))):
            row(name)  # names a row
        assert (r.reducer is None) or r.kind == "array", r.name
        assert (r.section is not None) == (r.kind == "training"), r.name
    with pytest.raises(ValueError, match="unknown stage 'nope', expected one of encode, reference"):
        row("nope")


def test_the_plan_covers_every_step_in_table_order(cfg):
    steps = pipeline_plan(cfg)
    planned = {s.stage for s in steps}
    run = [s for st in steps for s in steps_of(st.stage)]
    assert set(run) == set(STAGE_NAMES) - {"import-base"}
    order = [r.name for r in TABLE]
    for k in range(cfg.iterations.count):
        mine = [s.stage for s in steps if s.iteration == k]
        assert mine == sorted(mine, key=order.index)
    assert all(row(s).completes is None or s == "import-base" for s in planned)  # reducers follow their array


def _settings(shards: int = 3) -> object:
    return settings_from_dict({"release": "r", "image": "sims:test", "configMap": "cm",
                               "stages": {r.name: {"shards": shards} for r in TABLE}})


def test_kubernetes_workloads_are_the_rows_kinds(cfg):
    """Every array step is an Indexed Job of its shards, every training stage the backend's kind, every other step
    a plain one-pod Job; each reducer right after its array."""
    workloads = k8s_plan(cfg, _settings())
    assert [w.step for w in workloads] == [s for st in pipeline_plan(cfg) for s in steps_of(st.stage)]
    for w in workloads:
        kind = row(w.step).kind
        assert w.stage == row(w.step).stage
        if kind == "training":
            assert w.kind == "PyTorchJob", w.name
        else:
            assert w.kind == "Job", w.name
            spec = w.body["spec"]
            indexed = spec.get("completionMode") == "Indexed"
            assert indexed == (kind == "array"), w.name
            assert spec.get("completions") == (3 if kind == "array" else None), w.name


def test_the_local_cluster_runs_the_rows_kinds(cfg, monkeypatch):
    """`sims local-cluster`: every array step as parts (then its reducer), training under torchrun, the rest as one
    process, exactly as the Kubernetes workloads run them."""
    launched: list[tuple[str, list[list[str]]]] = []

    def record(commands, env, what, tag="[local]"):
        launched.append((what, commands))

    monkeypatch.setattr(launch, "run_together", record)
    monkeypatch.setattr("sims_platform.pipeline.processes.run_together", record)
    n = launch.Processes(train=2, writers=2, arrays=3)
    k8s = [w.step for w in k8s_plan(cfg, _settings())]
    local: list[str] = []
    for step in pipeline_plan(cfg):
        before = len(launched)
        launch.run_step(step, "pipeline.yaml", [], {}, n)
        mine = launched[before:]
        r = row(step.stage)
        argv = mine[0][1]
        if r.kind == "array":
            parts = n.writers if r.writes_shards else n.arrays
            assert [c[c.index("--index") + 1] for c in argv] == [str(i) for i in range(parts)], step
            assert len(mine) == (2 if r.reducer else 1)
        elif r.kind == "training":
            assert len(argv) == 1 and "torch.distributed.run" in argv[0], step
        else:
            assert len(argv) == 1 and "--index" not in argv[0] and "torch.distributed.run" not in argv[0], step
        local += [c[c.index("stage") + 1] for _, commands in mine for c in commands[:1]]
    assert local == k8s


def test_the_local_runner_splits_the_rows_local_parts(cfg, tmp_path, monkeypatch):
    """`sims run` with runtime.local_parts > 1: the table's local_parts arrays as parts then their reducer in
    process; every other stage in process, whole."""
    ran: list[str] = []
    parted: list[Step] = []
    monkeypatch.setattr(runner, "run_stage", lambda ctx, stage: ran.append(stage))
    monkeypatch.setattr(runner, "is_done", lambda ctx, stage: False)
    monkeypatch.setattr(runner, "close_complete_runs", lambda ctx: None)
    monkeypatch.setattr(runner, "run_parts", lambda step, *a, **k: parted.append(step))
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"local_parts": 2, "device": "cpu"})})
    runner._run_with_parts(cfg, RunLayout.of(cfg.storage.root), None)
    split = [r.name for r in TABLE if r.local_parts]
    assert split and all(row(s).kind == "array" for s in split)
    assert [s.stage for s in parted] == [s.stage for s in pipeline_plan(cfg) if s.stage in split]
    # One process runs a whole array (its one part completes the stage); split arrays' reducers run here.
    in_process = [st.stage if st.stage not in split else row(st.stage).reducer for st in pipeline_plan(cfg)]
    assert ran == [s for s in in_process if s is not None]


def test_layout_and_lineage_folders_follow_the_rows_scope(tmp_path):
    layout = RunLayout.of(str(tmp_path))
    loop = layout.in_loop("sims-dp50")
    for r in TABLE:
        folder = loop.stage(0, r.name)
        if r.scope == "run":
            assert folder == layout.stage(3, r.name) and "/iter-" not in folder
        elif r.scope == "loop":
            assert "/loops/sims-dp50/iter-00/" in folder
        else:
            assert folder == layout.stage(0, r.name) and "/loops/" not in folder
        assert layout.producer(layout.stage(1, r.name) + "/x") == Step(0 if r.scope == "run" else 1, r.stage)
