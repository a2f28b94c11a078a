"""Guidance methods from the method table: sims+autoguidance reduces to sims and to autoguidance bit for bit, a
guidance interval covering every sigma changes nothing and outside it an arm is its base, a pipeline comparing
the methods validates and runs, and bad weights or intervals are one-line errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sims_platform.cli import main
from sims_platform.config import ConfigError, config_from_dict
from sims_platform.config.schema import SamplerConfig
from sims_platform.config.methods import method
from sims_platform.sampling import guidance
from sims_platform.sampling.guidance import NetDenoiser
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.sampling.heun import call_sigmas, heun_sample

from pipeline_support import tiny_config_dict

PIPELINE = Path(__file__).parent.parent / "pipelines" / "digits-guidance.yaml"


class TinyNet(nn.Module):
    """A small conditional-free denoiser network: a conv whose output depends on sigma."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, sigma, labels):
        return self.conv(x) / (1 + sigma)


def _nets() -> tuple[nn.Module, nn.Module, nn.Module]:
    return TinyNet(0), TinyNet(1), TinyNet(2)  # base, aux, early base


def _outputs(denoise) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    d = denoise(x, torch.tensor(1.5), None)
    images = heun_sample(denoise, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)), None,
                         SamplerConfig(steps=6))
    return d, images


@pytest.mark.parametrize("w,alone,alone_w", [((0.5, 0.0), "sims", 0.5), ((0.0, 0.75), "autoguidance", 0.75)])
def test_sims_plus_autoguidance_with_one_weight_zero_is_the_other_method_bit_for_bit(w, alone, alone_w):
    base, aux, guide = _nets()
    both = method("sims+autoguidance").build(guidance, base, [aux, guide], w)
    one = method(alone).build(guidance, base, [aux if alone == "sims" else guide], alone_w)
    for got, want in zip(_outputs(both), _outputs(one)):
        assert torch.equal(got, want)
    # Both weights on: a third network changes the result.
    mixed, _ = _outputs(method("sims+autoguidance").build(guidance, base, [aux, guide], (0.5, 0.75)))
    assert not torch.equal(mixed, _outputs(one)[0])


def test_cost_counts_every_network():
    assert method("sims+autoguidance").nfe_per_sample(16) == 3 * 31
    assert method("sims").nfe_per_sample(16) == 2 * 31 and method("neon").nfe_per_sample(16) == 31
    assert method("sims+autoguidance").nfe_per_sample(16, (0.5, 0.0)) == 2 * 31  # a zero weight skips its guide


@pytest.mark.parametrize("name", ["sims", "autoguidance", "sims+autoguidance", "neon"])
def test_an_interval_covering_every_sigma_is_no_interval_and_outside_it_an_arm_is_its_base(name):
    base, aux, guide = _nets()
    row = method(name)
    guides = {"sims": [aux], "neon": [aux], "autoguidance": [guide], "sims+autoguidance": [aux, guide]}[name]
    w = (0.5, 0.75) if row.vector else 0.5
    plain = _outputs(row.denoiser(guidance, base, guides, w))
    sigmas = call_sigmas(SamplerConfig(steps=6))
    every = _outputs(row.denoiser(guidance, base, guides, w, [min(sigmas), max(sigmas)]))
    assert all(torch.equal(a, b) for a, b in zip(every, plain))
    # _outputs' single call is at sigma 1.5: an interval above it leaves the base alone there.
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    outside = row.denoiser(guidance, base, guides, w, [2.0, 80.0])(x, torch.tensor(1.5), None)
    assert torch.equal(outside, NetDenoiser(base)(x, torch.tensor(1.5), None))
    assert not torch.equal(row.denoiser(guidance, base, guides, w)(x, torch.tensor(1.5), None), outside)


def test_nfe_counts_the_sampler_calls_inside_the_interval():
    sampler = SamplerConfig(steps=16)
    sigmas = call_sigmas(sampler)
    assert len(sigmas) == 31 and max(sigmas) == 80.0
    inside = sum(0.28 <= s <= 2.9 for s in sigmas)
    assert 0 < inside < 31
    assert method("sims").nfe_in_interval(sigmas, 0.5, [0.28, 2.9]) == 31 + inside
    assert method("sims+autoguidance").nfe_in_interval(sigmas, (0.5, 1.0), [0.28, 2.9]) == 31 + 2 * inside
    assert method("sims").nfe_in_interval(sigmas, 0.5, [1e-3, 100.0]) == method("sims").nfe_per_sample(16)


@pytest.mark.parametrize("interval,expected", [
    ([2.0, 1.0], r"evaluate\.methods\.0\.guidance_interval: .*0 < sigma_lo < sigma_hi \(got \[2\.0, 1\.0\]\)"),
    ([1.0, 1.0], r"guidance_interval: .*sigma_lo < sigma_hi"),
    ([0.0, 1.0], r"guidance_interval: .*0 < sigma_lo"),
    ([1.0], r"guidance_interval: .*expected \[sigma_lo, sigma_hi\]"),
])
def test_bad_intervals_are_one_line_errors(interval, expected):
    d = yaml.safe_load(PIPELINE.read_text())
    d["evaluate"]["methods"][0]["guidance_interval"] = interval
    with pytest.raises(ConfigError, match=expected) as err:
        config_from_dict(d)
    assert len([ln for ln in str(err.value).splitlines() if "guidance_interval" in ln]) == 1


def test_the_guidance_pipeline_validates():
    assert main(["validate", str(PIPELINE)]) == 0
    cfg = config_from_dict(yaml.safe_load(PIPELINE.read_text()))
    assert [m.name for m in cfg.evaluate.methods] == ["sims", "autoguidance", "sims+autoguidance"]
    assert cfg.evaluate.method("sims+autoguidance").grid == [(0.1, 0.25), (0.25, 0.25)]
    assert all(m.guidance_interval is not None for m in cfg.evaluate.methods)


@pytest.mark.parametrize("weights,expected", [
    ({"sims": [0.5], "autoguide": [1.0]},
     r"evaluate\.methods\.2\.weights: sims\+autoguidance takes one sweep per guide .*autoguide: no guide"),
    ([0.5, 1.0], r"evaluate\.methods\.2\.weights: sims\+autoguidance takes one sweep per guide, e\.g\."),
    ({"sims": [0.5]}, r"weights: sims\+autoguidance takes one sweep per guide \['sims', 'autoguidance'\]"),
    ({"sims": [0.5], "autoguidance": [-1.0]}, r"weights\.autoguidance must be >= 0"),
])
def test_bad_weight_vectors_are_one_line_errors(weights, expected):
    d = yaml.safe_load(PIPELINE.read_text())
    d["evaluate"]["methods"][2]["weights"] = weights
    with pytest.raises(ConfigError, match=expected) as err:
        config_from_dict(d)
    assert len([ln for ln in str(err.value).splitlines() if "weights" in ln]) == 1


def tiny_guidance_dict(root: str) -> dict:
    """The guidance pipeline's methods on the tiny pipeline of the end-to-end tests."""
    d = tiny_config_dict(root)
    methods = yaml.safe_load(PIPELINE.read_text())["evaluate"]["methods"]
    # its trained guide, smaller than the tiny network (16 channels)
    d["guide"] = {"network": {"preset": "digits-mini", "model_channels": 8, "channel_mult": [1, 2]},
                  "images": 128, "batch_size": 64, "ema_std": 0.05, "checkpoint_images": 128, "log_images": 128}
    d["data"]["max_images"] = 200
    d["train_base"].update(images=512, checkpoint_images=512)
    d["finetune_aux"].update(images=128, checkpoint_images=128)
    d["evaluate"].update(methods=methods, num_samples=8, batch_size=8)
    d["generate"].update(num_samples=16, batch_size=16, shard_size=16)
    return d


@pytest.mark.slow
def test_sims_run_evaluates_every_method_of_the_guidance_pipeline(tmp_path):
    cfg = config_from_dict(tiny_guidance_dict(f"file://{tmp_path}/run"))
    summary = run_pipeline(cfg)
    (row,) = summary["iterations"]
    assert row["method_order"] == ["sims", "autoguidance", "sims+autoguidance"]
    both = row["methods"]["sims+autoguidance"]
    assert set(both["fid"]) == {"0.0", "0.1,0.25", "0.25,0.25"}
    # Outside its guidance interval a sampler call evaluates the base alone.
    inside = sum(0.28 <= s <= 5.0 for s in call_sigmas(cfg.evaluate.sampler))
    assert both["nfe_per_w"]["0.1,0.25"] == (2 * 4 - 1) + 2 * inside < 3 * (2 * 4 - 1)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
