"""Where the MLflow tracking store is, and opening a client on it.

tracking.uri, else MLFLOW_TRACKING_URI (a server on a cluster), else a SQLite database under a local storage
root. Several processes of one stage (torchrun ranks, job-array parts run on one machine) may open a new local
database at the same moment; MLflow creates its tables on the first connection and two creators collide
("table ... already exists"), so opening a SQLite store holds a file lock next to the database.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shlex
import sqlite3
import sys
from contextlib import contextmanager
from collections.abc import Iterator

from mlflow import MlflowClient

from sims_platform.config import ConfigError
from sims_platform.config.schema import PipelineConfig
from sims_platform.config.secrets import check_uri
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
        try:
            check_uri("MLFLOW_TRACKING_URI", env)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return env
    return local_store(layout)[0]


def default_artifact_location(tracking_uri: str, layout: RunLayout) -> str | None:
    """The artifact root for the local store under the storage root; None lets a server choose."""
    if _local_path(layout) is not None and tracking_uri == local_store(layout)[0]:
        return local_store(layout)[1]
    return None


def ui_command(tracking_uri: str, layout: RunLayout | None = None, sims: str = "sims") -> str:
    """The shell command that shows these runs (for a tracking server, just its URL to open): `sims ui <folder>` for
    the store under a local run folder (it re-roots a moved folder's artifacts first), else `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    if layout is not None and default_artifact_location(tracking_uri, layout):
        return f"{sims} ui {shlex.quote(os.path.relpath(_local_path(layout) or '.'))}"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def mlflow_ui_argv(layout: RunLayout) -> list[str]:
    """The `mlflow ui` command line (this Python's mlflow) for the store under a local run folder."""
    uri, artifacts = local_store(layout)
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root", artifacts]


# ----------------------------------------------------------------------------
# A run folder that moves: artifact locations follow the database

# The columns of MLflow's SQLite schema that hold an artifact location (absolute URIs, fixed when a row is written).
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"), ("workspaces", "default_artifact_root"))
_ARTIFACTS = re.compile(r"^file://(/.*)/mlartifacts(?:/|$)")


def reroot(db: str) -> list[str]:
    """Point every artifact location of the run folder's store at this folder's `mlartifacts/`.

    MLflow records absolute artifact URIs, so a moved folder would show "No Artifacts Recorded" and a copied one
    would write its new artifacts into the original. The store lives at <folder>/mlflow.db and its artifacts at
    <folder>/mlartifacts, so any other `file://<old>/mlartifacts` prefix is this folder's own, from where it was
    written. Returns the old folders rewritten. Call with the database's lock held."""
    if not os.path.exists(db):
        return []
    here = os.path.dirname(os.path.abspath(db))
    con = sqlite3.connect(db)
    try:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = [(t, c) for t, c in _LOCATION_COLUMNS
                   if t in tables and c in {row[1] for row in con.execute(f"PRAGMA table_info({t})")}]
        old: set[str] = set()
        for t, c in columns:
            for (value,) in con.execute(f"SELECT DISTINCT {c} FROM {t} WHERE {c} LIKE 'file://%/mlartifacts%'"):
                m = _ARTIFACTS.match(value or "")
                if m and m.group(1) != here:
                    old.add(m.group(1))
        for prefix in sorted(old):
            src, dst = f"file://{prefix}/mlartifacts", f"file://{here}/mlartifacts"
            for t, c in columns:
                con.execute(f"UPDATE {t} SET {c} = ? || substr({c}, ?) WHERE {c} = ? OR {c} LIKE ? ESCAPE '\\'",
                            (dst, len(src) + 1, src, _like_prefix(src + "/")))
        con.commit()
        return sorted(old)
    finally:
        con.close()


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held by this process until the block ends."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Loggers that report creating or migrating the store's tables at INFO, in every process that opens it (each
# part, each rank): routine setup, not news to the user. Their warnings and errors still show.
_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic")


def _quiet_store_setup() -> None:
    for name in _SETUP_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient on tracking_uri; a SQLite database gets its folder and is created by one process at a time
    (the first to take <database>.lock creates the tables, the others find them)."""
    _quiet_store_setup()
    if not tracking_uri.startswith(SQLITE):
        return MlflowClient(tracking_uri)
    db = tracking_uri[len(SQLITE):]
    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    with _exclusive(f"{db}.lock"):
        moved = reroot(db)
        if moved:
            print(f"[tracking] {os.path.dirname(db)} was moved or copied from {', '.join(moved)}: its artifact "
                  "locations now point into it", flush=True)
        return MlflowClient(tracking_uri)  # constructing it opens the store, which creates or migrates the tables
