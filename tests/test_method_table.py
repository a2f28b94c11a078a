"""Guidance methods from the method table: sims+autoguidance reduces to sims and to autoguidance bit for bit, a
pipeline comparing them validates and runs, and bad weights are one-line errors naming the field."""

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
from sims_platform.guidance.methods import method
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.sampling.heun import heun_sample

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
    both = method("sims+autoguidance").build(base, [aux, guide], w)
    one = method(alone).build(base, [aux if alone == "sims" else guide], alone_w)
    for got, want in zip(_outputs(both), _outputs(one)):
        assert torch.equal(got, want)
    # Both weights on: a third network changes the result.
    mixed, _ = _outputs(method("sims+autoguidance").build(base, [aux, guide], (0.5, 0.75)))
    assert not torch.equal(mixed, _outputs(one)[0])


def test_cost_counts_every_network():
    assert method("sims+autoguidance").nfe_per_sample(16) == 3 * 31
    assert method("sims").nfe_per_sample(16) == 2 * 31 and method("neon").nfe_per_sample(16) == 31
    assert method("sims+autoguidance").nfe_per_sample(16, (0.5, 0.0)) == 2 * 31  # a zero weight skips its guide


def test_the_guidance_pipeline_validates():
    assert main(["validate", str(PIPELINE)]) == 0
    cfg = config_from_dict(yaml.safe_load(PIPELINE.read_text()))
    assert [m.name for m in cfg.evaluate.methods] == ["sims", "autoguidance", "sims+autoguidance"]
    assert cfg.evaluate.method("sims+autoguidance").grid == [(0.1, 0.25), (0.25, 0.25)]


@pytest.mark.parametrize("weights,expected", [
    ({"sims": [0.5], "autoguide": [1.0]}, r"weights of sims\+autoguidance: .*autoguide: no guide"),
    ([0.5, 1.0], r"weights of sims\+autoguidance: one sweep per guide"),
    ({"sims": [0.5]}, r"weights of sims\+autoguidance: expected one sweep per guide"),
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
    for m in methods:
        if "guide_images" in m:
            m["guide_images"] = 1024
    d["train_base"]["snapshots"] = [1024]
    d["evaluate"]["methods"] = methods
    d["evaluate"]["num_samples"] = 16
    d["evaluate"]["batch_size"] = 16
    d["generate"]["num_samples"] = 48
    return d


@pytest.mark.slow
def test_sims_run_evaluates_every_method_of_the_guidance_pipeline(tmp_path):
    cfg = config_from_dict(tiny_guidance_dict(f"file://{tmp_path}/run"))
    summary = run_pipeline(cfg)
    (row,) = summary["iterations"]
    assert row["method_order"] == ["sims", "autoguidance", "sims+autoguidance"]
    both = row["methods"]["sims+autoguidance"]
    assert set(both["fid"]) == {"0.0", "0.1,0.25", "0.25,0.25"}
    assert both["nfe_per_w"]["0.1,0.25"] == 3 * (2 * 4 - 1)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
