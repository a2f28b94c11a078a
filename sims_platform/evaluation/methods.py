"""Each guidance method's networks and denoiser: which models an arm loads, and how it combines them."""

from __future__ import annotations

from functools import cached_property
from typing import Protocol

from torch import nn

from sims_platform.config.schema import PipelineConfig
from sims_platform.evaluation.plan import Arm
from sims_platform.sampling.guidance import Denoiser, Guided, NetDenoiser, Unconditional, neon
from sims_platform.storage.layout import RunLayout


class _Loader(Protocol):
    def sampling(self, uri: str) -> nn.Module: ...


class StageContext(Protocol):
    """What the methods read of a step: its config, run folders, iteration and a loader of sampling networks."""

    cfg: PipelineConfig
    layout: RunLayout
    iteration: int
    models: _Loader

# The training stage whose model.pt is each method's guide (cfg guides with the base itself).
GUIDE_STAGE = {"sims": "finetune-aux", "neon": "finetune-aux", "sims-real-aux": "finetune-real-aux"}


def guide_uri(ctx: StageContext, method: str) -> str | None:
    """The model a method extrapolates away from (None: cfg, whose guide is the base without labels)."""
    k, layout = ctx.iteration, ctx.layout
    if method in GUIDE_STAGE:
        return layout.model(k, GUIDE_STAGE[method])
    if method == "autoguidance":
        if ctx.cfg.pretrained.guide:
            return ctx.cfg.pretrained.guide
        images = ctx.cfg.evaluate.method("autoguidance").guide_images
        assert images is not None  # validated: autoguidance names its snapshot
        return layout.snapshot(k, "train-base", images)
    return None


# How the lineage names each guide (sims.input.<role>): neon extrapolates away from the same aux as sims.
GUIDE_ROLE = {"sims": "aux_model", "neon": "aux_model", "sims-real-aux": "real_aux_model",
              "autoguidance": "guide_model"}


def model_inputs(ctx: StageContext, methods: list[str]) -> dict[str, str]:
    """Lineage inputs of an evaluation over these methods: the base and every guide, keyed by role."""
    out = {"base_model": ctx.layout.model(ctx.iteration, "train-base")}
    for m in methods:
        uri = guide_uri(ctx, m)
        if uri is not None:
            out[GUIDE_ROLE[m]] = uri
    return out


class Networks:
    """Loads each network once per process and builds the denoiser of any arm from them."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self._guides: dict[str, nn.Module] = {}
        self._neon: dict[float, nn.Module] = {}

    @cached_property
    def base(self) -> nn.Module:
        return self.ctx.models.sampling(self.ctx.layout.model(self.ctx.iteration, "train-base"))

    def guide(self, method: str) -> nn.Module:
        uri = guide_uri(self.ctx, method)
        if uri is None:
            return self.base
        if uri not in self._guides:
            self._guides[uri] = self.ctx.models.sampling(uri)
        return self._guides[uri]

    def denoiser(self, arm: Arm) -> Denoiser:
        """The sampler's denoiser for this arm; the base arm (and any w = 0) is the base network alone."""
        if arm.method == "base" or arm.w == 0:
            return NetDenoiser(self.base)
        if arm.method == "neon":
            if arm.w not in self._neon:
                self._neon[arm.w] = neon(self.base, self.guide("neon"), arm.w)
            return NetDenoiser(self._neon[arm.w])
        if arm.method == "cfg":
            return Guided(NetDenoiser(self.base), Unconditional(self.base), arm.w)
        return Guided(NetDenoiser(self.base), NetDenoiser(self.guide(arm.method)), arm.w)
