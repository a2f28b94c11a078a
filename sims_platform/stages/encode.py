"""encode: real images -> VAE latents -> WebDataset shards, once per run, so training reads latents (as EDM2).

Part i of N encodes output shards j with j % N == i; shard j holds source samples [j*S, (j+1)*S) in the
source's deterministic order, keyed by their index. A restarted part skips committed shards; whoever finds
every shard committed writes the manifest.
"""

from __future__ import annotations

import torch

from sims_platform.data import ShardWriter, SourceIndex
from sims_platform.stages.context import StageContext
from sims_platform.stages.shard_parts import write_owned_shards


def encode(ctx: StageContext, run_id: str) -> dict:
    cfg, out = ctx.cfg, ctx.layout.encoded
    index = SourceIndex(cfg.data)
    meta = {"source": cfg.data.source, "path": cfg.data.path, "resolution": cfg.data.resolution,
            "encoder": cfg.encoder.kind, "vae": cfg.encoder.vae if cfg.encoder.vae_config is None else "random"}
    writer = ShardWriter(out, shard_size=cfg.encoder.shard_size, total=len(index), meta=meta)
    ctx.lineage.log_params(run_id, {"images": len(index), "shard_size": cfg.encoder.shard_size, "vae": meta["vae"]})
    ctx.lineage.link(run_id, inputs={"real": ctx.real_uri()}, outputs={"encoded": out})

    def make(j: int, rng: range, advance) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = index.load(rng)
        latents = ctx.encoder.encode(real.images)
        advance(len(rng))
        return latents, real.labels, torch.arange(rng.start, rng.stop)  # keys: index in the source order

    complete = write_owned_shards(ctx, writer, "encode", make) is not None
    return {"encoded": out, "complete": complete, "images": len(index)}
