"""fsspec I/O that never exposes half-written files: atomic writes, JSON and torch objects at URIs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import torch
from fsspec.core import url_to_fs

from sims_platform.storage.safe_pickle import UnsafePickleError, load_torch_bytes  # noqa: F401 (re-exported)


def normalize_uri(uri: str) -> str:
    """Absolute file:// URIs for local paths (relative ones resolve against the working directory)."""
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        return "file://" + os.path.abspath(path)
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of uri.

    s3:// goes through s3fs, configured by the standard AWS environment (botocore reads it; no options
    here): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL for an S3-compatible store (MinIO, Ceph, moto).
    """
    return url_to_fs(uri)


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # s3fs caches listings for the life of the process; whether a shard or manifest is committed must be
    # answered by the store now (another worker may have written it since), not by an old listing.
    fs.invalidate_cache(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    _fresh(fs, path)
    return fs.exists(path)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries under uri; empty if it does not exist."""
    fs, path = filesystem(uri)
    _fresh(fs, path)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def file_sizes(uri: str) -> dict[str, int]:
    """Name -> size in bytes of the files directly under uri, from one listing; empty if it does not exist."""
    fs, path = filesystem(uri)
    _fresh(fs, path)
    if not fs.exists(path):
        return {}
    return {os.path.basename(e["name"].rstrip("/")): int(e["size"]) for e in fs.ls(path, detail=True)
            if e["type"] == "file"}


def read_many(uris: list[str]) -> list[bytes]:
    """The contents of several files, in order (s3fs fetches them concurrently: one round trip, not len(uris))."""
    if not uris:
        return []
    fs, _ = filesystem(uris[0])
    paths = [filesystem(u)[1] for u in uris]
    got = fs.cat(paths, on_error="raise")
    return [got[p] for p in paths]


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


_TMP = ".tmp-"  # a local atomic write's temporary name: <path>.tmp-<8 hex digits>
_STAGED = ".staged-"  # a fenced write's staged copy (stage_name): <path>.staged-<8 hex digits>, on every store


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open uri for writing so that readers see either nothing or the whole file.

    Local files are written under a temporary name and renamed. Object stores (s3fs) only publish an
    object when its upload completes, so there we write in place, but on an exception the upload is
    discarded instead of committed (s3fs would otherwise publish the truncated object on close). A
    process killed mid-upload publishes nothing either; it may leave an incomplete multipart upload,
    invisible to readers, which a bucket lifecycle rule (AbortIncompleteMultipartUpload) cleans up.
    Rewriting an existing object replaces it whole, so retried writes of the same name are safe.
    """
    assert mode in ("wb", "w"), mode
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    if _is_local(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}{_TMP}{uuid.uuid4().hex[:8]}"
        f = fs.open(tmp, mode)
        try:
            yield f
            f.close()
            os.replace(tmp, path)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    f = fs.open(path, mode)
    try:
        yield f
    except BaseException:
        _discard(fs, path, f)
        raise
    try:
        f.close()
    except BaseException:
        # A failed commit (e.g. complete_multipart_upload) leaves the upload open: abort it, keep the error.
        with contextlib.suppress(Exception):
            _discard(fs, path, f)
        raise


def stage_name(uri: str) -> str:
    """A name no other writer uses, beside uri: a fenced write stages its file there, commits the record that
    describes it, and only then publishes it at uri (publish), so a writer that loses the record never replaces
    the winner's file."""
    return f"{uri}{_STAGED}{uuid.uuid4().hex[:8]}"


def publish(staged: str, uri: str) -> None:
    """Move a staged file to its name (a rename locally; a server-side copy and delete on object stores, where
    readers see the whole object or none)."""
    fs, src = filesystem(staged)
    _, dst = filesystem(uri)
    if _is_local(fs):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)
    _fresh(fs, dst)


def remove_staged(folder: str) -> int:
    """Remove every staged copy (stage_name) left in folder, with one listing; returns how many. Only once every
    writer of the folder is done (a set's finalize)."""
    fs, path = filesystem(folder)
    _fresh(fs, path)
    stale = [p for p in fs.ls(path, detail=False) if _STAGED in os.path.basename(p)] if fs.exists(path) else []
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p)
    return len(stale)


def remove_leftovers(uri: str) -> int:
    """Remove what killed writers of uri left behind (atomic_open's local temporary files, staged copies on any
    store); returns how many. Only the one writer that owns uri may call it, before writing it, or a reducer
    once every writer of uri is done."""
    fs, path = filesystem(uri)
    _fresh(fs, path)
    stale = fs.glob(f"{path}{_STAGED}*") + (fs.glob(f"{path}{_TMP}*") if _is_local(fs) else [])
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p)
    return len(stale)


def _discard(fs: fsspec.AbstractFileSystem, path: str, f: IO[Any]) -> None:
    discard = getattr(f, "discard", None)
    if discard is None:  # pragma: no cover - stores without discard: best effort
        f.close()
        fs.rm(path)
        return
    discard()  # s3fs: aborts the multipart upload (if one was started) and drops the buffer
    # Mark it closed: otherwise the garbage collector's close() tries to commit the dropped buffer
    # (it fails, but prints "Exception ignored" tracebacks, or could start a fresh upload).
    with contextlib.suppress(AttributeError):  # read-only on some file types; those need no help
        f.closed = True  # type: ignore[misc]


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_open(uri, "wb") as f:
        f.write(data)


def create_bytes(uri: str, data: bytes) -> None:
    """Write uri only if nothing is there yet, in one step: of writers racing for the name, exactly one
    succeeds and the others get FileExistsError (the record they found is the winner's).

    Local files are written under a temporary name and hard-linked into place: link() fails if the name
    exists, and readers never see a partial file. s3:// is a conditional PUT (If-None-Match: *), which S3
    refuses with 412 when the key exists (s3fs raises FileExistsError); an S3-compatible store must
    implement conditional writes for this to hold. Other fsspec stores get fsspec's check-then-write,
    which is not atomic.
    """
    fs, path = filesystem(uri)
    if not _is_local(fs):
        fs.pipe_file(path, data, mode="create")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{_TMP}{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: O_EXCL still lets only one writer create the name
        with open(path, "xb") as f:
            f.write(data)
    finally:
        os.remove(tmp)


def create_json(uri: str, obj: Any) -> None:
    """write_json, but only if uri does not exist yet (see create_bytes); FileExistsError otherwise."""
    create_bytes(uri, _json_bytes(obj))


class ConflictingWriteError(RuntimeError):
    """Another writer already committed a different record under this name."""


def commit_json(uri: str, obj: Any) -> None:
    """Create the JSON record uri once (see create_bytes). A record already there with the same content is
    kept (a deterministic writer's rerun, or two parts finalizing one set); a different one is never
    overwritten: ConflictingWriteError names the file, so a second writer cannot replace what readers trust."""
    data = _json_bytes(obj)
    try:
        create_bytes(uri, data)
    except FileExistsError:
        fs, path = filesystem(uri)
        _fresh(fs, path)  # the winner's record is newer than this process's listing of the folder
        if read_bytes(uri) != data:
            raise ConflictingWriteError(
                f"{uri}: another writer already committed a different record here; not overwriting it "
                "(two writers on one output, or an output made under other settings: remove it to redo)") from None


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def _json_bytes(obj: Any) -> bytes:
    """How every JSON record is written (write_json, create_json): sorted keys, indented."""
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, _json_bytes(obj))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def save_torch(uri: str, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(uri, buf.getvalue())


def load_torch(uri: str) -> Any:
    """What save_torch wrote: tensors in plain containers only; a file that asks for anything else (it may
    carry code, e.g. one planted in the bucket) raises UnsafePickleError naming uri, and nothing runs."""
    return load_torch_bytes(read_bytes(uri), uri)
