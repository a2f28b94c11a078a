"""Random access to a data source by sample index, so workers can each load only their slice of it.

The order is the same deterministic order `load_images` uses. Folders list their files (cheap); WebDataset
sources are scanned once for their sample keys (reads the tars, decodes nothing), except a set `sims prepare`
wrote, whose manifest lists every sample and class; then each slice reads only the shards that hold it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from webdataset.shardlists import expand_urls

from sims_platform.config.schema import DataConfig
from sims_platform.data.errors import DataError
from sims_platform.data.image_shards import prepared_samples
from sims_platform.data.images import LabeledImages
from sims_platform.data.shards import iter_tar
from sims_platform.data.sources import IMAGE_KEYS, sample_class, decode_image, folder_files, load_images
from sims_platform.storage.fsio import filesystem


@dataclass(frozen=True)
class _Entry:
    where: str  # file path (folder) or shard URL (webdataset)
    key: str    # '' for folders, the sample key inside the shard otherwise
    label: int


class SourceIndex:
    """len(index) samples; `load(indices)` decodes just those, in the order given."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._memory: LabeledImages | None = None
        self._entries: list[_Entry] = []
        if cfg.source == "digits":
            self._memory = load_images(cfg)
        elif cfg.source == "folder":
            self._entries = _folder_entries(cfg)
        else:
            self._entries = _webdataset_entries(cfg)
        if cfg.max_images is not None:
            self._entries = self._entries[: cfg.max_images]
        if len(self) == 0:
            raise DataError(f"data.path: no images found in {cfg.path}")

    def __len__(self) -> int:
        return len(self._memory) if self._memory is not None else len(self._entries)

    @property
    def labels(self) -> torch.Tensor:
        """The class of every sample in index order (no image is decoded)."""
        if self._memory is not None:
            return self._memory.labels
        return torch.tensor([e.label for e in self._entries], dtype=torch.int64)

    def load(self, indices: Sequence[int]) -> LabeledImages:
        if self._memory is not None:
            idx = torch.as_tensor(list(indices), dtype=torch.int64)
            return LabeledImages(self._memory.images[idx], self._memory.labels[idx])
        cfg, entries = self.cfg, [self._entries[i] for i in indices]
        if cfg.source == "folder":
            assert cfg.path is not None  # DataConfig requires it for a folder source
            fs, _ = filesystem(cfg.path)
            images = [decode_image(fs.cat_file(e.where), e.where, cfg.channels, cfg.resolution,
                                   cfg.crop) for e in entries]
        else:
            wanted: dict[str, set[str]] = defaultdict(set)
            for e in entries:
                wanted[e.where].add(e.key)
            decoded: dict[tuple[str, str], torch.Tensor] = {}
            for url, keys in wanted.items():
                with contextlib.closing(iter_tar(url)) as samples:
                    for sample in samples:
                        if sample["__key__"] in keys:
                            key = next(k for k in IMAGE_KEYS if k in sample)
                            decoded[url, sample["__key__"]] = decode_image(
                                sample[key], f"{url}:{sample['__key__']}.{key}", cfg.channels, cfg.resolution,
                                cfg.crop)
            lost = next((e for e in entries if (e.where, e.key) not in decoded), None)
            if lost is not None:
                raise DataError(f"{lost.where}: no sample {lost.key}, which its index listed; was the shard "
                                "replaced after its manifest was written?")
            images = [decoded[e.where, e.key] for e in entries]
        labels = torch.tensor([e.label for e in entries], dtype=torch.int64)
        if cfg.num_classes > 0 and len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
            raise DataError(f"data.num_classes is {cfg.num_classes} but labels span "
                            f"{int(labels.min())}..{int(labels.max())}")
        return LabeledImages(torch.stack(images).float(), labels)


def _folder_entries(cfg: DataConfig) -> list[_Entry]:
    return [_Entry(path, "", label if cfg.num_classes else 0) for path, label in folder_files(cfg)]


def _webdataset_entries(cfg: DataConfig) -> list[_Entry]:
    out: list[_Entry] = []
    prepared: dict[str, dict[str, list[tuple[str, int]]] | None] = {}  # folder -> `sims prepare` manifest
    for url in expand_urls(cfg.path):
        folder, name = url.rsplit("/", 1) if "/" in url else ("", url)
        if folder not in prepared:
            prepared[folder] = prepared_samples(folder) if folder else None
        listed = (prepared[folder] or {}).get(name)
        if listed is not None:  # a prepared set's manifest lists its samples: no need to read the shard
            for key, label in listed:
                out.append(_Entry(url, key, label if cfg.num_classes else 0))
                if cfg.max_images is not None and len(out) == cfg.max_images:
                    return out
            continue
        with contextlib.closing(iter_tar(url)) as samples:
            for sample in samples:
                name = f"{url}:{sample['__key__']}"
                if not any(k in sample for k in IMAGE_KEYS):
                    raise DataError(f"{name}: no image; expected one of {list(IMAGE_KEYS)}")
                label = sample_class(sample, name, cfg.num_classes) if cfg.num_classes else 0
                out.append(_Entry(url, sample["__key__"], label))
                if cfg.max_images is not None and len(out) == cfg.max_images:
                    return out
    return out
