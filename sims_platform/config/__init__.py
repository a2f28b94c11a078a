"""Typed pipeline configuration (pydantic) and its YAML loader."""

from sims_platform.config.loader import ConfigError, config_from_dict, dump_config, load_config
from sims_platform.config.schema import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "config_from_dict", "dump_config", "load_config"]
