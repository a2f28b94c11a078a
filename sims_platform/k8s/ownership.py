"""One run, one owner, one config: the driver claims the run's storage root and pins its pipeline config.

Two releases (in two namespaces, or two clusters) with the same `storage.root` would write the same checkpoints
at once; a `helm upgrade` that changes the pipeline of a started run would mix two configs in one run. The
driver refuses both at start, before it creates anything, with the file and the fix named.
"""

from __future__ import annotations

from typing import Any

import yaml

from sims_platform.config import PipelineConfig, dump_config
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

OWNER_FILE = "_owner.json"
# Keys a started run may change: more iterations extend the run without touching finished stages.
MUTABLE = {("iterations", "count")}


class OwnershipError(RuntimeError):
    """Permanent: the storage root is another release's, or the pipeline changed mid-run."""


def owner_uri(layout: RunLayout) -> str:
    return fsio.join(layout.root, OWNER_FILE)


def claim(layout: RunLayout, namespace: str, release: str, run: str) -> dict[str, Any]:
    """Record (namespace, release, run) as the storage root's owner, or raise if someone else holds it.

    The record is created only if absent (one atomic step, see fsio.create_bytes), so of two drivers
    claiming a fresh root at once exactly one becomes the owner and the other reads its record and raises.
    """
    me = {"namespace": namespace, "release": release, "run": run}
    uri = owner_uri(layout)
    try:
        fsio.create_json(uri, me)
        return me
    except FileExistsError:
        held = fsio.read_json(uri)
    if {k: held.get(k) for k in me} != me:
        raise OwnershipError(
            f"storage root {layout.root} belongs to release '{held.get('release')}' (run '{held.get('run')}') "
            f"in namespace '{held.get('namespace')}' ({uri}); this is release '{release}' in namespace "
            f"'{namespace}'. Use another storage.root, or, if that release is gone for good, delete {uri}")
    return held


def _diff(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in _diff(a.get(k), b.get(k), path + (str(k),))]
    return [] if a == b else [path]


def pin_config(layout: RunLayout, cfg: PipelineConfig) -> None:
    """Write the run's config.yaml on first start; later, refuse a pipeline that differs from it."""
    text = dump_config(cfg)
    if not fsio.exists(layout.config):
        fsio.write_bytes(layout.config, text.encode())
        return
    before = yaml.safe_load(fsio.read_bytes(layout.config).decode())
    changed = [p for p in _diff(before, yaml.safe_load(text)) if p not in MUTABLE]
    if changed:
        keys = ", ".join(".".join(p) for p in changed[:8])
        raise OwnershipError(
            f"the pipeline of run '{cfg.name}' changed since it started ({keys}; recorded in {layout.config}): one "
            "run never mixes two configs. Roll the values back (helm rollback), or start a new run with another "
            "pipeline.name and storage.root")
    if before != yaml.safe_load(text):  # only mutable keys changed: record the new iteration count
        fsio.write_bytes(layout.config, text.encode())
