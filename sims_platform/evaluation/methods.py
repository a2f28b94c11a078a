"""The networks of an evaluation's arms: each method's guides (read from the method table) loaded once each."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cached_property

from torch import nn

from sims_platform.config.schema import PipelineConfig
from sims_platform.evaluation.plan import Arm
from sims_platform.config.methods import is_base
from sims_platform.sampling import guidance
from sims_platform.sampling.guidance import Denoiser, NetDenoiser
from sims_platform.storage.layout import RunLayout


def model_inputs(cfg: PipelineConfig, layout: RunLayout, k: int, methods: Iterable[str]) -> dict[str, str]:
    """Lineage inputs of an evaluation over these methods: the base and every guide network, keyed by role."""
    out = {"base_model": layout.model(k, "train-base")}
    for name in methods:
        m = cfg.evaluate.method(name)
        for guide, uri in zip(m.row.guides, m.row.guide_uris(cfg, m, layout, k)):
            if guide.role is not None and uri is not None:
                out[guide.role] = uri
    return out


class Networks:
    """Loads each network once per process (with `load`) and builds the denoiser of any arm from them."""

    def __init__(self, cfg: PipelineConfig, layout: RunLayout, k: int, load: Callable[[str], nn.Module]):
        self.cfg, self.layout, self.k, self.load = cfg, layout, k, load
        self._nets: dict[str, nn.Module] = {}
        self._denoisers: dict[Arm, Denoiser] = {}  # built by the method table's rows

    def _net(self, uri: str) -> nn.Module:
        if uri not in self._nets:
            self._nets[uri] = self.load(uri)
        return self._nets[uri]

    @cached_property
    def base(self) -> nn.Module:
        return self._net(self.layout.model(self.k, "train-base"))

    def guides(self, method: str) -> list[nn.Module | None]:
        """A method's guide networks in its row's order (None: the base without labels)."""
        m = self.cfg.evaluate.method(method)
        return [None if uri is None else self._net(uri) for uri in m.row.guide_uris(self.cfg, m, self.layout, self.k)]

    def denoiser(self, arm: Arm) -> Denoiser:
        """The sampler's denoiser for this arm; the base arm (and any all-zero weights) is the base network alone."""
        if arm.method == "base" or is_base(arm.w):
            return NetDenoiser(self.base)
        if arm not in self._denoisers:  # e.g. neon's merged network is built once per w
            m = self.cfg.evaluate.method(arm.method)
            # The table is torch-free: its denoisers are typed as plain callables.
            built = m.row.denoiser(guidance, self.base, self.guides(arm.method), arm.w, m.guidance_interval)
            self._denoisers[arm] = built  # type: ignore[assignment]
        return self._denoisers[arm]
