"""pretrained.base: iteration 0's base is imported by the import-base step, one plain process on every launcher,
which completes train-base's folder, record and MLflow run; later iterations still train."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from edm2_support import edm2_pickle
from pipeline_support import tiny_config_dict

from sims_platform.cli import main
from sims_platform.config import ConfigError, load_config
from sims_platform.pipeline import processes
from sims_platform.launch.processes import Processes, run_step
from sims_platform.models.precond import Precond
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.steps import Step
from sims_platform.pipeline.runner import iteration_complete, open_run
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.stages import stage_function
from sims_platform.storage import fsio
from sims_platform.steps import RUN_STAGES, STAGES
from sims_platform.storage.layout import RunLayout

# A small EDM2 network in EDM2's own argument names (tests/test_edm2_import.py), the tiny pipeline's shape.
INIT_KWARGS = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=0.0, use_fp16=True)


def _source_net() -> Precond:
    torch.manual_seed(1)
    return Precond(**{k: v for k, v in INIT_KWARGS.items() if k != "use_fp16"}).eval()


def _pretrained_pipeline(tmp_path, iterations: int = 2) -> tuple[str, str, Precond]:
    """A tiny pipeline whose iteration 0 base is a `sims import-edm2` model file: (config path, base URI, source)."""
    src = _source_net()
    pkl, model = tmp_path / "edm2-img8-xs-0000512-0.100.pkl", tmp_path / "models" / "base.pt"
    pkl.write_bytes(edm2_pickle(src, INIT_KWARGS, str(tmp_path / "pwned")))
    assert main(["import-edm2", str(pkl), str(model)]) == 0
    d = tiny_config_dict(str(tmp_path / "run"))
    d["network"].update(num_blocks=1, attn_resolutions=[4])
    d["iterations"] = {"count": iterations, "train_data": "real"}
    d["pretrained"] = {"base": fsio.normalize_uri(str(model))}
    # An imported base has weights only: its aux models are fine-tuned by transfer, not resumed.
    d["finetune_aux"].update(init={"mode": "transfer"}, optimizer={"rampup_images": 64})
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(d))
    return str(cfg), d["pretrained"]["base"], src


def test_every_step_has_one_kind_and_one_function():
    from sims_platform.steps import STAGE_NAMES, row

    assert set(STAGE_NAMES) >= set(STAGES + RUN_STAGES)
    assert all(callable(stage_function(name)) for name in STAGE_NAMES)
    assert row("import-base").kind == "single" and row("train-base").kind == "training"


def test_the_plan_imports_iteration_0s_base_and_trains_the_later_ones(tmp_path):
    cfg = load_config(_pretrained_pipeline(tmp_path)[0])
    steps = [(s.iteration, s.stage) for s in pipeline_plan(cfg)]
    assert (0, "import-base") in steps and (0, "train-base") not in steps
    assert (1, "train-base") in steps and (1, "import-base") not in steps
    assert steps.index((0, "import-base")) < steps.index((0, "generate"))
    plain = load_config(_pretrained_pipeline(tmp_path)[0], ["pretrained.base=null"])
    assert (0, "train-base") in [(s.iteration, s.stage) for s in pipeline_plan(plain)]


@pytest.mark.slow
def test_import_base_runs_as_one_plain_process_and_completes_train_base(tmp_path, monkeypatch):
    config, base_uri, src = _pretrained_pipeline(tmp_path)
    launched: list[list[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(cmd, *args, **kwargs):
        launched.append(list(cmd))
        return real_popen(cmd, *args, **kwargs)

    monkeypatch.setattr(processes.subprocess, "Popen", recording_popen)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1"}
    # As `sims local-cluster` launches every step: training would run under torchrun x2.
    run_step(Step(0, "import-base"), config, [], env, Processes(train=2, writers=2, arrays=2))

    assert launched == [[sys.executable, "-m", "sims_platform.cli", "stage", "import-base", "--config", config,
                         "--iteration", "0"]]
    cfg = load_config(config)
    layout = RunLayout.of(cfg.storage.root)
    record = fsio.read_json(layout.done_marker(0, "train-base"))
    assert record["stage"] == "import-base" and record["parts"] == 1 and record["device"] == "cpu"
    assert record["result"] == {"model": layout.model(0, "train-base"), "images": 512000, "pretrained": base_uri}
    assert layout.done_marker(0, "import-base") == layout.done_marker(0, "train-base")

    # The base the next stages load: the config's network with the imported weights, no training checkpoints.
    _, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    base = ctx.models.load(layout.model(0, "train-base"))
    g = torch.Generator().manual_seed(0)
    x, sigma, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([0.5, 5.0]), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(base(x, sigma, y), copy.deepcopy(src).half().float()(x, sigma, y))
    assert not fsio.exists(layout.checkpoints(0, "train-base"))

    # Lineage: train-base's stage run of iteration 0, the pretrained URI in, the model out.
    client = MlflowClient(f"sqlite:///{tmp_path / 'run'}/mlflow.db")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.run_name == "iter-0/train-base" and run.info.status == "FINISHED"
    assert run.data.tags["sims.stage"] == "train-base" and run.data.tags["sims.iteration"] == "0"
    assert run.data.tags["sims.input.pretrained"] == base_uri
    assert run.data.tags["sims.output.model"] == layout.model(0, "train-base")
    assert [s["stage"] for s in lineage.producers_of(layout.model(0, "train-base"))] == ["train-base"]

    # Resumption reads train-base's record: import-base is complete, its iteration waits on the rest only.
    assert run_stage(ctx, "import-base") == record["result"]
    assert not iteration_complete(cfg, layout, 0)


def test_the_wrong_base_step_is_one_line_naming_pretrained_base(tmp_path, capsys):
    config, _, _ = _pretrained_pipeline(tmp_path)
    assert main(["stage", "train-base", "--config", config, "--iteration", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: stage train-base --iteration 0: pretrained.base is set, so iteration 0's base is "
                   "imported, not trained: run stage import-base")
    assert main(["stage", "import-base", "--config", config, "--iteration", "1"]) == 2
    assert "only iteration 0's base is imported (pretrained.base)" in capsys.readouterr().err
    assert main(["stage", "import-base", "--config", config, "--set", "pretrained.base=null"]) == 2
    assert "pretrained.base is not set" in capsys.readouterr().err
    assert not fsio.exists(str(tmp_path / "run" / "iter-00"))  # nothing ran, nothing was recorded

    cfg = load_config(config)
    layout, lineage, _ = open_run(cfg)
    with pytest.raises(ConfigError, match="pretrained.base is set"):  # any launcher: run_stage checks the plan
        run_stage(StageContext(cfg, layout, 0, lineage), "train-base")
