"""Run a pipeline the way the cluster does, on one machine: torchrun training, job-array writers and
evaluation parts, a reducer, all against a loopback S3 endpoint and a real MLflow server.

It launches exactly the commands the Kubernetes workloads run (`sims stage ...`), only as local processes:
  sims local-cluster --config pipelines/digits.yaml --out out/cluster-local
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sims_platform.config import load_config
from sims_platform.launch.processes import Processes, run_step
from sims_platform.launch.servers import mlflow_server, moto_s3
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

BUCKET = "sims"


def run_local_cluster(config: str, out: Path, procs: int = 2, writers: int = 2, eval_parts: int = 2,
                      extra: list[str] | None = None) -> dict:
    cfg = load_config(config, extra)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with moto_s3(out) as s3:
        s3.create_bucket(BUCKET)
        with mlflow_server(out, f"s3://{BUCKET}/mlartifacts", env=s3.env()) as tracking:
            root = f"s3://{BUCKET}/runs/{cfg.name}"
            overrides = [*(extra or []), f"storage.root={root}", f"tracking.uri={tracking}"]
            # One thread per process: several processes share the cores, as pods share a node.
            env = dict(os.environ, **s3.env(), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=tracking)
            print(f"[local-cluster] S3 {s3.url}, MLflow {tracking}, storage {root}", flush=True)
            n = Processes(train=procs, writers=writers, arrays=eval_parts)
            for step in pipeline_plan(cfg):
                run_step(step, config, overrides, env, n, tag="[local-cluster]")
            os.environ.update(s3.env())  # read the results back through s3fs in this process
            summary = fsio.read_json(RunLayout.of(root).summary)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from sims_platform.tracking import format_table

    print(format_table(summary), flush=True)
    print(f"[local-cluster] summary copied to {out / 'summary.json'}; MLflow database: {out / 'mlflow.db'} "
          f"(artifacts lived in the in-memory S3 emulator and are gone with it)", flush=True)
    return summary
