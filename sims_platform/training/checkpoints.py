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


class CheckpointExistsError(FileExistsError):
    """A committed checkpoint is immutable: writing the same one again is refused (the message names it)."""


class CheckpointRefused(fsio.UnsafePickleError):
    """A checkpoint folder holding (or a commit record listing) files it should not; nothing was fetched.

    An UnsafePickleError: like a refused pickle, it is untrusted storage content, reported in one line."""


def save_sharded(folder: str, images: int, *, save_native: Callable[[str], None],
                 state: Callable[[], dict[str, Any] | None], commit: dict[str, Any], keep: int) -> str:
    """A DeepSpeed checkpoint; every rank calls this (DeepSpeed's save is collective).

    `save_native(dir)` writes this rank's DeepSpeed files; `state()` returns the consolidated state on
    rank 0 (it may run collectives, so every rank calls it) and None elsewhere. A folder of the same name
    without COMMIT.json (a killed attempt) is replaced; a committed one raises CheckpointExistsError.
    """
    uri = fsio.join(folder, folder_name(images))
    commit_uri = fsio.join(uri, COMMIT)
    # Every rank looks (before any collective), so all of them raise together instead of one waiting
    # in a barrier for a rank that gave up; COMMIT.json only appears after the last barrier below.
    if fsio.exists(commit_uri):
        raise CheckpointExistsError(
            f"{uri} is committed ({commit_uri}) and a committed checkpoint is never rewritten; expected this "
            f"run to write checkpoints after the newest one it resumed from (is another run writing {folder}?)")
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
        try:  # created only if absent: a second writer of this checkpoint never replaces its record
            fsio.create_json(commit_uri, {**commit, "images": images, "native_files": all_files})
        except FileExistsError:
            raise CheckpointExistsError(
                f"{commit_uri} was committed by another writer while this run wrote {uri}; expected one run "
                f"to write {folder} at a time") from None
        prune(folder, keep)
    distributed.barrier()
    return uri


# A DeepSpeed file name as COMMIT.json lists it: relative, '/'-separated parts of letters, digits, '_', '-'
# and '.', none starting with '.' (so never '.', '..' or hidden), e.g. state/mp_rank_00_model_states.pt.
_NATIVE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _listed_native_files(ckpt: Checkpoint) -> list[str]:
    """COMMIT.json's native_files, each name checked: the fetch joins them onto a local folder."""
    assert ckpt.commit is not None, ckpt
    commit_uri = fsio.join(ckpt.uri, COMMIT)
    names = ckpt.commit.get("native_files")
    if not isinstance(names, list) or not names:
        raise CheckpointRefused(f"{commit_uri}: native_files is {names!r}; expected the list of DeepSpeed file "
                                "names the checkpoint holds; refused, nothing fetched")
    for name in names:
        if not isinstance(name, str) or not all(_NATIVE_PART.fullmatch(p) for p in name.split("/")):
            raise CheckpointRefused(
                f"{commit_uri}: native_files lists {name!r}; expected a relative name of letters, digits, "
                "'_', '-', '.' (no '..', no absolute path); refused, nothing fetched")
    return names


def fetch_native(ckpt: Checkpoint, rank: int) -> str:
    """Download the DeepSpeed files this rank reads (shared ones and its own shard) to a local folder.

    The folder in storage must hold exactly the files its COMMIT.json lists: anything else there (a key
    planted in the bucket, a name that climbs out with '..') raises CheckpointRefused naming it before a
    byte is written, and only listed, checked names are joined onto the local folder.
    """
    names = _listed_native_files(ckpt)
    src = fsio.join(ckpt.uri, NATIVE)
    fs, base = fsio.filesystem(src)
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    # Names by prefix, not os.path.relpath: relpath would resolve a literal '..' in an object key.
    found = {p[len(base) + 1:] if p.startswith(base + "/") else p for p in fs.find(base)}
    unlisted, missing = sorted(found - set(names)), sorted(set(names) - found)
    if unlisted or missing:
        name = (unlisted or missing)[0]
        others = len(unlisted) + len(missing) - 1
        why = f"not listed in {fsio.join(ckpt.uri, COMMIT)}" if unlisted else \
            f"listed in {fsio.join(ckpt.uri, COMMIT)} but missing"
        raise CheckpointRefused(
            f"{src}/{name}: {why}{f' (and {others} more)' if others else ''}; a committed checkpoint holds "
            "exactly the files its commit record lists (was something planted or removed?); refused, nothing "
            "fetched")
    local = os.path.realpath(tempfile.mkdtemp(prefix=f"sims-load-r{rank}-", dir=_local_root()))
    mine = re.compile(rf"zero_pp_rank_{rank}_")
    try:
        for rel in names:
            if "zero_pp_rank_" in os.path.basename(rel) and not mine.search(os.path.basename(rel)):
                continue  # another rank's ZeRO shard: DeepSpeed reads only its own at the same world size
            dest = os.path.join(local, *rel.split("/"))
            # The names are checked above; this keeps the promise even if that check is ever loosened.
            if os.path.commonpath([local, os.path.realpath(dest)]) != local:
                raise CheckpointRefused(f"{src}/{rel}: would be written outside {local}; refused")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(f"{base}/{rel}", dest)
            check_native_file(dest, fsio.join(src, rel))
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
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
