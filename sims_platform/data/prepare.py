"""`sims prepare`: an ImageNet-style class folder -> WebDataset shards of prepared images, as a job array.

The images are cropped and resized once, as training would (data/crop.py; dhariwal is EDM2's ImageNet
preparation), and stored losslessly as PNG with their class (`cls`) and source file (`src`), so the
webdataset source reads back exactly these pixels (every crop mode is the identity on an image already at the
resolution) and the encode and reference stages never decode a full-size JPEG again.

Deterministic: the files are listed in the folder source's order (sorted class folders = classes 0..K-1,
sorted files), and shard j holds images [j*S, (j+1)*S) of that list, keyed by their position; the same inputs
give the same bytes whether one process or N parts write them. Part i of N writes the shards j with
j % N == i (the rule generate and encode use). Each shard is committed atomically with a record of its inputs'
digest; a rerun keeps the committed shards of the same inputs (record, size, and with `verify` the sha256) and
rewrites the rest, and whichever part finds every shard committed writes manifest.json (the same content from
any part, so two parts finishing together is harmless). A dst whose manifest describes other inputs or
settings is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

from sims_platform.config.schema import CropMode
from sims_platform.data.crop import CROP_MODES
from sims_platform.data.errors import DataError
from sims_platform.data.image_shards import ImageShardWriter, PreparedImage, labels_rle, sample_key
from sims_platform.data.shards import MANIFEST, read_manifest, record_name, shard_name
from sims_platform.data.sources import class_folder, decode_pixels, pixels_to_float
from sims_platform.storage.fsio import exists, filesystem, join, normalize_uri, remove, remove_leftovers
from sims_platform.utils.progress import Progress

FORMAT = 1  # changes whenever the same inputs would give other shard contents: old records are then stale
MAX_RESOLUTION = 4096


@dataclass(frozen=True)
class PrepareSpec:
    """What `sims prepare` was asked to do (the command line, resolved)."""

    src: str
    dst: str
    resolution: int
    crop: CropMode = "dhariwal"
    channels: int = 3
    shard_size: int = 1000
    max_images: int | None = None
    num_classes: int | None = None  # when set: the folder must have exactly this many classes
    png_level: int = 0              # zlib level 0-9; 0 (stored, as EDM2 writes its PNGs) is the fastest
    workers: int = 4                # threads decoding and encoding (Pillow releases the GIL while it works)
    verify: bool = False            # re-read this part's committed shards and check their sha256

    def __post_init__(self) -> None:
        checks = [(4 <= self.resolution <= MAX_RESOLUTION, f"--resolution must be 4..{MAX_RESOLUTION}"),
                  (self.crop in CROP_MODES, f"--crop must be one of {list(CROP_MODES)}"),
                  (self.channels in (1, 3), "--channels must be 1 or 3"),
                  (self.shard_size >= 1, "--shard-size must be >= 1"),
                  (self.max_images is None or self.max_images >= 1, "--max-images must be >= 1"),
                  (self.num_classes is None or self.num_classes >= 1, "--num-classes must be >= 1"),
                  (0 <= self.png_level <= 9, "--png-level must be 0..9"),
                  (self.workers >= 1, "--workers must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise DataError(message)

    def settings(self) -> dict[str, Any]:
        """Everything besides the files that decides a shard's bytes."""
        return {"format": FORMAT, "resolution": self.resolution, "crop": self.crop, "channels": self.channels,
                "png_level": self.png_level}


@dataclass(frozen=True)
class SourceFiles:
    """The source folder listed: class names and (path, relative path, class) in the deterministic order."""

    root: str
    classes: list[str]
    files: list[tuple[str, str, int]]

    @classmethod
    def of(cls, spec: PrepareSpec) -> SourceFiles:
        classes, files = class_folder(spec.src, "--src")
        if spec.num_classes is not None and len(classes) != spec.num_classes:
            raise DataError(f"--num-classes is {spec.num_classes} but {spec.src} has {len(classes)} class folders")
        if not files:
            raise DataError(f"--src: no files in the class folders of {spec.src}")
        _, root = filesystem(spec.src)
        root = root.rstrip("/") + "/"
        rel = [(p, p[len(root):] if p.startswith(root) else p, c) for p, c in files]
        return cls(spec.src, classes, rel[: spec.max_images] if spec.max_images is not None else rel)


def shard_inputs(spec: PrepareSpec, files: SourceFiles, ranges: list[range]) -> list[str]:
    """Per shard, sha256 of the settings, its first position (the sample keys) and its files (relative paths)
    with their classes."""
    settings = json.dumps(spec.settings(), sort_keys=True)
    out = []
    for rng in ranges:
        h = hashlib.sha256(settings.encode())
        h.update(json.dumps(rng.start).encode())
        for _, rel, c in files.files[rng.start:rng.stop]:
            h.update(json.dumps([rel, c]).encode())
        out.append(h.hexdigest())
    return out


def plan(spec: PrepareSpec, files: SourceFiles) -> ImageShardWriter:
    total, s = len(files.files), spec.shard_size
    ranges = [range(a, min(a + s, total)) for a in range(0, total, s)]
    inputs = shard_inputs(spec, files, ranges)
    meta = {"format": "png", "src": files.root, "resolution": spec.resolution, "crop": spec.crop,
            "channels": spec.channels, "png_level": spec.png_level, "num_classes": len(files.classes),
            "classes": files.classes, "labels_rle": labels_rle([c for _, _, c in files.files]),
            "inputs_sha256": hashlib.sha256("".join(inputs).encode()).hexdigest()}
    return ImageShardWriter(spec.dst, s, total, meta, inputs, [spec.channels, spec.resolution, spec.resolution],
                            spec.png_level)


def _refuse_other_set(writer: ImageShardWriter) -> None:
    """A complete set of other inputs or settings at dst is never overwritten shard by shard under its readers."""
    if not exists(join(writer.uri, MANIFEST)):
        return
    old = read_manifest(writer.uri)
    new = {"total": writer.total, "shard_size": writer.shard_size, **writer.meta}
    differ = sorted(k for k in ("total", "shard_size", "inputs_sha256", "resolution", "crop", "channels",
                                "png_level", "format") if old.get(k) != new.get(k))
    if differ:
        raise DataError(f"--dst: {writer.uri} already holds a prepared set made from other inputs or settings "
                        f"(its {MANIFEST} differs in {', '.join(differ)}); choose another --dst or remove it")


def _prepared(spec: PrepareSpec, files: SourceFiles, rng: range, pool: ThreadPoolExecutor,
              done: Callable[[int], None]) -> Iterator[PreparedImage]:
    """The images of one shard, in order, prepared by the pool's threads."""
    fs, _ = filesystem(spec.src)

    def one(i: int) -> PreparedImage:
        path, rel, label = files.files[i]
        try:
            data = fs.cat_file(path)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:  # permanent; other errors retry
            raise DataError(f"{path}: cannot read ({e})") from e
        pixels = decode_pixels(data, path, spec.channels, spec.resolution, spec.crop)
        if pixels.shape[0] != spec.resolution:  # center / none: scaled in float as training would, then rounded
            x = pixels_to_float(pixels, spec.resolution)
            pixels = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            pixels = pixels[..., 0] if spec.channels == 1 else pixels
        return PreparedImage(sample_key(i), pixels, label, rel)

    # A sliding window of 4 images a thread ahead of the writer: threads stay busy, memory stays bounded.
    indices = iter(rng)
    pending = deque(pool.submit(one, i) for i in islice(indices, 4 * spec.workers))
    while pending:
        im = pending.popleft().result()
        nxt = next(indices, None)
        if nxt is not None:
            pending.append(pool.submit(one, nxt))
        done(1)
        yield im


def run_part(spec: PrepareSpec, index: int = 0, count: int = 1,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write part `index` of `count`'s missing shards; finalize when every shard is committed."""
    if count < 1 or not 0 <= index < count:
        raise DataError(f"--index {index} --count {count}: expected 0 <= index < count")
    spec = replace(spec, src=normalize_uri(spec.src), dst=normalize_uri(spec.dst))
    files = SourceFiles.of(spec)
    writer = plan(spec, files)
    _refuse_other_set(writer)
    owned = [j for j in range(writer.num_shards) if j % count == index]
    todo = [j for j in writer.missing_shards(verify=owned if spec.verify else ()) if j % count == index]
    for j in todo:
        if j in writer.stale:
            log(f"[prepare] {shard_name(j)}: {writer.stale[j]}; rewriting it")
    if todo:
        _write(spec, files, writer, owned, todo, f"prepare part {index}/{count}")
    else:
        log(f"[prepare] part {index}/{count}: its {len(owned)} shard(s) are committed")
    complete = not writer.missing_shards()
    if complete:
        writer.finalize()
    return {"dst": writer.uri, "data_path": data_path(writer.uri, writer.num_shards), "images": writer.total,
            "shards": writer.num_shards, "part": index, "parts": count, "written": len(todo),
            "complete": complete}


def _write(spec: PrepareSpec, files: SourceFiles, writer: ImageShardWriter, owned: list[int], todo: list[int],
           desc: str) -> None:
    """Write the shards in todo (a subset of the part's owned shards), with progress over the part's images."""
    images = sum(len(writer.shard_range(j)) for j in owned)
    progress = Progress(desc, total=images, unit="img", done=images - sum(len(writer.shard_range(j)) for j in todo))

    def advance(n: int) -> None:
        progress.update(progress.done + n)

    with ThreadPoolExecutor(spec.workers) as pool:
        for j in todo:
            for name in (shard_name(j), record_name(j)):  # a killed writer's partial temporary files
                remove_leftovers(join(writer.uri, name))
            if j in writer.stale:  # its record is not kept (records are created once, never overwritten)
                remove(join(writer.uri, record_name(j)))
            writer.write_images(j, _prepared(spec, files, writer.shard_range(j), pool, advance))
    progress.close()


def data_path(dst: str, num_shards: int) -> str:
    """The data.path (or data.reference_path) that reads the set: its shards as a brace pattern."""
    return join(dst, f"shard-{{000000..{num_shards - 1:06d}}}.tar")
