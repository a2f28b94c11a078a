"""data.crop: images prepared as EDM2 prepares ImageNet (dhariwal), the original center crop, and none."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from webdataset import TarWriter

from sims_platform.config.schema import DataConfig
from sims_platform.data import DataError, SourceIndex, load_images
from sims_platform.data.crop import crop_pixels
from sims_platform.data.sources import decode_image, decode_pixels

# Odd sizes, landscape and portrait; 1031x517 is halved once (BOX) before the bicubic step at 64 and 128.
SIZES = [(37, 23), (23, 37), (200, 131), (131, 200), (1031, 517)]


def _noise(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """Smooth gradients plus noise: every filter's taps matter, so a wrong step shows in many pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 / max(w - 1, 1) + yy * 128 / max(h - 1, 1)) % 256
    channels = 1 if mode == "L" else 3
    a = np.stack([(base + 70 * c) % 256 for c in range(channels)], axis=-1) + rng.normal(0, 30, (h, w, channels))
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def edm2_dhariwal(img: Image.Image, size: int) -> np.ndarray:
    """EDM2's center-crop-dhariwal, step by step with PIL, written from its description (not our code)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def previous_center(img: Image.Image, resolution: int) -> torch.Tensor:
    """The platform's transform before data.crop existed: centred square, then antialiased bilinear in float."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    a = torch.from_numpy(np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8).copy())
    x = (a[None] if a.ndim == 2 else a.permute(2, 0, 1))[None].float() / 127.5 - 1
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > resolution).clamp(-1, 1)
    return x[0]


def _chw(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(a.copy())
    return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)).float() / 127.5 - 1


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("resolution", [16, 64, 128])
def test_dhariwal_is_edm2s_crop_exactly(size, mode, resolution):
    img = _noise(size, mode, seed=size[0] * 7 + resolution)
    expected = edm2_dhariwal(img, resolution)
    got = crop_pixels(img, resolution, "dhariwal", "x.png")
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert got.shape[:2] == (resolution, resolution)
    assert np.array_equal(got, expected)
    # through the decoder (PNG bytes -> L/RGB -> crop -> float), exactly u / 127.5 - 1 of those pixels
    channels = 1 if mode == "L" else 3
    x = decode_image(_png(img), "x.png", channels, resolution, "dhariwal")
    assert torch.equal(x, _chw(expected))


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", SIZES[:4])
def test_center_is_the_previous_transform_bit_for_bit(size, mode):
    img = _noise(size, mode, seed=3)
    for resolution in (8, 16, 23, 64):
        channels = 1 if mode == "L" else 3
        got = decode_image(_png(img), "x.png", channels, resolution, "center")
        assert torch.equal(got, previous_center(img, resolution))


def test_the_crops_differ_where_edm2s_does():
    """Why data.crop defaults to dhariwal: on an odd-sized image the original center transform is far from it."""
    img = _noise((200, 131), "RGB", seed=1)
    center = decode_image(_png(img), "x.png", 3, 64, "center")
    dhariwal = decode_image(_png(img), "x.png", 3, 64, "dhariwal")
    assert ((center - dhariwal).abs().max() * 127.5) > 10


@pytest.mark.parametrize("crop", ["dhariwal", "center", "none"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_an_image_at_the_resolution_is_read_unchanged(crop, mode):
    """A set written by `sims prepare` holds resolution x resolution images: every mode is the identity."""
    img = _noise((32, 32), mode, seed=5)
    pixels = np.asarray(img)
    assert np.array_equal(crop_pixels(img, 32, crop, "x.png"), pixels)
    channels = 1 if mode == "L" else 3
    assert torch.equal(decode_image(_png(img), "x.png", channels, 32, crop), _chw(pixels))


def test_none_resizes_square_images_and_refuses_others():
    square = _noise((40, 40), "RGB", seed=2)
    assert torch.equal(decode_image(_png(square), "sq.png", 3, 16, "none"),
                       decode_image(_png(square), "sq.png", 3, 16, "center"))
    with pytest.raises(DataError, match=r"wide\.png: image is 37x23, not square; data.crop 'none'"):
        decode_image(_png(_noise((37, 23), "RGB", seed=2)), "wide.png", 3, 16, "none")


def test_undecodable_bytes_name_the_file():
    with pytest.raises(DataError, match=r"^a/b\.jpg: cannot decode as an image"):
        decode_pixels(b"\xff\xd8\xff not really a jpeg", "a/b.jpg", 3, 16, "dhariwal")


def test_the_config_default_is_dhariwal():
    assert DataConfig().crop == "dhariwal"
    assert DataConfig(source="folder", path="x", crop="center").crop == "center"
    with pytest.raises(ValueError, match="crop"):
        DataConfig(crop="centre")


# ----------------------------------------------------------------------------
# The sources that decode files apply it: folder and webdataset, whole (load_images) and indexed (SourceIndex)


def _odd_images() -> list[tuple[Image.Image, int]]:
    return [(_noise(size, "RGB", seed=i), i % 3) for i, size in enumerate([(37, 23), (200, 131), (131, 200),
                                                                           (23, 37), (1031, 517), (50, 50)])]


def _expected(items, resolution: int, crop: str) -> torch.Tensor:
    if crop == "dhariwal":
        return torch.stack([_chw(edm2_dhariwal(img, resolution)) for img, _ in items])
    return torch.stack([previous_center(img, resolution) for img, _ in items])


@pytest.fixture
def odd_folder(tmp_path):
    items = _odd_images()
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(items):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        (root / f"class{label}" / f"{i:02d}.png").write_bytes(_png(img))
    order = sorted(range(len(items)), key=lambda i: (items[i][1], i))  # sorted classes, then sorted files
    return str(root), [items[i] for i in order]


@pytest.fixture
def odd_shards(tmp_path):
    items = _odd_images()
    for j in range(2):
        with TarWriter(str(tmp_path / f"odd-{j}.tar")) as tar:
            for i in range(3 * j, 3 * j + 3):
                tar.write({"__key__": f"s{i:03d}", "png": _png(items[i][0]), "cls": items[i][1]})
    return f"file://{tmp_path}/odd-{{0..1}}.tar", items


@pytest.mark.parametrize("which", ["folder", "webdataset"])
@pytest.mark.parametrize("crop", [None, "dhariwal", "center"])
def test_folder_and_webdataset_sources_apply_the_crop(which, crop, odd_folder, odd_shards):
    path, items = odd_folder if which == "folder" else odd_shards
    extra = {} if crop is None else {"crop": crop}
    cfg = DataConfig(source=which, path=path, resolution=16, channels=3, num_classes=3, **extra)
    expected = _expected(items, 16, crop or "dhariwal")  # None: the default, dhariwal
    loaded = load_images(cfg)
    assert torch.equal(loaded.images, expected)
    assert loaded.labels.tolist() == [label for _, label in items]
    indexed = SourceIndex(cfg).load([4, 0, 5])
    assert torch.equal(indexed.images, expected[[4, 0, 5]])


def test_the_reference_statistics_key_changes_with_the_crop():
    """Cached reference statistics are recomputed when data.crop changes the reference pixels."""
    from sims_platform.evaluation.reference import reference_source

    for extra in ({}, {"reference_path": "s3://b/val-{0..3}.tar"}):
        a = DataConfig(source="webdataset", path="s3://b/train-{0..9}.tar", crop="dhariwal", **extra)
        b = DataConfig(source="webdataset", path="s3://b/train-{0..9}.tar", crop="center", **extra)
        assert reference_source(a) != reference_source(b) and reference_source(a)["crop"] == "dhariwal"
    # the digits are not decoded from files: their cached statistics stay valid whatever crop says
    assert reference_source(DataConfig(crop="center")) == reference_source(DataConfig())
