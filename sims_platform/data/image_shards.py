"""Prepared image sets as WebDataset shards (PNG + cls): the shard writer behind `sims prepare`.

The shards, records and manifest are the synthetic sets' (data/shards.py): each shard is committed atomically,
then its record; the manifest is written once every shard is committed. What differs is the sample (a PNG, its
class and its source file) and what counts as committed: a shard's record must also name the same inputs (the
digest of the files the shard holds and of the preparation settings) and the shard's size must match the
record, so a rerun never keeps a shard made from other inputs or one that was truncated or replaced after it
was written; such shards are rewritten.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from sims_platform.data.shards import (MANIFEST, HashingFile, ShardError, ShardWriter, read_manifest, record_name,
                                       shard_name)
from sims_platform.storage.fsio import exists, file_sizes, join, read_many


@dataclass(frozen=True)
class PreparedImage:
    key: str            # the sample key: the image's position in the sorted file list, zero-padded
    pixels: np.ndarray  # uint8 [R, R] (L) or [R, R, 3] (RGB)
    label: int
    source: str         # the file it was prepared from, relative to the source folder


def png_bytes(pixels: np.ndarray, level: int) -> bytes:
    """Lossless PNG of uint8 pixels; Pillow writes no timestamp, so the same pixels give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level, optimize=False)
    return buf.getvalue()


def sample_key(i: int) -> str:
    """The key of the i-th image of a prepared set (its position in the sorted file list)."""
    return f"{i:08d}"


def labels_rle(labels: list[int]) -> list[list[int]]:
    """[[class, run length], ...] of the classes in sample order: the manifest lists every sample's class in
    about as many entries as there are classes (sorted class folders make one run per class)."""
    runs: list[list[int]] = []
    for c in labels:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return runs


def prepared_samples(folder: str) -> dict[str, list[tuple[str, int]]] | None:
    """Shard name -> [(sample key, class)] of a set `sims prepare` wrote in folder, from its manifest alone (the
    webdataset source then indexes a 1 TB set without reading it); None when folder holds no such manifest."""
    if not exists(join(folder, MANIFEST)):
        return None
    try:
        manifest = read_manifest(folder)
    except ShardError:  # some other file named manifest.json: the shards are scanned instead, as any others
        return None
    if manifest.get("format") != "png" or "labels_rle" not in manifest:
        return None
    labels = [c for c, n in manifest["labels_rle"] for _ in range(n)]
    if len(labels) != manifest["total"]:
        raise ShardError(f"{join(folder, MANIFEST)}: labels_rle holds {len(labels)} classes for "
                         f"{manifest['total']} samples")
    out, first = {}, 0
    for entry in manifest["shards"]:
        out[entry["name"]] = [(sample_key(i), labels[i]) for i in range(first, first + entry["count"])]
        first += entry["count"]
    return out


class ImageShardWriter(ShardWriter):
    """Shards of prepared images; inputs[j] is the digest of what shard j is made from (files and settings)."""

    DTYPE = "uint8"
    ENTRY_KEYS = ("name", "count", "sha256", "bytes")

    def __init__(self, uri: str, shard_size: int, total: int, meta: dict[str, Any], inputs: list[str],
                 shape: list[int], png_level: int) -> None:
        super().__init__(uri, shard_size, total, meta)
        if len(inputs) != self.num_shards:
            raise ValueError(f"{uri}: {len(inputs)} input digests for {self.num_shards} shards")
        self.inputs = inputs
        self.shape = shape
        self.png_level = png_level
        self.stale: dict[int, str] = {}  # shard -> why its committed copy is not kept (the last check's)

    def write_images(self, j: int, images: Iterable[PreparedImage]) -> dict[str, Any]:
        """Commit shard j from its images (a generator may raise midway: nothing is committed then)."""
        def samples():
            for im in images:
                if list(im.pixels.shape) != self._hwc():  # a bug, not bad input: every crop mode gives R x R
                    raise ValueError(f"{im.source}: prepared pixels {list(im.pixels.shape)}, expected "
                                     f"{self._hwc()}")
                yield {"__key__": im.key, "png": png_bytes(im.pixels, self.png_level), "cls": im.label,
                       "src": im.source}
        return self.commit_shard(j, samples(), {"shape": self.shape, "inputs": self.inputs[j]})

    def missing_shards(self, verify: Iterable[int] = ()) -> list[int]:
        """Shards not committed from these inputs: no shard or record, a record of other inputs, a shard whose
        size is not the record's, or (for the shards in `verify`, which are read whole) a sha256 mismatch."""
        sizes, check = file_sizes(self.uri), set(verify)
        listed = [j for j in range(self.num_shards) if shard_name(j) in sizes and record_name(j) in sizes]
        raw = read_many([join(self.uri, record_name(j)) for j in listed])
        self.stale = {}
        for j, data in zip(listed, raw):
            why = self._why_stale(j, data, sizes[shard_name(j)])
            if why is None and j in check:
                why = self._checksum(j, json.loads(data))
            if why is not None:
                self.stale[j] = why
        return [j for j in range(self.num_shards) if j not in listed or j in self.stale]

    def _why_stale(self, j: int, data: bytes, size: int) -> str | None:
        try:
            rec = json.loads(data)
        except ValueError:
            return "its record is unreadable"
        if not isinstance(rec, dict) or rec.get("inputs") != self.inputs[j]:
            return "written from other files or settings"
        if rec.get("count") != len(self.shard_range(j)) or rec.get("bytes") != size:
            return f"{size} bytes, its record says {rec.get('bytes')} (truncated or replaced)"
        return None

    def _checksum(self, j: int, rec: dict[str, Any]) -> str | None:
        with fsspec.open(join(self.uri, shard_name(j)), "rb") as f:
            h = HashingFile(f)
            while h.read(1 << 22):
                pass
        return None if h.sha.hexdigest() == rec.get("sha256") else "sha256 differs from its record"

    def _hwc(self) -> list[int]:
        c, r, _ = self.shape
        return [r, r] if c == 1 else [r, r, c]
