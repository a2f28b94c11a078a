"""Driver settings: how stages run on the cluster (image, queue, resources), from the chart's ConfigMap."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from sims_platform.config.loader import ConfigError
from sims_platform.config.secrets import refuse_credentials
from sims_platform.steps import STAGE_NAMES
from sims_platform.steps.table import TABLE

# Keys are camelCase in YAML (Helm values convention) and snake_case in Python.


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class Resources(Section):
    requests: dict[str, str | int] = Field(default_factory=dict, description="e.g. {cpu: '8', memory: 64Gi}")
    limits: dict[str, str | int] = Field(default_factory=dict)


class Placement(Section):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)


class StageSettings(Section):
    """One stage's pods. Training stages use nodes x gpus; sampling stages use shards (Indexed Job)."""

    nodes: int = Field(1, ge=1, description="PyTorchJob pods (1 Master + nodes-1 Workers)")
    gpus: int = Field(0, ge=0, description="GPUs per pod (nvidia.com/gpu); 0 = CPU only")
    shards: int = Field(1, ge=1, description="Indexed Job completions: slices of the work")
    parallelism: int | None = Field(None, ge=1, description="pods at once (default: shards)")
    resources: Resources = Resources()
    placement: Placement = Placement()
    shm_size: str = Field("1Gi", description="/dev/shm size (emptyDir medium Memory)")
    active_deadline_seconds: int | None = Field(None, ge=1)


# A step's pods when the chart's `stages:` does not list it: its row's `pods` in the stage table (otherwise one
# pod, no GPU, no requests).
DEFAULT_STAGES: dict[str, StageSettings] = {r.name: StageSettings.model_validate(r.pods) for r in TABLE if r.pods}


class Gang(Section):
    enabled: bool = Field(False, description="PyTorchJob runPolicy.schedulingPolicy (needs Volcano or "
                          "scheduler-plugins and the operator's --gang-scheduler-name)")
    scheduler_name: str | None = Field(None, description="pod schedulerName, e.g. volcano")
    schedule_timeout_seconds: int | None = Field(None, ge=1)


class DriverSettings(Section):
    release: str = Field(..., description="Helm release name (app.kubernetes.io/instance)")
    namespace: str = Field("default")
    chart: str = Field("sims", description="chart name-version for helm.sh/chart-like labels")
    image: str = Field(..., description="image of every stage pod")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    config_map: str = Field(..., description="ConfigMap holding pipeline.yaml (mounted at /etc/sims)")
    service_account: str | None = Field(None, description="stage pods' ServiceAccount (no API access needed; "
                                        "for cloud workload identity to S3)")
    backend: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob", description="training stages as Training Operator v1 PyTorchJobs or Trainer v2 TrainJobs")
    training_runtime: str | None = Field(None, description="the chart's TrainingRuntime (backend trainjob)")
    queue: str | None = Field(None, description="Kueue LocalQueue: label kueue.x-k8s.io/queue-name")
    priority_class: str | None = None
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    backoff_limit: int = Field(3, ge=0, description="retries of a PyTorchJob or a plain Job")
    backoff_limit_per_index: int = Field(2, ge=0, description="retries of each Indexed Job index")
    gang: Gang = Gang()
    s3_secret: str | None = Field(None, description="Secret with AWS_* keys, loaded with envFrom")
    mlflow_uri: str | None = Field(None, description="MLFLOW_TRACKING_URI of every pod")
    data_claim: str | None = Field(None, description="PVC mounted at data_mount_path (file:// storage)")
    data_mount_path: str = "/data"
    env: dict[str, str] = Field(default_factory=dict, description="extra non-secret env for every pod")
    poll_seconds: float = Field(15.0, gt=0)
    stages: dict[str, StageSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_stages(self) -> DriverSettings:
        refuse_credentials(self)
        bad = sorted(set(self.stages) - set(STAGE_NAMES))
        if bad:
            raise ValueError(f"stages: unknown stage(s) {bad}, expected some of {list(STAGE_NAMES)}")
        if self.backend == "trainjob" and not self.training_runtime:
            raise ValueError("trainingRuntime: required with backend trainjob (the chart's TrainingRuntime name)")
        return self

    def stage(self, name: str) -> StageSettings:
        if name in self.stages:
            return self.stages[name]
        return DEFAULT_STAGES.get(name, StageSettings())


def settings_from_dict(data: Any, source: str = "<driver settings>") -> DriverSettings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a YAML mapping, got {type(data).__name__}")
    try:
        return DriverSettings.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: invalid driver settings"]
        for e in err.errors():
            lines.append(f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_settings(path: str | Path) -> DriverSettings:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: driver settings file not found (the chart mounts it at /etc/sims/driver.yaml)")
    return settings_from_dict(yaml.safe_load(p.read_text()), str(path))
