"""Shared test fixtures: small configs that train in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline_support import tiny_config_dict

from sims_platform.config import config_from_dict

os.environ.setdefault("SIMS_PROGRESS_INTERVAL", "30")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs several workers: they share the cores, a thread each
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_cfg(tmp_path):
    return config_from_dict(tiny_config_dict(str(tmp_path / "run")))
