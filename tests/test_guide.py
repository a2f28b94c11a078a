"""Autoguidance with a trained guide: the guide section, the train-guide stage, model records that carry their
architecture, and the autoguidance arm guided by the guide that stage trained."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from pipeline_support import tiny_config_dict

from sims_platform.cli import main
from sims_platform.config import ConfigError, config_from_dict
from sims_platform.evaluation.methods import Networks
from sims_platform.models.precond import Precond
from sims_platform.pipeline.execute import run_stage
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.pipeline.provenance import plan_provenance
from sims_platform.pipeline.runner import open_run, run_pipeline
from sims_platform.stages.context import StageContext
from sims_platform.steps import Step
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import resolve_tracking_uri

# A guide half the tiny pipeline's network (16 channels): 8 channels, one level fewer.
GUIDE_NET = {"preset": "digits-tiny", "model_channels": 8, "channel_mult": [1, 2]}


def guided_dict(root: str) -> dict:
    d = tiny_config_dict(root)
    d["guide"] = {"network": GUIDE_NET, "images": 512, "batch_size": 64, "ema_std": 0.05,
                  "checkpoint_images": 256, "log_images": 256}
    d["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0]}]
    return d


def _tiny_context(tmp_path) -> StageContext:
    """Iteration 0 of the tiny pipeline, its run opened."""
    cfg = config_from_dict(tiny_config_dict(str(tmp_path / "run")))
    layout, lineage, _ = open_run(cfg)
    return StageContext(cfg, layout, 0, lineage)


def _x(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.full((n,), 2.5), torch.arange(n) % 10


# ----------------------------------------------------------------------------
# Model records carry their architecture


def test_a_smaller_guide_trains_saves_and_loads_with_its_own_architecture(tmp_path, monkeypatch):
    cfg = config_from_dict(guided_dict(str(tmp_path / "run")))
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    trained: dict[str, Precond] = {}
    from sims_platform.stages import training

    real_train = training.train

    def keep(net, *args, **kwargs):
        result = real_train(net, *args, **kwargs)
        trained["ema"] = result.ema
        return result

    monkeypatch.setattr(training, "train", keep)
    result = run_stage(ctx, "train-guide")
    assert result["model"] == layout.model(0, "train-guide") and result["images"] == 512

    net = ctx.models.load(layout.model(0, "train-guide"))
    assert net.unet.enc["8x8_conv"].weight.shape[0] == 8  # the guide's 8 channels, not the network's 16
    assert net.init_kwargs["model_channels"] == 8 and list(net.init_kwargs["channel_mult"]) == [1, 2]
    base_arch = ctx.models.build()
    assert base_arch.unet.enc["8x8_conv"].weight.shape[0] == 16
    ema = trained["ema"].to(memory_format=torch.contiguous_format).eval()  # trained channels-last
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ema.state_dict().values()))
    x, sigma, y = _x()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, y), ema(x, sigma, y))


def test_a_record_without_an_architecture_loads_into_the_configs_network(tmp_path):
    ctx = _tiny_context(tmp_path)
    layout = ctx.layout
    net = ctx.models.build().eval()
    uri = fsio.join(layout.root, "old-model.pt")
    fsio.save_torch(uri, {"ema": net.state_dict(), "images": 7})  # as records were written before
    loaded = ctx.models.load(uri)
    x, sigma, y = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, y), net(x, sigma, y))


def test_a_record_whose_architecture_names_an_unknown_argument_is_refused(tmp_path):
    ctx = _tiny_context(tmp_path)
    layout = ctx.layout
    net = ctx.models.build()
    uri = fsio.join(layout.root, "odd.pt")
    fsio.save_torch(uri, {"ema": net.state_dict(), "images": 7, "precond": {**net.init_kwargs, "evil": 1}})
    with pytest.raises(ValueError, match="unknown network argument evil=1"):
        ctx.models.load(uri)


# ----------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("change, field", [
    (lambda d: d["guide"].update(images=10**6), "guide.images"),
    (lambda d: d.update(pretrained={"guide": "file:///models/xs.pt"}), "pretrained.guide"),
    (lambda d: d["evaluate"]["methods"][0].update(guide_images=256), "guide_images"),
    (lambda d: d["guide"].update(ema_std=0.5), "guide.ema_std"),
    (lambda d: d["guide"].pop("network"), "guide.network"),
])
def test_validate_refuses_a_bad_guide_section_naming_the_field(tmp_path, capsys, change, field):
    import yaml

    d = guided_dict(str(tmp_path / "run"))
    change(d)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 2
    head, *lines = capsys.readouterr().err.strip().splitlines()
    assert "invalid pipeline configuration" in head
    assert len(lines) == 1 and field in lines[0], lines  # one line, naming the field


def test_a_guide_no_method_uses_is_a_note_and_not_trained(tmp_path, capsys):
    import yaml

    d = guided_dict(str(tmp_path / "run"))
    d["evaluate"]["methods"] = [{"name": "sims", "weights": [1.0]}]  # e.g. the demo's methods replaced by --set
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 0
    assert "note: guide: no evaluate.methods entry uses it (autoguidance, sims+autoguidance)" in capsys.readouterr().out
    assert "train-guide" not in {s.stage for s in pipeline_plan(config_from_dict(d))}


def test_autoguidance_over_an_imported_base_needs_a_guide(tmp_path):
    d = tiny_config_dict(str(tmp_path / "run"))
    d["pretrained"] = {"base": "file:///models/base.pt"}
    d["finetune_aux"]["init"] = {"mode": "restart"}  # an imported base has no training state to resume
    d["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0]}]
    with pytest.raises(ConfigError, match="pretrained.guide"):
        config_from_dict(d)
    d["guide"] = guided_dict("x")["guide"]
    cfg = config_from_dict(d)  # a guide trained here guides the imported base
    assert Step(0, "train-guide") in pipeline_plan(cfg)


# ----------------------------------------------------------------------------
# The plan and the method table


def test_train_guide_is_planned_only_with_a_guide_and_evaluate_reads_it(tmp_path):
    d = guided_dict(str(tmp_path / "run"))
    d["iterations"] = {"count": 2, "train_data": "real+synthetic", "feed_samples": 8, "feed_method": "autoguidance"}
    cfg = config_from_dict(d)
    steps = pipeline_plan(cfg)
    assert [s.stage for s in steps if s.iteration == 1][:2] == ["train-base", "train-guide"]
    prov = plan_provenance(cfg)
    assert "iter-00/train-guide" in prov[Step(0, "evaluate")].inputs
    assert "iter-00/train-guide" in prov[Step(0, "feed")].inputs
    assert "iter-00/feed" in prov[Step(1, "train-guide")].inputs  # the base's data: the earlier feed too
    layout = RunLayout.of(cfg.storage.root)
    (uri,) = cfg.evaluate.methods[0].row.guide_uris(cfg, cfg.evaluate.methods[0], layout, 1)
    assert uri == layout.model(1, "train-guide")

    plain = tiny_config_dict(str(tmp_path / "plain"))
    plain["train_base"]["snapshots"] = [1024]
    plain["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0], "guide_images": 1024}]
    cfg = config_from_dict(plain)
    assert "train-guide" not in {s.stage for s in pipeline_plan(cfg)}
    (uri,) = cfg.evaluate.methods[0].row.guide_uris(cfg, cfg.evaluate.methods[0], layout, 0)
    assert uri == layout.snapshot(0, "train-base", 1024)  # without a guide section: today's early snapshot


# ----------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_a_pipeline_with_a_guide_evaluates_autoguidance_with_the_trained_guide(tmp_path):
    d = guided_dict(str(tmp_path / "run"))
    d["train_base"]["label_dropout"] = 0.1
    d["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0]}, {"name": "cfg", "weights": [0.5]},
                                {"name": "sims+autoguidance", "weights": {"sims": [0.5], "autoguidance": [0.5]}}]
    cfg = config_from_dict(d)
    summary = run_pipeline(cfg)
    (row,) = summary["iterations"]
    assert {"autoguidance", "cfg", "sims+autoguidance"} <= set(row["methods"])
    assert "1.0" in row["methods"]["autoguidance"]["fid"]

    layout = RunLayout.of(cfg.storage.root)
    guide_uri = layout.model(0, "train-guide")
    client = MlflowClient(resolve_tracking_uri(cfg, layout))
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=200)}
    assert runs["iter-0/train-guide"].data.tags["sims.output.model"] == guide_uri
    assert runs["iter-0/evaluate"].data.tags["sims.input.guide_model"] == guide_uri

    # the autoguidance arm samples with the trained guide (its own, smaller architecture)
    ctx = StageContext(cfg, layout, 0, open_run(cfg)[1])
    nets = Networks(cfg, layout, 0, ctx.models.load)
    (guide,) = nets.guides("autoguidance")
    assert guide.init_kwargs["model_channels"] == 8
    assert nets.guides("sims+autoguidance")[1] is guide
