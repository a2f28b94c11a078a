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
    # And so does every process a test starts (`sims run`, its parts, torchrun ranks): a process with two OpenMP
    # threads on cores another worker keeps busy spends most of its time waiting for its second thread (a tiny
    # `sims run` beside two busy processes: 30 s with one thread, 300 s with two).
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding end-to-end (`slow`) tests run first, each module's tests kept together and in order: the
    parallel workers then start on the minute-long tests and end on the short ones, instead of one worker finishing
    a long test while the other waits."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # a stable sort: the order within each group is kept


@pytest.fixture
def tiny_cfg(tmp_path):
    return config_from_dict(tiny_config_dict(str(tmp_path / "run")))
