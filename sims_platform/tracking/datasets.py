"""MLflow dataset entries for the URIs a stage reads: a source by the URI's scheme, a digest from its content.

The run page's "Datasets used" (and the runs table's Datasets column) lists these. A shard set (a folder with
a manifest.json, as generate, feed and encode write) gets a digest of its shards' sha256 checksums, so the
same samples show the same digest wherever they are read; any other URI (a model file, a built-in data set
such as sklearn://load_digits) is identified by the URI itself.
"""

from __future__ import annotations

import hashlib
import json
import warnings

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from sims_platform.data.shards import MANIFEST, ShardError, read_manifest
from sims_platform.storage.fsio import exists, join

# MLflow's context tag on a dataset input; the UI shows it next to the dataset's name.
CONTEXT_TAG = "mlflow.data.context"
# What the UI shows for a URI MLflow has no source type for: "external" datasets are listed with their URL.
EXTERNAL = "external"
DIGEST_CHARS = 16


def _source(uri: str) -> tuple[str, str]:
    """(source type, source JSON): MLflow's own for local, s3 and http URIs; 'external' for other schemes."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for file URIs
            source = resolve_dataset_source(uri)
        return source._get_source_type(), source.to_json()
    except MlflowException:  # e.g. sklearn://load_digits: no resolver, but still the data the stage read
        return EXTERNAL, json.dumps({"url": uri})


def manifest_of(uri: str) -> dict | None:
    """The shard manifest at uri, or None when uri is not a (complete) shard set."""
    try:
        return read_manifest(uri) if exists(join(uri, MANIFEST)) else None
    except (ShardError, OSError, ValueError):
        return None  # not a folder (a model file) or not a shard set: identified by its URI instead


def content_digest(uri: str, manifest: dict | None) -> str:
    """sha256 over the shards' (name, count, sha256) when a manifest exists, else over the URI."""
    if manifest is None:
        return hashlib.sha256(uri.encode()).hexdigest()[:DIGEST_CHARS]
    entries = [[s["name"], s["count"], s["sha256"]] for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:DIGEST_CHARS]


def dataset_input(name: str, uri: str) -> DatasetInput:
    """The dataset entry a stage run logs for input `name` read from `uri`."""
    source_type, source = _source(uri)
    manifest = manifest_of(uri)
    profile = None
    if manifest is not None:
        profile = json.dumps({"num_rows": manifest["total"], "shards": len(manifest["shards"]),
                              "shape": manifest.get("shape")})
    entity = Dataset(name=name, digest=content_digest(uri, manifest), source_type=source_type, source=source,
                     profile=profile)
    return DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, name)])
