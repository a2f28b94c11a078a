"""Where the MLflow tracking store is, and opening a client on it.

tracking.uri, else MLFLOW_TRACKING_URI (a server on a cluster), else a SQLite database under a local storage
root. Several processes of one stage (torchrun ranks, job-array parts run on one machine) may open a new local
database at the same moment; MLflow creates its tables on the first connection and two creators collide
("table ... already exists"), so opening a SQLite store holds a file lock next to the database.
"""

from __future__ import annotations

import fcntl
import os
import shlex
from contextlib import contextmanager
from collections.abc import Iterator

from mlflow import MlflowClient

from sims_platform.config.schema import PipelineConfig
from sims_platform.storage.layout import RunLayout

SQLITE = "sqlite:///"


class LineageError(RuntimeError):
    """The tracking store and the run's folder disagree, or a run cannot be found or created."""


def _local_path(layout: RunLayout) -> str | None:
    return layout.root[len("file://"):] if layout.root.startswith("file://") else None


def local_store(layout: RunLayout) -> tuple[str, str]:
    """(tracking URI, artifact root) of the SQLite store kept under a local storage root."""
    path = _local_path(layout)
    if path is None:
        raise LineageError(f"storage root {layout.root} is not local, so it cannot hold an MLflow store: "
                           "set tracking.uri (or MLFLOW_TRACKING_URI) to a tracking server, "
                           "e.g. http://mlflow.mlflow.svc:5000")
    # MLflow 3 refuses the file store (./mlruns) unless MLFLOW_ALLOW_FILE_STORE=true; SQLite is its default.
    return f"{SQLITE}{path}/mlflow.db", f"file://{path}/mlartifacts"


def resolve_tracking_uri(cfg: PipelineConfig, layout: RunLayout) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a SQLite store under the (local) storage root."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return local_store(layout)[0]


def default_artifact_location(tracking_uri: str, layout: RunLayout) -> str | None:
    """The artifact root for the local store under the storage root; None lets a server choose."""
    if _local_path(layout) is not None and tracking_uri == local_store(layout)[0]:
        return local_store(layout)[1]
    return None


def ui_command(tracking_uri: str, layout: RunLayout | None = None) -> str:
    """The shell command that shows these runs (for a tracking server, just its URL to open)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    cmd = f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"
    if layout is not None and (artifacts := default_artifact_location(tracking_uri, layout)):
        cmd += f" --default-artifact-root {shlex.quote(artifacts)}"
    return cmd


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held by this process until the block ends."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient on tracking_uri; a SQLite database gets its folder and is created by one process at a time
    (the first to take <database>.lock creates the tables, the others find them)."""
    if not tracking_uri.startswith(SQLITE):
        return MlflowClient(tracking_uri)
    db = tracking_uri[len(SQLITE):]
    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    with _exclusive(f"{db}.lock"):
        return MlflowClient(tracking_uri)  # constructing it opens the store, which creates or migrates the tables
