"""The shard-writing job array shared by generate, feed and encode: each part writes the shards it owns."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sims_platform.data import ShardWriter
from sims_platform.stages.context import Part
from sims_platform.utils.progress import Progress

# make(j, sample indexes of shard j, advance(n)) -> (x, labels, seeds) of shard j
ShardMaker = Callable[[int, range, Callable[[int], None]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def write_owned_shards(part: Part, writer: ShardWriter, desc: str, make: ShardMaker) -> dict | None:
    """Write this part's shards that are not committed yet; return the manifest if the set is now complete.

    A part owns shards j with j mod count == index (disjoint names and samples), so a restarted
    part skips its committed shards. Whoever finds every shard committed afterwards writes the manifest (the
    same content from any part); otherwise None (other parts are still writing).
    """
    owned = [j for j in range(writer.num_shards) if part.owns(j)]
    todo = [j for j in writer.missing_shards() if part.owns(j)]
    total = sum(len(writer.shard_range(j)) for j in owned)
    progress = Progress(desc, total=total, done=total - sum(len(writer.shard_range(j)) for j in todo), unit="img")

    def advance(n: int) -> None:
        progress.update(progress.done + n)

    for j in todo:
        writer.write_shard(j, *make(j, writer.shard_range(j), advance))
    progress.close()
    return None if writer.missing_shards() else writer.finalize()
