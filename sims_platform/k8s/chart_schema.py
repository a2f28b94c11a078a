"""Keep charts/sims/values.schema.json's `pipeline` schema equal to PipelineConfig's and its `stages` keys equal to
the stage table's steps (run as a module to rewrite it).

The chart's own knobs are written by hand in the JSON file; the `pipeline:` mapping is checked against the very
schema `sims validate` uses, so a misspelt pipeline key fails `helm install` too, with the field named; `stages:`
accepts exactly the stage table's steps, each with the hand-written pod settings of a stage.
    python -m sims_platform.k8s.chart_schema charts/sims/values.schema.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sims_platform.config.schema import PipelineConfig
from sims_platform.config.secrets import CREDENTIALS
from sims_platform.steps.table import TABLE

ROOT_DEF = "PipelineConfig"


def pipeline_defs() -> dict[str, Any]:
    """PipelineConfig's JSON schema as $defs (the root model under ROOT_DEF), refs kept root-relative."""
    schema = PipelineConfig.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})
    defs[ROOT_DEF] = schema
    return defs


def refusing_credentials(schema: Any) -> Any:
    """The schema with every string refusing a URI that carries credentials, as `sims validate` does, so
    `helm install` stops before any manifest holds one."""
    if isinstance(schema, list):
        return [refusing_credentials(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: refusing_credentials(v) for k, v in schema.items()}
    if out.get("type") == "string" and "enum" not in out and "const" not in out:
        out["not"] = {"pattern": CREDENTIALS}
    return out


def with_pipeline(values_schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(values_schema)
    out["properties"] = dict(out.get("properties", {}))
    out["properties"]["pipeline"] = {"$ref": f"#/$defs/{ROOT_DEF}",
                                     "description": "the pipeline config: the schema of pipelines/*.yaml"}
    out["$defs"] = pipeline_defs()
    return refusing_credentials(out)


def with_stages(values_schema: dict[str, Any]) -> dict[str, Any]:
    """`stages:` with one key per step of the stage table, in table order, each with the same pod settings (the
    hand-written schema of one stage's pods, taken from the first key present) and its row's line as description."""
    out = dict(values_schema)
    stages = dict(out["properties"]["stages"])
    pods = next(iter(stages["properties"].values()))
    pods = {k: v for k, v in pods.items() if k != "description"}
    stages["properties"] = {r.name: {"description": f"{r.name} ({r.kind}): {r.about}", **pods} for r in TABLE}
    out["properties"] = dict(out["properties"], stages=stages)
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "charts/sims/values.schema.json")
    schema = with_stages(with_pipeline(json.loads(path.read_text())))
    path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"{path}: pipeline schema updated ({len(schema['$defs'])} definitions), {len(TABLE)} stages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
