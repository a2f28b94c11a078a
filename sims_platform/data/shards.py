"""Synthetic sets as WebDataset tar shards: atomic per-shard commits, restartable writes, checksummed reads."""

from __future__ import annotations

import hashlib
import math
import re
import tarfile
from collections.abc import Generator, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
from webdataset import TarWriter
from webdataset.autodecode import npy_loads
from webdataset.tariterators import group_by_keys

from sims_platform.data.errors import DataError
from sims_platform.storage.fsio import (atomic_open, commit_json, exists, join, listdir, publish, read_json, remove,
                                       remove_staged, stage_name)

if TYPE_CHECKING:
    from typing_extensions import Self

MANIFEST = "manifest.json"
DTYPE = "float16"
_MTIME = 0  # fixed: byte-identical shards for the same samples; an int (a float adds PAX headers)
_RESERVED = {"shards", "total", "shard_size", "dtype", "shape"}


class ShardError(DataError):
    """A synthetic set that is incomplete, corrupt or inconsistent with its manifest."""


def shard_name(j: int) -> str:
    return f"shard-{j:06d}.tar"


def record_name(j: int) -> str:
    # Written right after the shard commits: its presence is what marks shard j as done.
    return f"shard-{j:06d}.json"


# ----------------------------------------------------------------------------
# Tar streams (shared with the webdataset image source)


class HashingFile:
    """Wraps a file object and hashes the bytes passing through it, so checksums never need a second pass."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b


class _EndAwareInfo(tarfile.TarInfo):
    """TarInfo that notes on its TarFile when the end-of-archive marker (a zero block) is read.

    tarfile ends its iteration silently both at that marker and at a bare end of data, and a tar cut at a
    member boundary looks like the latter: without this note its missing samples would just be gone.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tar)
        # typeshed leaves out this (undocumented) error, which tarfile raises at the end-of-archive marker
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]
            tar.end_marker_seen = True  # type: ignore[attr-defined]
            raise


# Member names webdataset's own tar iteration skips as shard metadata (e.g. __index__).
_META = re.compile(r"__[^/]*__($|/)")


def _tar_files(stream: IO[bytes] | HashingFile, url: str) -> Iterator[dict[str, Any]]:
    """The regular files of one tar stream as webdataset's iteration yields them ({fname, data, __url__}),
    read to the end-of-archive marker: a tar cut short raises DataError naming url, never loses samples."""
    try:
        # Stream mode only reads; typeshed asks every file object for seek and tell as well.
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareInfo)  # type: ignore[call-overload]
        members = 0
        for info in tar:
            members += 1
            if not info.isreg() or _META.match(info.name):
                continue
            f = tar.extractfile(info)
            assert f is not None  # a regular file always has data
            yield {"fname": info.name, "data": f.read(), "__url__": url}
            tar.members = []  # stream mode would keep every header for the whole shard
    except (tarfile.TarError, EOFError) as e:  # cut (or corrupt) inside a member or a compressed stream
        raise DataError(f"{url}: truncated or corrupt tar ({e}); expected a complete tar archive (was the copy "
                        "or upload cut short?)") from e
    if not getattr(tar, "end_marker_seen", False):
        raise DataError(f"{url}: truncated tar: it ends after {members} members without the end-of-archive "
                        "marker; expected a complete tar archive (was the copy or upload cut short?)")


def tar_samples(stream: IO[bytes] | HashingFile, url: str) -> Iterator[dict[str, Any]]:
    """Samples of one open tar stream (raw bytes by extension, plus __key__), grouped as webdataset does;
    a truncated tar raises DataError naming url (webdataset's own iteration would drop the lost samples)."""
    return group_by_keys(_tar_files(stream, url))


def iter_tar(uri: str) -> Generator[dict[str, Any], None, None]:
    """Samples of the tar at uri, opened through fsspec (webdataset has no s3:// opener) and always closed."""
    try:
        f = fsspec.open(uri, "rb").open()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: tar shard not found") from e
    with f:
        yield from tar_samples(f, uri)


# ----------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes samples 0..total-1 as shards of shard_size; committed shards survive restarts, manifest last.

    The samples are float16 arrays (x.npy) with a class and a seed; a subclass stores other samples through
    commit_shard and names its own DTYPE and manifest ENTRY_KEYS.
    """

    DTYPE = DTYPE
    ENTRY_KEYS: tuple[str, ...] = ("name", "count", "first_seed", "sha256")  # each shard's manifest entry

    def __init__(self, uri: str, shard_size: int, total: int, meta: dict[str, Any] | None = None) -> None:
        if shard_size < 1 or total < 1:
            raise ValueError(f"ShardWriter({uri}): shard_size and total must be >= 1, got {shard_size}, {total}")
        clash = _RESERVED & set(meta or {})
        if clash:
            raise ValueError(f"ShardWriter({uri}): meta keys {sorted(clash)} are reserved for the manifest")
        self.uri = uri.rstrip("/")
        self.shard_size = shard_size
        self.total = total
        self.meta = dict(meta or {})
        self.num_shards = math.ceil(total / shard_size)

    def shard_range(self, j: int) -> range:
        """Sample indexes that shard j holds."""
        if not 0 <= j < self.num_shards:
            raise ValueError(f"{self.uri}: shard {j} out of range 0..{self.num_shards - 1}")
        return range(j * self.shard_size, min((j + 1) * self.shard_size, self.total))

    def missing_shards(self) -> list[int]:
        names = set(listdir(self.uri))
        return [j for j in range(self.num_shards)
                if shard_name(j) not in names or record_name(j) not in names]

    def write_shard(self, j: int, x: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor,
                    keys: torch.Tensor | None = None) -> dict[str, Any]:
        """Write shard j atomically (readers see all of it or nothing) and record it as committed.

        keys: the sample keys, distinct and >= 0; default the seeds. A resampled set (select-aux) may hold a
        seed twice and keys its samples by position instead.
        """
        n = len(self.shard_range(j))
        keys = seeds if keys is None else keys
        if not (x.shape[0] == labels.shape[0] == seeds.shape[0] == keys.shape[0] == n):
            raise ValueError(f"{self.uri}: shard {j} needs {n} samples, got x {tuple(x.shape)}, "
                             f"labels {tuple(labels.shape)}, seeds {tuple(seeds.shape)}, keys {tuple(keys.shape)}")
        x16 = x.detach().to("cpu", torch.float16)
        if not torch.isfinite(x16).all():
            raise ValueError(f"{self.uri}: shard {j} has values that are not finite in float16")
        seed_list, key_list = [int(s) for s in seeds], [int(k) for k in keys]
        if min(seed_list) < 0 or min(key_list) < 0 or len(set(key_list)) != n:
            raise ValueError(f"{self.uri}: shard {j} seeds must be >= 0 and the sample keys (default: the seeds) "
                             "distinct and >= 0")
        arrays = x16.numpy()
        label_list = [int(c) for c in labels]
        samples = ({"__key__": f"{key:010d}", "x.npy": a, "cls": c, "seed": str(s)}
                   for a, c, s, key in zip(arrays, label_list, seed_list, key_list))
        return self.commit_shard(j, samples, {"first_seed": seed_list[0], "shape": list(x16.shape[1:])})

    def commit_shard(self, j: int, samples: Iterable[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        """Write the samples as shard j atomically, then its record (name, count, sha256, bytes, plus info, which
        holds at least the sample shape): the record and the shard together mark shard j as committed.

        samples may be a generator that fails midway (a bad input file): the partial tar is then discarded
        (storage/fsio.atomic_open) and no record is written, so the shard stays missing.

        One writer at a time: the tar is staged under a name of its own, the record is created only if absent
        (commit_json), and the tar is published under the shard's name only after that. A second writer of other
        samples loses at the record (ConflictingWriteError) with its staged tar removed, so it never replaces the
        committed tar; one with the same samples publishes the same bytes.
        """
        count = 0
        staged = stage_name(join(self.uri, shard_name(j)))
        with atomic_open(staged, "wb") as f:
            out = HashingFile(f)
            with TarWriter(out, mtime=_MTIME) as tar:
                for sample in samples:
                    tar.write(sample)
                    count += 1
                if count != len(self.shard_range(j)):  # raised inside: the tar is discarded, not committed
                    raise ValueError(f"{self.uri}: shard {j} got {count} samples, expected "
                                     f"{len(self.shard_range(j))}")
        record = {**info, "name": shard_name(j), "count": count, "sha256": out.sha.hexdigest(), "bytes": out.size}
        try:
            commit_json(join(self.uri, record_name(j)), record)
        except BaseException:
            remove(staged)
            raise
        publish(staged, join(self.uri, shard_name(j)))
        return record

    def read_record(self, j: int) -> dict[str, Any]:
        return read_json(join(self.uri, record_name(j)))

    def finalize(self) -> dict[str, Any]:
        """Write manifest.json (the set's commit point) from the shard records; every shard must be there."""
        missing = self.missing_shards()
        if missing:
            raise ShardError(f"{self.uri}: cannot finalize, shards {missing} of {self.num_shards} are not written")
        records = [self.read_record(j) for j in range(self.num_shards)]
        for j, r in enumerate(records):
            if r["count"] != len(self.shard_range(j)):
                raise ShardError(f"{self.uri}: {r['name']} holds {r['count']} samples, expected "
                                 f"{len(self.shard_range(j))}; written with another shard_size or total?")
        shapes = {tuple(r["shape"]) for r in records}
        if len(shapes) != 1:
            raise ShardError(f"{self.uri}: shards disagree on the sample shape: {sorted(shapes)}")
        manifest = {"shards": [{k: r[k] for k in self.ENTRY_KEYS} for r in records],
                    "total": self.total, "shard_size": self.shard_size, "dtype": self.DTYPE,
                    "shape": list(shapes.pop()), **self.meta}
        commit_json(join(self.uri, MANIFEST), manifest)
        remove_staged(self.uri)  # what killed or losing writers staged (every shard is committed now)
        return manifest


# ----------------------------------------------------------------------------
# Reading


def read_manifest(uri: str) -> dict[str, Any]:
    path = join(uri, MANIFEST)
    if not exists(path):
        raise ShardError(f"{uri}: no {MANIFEST}; the synthetic set is incomplete (did generate finish?)")
    try:
        manifest = read_json(path)
        problem = _manifest_problem(manifest)
    except ValueError as e:  # not JSON
        problem = str(e)
    if problem:
        raise ShardError(f"{path}: not a valid shard manifest ({problem})")
    return manifest


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a parsed manifest (every field a reader uses, with its type), or None."""
    if not isinstance(m, dict):
        return f"expected a JSON object, got {type(m).__name__}"
    shape, total, entries = m.get("shape"), m.get("total"), m.get("shards")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        return "'shape' must be a list of positive integers"
    if not (type(total) is int and total >= 0):
        return "'total' must be an integer >= 0"
    if not isinstance(entries, list):
        return "'shards' must be a list"
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and re.fullmatch(r"shard-\d+\.tar", e["name"])
                and type(e.get("count")) is int and e["count"] >= 0 and isinstance(e.get("sha256"), str)):
            return f"shards[{i}] must have a name shard-N.tar, an integer count and a sha256"
    if sum(e["count"] for e in entries) != total:
        return "shard counts do not add up to total"
    return None


def read_shard(uri: str, entry: dict[str, Any],
               shape: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One shard of the set at uri (entry from its manifest), verified (checksum, count, shape) before return."""
    path = join(uri, entry["name"])
    if not exists(path):
        raise ShardError(f"{uri}: shard {entry['name']} is listed in {MANIFEST} but missing")
    xs, labels, seeds = [], [], []
    try:
        with fsspec.open(path, "rb") as f:
            stream = HashingFile(f)
            for sample in tar_samples(stream, path):
                xs.append(npy_loads(sample["x.npy"]))
                labels.append(int(sample["cls"]))
                seeds.append(int(sample["seed"]))
            while stream.read(1 << 20):  # tar readers stop at the end marker; the checksum covers every byte
                pass
    except DataError as e:  # a truncated tar: the message already names the shard
        raise ShardError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - a damaged member fails in many ways (tar, npy header, int parsing)
        raise ShardError(f"{path}: unreadable shard ({type(e).__name__}: {str(e)[:200]})") from e
    if stream.sha.hexdigest() != entry["sha256"]:
        raise ShardError(f"{path}: sha256 checksum mismatch (manifest {entry['sha256'][:12]}..., file "
                         f"{stream.sha.hexdigest()[:12]}...); the shard is corrupt or was rewritten")
    if len(xs) != entry["count"]:
        raise ShardError(f"{path}: holds {len(xs)} samples, manifest says {entry['count']}")
    x = torch.from_numpy(np.stack(xs)).float() if xs else torch.zeros(0, *shape)
    if list(x.shape[1:]) != list(shape):
        raise ShardError(f"{path}: samples have shape {list(x.shape[1:])}, manifest says {shape}")
    return x, torch.tensor(labels, dtype=torch.int64), torch.tensor(seeds, dtype=torch.int64)


def iter_shards(uri: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x float32, labels, seeds) per shard, each yielded only after its checksum and count are verified."""
    manifest = read_manifest(uri)
    for entry in manifest["shards"]:
        yield read_shard(uri, entry, manifest["shape"])


def read_shards(uri: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole synthetic set in memory: x float32 [N, ...], labels int64 [N], seeds int64 [N]."""
    parts = list(iter_shards(uri))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]
