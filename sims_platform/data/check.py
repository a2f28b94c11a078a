"""Before a run: do the data paths a config names exist? Checked where the storage can be read from here."""

from __future__ import annotations

import os

from webdataset.shardlists import expand_urls

from sims_platform.config.schema import DataConfig
from sims_platform.data.errors import DataError
from sims_platform.storage import fsio


def _reachable(uri: str) -> bool:
    """Local paths always; object stores only with credentials in the environment (else a check could hang on
    the metadata service or a timeout instead of answering)."""
    if "://" not in uri or uri.startswith("file://"):
        return True
    return any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"))


def check_data_paths(cfg: DataConfig) -> list[str]:
    """DataError naming the field when data.path or data.reference_path is missing; notes for what could not be
    checked from here."""
    notes = []
    for field, uri in (("data.path", cfg.path), ("data.reference_path", cfg.reference_path)):
        if uri is None or cfg.source == "digits":
            continue
        if not _reachable(uri):
            notes.append(f"{field}: {uri} not checked (no storage credentials here; the run checks it)")
            continue
        try:
            if cfg.source == "folder":
                fs, path = fsio.filesystem(uri)
                if not fs.isdir(path):
                    raise DataError(f"{field}: folder {uri} does not exist (expected one sub-folder of images per "
                                    "class)")
                continue
            urls = expand_urls(uri)
            missing = [u for u in (urls[0], urls[-1]) if not fsio.exists(u)]
            if missing:
                raise DataError(f"{field}: shard {missing[0]} does not exist ({len(urls)} shards named by {uri})")
        except DataError:
            raise
        except Exception as err:  # storage errors come in many types; none should stop a validation
            notes.append(f"{field}: {uri} not checked ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    return notes
