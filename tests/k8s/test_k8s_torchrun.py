"""The training entrypoint: real torchrun over `sims`; a worker's permanent exit code becomes the container's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from k8s_support import REPO

from sims_platform.k8s.jobs import PERMANENT_EXITS
from sims_platform.k8s.torchrun import container_exit, recorded_code


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], tmp_path: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path), PET_NNODES="1", PET_NODE_RANK="0",
               PET_NPROC_PER_NODE="1", PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(_port()))
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, timeout=300).returncode


def test_a_bad_config_exits_2_through_torchrun(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain_base: {batch_size: many}\n")
    stage = ["stage", "train-base", "--config", str(bad), "--iteration", "0"]
    assert _run([sys.executable, "-m", "sims_platform.k8s.torchrun", *stage], tmp_path) == 2
    # plain torchrun re-raises the worker's failure: exit 1, which every failure policy retries
    plain = [sys.executable, "-m", "torch.distributed.run", "--no-python", str(Path(sys.executable).parent / "sims")]
    assert _run([*plain, *stage], tmp_path) == 1


def test_only_permanent_codes_are_carried(tmp_path):
    assert PERMANENT_EXITS == (2,)
    assert container_exit(1, 2) == 2            # a worker's bad config
    assert container_exit(1, 1) == 1            # a worker's crash or a lost peer: retried
    assert container_exit(1, None) == 1         # no worker recorded anything (killed by a signal)
    assert container_exit(0, 2) == 0
    f = tmp_path / "error.json"
    f.write_text('{"message": {"message": "x", "errorCode": 2, "extraInfo": {}}}')
    assert recorded_code(f) == 2
    f.write_text('{"message": "new format"}')
    assert recorded_code(f) is None
    assert recorded_code(tmp_path / "absent.json") is None
