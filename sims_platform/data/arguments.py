"""The options of `sims prepare`, which `sims k8s prepare-job` passes on to its pods, and the spec they ask for."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, get_args

from sims_platform.config.schema import CropMode

if TYPE_CHECKING:
    from sims_platform.data.prepare import PrepareSpec


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sims prepare` that `sims k8s prepare-job` passes on to its pods."""
    p.add_argument("--src", required=True, help="the folder: path or URI (file://, s3://)")
    p.add_argument("--dst", required=True, help="the shard folder to write: path or URI; data.path is then "
                   "DST/shard-{000000..N-1}.tar")
    p.add_argument("--resolution", type=int, required=True, help="side of the square images, e.g. 512")
    p.add_argument("--crop", default="dhariwal", choices=get_args(CropMode),
                   help="as data.crop (default dhariwal: EDM2's ImageNet preparation)")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="1 = grayscale, 3 = RGB (default)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--max-images", type=int, help="only the first N images of the sorted list")
    p.add_argument("--num-classes", type=int, help="refuse a folder without exactly this many class folders")
    p.add_argument("--png-level", type=int, default=0, help="PNG zlib level 0-9 (default 0: uncompressed, as "
                   "EDM2 stores its images; higher is smaller and slower to write, same pixels)")
    p.add_argument("--verify", action="store_true", help="re-read this part's committed shards and check their "
                   "sha256 before keeping them (default: their record and size)")
    p.add_argument("--workers", type=int, help="threads preparing images (`sims prepare`: default 4)")


def prepare_spec(args: argparse.Namespace, workers: int) -> PrepareSpec:
    """The PrepareSpec the `sims prepare` options ask for (add_prepare_arguments); workers when not given."""
    from sims_platform.data.prepare import PrepareSpec

    return PrepareSpec(src=args.src, dst=args.dst, resolution=args.resolution, crop=args.crop,
                       channels=args.channels, shard_size=args.shard_size, max_images=args.max_images,
                       num_classes=args.num_classes, png_level=args.png_level,
                       workers=args.workers if args.workers is not None else workers, verify=args.verify)
