"""How the aux fine-tune starts (finetune_aux.init.mode): resume continues the base's training exactly, transfer
warms up and keeps its starting weights in the EMA, restart is today's fresh start; each is validated and logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline_support import tiny_config_dict
from sims_platform.config import ConfigError, load_config
from sims_platform.config.schema import OptimizerConfig, PipelineConfig, TrainConfig
from sims_platform.models.ema import power_function_beta
from sims_platform.storage import fsio
from sims_platform.models.precond import Precond
from sims_platform.training.checkpoints import latest, read_state
from sims_platform.training.loop import Start, learning_rate, train


def make_net() -> Precond:
    torch.manual_seed(0)
    return Precond(8, 1, 10, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 1, 8, 8, generator=g) * 0.5, torch.randint(10, (64,), generator=g)


# The base's schedule decays within its run (ref_images < images), so a resume that restarted it would differ.
BASE = TrainConfig(images=256, batch_size=32, checkpoint_images=128, log_images=64, ema_std=0.1,
                   optimizer=OptimizerConfig(lr=0.01, ref_images=128, rampup_images=64))


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_a_resumed_aux_is_one_uninterrupted_run_that_switched_to_the_synthetic_set(tmp_path):
    real, synthetic = data(0), data(1)
    train(make_net(), *real, BASE, seed=3, checkpoints=str(tmp_path / "base"))
    aux_cfg = BASE.model_copy(update={"images": BASE.images + 128})
    base_ckpt = latest(str(tmp_path / "base"))
    assert base_ckpt is not None and base_ckpt.images == 256
    aux = train(make_net(), *synthetic, aux_cfg, seed=3, checkpoints=str(tmp_path / "aux"),
                start=Start(checkpoint=base_ckpt))

    # One run of 384 images whose training set becomes the synthetic one right after image 256.
    x, y = real[0].clone(), real[1].clone()

    def switch(images: int, metrics: dict) -> None:
        if images == BASE.images:
            x.copy_(synthetic[0])
            y.copy_(synthetic[1])

    one = train(make_net(), x, y, aux_cfg, seed=3, checkpoints=str(tmp_path / "one"), on_log=switch)
    assert aux.images == one.images == 384
    for name, a in aux.ema.state_dict().items():
        assert torch.equal(a, one.ema.state_dict()[name]), name
    ours, theirs = read_state(latest(str(tmp_path / "aux"))), read_state(latest(str(tmp_path / "one")))
    for name, a in ours["net"].items():
        assert torch.equal(a, theirs["net"][name]), name
    moments = [(s["exp_avg"], theirs["optimizer"]["state"][i]["exp_avg"]) for i, s in ours["optimizer"]["state"].items()]
    assert moments and all(torch.equal(a, b) for a, b in moments)

    # The same budget on the real data instead gives another model: the data is all that changed.
    other = train(make_net(), *real, aux_cfg, seed=3, checkpoints=str(tmp_path / "real"),
                  start=Start(checkpoint=base_ckpt))
    assert not all(torch.equal(a, b) for a, b in zip(other.ema.state_dict().values(), aux.ema.state_dict().values()))


def test_transfer_warms_up_from_the_bases_learning_rate_and_its_ema_starts_at_the_starting_weights(tmp_path):
    cfg = TrainConfig(images=32, batch_size=32, checkpoint_images=32, log_images=32, ema_std=0.1,
                      optimizer=OptimizerConfig(lr=0.01, ref_images=100, rampup_images=128))
    offset, start_net = 1000, make_net()
    start_weights = _params(start_net)
    logged: list[dict] = []
    result = train(start_net, *data(1), cfg, seed=5, checkpoints=str(tmp_path / "t"), start=Start(offset=offset),
                   on_log=lambda images, m: logged.append(m))
    # The first step's lr: the base's schedule where it ended (decayed at 1000 + 32 images), times the warm-up.
    assert logged[0]["lr"] == pytest.approx(0.01 / math.sqrt(1032 / 100) * 32 / 128, rel=1e-6)
    assert learning_rate(cfg.optimizer, 128, offset) == pytest.approx(0.01 / math.sqrt(1128 / 100))
    raw = list(read_state(latest(str(tmp_path / "t")))["net"].values())
    beta = power_function_beta(0.1, offset + 32, 32)
    assert beta > 0.5  # most of the EMA is still the starting weights after one step
    names = [n for n, _ in start_net.named_parameters()]
    state = read_state(latest(str(tmp_path / "t")))["net"]
    for name, s, e in zip(names, start_weights, result.ema.parameters()):
        expected = s.lerp(state[name], 1 - beta)
        assert torch.allclose(e, expected, atol=1e-7), name
        assert not torch.equal(e, state[name]) or torch.equal(s, state[name])
    assert raw  # the checkpoint holds the raw weights the EMA moved toward

    # restart (no offset): the first update replaces the starting weights (beta = 0).
    again = train(make_net(), *data(1), cfg, seed=5, checkpoints=str(tmp_path / "r"))
    state = read_state(latest(str(tmp_path / "r")))["net"]
    for name, e in zip(names, again.ema.parameters()):
        assert torch.equal(e, state[name]), name


def _cfg(tmp_path: Path, **init) -> dict:
    d = tiny_config_dict(str(tmp_path / "run"))
    d["finetune_aux"]["init"] = init
    return d


def _refused(tmp_path: Path, d: dict, match: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


def test_resume_is_the_default_takes_the_bases_settings_and_refuses_others(tmp_path):
    d = _cfg(tmp_path)
    d["train_base"]["optimizer"] = {"lr": 0.02, "ref_images": 1000, "rampup_images": 100}
    d["train_base"]["ema_std"] = 0.05
    cfg = PipelineConfig.model_validate(d)
    assert cfg.finetune_aux.init.mode == "resume"
    assert (cfg.finetune_aux.optimizer, cfg.finetune_aux.ema_std) == (cfg.train_base.optimizer, 0.05)
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg  # a pinned (dumped) config loads back
    d["finetune_aux"]["optimizer"] = {"lr": 0.01}
    _refused(tmp_path, d, r"finetune_aux\.optimizer: init\.mode 'resume' continues the base's training with "
                          r"train_base\.optimizer")
    d = _cfg(tmp_path, mode="resume")
    d["finetune_aux"]["ema_std"] = d["train_base"].get("ema_std", 0.1)  # repeating the base's value is fine
    PipelineConfig.model_validate(d)
    d["pretrained"] = {"base": "s3://bucket/base.pt"}
    _refused(tmp_path, d, r"finetune_aux\.init\.mode: 'resume' continues the base's training state, but iteration "
                          r"0's base is imported")


def test_transfer_needs_a_warm_up(tmp_path):
    _refused(tmp_path, _cfg(tmp_path, mode="transfer"), r"finetune_aux\.optimizer\.rampup_images: init\.mode "
                                                          r"'transfer' warms the learning rate up")
    _refused(tmp_path, _cfg(tmp_path, mode="sideways"), r"finetune_aux\.init\.mode")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["resume", "transfer"])
def test_each_mode_runs_in_a_pipeline_and_logs_its_start_and_drift(tmp_path, mode):
    from sims_platform.pipeline.runner import run_pipeline
    from sims_platform.tracking.store import open_client, resolve_tracking_uri
    from sims_platform.storage.layout import RunLayout

    d = _cfg(tmp_path, mode=mode)
    d["finetune_aux"]["optimizer"] = {"lr": 0.01, "rampup_images": 128} if mode == "transfer" else \
        d["train_base"].get("optimizer", {})
    if mode == "resume":
        del d["finetune_aux"]["optimizer"]
    d["evaluate"]["methods"].append({"name": "sims-real-aux", "weights": [1.0]})
    cfg = PipelineConfig.model_validate(d)
    run_pipeline(cfg)
    layout = RunLayout.of(cfg.storage.root)
    drift = fsio.read_json(layout.drift(0))
    assert set(drift["models"]) == {"finetune-aux", "finetune-real-aux"}
    for stage, rec in drift["models"].items():
        assert 0 < rec["weight_distance"] < 1
        assert set(rec["mse"]) == {"real", "synthetic"}
        assert all(len(v) == len(drift["sigmas"]) and all(x > 0 for x in v) for v in rec["mse"].values())
    client = open_client(resolve_tracking_uri(cfg, layout))
    experiments = [e.experiment_id for e in client.search_experiments()]
    (aux_run,) = client.search_runs(experiments, "tags.`sims.stage` = 'finetune-aux'")
    assert aux_run.data.params["init.mode"] == mode
    assert int(aux_run.data.params["start_images"]) == 2048  # the base's final count, in both modes
    (run,) = client.search_runs(experiments, "tags.`sims.stage` = 'evaluate'")
    assert {"drift.finetune-aux.weight_distance", "drift.finetune-real-aux.mse_real"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "drift.finetune-aux.mse_synthetic")
    assert [m.step for m in history] == list(range(len(drift["sigmas"])))
    assert "drift.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
