"""Distributed training: 2-process ZeRO-2 / ZeRO-3 (DeepSpeed on CPU, gloo) and plain data parallel, with resume.

Real processes on loopback, launched as a PyTorchJob pod launches them (torchrun). The same file is the
worker: `python -m torch.distributed.run ... tests/test_distributed.py <spec.json>`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sims_platform.config.schema import TrainConfig
from sims_platform.models.precond import Precond
from sims_platform.training.batches import plan_batches
from sims_platform.training.checkpoints import committed, latest, read_state, save_checkpoint
from sims_platform.training.distributed import detect

ROOT = Path(__file__).resolve().parents[1]
S3_ENV: dict[str, str] = {}  # set while a loopback S3 endpoint serves a test
# Partition even the tiny net's parameters under ZeRO-3 (the default keeps params < 1e5 elements whole).
Z3_SMALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def make_net() -> Precond:
    torch.manual_seed(0)
    return Precond(8, 1, 10, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g) * 0.5, torch.randint(10, (64,), generator=g)


def cfg(distributed: dict | None = None, **kw) -> TrainConfig:
    base = dict(images=1280, batch_size=32, checkpoint_images=320, keep_checkpoints=2, log_images=320,
                optimizer={"lr": 0.01})
    return TrainConfig.model_validate(base | kw | {"distributed": distributed or {}})


# ----------------------------------------------------------------------------
# The worker (one rank)


def worker(spec_path: str) -> int:
    from sims_platform.training import distributed
    from sims_platform.training.loop import StopTraining, train

    spec = json.loads(Path(spec_path).read_text())
    x, y = data()

    def stop(images: int) -> None:
        if images == spec.get("stop_at"):
            raise StopTraining

    try:
        result = train(make_net(), x, y, TrainConfig.model_validate(spec["cfg"]), seed=1,
                       checkpoints=spec["checkpoints"], after_checkpoint=stop)
    except StopTraining:
        distributed.teardown()
        return 0
    if distributed.is_main():
        assert result.ema is not None
        torch.save(result.ema.state_dict(), spec["out"] + ".pt")
        Path(spec["out"]).write_text(json.dumps({"losses": result.losses, "images": result.images,
                                                 "resumed_from": result.resumed_from}))
    distributed.teardown()
    return 0


# ----------------------------------------------------------------------------
# Launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, config: TrainConfig, procs: int, stop_at: int | None = None,
           ckpt: str | None = None) -> dict | None:
    spec = {"cfg": config.model_dump(mode="json"), "checkpoints": ckpt or str(tmp / "ckpt"), "stop_at": stop_at,
            "out": str(tmp / f"{name}.json")}
    (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # Two cores and a busy machine: one thread per process; DeepSpeed's CPU accelerator; quiet progress.
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "SIMS_PROGRESS_INTERVAL": "1000", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    env |= S3_ENV
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, str(tmp / f"{name}.spec.json")]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = tmp / f"{name}.json"
    return json.loads(out.read_text()) | {"ema": torch.load(str(out) + ".pt")} if out.exists() else None


def single(tmp: Path, config: TrainConfig) -> dict:
    """The same training in this process: plain engine, one rank."""
    from sims_platform.training.loop import train

    x, y = data()
    r = train(make_net(), x, y, config, seed=1, checkpoints=str(tmp / "single"))
    return {"losses": r.losses, "images": r.images, "ema": r.ema.state_dict()}


def assert_close_ema(a: dict, b: dict, tol: float) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (k, (a[k] - b[k]).abs().max())


# ----------------------------------------------------------------------------
# Fast checks


def test_env_detection_torchrun_and_bare_pytorchjob():
    assert detect({}).world_size == 1 and not detect({}).launched
    t = detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "m", "MASTER_PORT": "1"})
    assert (t.rank, t.world_size, t.local_rank) == (3, 4, 1)
    bare = detect({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"})
    assert (bare.rank, bare.local_rank) == (1, 0)  # the operator injects no LOCAL_RANK: one process per pod
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        detect({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "m"})


def test_batch_plan_and_errors_name_the_field():
    c = cfg({"micro_batch": 4})
    assert plan_batches(c, 2, "train_base").accumulation == 4  # 32 = 4 x 2 ranks x 4 passes
    with pytest.raises(ValueError, match=r"train_base.distributed.micro_batch=8: train_base.batch_size=48 must be "
                                         r"a multiple of micro_batch x world size = 32"):
        plan_batches(cfg({"micro_batch": 8}, batch_size=48), 4, "train_base")
    with pytest.raises(ValueError, match="train_base.batch_size=32 must be a multiple of the world size 3"):
        plan_batches(c, 3, "train_base")
    with pytest.raises(ValueError, match="distributed.micro_batch=5 must divide batch_size=32"):
        cfg({"micro_batch": 5})
    with pytest.raises(ValueError, match="zero_stage=2 needs distributed.backend deepspeed"):
        cfg({"backend": "plain", "zero_stage": 2})
    assert not cfg().distributed.uses_deepspeed() and cfg({"zero_stage": 1}).distributed.uses_deepspeed()


def test_uncommitted_deepspeed_folder_is_ignored_then_pruned(tmp_path):
    folder = str(tmp_path)
    save_checkpoint(folder, 320, {"images": 320}, keep=2)
    (tmp_path / "ckpt-0000000640" / "ds").mkdir(parents=True)  # a run killed before COMMIT.json
    assert latest(folder).images == 320
    save_checkpoint(folder, 960, {"images": 960}, keep=2)
    assert not (tmp_path / "ckpt-0000000640").exists() and latest(folder).images == 960


# ----------------------------------------------------------------------------
# Real processes


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A loopback S3 endpoint (moto) with a bucket; the workers get its env."""
    from sims_platform.launch.servers import moto_s3

    with moto_s3(tmp_path) as endpoint:
        endpoint.create_bucket("ckpt")
        for k, v in endpoint.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys.modules[__name__], "S3_ENV", endpoint.env())
        yield "s3://ckpt/run"


@pytest.mark.slow
@pytest.mark.parametrize("zero, store", [(2, "s3"), (3, "file")])
def test_zero_trains_and_resumes(tmp_path, request, zero, store):
    """2 ranks, ZeRO-2 (checkpoints on S3) / ZeRO-3 (file://): stop after a checkpoint, relaunch, finish;
    the loss falls and the run takes the same steps as one plain process."""
    where = request.getfixturevalue("s3") if store == "s3" else str(tmp_path / "ckpt")
    config = cfg({"zero_stage": zero, "deepspeed": Z3_SMALL if zero == 3 else {}})
    assert launch(tmp_path, "first", config, procs=2, stop_at=640, ckpt=where) is None
    ckpts = committed(where)
    assert [c.images for c in ckpts] == [320, 640]
    assert ckpts[-1].commit["world_size"] == 2 and ckpts[-1].commit["zero_stage"] == zero
    assert set(ckpts[-1].commit["native_files"]) >= {f"state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                     for r in (0, 1)} or zero == 3
    r = launch(tmp_path, "resumed", config, procs=2, ckpt=where)
    assert r["resumed_from"].endswith("ckpt-0000000640") and r["images"] == 1280
    assert [i for i, _ in r["losses"]] == [960, 1280]  # only what happened after the resume is logged
    ref = single(tmp_path, cfg())
    assert r["losses"][-1][1] < ref["losses"][0][1]  # the loss decreased from the first window
    # Same steps as one plain process, up to float reduction order.
    for (i, a), (j, b) in zip(r["losses"], ref["losses"][2:]):
        assert i == j and abs(a - b) < 1e-4 * abs(b), (i, a, b)
    assert_close_ema(r["ema"], ref["ema"], 1e-4)
    final = committed(where)
    assert [c.images for c in final] == [960, 1280]  # rank 0 pruned the older ones
    # EDM2's forced weight normalisation held on the (partitioned) master weights: unit RMS per channel.
    weights = read_state(final[-1])["net"]
    for name in ("unet.emb_noise.weight", "logvar_linear.weight"):
        rms = weights[name].flatten(1).pow(2).mean(1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), (name, rms)


@pytest.mark.slow
def test_resume_at_another_world_size(tmp_path):
    """ZeRO-2 on 2 ranks, then ZeRO-3 on 1 rank, then plain on 2 ranks, from the consolidated state."""
    z2 = cfg({"zero_stage": 2}, images=1280)
    assert launch(tmp_path, "a", z2, procs=2, stop_at=640) is None
    z3 = cfg({"zero_stage": 3, "deepspeed": Z3_SMALL}, images=1280)
    assert launch(tmp_path, "b", z3, procs=1, stop_at=960) is None
    r = launch(tmp_path, "c", cfg(images=1280), procs=2)
    assert r["resumed_from"].endswith("ckpt-0000000960") and r["images"] == 1280
    ref = single(tmp_path, cfg())
    assert abs(r["losses"][-1][1] - ref["losses"][-1][1]) < 1e-3 * abs(ref["losses"][-1][1])
    assert_close_ema(r["ema"], ref["ema"], 1e-3)


@pytest.mark.slow
def test_plain_data_parallel_matches_one_process(tmp_path):
    """Plain engine, 2 ranks with gradient accumulation (micro_batch 8): same steps as one process."""
    r = launch(tmp_path, "dp", cfg({"micro_batch": 8}, images=640), procs=2)
    ref = single(tmp_path, cfg(images=640))
    for (i, a), (j, b) in zip(r["losses"], ref["losses"]):
        assert i == j and abs(a - b) < 1e-4 * abs(b), (i, a, b)
    assert_close_ema(r["ema"], ref["ema"], 1e-4)
    # A one-file checkpoint (the plain format), written once by rank 0.
    assert [c.commit for c in committed(str(tmp_path / "ckpt"))] == [None, None]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
