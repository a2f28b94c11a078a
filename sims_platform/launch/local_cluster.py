"""Run a pipeline the way the cluster does, on one machine: torchrun training, job-array writers and
evaluation parts, a reducer, all against a loopback S3 endpoint and a real MLflow server.

It launches exactly the commands the Kubernetes workloads run (`sims stage ...`), only as local processes:
  sims local-cluster --config pipelines/digits.yaml --out out/cluster-local
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sims_platform.config import load_config
from sims_platform.launch.servers import free_port, mlflow_server, moto_s3
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.storage import fsio
from sims_platform.storage.layout import REDUCERS, TRAINING_STAGES, RunLayout

TRAINING = TRAINING_STAGES
ARRAYS = ("reference", "generate", "evaluate")
BUCKET = "sims"


def _stage_argv(stage: str, config: str, k: int, overrides: list[str], loop: str | None = None) -> list[str]:
    argv = ["stage", stage, "--config", config, "--iteration", str(k)] + (["--loop", loop] if loop else [])
    for o in overrides:
        argv += ["--set", o]
    return argv


def _run_all(commands: list[list[str]], env: dict[str, str], what: str) -> None:
    """Start the commands together (one job array or one torchrun) and fail with the first bad exit code."""
    t0 = time.time()
    procs = [subprocess.Popen(c, env=env) for c in commands]
    codes = [p.wait() for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        raise RuntimeError(f"{what}: process(es) {bad} failed (index, exit code)")
    print(f"[local-cluster] {what}: ok in {time.time() - t0:.0f} s", flush=True)


def run_local_cluster(config: str, out: Path, procs: int = 2, writers: int = 2, eval_parts: int = 2,
                      extra: list[str] | None = None) -> dict:
    cfg = load_config(config, extra)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sims = [sys.executable, "-m", "sims_platform.cli"]
    with moto_s3(out) as s3:
        s3.create_bucket(BUCKET)
        with mlflow_server(out, f"s3://{BUCKET}/mlartifacts", env=s3.env()) as tracking:
            root = f"s3://{BUCKET}/runs/{cfg.name}"
            overrides = [*(extra or []), f"storage.root={root}", f"tracking.uri={tracking}"]
            # One thread per process: several processes share the cores, as pods share a node.
            env = dict(os.environ, **s3.env(), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=tracking)
            print(f"[local-cluster] S3 {s3.url}, MLflow {tracking}, storage {root}", flush=True)
            for st in pipeline_plan(cfg):
                k, stage, loop = st.iteration, st.stage, st.loop_name
                argv = _stage_argv(stage, config, k, overrides, loop)
                what = f"{loop + ' ' if loop else ''}iter {k}"
                if stage in TRAINING:
                    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                                "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                                "--master_port", str(free_port()), "-m", "sims_platform.cli"]
                    _run_all([torchrun + argv], env, f"{what} {stage} (torchrun x{procs})")
                elif stage in ARRAYS:
                    n = writers if stage == "generate" else eval_parts
                    _run_all([sims + argv + ["--index", str(i), "--count", str(n)] for i in range(n)], env,
                             f"{what} {stage} ({n} parts)")
                    if stage in REDUCERS:
                        _run_all([sims + _stage_argv(REDUCERS[stage], config, k, overrides, loop)], env,
                                 f"{what} {REDUCERS[stage]}")
                else:
                    _run_all([sims + argv], env, f"{what} {stage}")
            os.environ.update(s3.env())  # read the results back through s3fs in this process
            summary = fsio.read_json(RunLayout.of(root).summary)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from sims_platform.tracking import format_table

    print(format_table(summary), flush=True)
    print(f"[local-cluster] summary copied to {out / 'summary.json'}; MLflow database: {out / 'mlflow.db'} "
          f"(artifacts lived in the in-memory S3 emulator and are gone with it)", flush=True)
    return summary
