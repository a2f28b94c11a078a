"""How a decoded image becomes a square training image: the crop modes of `data.crop`.

dhariwal is the crop EDM2 prepares ImageNet with (its dataset tool's `center-crop-dhariwal`, ADM's
`center_crop_imagenet`), so latents and reference statistics computed here match EDM2's:
  1. while the short side is at least twice the target, halve the image (each side floored) with a BOX filter;
  2. resize with BICUBIC so the short side equals the target (each side round(side * target / short));
  3. crop the target square at offsets ((width - target) // 2, (height - target) // 2).
All three steps run in PIL on uint8 pixels, so the result is exactly EDM2's, pixel for pixel.

center keeps the platform's original transform: the centred square of side min(width, height), which the
caller resizes to the resolution with antialiased bilinear interpolation in float (sources.resize); the
float step is kept out of this module so center stays bit for bit what it always was.

none is for sets that are already square (e.g. images another tool prepared): they are resized like
center's square; an image that is not square is an error naming the file, since stretching it would
silently change its aspect ratio.

On an image that is already resolution x resolution every mode returns it unchanged, so a set prepared
with `sims prepare` reads back as the exact pixels it stores, whatever data.crop says.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
from PIL import Image

from sims_platform.config.schema import CropMode
from sims_platform.data.errors import DataError

CROP_MODES: tuple[str, ...] = get_args(CropMode)


def crop_pixels(img: Image.Image, resolution: int, crop: CropMode, name: str) -> np.ndarray:
    """The square uint8 pixels of a decoded L or RGB image: [S, S] (L) or [S, S, 3] (RGB).

    dhariwal returns S = resolution. center and none return the image's own square (S = its short side),
    which the caller scales to the resolution in float; S = resolution already means no scaling at all.
    """
    if crop == "dhariwal":
        return np.asarray(_dhariwal(img, resolution), dtype=np.uint8)
    if crop == "center":
        return np.asarray(_center_square(img), dtype=np.uint8)
    if crop == "none":
        if img.width != img.height:
            raise DataError(f"{name}: image is {img.width}x{img.height}, not square; data.crop 'none' only "
                            f"takes square images (use 'dhariwal' or 'center' to crop it)")
        return np.asarray(img, dtype=np.uint8)
    raise ValueError(f"unknown crop mode {crop!r}, expected one of {list(CROP_MODES)}")


def _dhariwal(img: Image.Image, resolution: int) -> Image.Image:
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _center_square(img: Image.Image) -> Image.Image:
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))
