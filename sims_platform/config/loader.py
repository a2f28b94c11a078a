"""Load, override and validate pipeline YAML; errors name the field and what was expected."""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sims_platform.config.schema import PipelineConfig
from sims_platform.config.secrets import shown


class ConfigError(ValueError):
    """A pipeline file that cannot be used; the message lists every bad field."""


# ----------------------------------------------------------------------------
# Error messages


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at the mapping that holds loc[-1] (for 'did you mean'); [] when unknown."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list entry: the annotation was already unwrapped to the entry's model
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (directly, in a list, or in an Optional), else None."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _message(e: Any) -> str:
    loc = tuple(e["loc"])
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "check the spelling; see `sims validate --help`"
        return f"unknown key ({hint})"
    if e["type"] == "missing":
        return "required field is missing"
    if e["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "expected a mapping of its fields"
    return re.sub(r"instance of [A-Z]\w*", "a mapping", e["msg"])


def _format(err: ValidationError, source: str, blame: dict[tuple[str, ...], str] | None = None) -> str:
    """One line per bad field; a field an override set is blamed on that `--set`, not on the file."""
    lines = [f"{source}: invalid pipeline configuration"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        message = _message(e)
        # A cross-field rule names the field it is about first ("tracking.uri: ..."): show it as that field's.
        if named := re.match(r"Value error, ([\w.]+): (.*)", message, re.S):
            field = tuple(named.group(1).split("."))
            # Relative to the section that raised it, unless it already names the section.
            loc, message = (field if field[:len(loc)] == loc else loc + field), named.group(2)
        path = ".".join(loc) or "(top level)"
        got = e.get("input")
        got_text = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) \
            else f" (got {shown(got)!r})"
        where = next((f" [from --set {_shown_pair(pair)}]" for key, pair in (blame or {}).items()
                      if loc[:len(key)] == key), "")
        lines.append(f"  {path}: {message}{got_text}{where}")
    return "\n".join(lines)


def _shown_pair(pair: str) -> str:
    key, _, value = pair.partition("=")
    return f"{key}={shown(value)}"


# ----------------------------------------------------------------------------
# Overrides (--set KEY=VALUE)


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any, str]]:
    """['a.b=1', 'evaluate.methods.0.name=neon'] -> (key path, YAML-parsed value, the pair as given)."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {pair}: expected KEY=VALUE, e.g. seed=3, finetune_aux.images=4096 or "
                              "evaluate.methods.0.weights=[0.5,1]")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        out.append((parts, parsed, pair))
    return out


def apply_overrides(data: dict[str, Any], pairs: list[str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """A copy of data with each override set at its path (mappings are created as needed; a number indexes an
    existing list entry) and, per overridden path, the pair that set it."""
    out, blame = copy.deepcopy(data), {}
    for parts, value, pair in parse_overrides(pairs):
        node: Any = out
        for i, part in enumerate(parts):
            where = ".".join(parts[:i]) or "(top level)"
            key: Any = part
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {pair}: {where} is a list of {len(node)} entries; index it with "
                                      f"0..{len(node) - 1} (got '{part}')")
                key = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {pair}: {where} is {node!r}, not a mapping or list to set '{part}' in")
            if i == len(parts) - 1:
                node[key] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
        blame[tuple(parts)] = pair
    return out, blame


# ----------------------------------------------------------------------------
# Loading


def is_values_file(path: str | Path) -> bool:
    """Whether the YAML file at path is a Helm values file (a `pipeline:` mapping among the chart's keys)."""
    if str(path) == "-" or not Path(path).is_file():
        return False
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "pipeline" in data


def pipeline_of(data: Any, source: str) -> tuple[Any, str]:
    """A Helm values file (the chart's values, with the pipeline under `pipeline:`) stands for its pipeline."""
    if isinstance(data, dict) and "pipeline" in data:
        if not isinstance(data["pipeline"], dict):
            raise ConfigError(f"{source}: pipeline: expected the pipeline mapping, got "
                              f"{type(data['pipeline']).__name__}")
        return data["pipeline"], f"{source} (Helm values, pipeline:)"
    return data, source


def config_from_dict(data: Any, source: str = "<config>", overrides: list[str] | None = None) -> PipelineConfig:
    data, source = pipeline_of(data, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}")
    blame: dict[tuple[str, ...], str] = {}
    if overrides:
        data, blame = apply_overrides(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source, blame)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML file ('-' reads standard input)."""
    if str(path) == "-":
        import sys
        text, source = sys.stdin.read(), "<stdin>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: pipeline file not found")
        source = str(path)
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source}: not a UTF-8 text file (byte {err.start}); expected pipeline YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    return config_from_dict(data, source, overrides)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
