"""encode: real training images -> VAE posteriors -> WebDataset shards, once per run, so training reads latents.

As EDM2, each sample keeps the posterior's mean and std (scaled like a latent, stacked on the channel axis:
[2C, h, w], manifest `posterior: true`), and training draws a fresh latent every time it draws the image
(encoders/latent.py posterior_sample, with normals from the step's generators: training/batches.py).

Only the training images are encoded (data/split.py training_indices): the held-out images never reach a
training stage; with a separate reference set (data.reference_path), all of data.path is. Part i of N encodes
output shards j with j % N == i; shard j holds training samples [j*S, (j+1)*S) in the source's deterministic
order, keyed by their index in the source. A restarted part skips committed shards; whoever finds
every shard committed writes the manifest.
"""

from __future__ import annotations

import torch

from sims_platform.data import ShardWriter, SourceIndex, class_subset, training_indices
from sims_platform.encoders.latent import LatentEncoder
from sims_platform.stages.context import StageContext
from sims_platform.stages.shard_parts import write_owned_shards


def encode(ctx: StageContext, run_id: str) -> dict:
    cfg, out = ctx.cfg, ctx.layout.encoded
    index = SourceIndex(cfg.data)
    train = training_indices(index.labels, cfg.data)
    train = train[class_subset(index.labels[train], cfg.data.class_fractions, cfg.data.holdout_seed)]
    meta = {"source": cfg.data.source, "path": cfg.data.path, "resolution": cfg.data.resolution,
            "crop": cfg.data.crop,
            "encoder": cfg.encoder.kind, "vae": cfg.encoder.vae_identity(),
            "vae_pixel_range": [0, 1],  # EDM2's convention (encoders/latent.py)
            "holdout_fraction": cfg.data.holdout_fraction, "holdout_seed": cfg.data.holdout_seed,
            "reference_path": cfg.data.reference_path,
            "posterior": cfg.encoder.kind == "latent"}
    writer = ShardWriter(out, shard_size=cfg.encoder.shard_size, total=len(train), meta=meta)
    ctx.lineage.log_params(run_id, {"images": len(train), "held_out": len(index) - len(train),
                                    "shard_size": cfg.encoder.shard_size, "vae": meta["vae"]})
    ctx.lineage.link(run_id, inputs={"real": ctx.data.real_uri()}, outputs={"encoded": out})

    def make(j: int, rng: range, advance) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = train[rng.start:rng.stop]
        real = index.load(source.tolist())
        enc = ctx.data.encoder  # a latent encoder (meta["posterior"]) stores posteriors, a pixel one the images
        latents = enc.encode_posterior(real.images) if isinstance(enc, LatentEncoder) else enc.encode(real.images)
        advance(len(rng))
        return latents, real.labels, source  # keys: index in the source order

    complete = write_owned_shards(ctx.job_part, writer, "encode", make) is not None
    return {"encoded": out, "complete": complete, "images": len(train)}
