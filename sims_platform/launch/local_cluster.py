"""Run a pipeline the way the cluster does, on one machine: torchrun training, job-array writers and
evaluation parts, a reducer, all against a loopback S3 endpoint and a real MLflow server.

It launches exactly the commands the Kubernetes workloads run (`sims stage ...`), only as local processes:
  sims local-cluster --config pipelines/digits.yaml --out out/cluster-local
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from sims_platform.config import load_config
from sims_platform.launch.processes import Processes, run_step
from sims_platform.launch.servers import S3Endpoint, mlflow_server, moto_s3
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

BUCKET = "sims"


def _forget_s3_clients() -> None:
    """s3fs keeps one filesystem per set of arguments for the process's life; an earlier run in this process
    may have made one for another endpoint (the environment names the current one)."""
    import s3fs  # type: ignore[import-untyped]

    s3fs.S3FileSystem.clear_instance_cache()


def run_local_cluster(config: str, out: Path, procs: int = 2, writers: int = 2, eval_parts: int = 2,
                      extra: list[str] | None = None,
                      s3_wrap: Callable[[S3Endpoint], AbstractContextManager[S3Endpoint]] | None = None) -> dict:
    """s3_wrap(endpoint): the endpoint every process (stages, MLflow server, this one) talks to instead of the
    emulator's, for as long as the run lasts (e.g. a fault-injecting proxy in front of it)."""
    cfg = load_config(config, extra)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with moto_s3(out) as emulator:
        emulator.create_bucket(BUCKET)
        with (s3_wrap(emulator) if s3_wrap else contextlib.nullcontext(emulator)) as s3, \
                mlflow_server(out, f"s3://{BUCKET}/mlartifacts", env=s3.env()) as tracking:
            root = f"s3://{BUCKET}/runs/{cfg.name}"
            overrides = [*(extra or []), f"storage.root={root}", f"tracking.uri={tracking}"]
            # One thread per process: several processes share the cores, as pods share a node.
            env = dict(os.environ, **s3.env(), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=tracking)
            print(f"[local-cluster] S3 {s3.url}, MLflow {tracking}, storage {root}", flush=True)
            n = Processes(train=procs, writers=writers, arrays=eval_parts)
            for step in pipeline_plan(cfg):
                run_step(step, config, overrides, env, n, tag="[local-cluster]")
            os.environ.update(s3.env())  # read the results back through s3fs in this process
            _forget_s3_clients()
            summary = fsio.read_json(RunLayout.of(root).summary)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from sims_platform.tracking import format_table

    print(format_table(summary), flush=True)
    print(f"[local-cluster] summary copied to {out / 'summary.json'}; MLflow database: {out / 'mlflow.db'} "
          f"(artifacts lived in the in-memory S3 emulator and are gone with it)", flush=True)
    return summary
