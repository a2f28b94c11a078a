"""Training checkpoints at a storage URI (file://, s3://): atomic commit, newest-first resume, keep the latest k.

Two layouts share one folder:
- `ckpt-<images>.pt`: one file (plain engine, written by rank 0); atomic by fsio's commit.
- `ckpt-<images>/`: a DeepSpeed checkpoint. DeepSpeed writes per-rank files to a local folder and has no
  S3 writer, so every rank saves locally, uploads its own files under `ds/`, rank 0 adds the consolidated
  `state.pt` (full weights, Adam state, EMA, counters) and writes `COMMIT.json` last, after a barrier.
  Readers ignore a folder without COMMIT.json (a run killed mid-upload).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sims_platform.storage import fsio
from sims_platform.training import distributed

_FILE = re.compile(r"^ckpt-(\d{10})\.pt$")
_FOLDER = re.compile(r"^ckpt-(\d{10})$")
COMMIT = "COMMIT.json"
STATE = "state.pt"
NATIVE = "ds"


def checkpoint_name(images: int) -> str:
    return f"ckpt-{images:010d}.pt"


def folder_name(images: int) -> str:
    return f"ckpt-{images:010d}"


@dataclass(frozen=True)
class Checkpoint:
    images: int
    uri: str
    commit: dict[str, Any] | None = None  # COMMIT.json of a DeepSpeed checkpoint; None for a single file

    def state_uri(self) -> str:
        return self.uri if self.commit is None else fsio.join(self.uri, STATE)


def _scan(folder: str) -> tuple[list[Checkpoint], list[tuple[int, str]]]:
    """(committed checkpoints oldest first, uncommitted DeepSpeed folders)."""
    done: dict[int, Checkpoint] = {}
    partial = []
    for name in fsio.listdir(folder):
        uri = fsio.join(folder, name)
        if m := _FILE.match(name):
            done.setdefault(int(m.group(1)), Checkpoint(int(m.group(1)), uri))
        elif m := _FOLDER.match(name):
            images = int(m.group(1))
            commit_uri = fsio.join(uri, COMMIT)
            if fsio.exists(commit_uri):
                done[images] = Checkpoint(images, uri, fsio.read_json(commit_uri))  # preferred over a file
            else:
                partial.append((images, uri))
    return [done[k] for k in sorted(done)], partial


def committed(folder: str) -> list[Checkpoint]:
    return _scan(folder)[0]


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(images, uri) of committed checkpoints, oldest first; temporary files and uncommitted folders are ignored."""
    return [(c.images, c.uri) for c in committed(folder)]


def latest(folder: str) -> Checkpoint | None:
    found = committed(folder)
    return found[-1] if found else None


def latest_checkpoint(folder: str) -> str | None:
    c = latest(folder)
    return None if c is None else c.uri


def read_state(ckpt: Checkpoint) -> dict[str, Any]:
    return fsio.load_torch(ckpt.state_uri())


def prune(folder: str, keep: int) -> None:
    """Keep the newest `keep` committed checkpoints; drop older ones and stale uncommitted folders."""
    done, partial = _scan(folder)
    for c in done[:-keep]:
        fsio.remove(c.uri)
    newest = done[-1].images if done else -1
    for images, uri in partial:
        if images <= newest:  # left by a killed run; anything newer may still be being written
            fsio.remove(uri)


def save_checkpoint(folder: str, images: int, state: dict, keep: int) -> str:
    """One-file checkpoint (the plain engine; call on rank 0 only)."""
    uri = fsio.join(folder, checkpoint_name(images))
    fsio.save_torch(uri, state)
    prune(folder, keep)
    return uri


def _local_root() -> str:
    # Node-local scratch for DeepSpeed's files before upload; SIMS_LOCAL_CHECKPOINT_DIR picks a roomy disk.
    root = os.environ.get("SIMS_LOCAL_CHECKPOINT_DIR") or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    return root


def _upload_tree(local: str, uri: str) -> list[str]:
    fs, base = fsio.filesystem(uri)
    names = []
    for dirpath, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local)
            fs.makedirs(os.path.dirname(f"{base}/{rel}"), exist_ok=True)
            fs.put_file(os.path.join(dirpath, f), f"{base}/{rel}")
            names.append(rel)
    return sorted(names)


def save_sharded(folder: str, images: int, *, save_native: Callable[[str], None],
                 state: Callable[[], dict[str, Any] | None], commit: dict[str, Any], keep: int) -> str:
    """A DeepSpeed checkpoint; every rank calls this (DeepSpeed's save is collective).

    `save_native(dir)` writes this rank's DeepSpeed files; `state()` returns the consolidated state on
    rank 0 (it may run collectives, so every rank calls it) and None elsewhere.
    """
    uri = fsio.join(folder, folder_name(images))
    local = tempfile.mkdtemp(prefix=f"sims-ckpt-r{distributed.rank()}-", dir=_local_root())
    try:
        save_native(local)
        if distributed.is_main() and fsio.exists(uri):
            fsio.remove(uri)  # an uncommitted leftover with the same name, from a killed attempt
        distributed.barrier()
        files = _upload_tree(local, fsio.join(uri, NATIVE))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    payload = state()
    if distributed.is_main():
        assert payload is not None
        fsio.save_torch(fsio.join(uri, STATE), payload)
    # Every rank's upload finished (a rank that failed raised and never gets here, so this waits for it).
    all_files = sorted({f for fs in distributed.all_gather(files) for f in fs})
    if distributed.is_main():
        fsio.write_json(fsio.join(uri, COMMIT), {**commit, "images": images, "native_files": all_files})
        prune(folder, keep)
    distributed.barrier()
    return uri


def fetch_native(ckpt: Checkpoint, rank: int) -> str:
    """Download the DeepSpeed files this rank reads (shared ones and its own shard) to a local folder."""
    assert ckpt.commit is not None, ckpt
    src = fsio.join(ckpt.uri, NATIVE)
    fs, base = fsio.filesystem(src)
    local = tempfile.mkdtemp(prefix=f"sims-load-r{rank}-", dir=_local_root())
    mine = re.compile(rf"zero_pp_rank_{rank}_")
    for path in fs.find(base):
        rel = os.path.relpath(path, base.rstrip("/"))
        name = os.path.basename(rel)
        if "zero_pp_rank_" in name and not mine.search(name):
            continue  # another rank's ZeRO shard: DeepSpeed reads only its own at the same world size
        dest = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(path, dest)
        check_native_file(dest, fsio.join(src, rel))
    return local


# What DeepSpeed's own checkpoint files name besides tensors and plain containers (found by saving ZeRO 1-3
# checkpoints): installed classes that hold state, nothing that calls out. DeepSpeed reads its files with
# torch.load(weights_only=False), so each file is checked against this list before it is handed over.
DEEPSPEED_GLOBALS: frozenset[str] = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an enum: the ZeRO stage
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # loss-scale state (static; dynamic under fp16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass (numel, start): ZeRO-1/2 partition layout
})


def check_native_file(path: str, uri: str) -> None:
    """Refuse (UnsafePickleError naming uri) a DeepSpeed file that names a global outside DEEPSPEED_GLOBALS."""
    if not path.endswith(".pt"):
        return  # DeepSpeed reads only its .pt files with pickle (the rest are json/text)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # not a torch.save zip: DeepSpeed would fall back to a raw pickle
        raise fsio.UnsafePickleError(f"{uri}: not a DeepSpeed checkpoint file ({err}); refused") from None
    unexpected = sorted(set(found) - DEEPSPEED_GLOBALS)
    if unexpected:
        raise fsio.UnsafePickleError(
            f"{uri}: refused to load: it needs {', '.join(unexpected)}, which DeepSpeed checkpoints never "
            "contain; the file may carry code and was not loaded")
