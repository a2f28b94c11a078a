"""`sims k8s render`: from the chart's rendered ConfigMap(s), every object the driver would create, as YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from sims_platform.config import ConfigError, PipelineConfig, config_from_dict
from sims_platform.k8s.settings import DriverSettings, settings_from_dict
from sims_platform.k8s.workloads import plan

PIPELINE_KEY, SETTINGS_KEY = "pipeline.yaml", "driver.yaml"


@dataclass(frozen=True)
class RunSpec:
    """What the driver reads from the chart's ConfigMap: the pipeline config and the driver settings."""

    cfg: PipelineConfig
    settings: DriverSettings
    source: str


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None


def run_specs(manifests: str) -> list[RunSpec]:
    """Every ConfigMap holding both pipeline.yaml and driver.yaml in a multi-document YAML stream."""
    try:
        docs = [d for d in yaml.safe_load_all(manifests) if isinstance(d, dict)]
    except yaml.YAMLError as err:
        raise ConfigError(f"<stdin>: not valid multi-document YAML: {err}") from None
    specs = []
    for doc in docs:
        data = doc.get("data") or {}
        if doc.get("kind") != "ConfigMap" or PIPELINE_KEY not in data or SETTINGS_KEY not in data:
            continue
        where = f"ConfigMap {doc.get('metadata', {}).get('name', '?')}"
        cfg = config_from_dict(_yaml(data[PIPELINE_KEY], f"{where}/{PIPELINE_KEY}"), f"{where}/{PIPELINE_KEY}")
        settings = settings_from_dict(_yaml(data[SETTINGS_KEY], f"{where}/{SETTINGS_KEY}"),
                                      f"{where}/{SETTINGS_KEY}")
        specs.append(RunSpec(cfg, settings, where))
    if not specs:
        raise ConfigError(f"no ConfigMap with both {PIPELINE_KEY} and {SETTINGS_KEY} in the input: pipe in the "
                          "chart's output, e.g. helm template sims-run charts/sims -f values-imagenet512.yaml "
                          "| sims k8s render -")
    return specs


def render_objects(manifests: str) -> list[dict[str, Any]]:
    return [w.body for spec in run_specs(manifests) for w in plan(spec.cfg, spec.settings)]


def render(manifests: str) -> str:
    """Multi-document YAML of every workload of every run in the input, in the order the driver creates them."""
    return yaml.safe_dump_all(render_objects(manifests), sort_keys=False, explicit_start=True)
