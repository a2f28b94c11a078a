"""Sample seeds: each (iteration, purpose) owns a disjoint range of 10^9 seeds, so every sample depends only on its
seed, whichever part or process draws it."""

from __future__ import annotations

import torch

# "tuning" is for choices made before the evaluation (e.g. the sampler's step count,
# benchmarks/sampler_convergence.py), never reported on.
SEED_STREAMS = {"generate": 1, "evaluate": 2, "feed": 3, "tuning": 4}


def sample_seeds(base_seed: int, k: int, stream: str, count: int, start: int = 0) -> torch.Tensor:
    """Seeds of samples [start, start+count) of a stream; evaluation seeds are the same in every iteration."""
    it = 0 if stream in ("evaluate", "tuning") else k
    first = ((base_seed * 1000 + it) * 10 + SEED_STREAMS[stream]) * 10**9
    return torch.arange(first + start, first + start + count, dtype=torch.int64)
