"""The GPU check's pipeline (benchmarks/cuda_pipeline.py) is a valid config on both devices, so a session lent a
GPU spends its minutes running it, not fixing it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sims_platform.config import config_from_dict

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "cuda_pipeline.py"


@pytest.mark.parametrize("device,sampling", [("cuda:0", "fp16"), ("cpu", "bf16")])
def test_cuda_pipeline_config_is_valid(tmp_path, device, sampling):
    spec = importlib.util.spec_from_file_location("cuda_pipeline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = config_from_dict(mod.pipeline_dict(str(tmp_path), device, 8192))
    assert cfg.runtime.device == device and cfg.encoder.kind == "latent"
    assert cfg.generate.sampler.precision == cfg.evaluate.sampler.precision == sampling
    assert cfg.train_base.distributed.precision == cfg.finetune_aux.distributed.precision == "bf16"
    assert {m.name for m in cfg.evaluate.methods} == {"sims", "neon"}
