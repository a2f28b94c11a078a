"""import-base: iteration 0's base from an existing network (pretrained.base) instead of training one.

One process reads the network (an EDM2 pickle, read without running its code, or a model file), checks that it is
the network the config describes, and writes it where train-base writes its model; train-base's completion record
and MLflow run are this step's too (its row in the stage table completes train-base), so the stages after it cannot tell the difference.
Nothing is trained, so every launcher runs it as one plain process, never under torchrun (on a cluster: a single-pod
Job without GPUs).
"""

from __future__ import annotations

from sims_platform.config import ConfigError
from sims_platform.models.pretrained import check_encoder, mismatches, read_network
from sims_platform.stages.context import StageContext
from sims_platform.storage import fsio


def import_base(ctx: StageContext, run_id: str) -> dict:
    uri = ctx.cfg.pretrained.base
    assert uri and ctx.iteration == 0, "run_stage runs import-base only where the plan does (base_step_error)"
    if not fsio.exists(uri):
        raise FileNotFoundError(f"pretrained.base: {uri} not found")
    rec = read_network(uri)
    try:
        check_encoder(rec, ctx.cfg.encoder, "pretrained.base")  # trained on the latents this config makes
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if rec.kwargs is not None:  # a file that names its architecture must name ours
        diff = mismatches(rec.kwargs, ctx.models.network_kwargs())
        if diff:
            raise ConfigError(f"pretrained.base: {uri} is not the network this config describes (network, "
                              f"data): {'; '.join(diff)}")
    net = ctx.models.build()
    try:
        net.load_state_dict(rec.state_dict)
    except RuntimeError as err:
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ConfigError(f"pretrained.base: the weights in {uri} do not fit the config's network: {why}") from None
    out_uri = ctx.layout.model(0, "train-base")
    images = rec.images or 0
    ctx.lineage.log_params(run_id, {"pretrained": uri, "images": images})
    ctx.lineage.link(run_id, inputs={"pretrained": uri}, outputs={"model": out_uri})
    ctx.models.save(out_uri, net, images, stage="train-base", iteration=0, source=uri)
    return {"model": out_uri, "images": images, "pretrained": uri}
