"""Training checkpoints at a storage URI: atomic commit, newest-first resume, keep the latest k."""

from __future__ import annotations

import re

from sims_platform.storage import fsio

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


def checkpoint_name(images: int) -> str:
    return f"ckpt-{images:010d}.pt"


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(images, uri) of committed checkpoints, oldest first; temporary files are ignored."""
    found = []
    for name in fsio.listdir(folder):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), fsio.join(folder, name)))
    return sorted(found)


def latest_checkpoint(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(folder: str, images: int, state: dict, keep: int) -> str:
    uri = fsio.join(folder, checkpoint_name(images))
    fsio.save_torch(uri, state)
    for _, old in list_checkpoints(folder)[:-keep]:
        fsio.remove(old)
    return uri
