"""Real training images from a data source (digits, class folders, WebDataset shards) as LabeledImages."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from webdataset.shardlists import expand_urls

from sims_platform.config.schema import DataConfig
from sims_platform.data.crop import CropMode, crop_pixels
from sims_platform.data.errors import DataError
from sims_platform.data.images import LabeledImages
from sims_platform.data.shards import iter_tar
from sims_platform.storage.fsio import filesystem

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # WebDataset sample keys searched for the image, in this order


def load_images(cfg: DataConfig) -> LabeledImages:
    """Load cfg.source in its deterministic order, capped at cfg.max_images, resized to cfg.resolution."""
    loaders: dict[str, Callable[[DataConfig], tuple[torch.Tensor, torch.Tensor]]] = {
        "digits": _digits, "folder": _folder, "webdataset": _webdataset}
    images, labels = loaders[cfg.source](cfg)
    if len(labels) == 0:
        raise DataError(f"data.path: no images found in {cfg.path}")
    if cfg.num_classes == 0:
        labels = torch.zeros_like(labels)  # unconditional: the class is never looked at
    elif labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise DataError(f"data.num_classes is {cfg.num_classes} but the labels of {cfg.source} data span "
                        f"{int(labels.min())}..{int(labels.max())}; expected 0..{cfg.num_classes - 1}")
    return LabeledImages(images=images.float().contiguous(), labels=labels.long())


# ----------------------------------------------------------------------------
# Pixel conversions shared by the sources


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Square [N, C, S, S] in [-1, 1] to [N, C, R, R]; antialiased when shrinking so thin strokes survive."""
    if x.shape[-1] == resolution:
        return x
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                      antialias=x.shape[-1] > resolution)
    return x.clamp(-1, 1)


def decode_pixels(data: bytes, name: str, channels: int, resolution: int, crop: CropMode) -> np.ndarray:
    """Encoded image bytes to square uint8 pixels ([S, S] or [S, S, 3]), converted to L or RGB and cropped as
    data.crop says (data/crop.py: S = resolution for dhariwal, the image's own square for center and none)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except Image.UnidentifiedImageError as e:
        raise DataError(f"{name}: cannot decode as an image (not an image format PIL reads)") from e
    except Exception as e:  # PIL raises several unrelated types for bad data; all mean the same here
        raise DataError(f"{name}: cannot decode as an image ({e})") from e
    return crop_pixels(img, resolution, crop, name)


def pixels_to_float(pixels: np.ndarray, resolution: int) -> torch.Tensor:
    """Square uint8 pixels to [C, R, R] in [-1, 1] (u / 127.5 - 1), scaled to R in float when not R already."""
    a = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # a writable copy: PIL's arrays are read-only
    a = a[None] if a.ndim == 2 else a.permute(2, 0, 1)
    return resize(a[None].float() / 127.5 - 1, resolution)[0]


def decode_image(data: bytes, name: str, channels: int, resolution: int, crop: CropMode) -> torch.Tensor:
    """Encoded image bytes to [C, R, R] in [-1, 1]: converted to L or RGB, cropped as data.crop says."""
    return pixels_to_float(decode_pixels(data, name, channels, resolution, crop), resolution)


# ----------------------------------------------------------------------------
# Sources


def _digits(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import; the data ships with it

    d = load_digits()
    n = len(d.target) if cfg.max_images is None else cfg.max_images
    x = torch.from_numpy(d.images[:n]).float()[:, None] / 8 - 1  # values 0..16 -> [-1, 1]
    x = resize(x, cfg.resolution)
    if cfg.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x, torch.from_numpy(d.target[:n]).long()


def folder_files(cfg: DataConfig) -> list[tuple[str, int]]:
    """(file path, class) of a folder source in its deterministic order: sorted classes, sorted files."""
    classes, files = class_folder(cfg.path or "", "data.path")
    if cfg.num_classes > 0 and len(classes) != cfg.num_classes:
        raise DataError(f"data.num_classes is {cfg.num_classes} but {cfg.path} has {len(classes)} class "
                        f"folders: {classes}")
    return files[: cfg.max_images] if cfg.max_images is not None else files


def class_folder(path: str, field: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sub-folder names, sorted) of an ImageNet-style folder and its (file path, class) pairs:
    class c is the c-th sub-folder in sorted order, its files sorted by path; hidden entries are skipped.
    Errors name `field`, the setting that gave the path."""
    fs, root = filesystem(path)
    if not fs.isdir(root):
        raise DataError(f"{field}: folder {path} does not exist")
    entries = fs.ls(root, detail=True)
    folders = sorted(e["name"] for e in entries if e["type"] == "directory" and not _hidden(e["name"]))
    if not folders:
        raise DataError(f"{field}: {path} has no class sub-folders (expected one folder of images per class)")
    out = []
    for label, folder in enumerate(folders):
        files = sorted(e["name"] for e in fs.ls(folder, detail=True)
                       if e["type"] == "file" and not _hidden(e["name"]))
        out += [(p, label) for p in files]
    return [_base(f) for f in folders], out


def _folder(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    assert cfg.path is not None  # DataConfig requires it for a folder source
    fs, _ = filesystem(cfg.path)
    files = folder_files(cfg)
    images = [decode_image(fs.cat_file(path), path, cfg.channels, cfg.resolution, cfg.crop)
              for path, _ in files]
    return _stack(images, cfg), torch.tensor([label for _, label in files], dtype=torch.int64)


def _webdataset(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for url in expand_urls(cfg.path):  # webdataset's own shard-list syntax: braces and '::'
        with contextlib.closing(iter_tar(url)) as samples:  # closes the shard even when we stop early
            for sample in _capped(samples, cfg.max_images, len(images)):
                name = f"{url}:{sample['__key__']}"
                key = next((k for k in IMAGE_KEYS if k in sample), None)
                if key is None:
                    raise DataError(f"{name}: no image; expected one of {list(IMAGE_KEYS)}, found "
                                    f"{sorted(k for k in sample if not k.startswith('__'))}")
                images.append(decode_image(sample[key], f"{name}.{key}", cfg.channels, cfg.resolution,
                                           cfg.crop))
                labels.append(sample_class(sample, name, cfg.num_classes))
        if cfg.max_images is not None and len(images) == cfg.max_images:
            break
    return _stack(images, cfg), torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------
# Helpers


def sample_class(sample: dict, name: str, num_classes: int) -> int:
    """The class of a webdataset sample (its 'cls' entry; 0 for an unconditional set), checked against num_classes."""
    if "cls" not in sample:
        if num_classes == 0:
            return 0
        raise DataError(f"{name}: no 'cls' entry; data.num_classes is {num_classes} so every sample needs one")
    try:
        return int(sample["cls"])
    except ValueError as e:
        raise DataError(f"{name}.cls: expected an integer class, got {sample['cls'][:20]!r}") from e


def _capped(samples: Iterator[dict], cap: int | None, have: int) -> Iterator[dict]:
    for sample in samples:
        if cap is not None and have >= cap:
            return
        have += 1
        yield sample


def _stack(images: list[torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    if not images:
        return torch.zeros(0, cfg.channels, cfg.resolution, cfg.resolution)
    return torch.stack(images)


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _hidden(path: str) -> bool:
    return _base(path).startswith(".")
