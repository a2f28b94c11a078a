"""The Indexed Job that runs `sims prepare` as N parts: built like the stages' Jobs, from the release's settings.

It belongs to no run (it prepares the data a run reads), so it carries the release's labels but no sims.io/run,
and its pods mount no pipeline config: it can run before the release that will train on its output is
installed. Each pod is one part (`--count N`, the index from JOB_COMPLETION_INDEX); a pod that fails is retried
per index and resumes from its committed shards; the pod that completes the set writes its manifest. Exit 2
(bad input: a missing folder, an undecodable file) fails that index at once.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sims_platform.config.loader import ConfigError
from sims_platform.data.prepare import PrepareSpec
from sims_platform.k8s import labels as L
from sims_platform.k8s.jobs import CONTAINER, batch_job
from sims_platform.k8s.names import MAX_NAME, is_dns_label
from sims_platform.k8s.pods import pod_template
from sims_platform.k8s.settings import DriverSettings, Resources, StageSettings

COMPONENT = "prepare"


def prepare_argv(spec: PrepareSpec, parts: int) -> list[str]:
    """The `sims prepare` argv of every pod (the part index comes from JOB_COMPLETION_INDEX)."""
    argv = ["prepare", "--src", spec.src, "--dst", spec.dst, "--resolution", str(spec.resolution),
            "--crop", spec.crop, "--channels", str(spec.channels), "--shard-size", str(spec.shard_size),
            "--png-level", str(spec.png_level), "--workers", str(spec.workers), "--count", str(parts)]
    if spec.max_images is not None:
        argv += ["--max-images", str(spec.max_images)]
    if spec.num_classes is not None:
        argv += ["--num-classes", str(spec.num_classes)]
    if spec.verify:
        argv.append("--verify")
    return argv


def job_name(release: str, dst: str) -> str:
    """'<release>-prepare-<8 hex of dst>': one Job per destination, rerun under the same name."""
    tail = f"-{COMPONENT}-{hashlib.sha256(dst.encode()).hexdigest()[:8]}"
    head = release[: MAX_NAME - len(tail)].rstrip("-")
    return f"{head}{tail}" if head and head[0].isalpha() else f"sims{tail}"


def prepare_job(settings: DriverSettings, spec: PrepareSpec, parts: int, *, parallelism: int | None = None,
                cpu: str = "4", memory: str = "8Gi", name: str | None = None) -> dict[str, Any]:
    """The batch/v1 Indexed Job: `parts` completions of `sims prepare --count parts`, CPU only."""
    for field, where in (("--src", spec.src), ("--dst", spec.dst)):
        if "://" not in where and not where.startswith("/"):
            raise ConfigError(f"{field} {where}: give a URI or an absolute path (the pods resolve it, not this "
                              "machine)")
    if parts < 1:
        raise ConfigError(f"--parts {parts}: expected at least 1")
    name = name or job_name(settings.release, spec.dst)
    if not is_dns_label(name, MAX_NAME):
        raise ConfigError(f"--name {name}: not a DNS-1035 label of at most {MAX_NAME} characters")
    labels = {"app.kubernetes.io/name": "sims", "app.kubernetes.io/instance": settings.release,
              "app.kubernetes.io/component": COMPONENT, "app.kubernetes.io/part-of": "sims",
              "app.kubernetes.io/managed-by": "sims-cli"}
    if settings.queue:
        labels[L.QUEUE] = settings.queue
    # Kueue admits by requests, so memory is requested and limited alike; CPU may burst.
    st = StageSettings(resources=Resources(requests={"cpu": cpu, "memory": memory}, limits={"memory": memory}))
    template = pod_template(settings, st, container=CONTAINER, command=["sims"], args=prepare_argv(spec, parts),
                            labels=L.pod_labels(labels), restart_policy="Never", mount_config=False)
    return batch_job(name, labels, template, settings, completions=parts, parallelism=parallelism)
