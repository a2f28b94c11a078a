"""A synthetic set streamed shard by shard: verified, shuffled per epoch, split over ranks and loader workers."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.filters import shuffle as buffer_shuffle
from webdataset.utils import pytorch_worker_info

from sims_platform.data.shards import MANIFEST, ShardError, read_manifest, read_shard
from sims_platform.storage.fsio import listdir

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x float32 [C, H, W], label int64 [], seed int64 []


def _seed(*parts: int) -> int:
    # SeedSequence mixes the parts well; (seed, epoch) and (seed, epoch + 1) give unrelated streams.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order; the same on every rank and worker, which is what makes the split disjoint."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng(_seed(seed, epoch)).permutation(num_shards).tolist()


def assigned_shards(num_shards: int, seed: int, epoch: int, shuffle: bool,
                    rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shards that (rank, worker) reads this epoch: each shard goes to exactly one of world_size * num_workers.

    Dealt worker-major (worker 0 of every rank, then worker 1 of every rank, ...): with at least one shard per
    rank every rank gets data whatever its loader_workers, so no rank spins through empty epochs; only a
    surplus worker may get none, and it simply ends.
    """
    slot, slots = worker * world_size + rank, world_size * num_workers
    return shard_order(num_shards, seed, epoch, shuffle)[slot::slots]


class ShardStream(IterableDataset):
    """(x, label, seed) samples of the shard set at uri (file://, s3://, any fsspec URI), one shard in memory.

    Each shard is read whole and checked against the manifest (sha256, count, shape) before any of its
    samples is yielded, so a corrupt or rewritten shard raises ShardError instead of training on it; memory
    per worker is one shard plus the shuffle buffer. Every epoch the shard order is permuted (seed, epoch),
    and samples pass through a buffer of `buffer_size` shuffled by (seed, epoch, rank, worker): the order is
    reproducible and differs between epochs. Shards are dealt round-robin to the world_size * num_workers
    (rank, DataLoader worker) slots, worker-major (see assigned_shards), so each is read by exactly one per
    epoch and every rank gets some as long as there is a shard per rank; workers beyond the number of shards
    get nothing, and ranks may get different sample counts when shards do not divide evenly.

    rank and world_size default to torch.distributed (or the RANK / WORLD_SIZE env that torchrun sets).
    Call set_epoch(e) before iterating each epoch (DataLoader workers copy the dataset when an iterator is
    created, so this needs persistent_workers=False, the default).
    """

    def __init__(self, uri: str, *, shuffle: bool = True, seed: int = 0, buffer_size: int = 1000,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError(f"ShardStream({uri}): give both rank and world_size or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"ShardStream({uri}): rank {rank} is not in 0..{world_size - 1}")
        if buffer_size < 1:
            raise ValueError(f"ShardStream({uri}): buffer_size must be >= 1, got {buffer_size}")
        self.uri = uri.rstrip("/")
        self.manifest = read_manifest(self.uri)  # raises ShardError naming uri when missing or inconsistent
        names = set(listdir(self.uri))
        missing = [e["name"] for e in self.manifest["shards"] if e["name"] not in names]
        if missing:  # fail here, in the main process, not later inside a DataLoader worker
            raise ShardError(f"{self.uri}: shards {missing} are listed in {MANIFEST} but missing")
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples in the whole set (all ranks and workers together)."""
        return int(self.manifest["total"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slot(self) -> tuple[int, int, int, int]:
        rank, world_size, worker, num_workers = pytorch_worker_info()
        if self.world_size is not None:
            rank, world_size = self.rank, self.world_size
        return rank, world_size, worker, num_workers

    def _samples(self, shards: list[int]) -> Iterator[Sample]:
        entries, shape = self.manifest["shards"], self.manifest["shape"]
        for j in shards:
            x, labels, seeds = read_shard(self.uri, entries[j], shape)
            # Clones: a view would keep its whole shard alive in the shuffle buffer (and in worker IPC).
            for i in range(len(x)):
                yield x[i].clone(), labels[i], seeds[i]

    def __iter__(self) -> Iterator[Sample]:
        rank, world_size, worker, num_workers = self._slot()
        num_shards = len(self.manifest["shards"])
        if num_shards < world_size:  # a rank with no data would spin through empty epochs forever
            raise ShardError(f"{self.uri}: {num_shards} shards cannot feed {world_size} ranks; "
                             f"expected at least one shard per rank (write smaller shards)")
        shards = assigned_shards(num_shards, self.seed, self.epoch, self.shuffle,
                                 rank, world_size, worker, num_workers)
        samples = self._samples(shards)
        if not self.shuffle:
            return samples
        # Without an rng webdataset seeds from pid and time; ours makes the order reproducible.
        rng = random.Random(_seed(self.seed, self.epoch, rank * num_workers + worker))
        return buffer_shuffle(self.buffer_size, self.buffer_size, rng=rng)(samples)

