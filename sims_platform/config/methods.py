"""The method table: each guidance method is one row, the one place it is defined.

A row names the networks the method guides with (each guide's source and lineage role), its cost in network
evaluations, how its denoiser is built from loaded networks and its weights, its config checks and its label.
Config, planning, evaluation, the feed and the reports read these rows; nothing else switches on a method's name.
It sits in the config package (the lowest layer) and imports nothing above it: a row builds its denoiser with the
denoiser kit its caller passes (sampling/guidance.py), and finds its guides through the run's layout passed in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# An arm's weights: a float for a one-guide method, one float per guide (in the row's order) otherwise.
Weights = float | tuple[float, ...]
# A network (torch.nn.Module) and a denoiser (sampling/guidance.py's Denoiser): this layer does not import torch.
Net = Any
Denoiser = Callable[[Any, Any, Any], Any]


class MethodConfig(Protocol):
    """What a row reads of its evaluate.methods entry (config/schema.py's MethodConfig; the schema imports this
    table, so the table names what it needs instead of importing the schema back)."""

    @property
    def name(self) -> str: ...

    @property
    def guide_images(self) -> int | None: ...


class PipelineConfig(Protocol):
    """What a row reads of the pipeline (config/schema.py's PipelineConfig): where its guides come from and what
    the base was trained with."""

    @property
    def pretrained(self) -> Any: ...

    @property
    def guide(self) -> Any: ...

    @property
    def train_base(self) -> Any: ...

    @property
    def data(self) -> Any: ...


class Layout(Protocol):
    """Where a run's models are (storage/layout.py's RunLayout)."""

    def model(self, k: int, stage: str) -> str: ...

    def snapshot(self, k: int, stage: str, images: int) -> str: ...


# ----------------------------------------------------------------------------
# Where a guide's network comes from


@dataclass(frozen=True)
class StageModel:
    """The model a training stage of the same iteration hands on (e.g. the aux fine-tuned on the synthetic set)."""

    stage: str
    takes_guide_images = False

    def trained_by(self, cfg: PipelineConfig) -> str | None:
        return self.stage

    def uri(self, cfg: PipelineConfig, method: MethodConfig, layout: Layout, k: int) -> str | None:
        return layout.model(k, self.stage)

    def check(self, cfg: PipelineConfig, method: MethodConfig) -> None:
        return None


@dataclass(frozen=True)
class EarlyBase:
    """A smaller or earlier base, the first of: the model `stage` trains when the config has a guide section (EDM2's
    recipe), pretrained.guide, the snapshot of train-base at the method's guide_images."""

    stage: str  # the training stage of a guide section
    takes_guide_images = True

    def trained_by(self, cfg: PipelineConfig) -> str | None:
        return self.stage if cfg.guide is not None else None

    def uri(self, cfg: PipelineConfig, method: MethodConfig, layout: Layout, k: int) -> str | None:
        if cfg.guide is not None:
            return layout.model(k, self.stage)
        if cfg.pretrained.guide:
            return cfg.pretrained.guide
        assert method.guide_images is not None  # check() made the config name a snapshot
        return layout.snapshot(k, "train-base", method.guide_images)

    def check(self, cfg: PipelineConfig, method: MethodConfig) -> None:
        if cfg.guide is not None:
            if method.guide_images is not None:
                raise ValueError(f"evaluate.methods {method.name}: guide_images names a train_base snapshot, but the "
                                 "guide section trains the guide; remove one of them")
            return
        if cfg.pretrained.guide is None and cfg.pretrained.base is not None:
            raise ValueError(f"evaluate.methods {method.name}: iteration 0's base is imported (pretrained.base), so "
                             "it has no training snapshots to guide with; set pretrained.guide (e.g. EDM2-XS) or "
                             "a guide section (a guide trained here)")
        if cfg.pretrained.guide is None and method.guide_images not in cfg.train_base.snapshots:
            raise ValueError(f"evaluate.methods {method.name}: guide_images must be one of train_base.snapshots "
                             f"{cfg.train_base.snapshots} (the early base checkpoint that guides), or "
                             "pretrained.guide or a guide section must name a guide")


@dataclass(frozen=True)
class BaseWithoutLabels:
    """The base itself with its class input dropped (classifier-free guidance): no network of its own."""

    takes_guide_images = False

    def trained_by(self, cfg: PipelineConfig) -> str | None:
        return None

    def uri(self, cfg: PipelineConfig, method: MethodConfig, layout: Layout, k: int) -> str | None:
        return None

    def check(self, cfg: PipelineConfig, method: MethodConfig) -> None:
        if cfg.train_base.label_dropout == 0:
            raise ValueError(f"evaluate.methods '{method.name}' needs train_base.label_dropout > 0 "
                             "(the base must also learn the unconditional model)")
        if cfg.data.label_dim == 0:
            raise ValueError(f"evaluate.methods '{method.name}' needs a class-conditional model (data.num_classes > 0 "
                             "and data.conditional true)")


Source = StageModel | EarlyBase | BaseWithoutLabels


@dataclass(frozen=True)
class Guide:
    """One network a method guides away from: the name of its weight, its source and its lineage role."""

    weight: str
    source: Source
    role: str | None  # sims.input.<role> in the lineage; None: no network of its own


AUX = Guide("sims", StageModel("finetune-aux"), "aux_model")
REAL_AUX = Guide("sims", StageModel("finetune-real-aux"), "real_aux_model")
EARLY_BASE = Guide("autoguidance", EarlyBase("train-guide"), "guide_model")
UNCONDITIONAL = Guide("cfg", BaseWithoutLabels(), None)


# ----------------------------------------------------------------------------
# How a row builds its denoiser


def _as_vector(w: Weights) -> tuple[float, ...]:
    return w if isinstance(w, tuple) else (float(w),)


def extrapolate(g: Any, base: Net, guides: Sequence[Net | None], w: Weights) -> Denoiser:
    """D = D_base + sum_i w_i (D_base - D_guide_i); a guide of None is the base without its labels.
    `g` is the denoiser kit (sampling/guidance.py)."""
    pairs = [(g.NetDenoiser(net) if net is not None else g.Unconditional(base), wi)
             for net, wi in zip(guides, _as_vector(w))]
    (first, w0), *more = pairs
    return g.Guided(g.NetDenoiser(base), first, w0, more)


def weight_space(g: Any, base: Net, guides: Sequence[Net | None], w: Weights) -> Denoiser:
    """Neon: one network with weights (1 + w) theta_base - w theta_guide."""
    (aux,) = guides
    return g.NetDenoiser(g.neon(base, aux, float(_as_vector(w)[0])))


class Interval:
    """A guidance interval (Kynkaanniemi et al. 2024): the guided denoiser for lo <= sigma <= hi, the base alone
    elsewhere, so a step outside evaluates one network."""

    def __init__(self, guided: Denoiser, base: Denoiser, lo: float, hi: float):
        self.guided, self.base, self.lo, self.hi = guided, base, lo, hi

    def inside(self, sigma: float) -> bool:
        return self.lo <= sigma <= self.hi

    def __call__(self, x: Any, sigma: Any, labels: Any) -> Any:
        # The sampler's sigma is one value per call: reading it to the host decides which networks run.
        return (self.guided if self.inside(float(sigma)) else self.base)(x, sigma, labels)


Build = Callable[[Any, Net, Sequence[Net | None], Weights], Denoiser]


# ----------------------------------------------------------------------------
# The rows


@dataclass(frozen=True)
class Method:
    """One guidance method: everything the platform needs to know about it."""

    name: str
    description: str
    guides: tuple[Guide, ...]
    build: Build
    networks: int  # network evaluations per denoiser call with every weight on
    shift_calibrated: bool = False  # shift's aux set is designed for exactly this method's formula

    @property
    def label(self) -> str:
        """Its name in tables and plots."""
        return self.name

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(g.weight for g in self.guides)

    @property
    def vector(self) -> bool:
        """Weights are a named vector (one w per guide), e.g. {sims: [...], autoguidance: [...]} in the config."""
        return len(self.guides) > 1

    def grid(self, weights: list[float] | dict[str, list[float]]) -> list[Weights]:
        """Every weight setting of a config's grid: the floats, or the product of the per-guide grids."""
        if isinstance(weights, list):
            return list(weights)
        return list(itertools.product(*(weights[n] for n in self.weight_names)))

    def check(self, cfg: PipelineConfig, method: MethodConfig) -> None:
        """Cross-field rules of one evaluate.methods entry (a ValueError names the field)."""
        for g in self.guides:
            g.source.check(cfg, method)
        if method.guide_images is not None and not any(g.source.takes_guide_images for g in self.guides):
            raise ValueError(f"evaluate.methods {method.name}: guide_images is only for methods guided by an early "
                             f"base ({', '.join(m.name for m in METHODS.values() if m.takes_guide_images)})")

    @property
    def takes_guide_images(self) -> bool:
        return any(g.source.takes_guide_images for g in self.guides)

    def stages(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The training stages whose models it guides with in this config."""
        return tuple(st for g in self.guides if (st := g.source.trained_by(cfg)) is not None)

    def guide_uris(self, cfg: PipelineConfig, method: MethodConfig, layout: Layout,
                   k: int) -> list[str | None]:
        """Each guide's network URI at iteration k (None: the base without labels)."""
        return [g.source.uri(cfg, method, layout, k) for g in self.guides]

    def networks_at(self, w: Weights | None = None) -> int:
        """Network evaluations per denoiser call at these weights: a guide whose weight is 0 is not evaluated."""
        if w is None:
            return self.networks
        return min(self.networks, 1 + sum(x != 0 for x in _as_vector(w)))

    def nfe_per_sample(self, steps: int, w: Weights | None = None) -> int:
        """Network evaluations per sample with a Heun sampler of `steps` steps (2 steps - 1 denoiser calls)."""
        return self.networks_at(w) * (2 * steps - 1)

    def nfe_in_interval(self, sigmas: Sequence[float], w: Weights | None, interval: Sequence[float]) -> int:
        """Network evaluations per sample when guidance acts only inside `interval` (the base alone elsewhere),
        for a sampler that calls its denoiser at `sigmas` (sampling/heun.py call_sigmas)."""
        lo, hi = interval
        return sum(self.networks_at(w) if lo <= s <= hi else 1 for s in sigmas)

    def denoiser(self, kit: Any, base: Net, guides: Sequence[Net | None], w: Weights,
                 interval: Sequence[float] | None = None) -> Denoiser:
        """The arm's denoiser, built with the denoiser kit (sampling/guidance.py); with a guidance interval, the
        base network alone outside it."""
        guided = self.build(kit, base, guides, w)
        if interval is None:
            return guided
        lo, hi = interval
        return Interval(guided, kit.NetDenoiser(base), lo, hi)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sims", "D_base + w (D_base - D_aux), aux fine-tuned on the synthetic set", (AUX,), extrapolate,
           networks=2, shift_calibrated=True),
    Method("neon", "one network with weights (1+w) theta_base - w theta_aux", (AUX,), weight_space, networks=1),
    Method("sims-real-aux", "the control: an aux fine-tuned the same way on real training data", (REAL_AUX,),
           extrapolate, networks=2),
    Method("autoguidance", "a bad version of the base as guide: the guide section's trained guide, else "
           "pretrained.guide, else an early base snapshot", (EARLY_BASE,), extrapolate,
           networks=2),
    Method("cfg", "the unconditional base as guide", (UNCONDITIONAL,), extrapolate, networks=2),
    Method("sims+autoguidance", "D_base + w_s (D_base - D_aux) + w_a (D_base - D_guide): sims and autoguidance "
           "at once, weights {sims: [...], autoguidance: [...]}", (AUX, EARLY_BASE), extrapolate, networks=3),
]}

NAMES: tuple[str, ...] = tuple(METHODS)


def method(name: str) -> Method:
    """The row of a method name (a KeyError lists the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown guidance method '{name}' (known: {', '.join(NAMES)})") from None


def is_base(w: Weights) -> bool:
    """Every weight 0: the base network alone, whatever the method."""
    return all(x == 0 for x in _as_vector(w))


def w_key(w: Weights) -> str:
    """A weight setting as summary.json and the arm keys write it: '0.25', or '0.25,1.0' for a vector."""
    return ",".join(str(float(x)) for x in _as_vector(w))


def parse_w_key(key: str) -> Weights | None:
    """w_key's inverse: the weights of a summary.json key, or None when the key is no weight setting."""
    try:
        parts = [float(x) for x in str(key).split(",")]
    except ValueError:
        return None
    return parts[0] if len(parts) == 1 else tuple(parts)


def metric_tag(name: str) -> str:
    """A method's name as MLflow metric names and arm keys may hold it ('+' is not allowed there)."""
    return name.replace("+", "_")


def w_metric(name: str, metric: str, w: Weights) -> tuple[str, int]:
    """(MLflow metric name, step) of a per-w value: step = 1000 w for one weight; a vector is in the name."""
    if isinstance(w, tuple):
        return f"{metric_tag(name)}.{metric}_w_{'_'.join(str(float(x)) for x in w)}", 0
    return f"{metric_tag(name)}.{metric}", int(round(float(w) * 1000))


def curves(label: str, by_key: dict[str, Any]) -> dict[str, dict[float, Any]]:
    """Plot lines of one method's per-w values: one line against w; for a weight vector, one line against its first
    weight per setting of the others (all-zero, the base, belongs to no line of its own)."""
    out: dict[str, dict[float, Any]] = {}
    for key, v in by_key.items():
        w = parse_w_key(key)
        if w is None:
            continue
        if not isinstance(w, tuple):
            out.setdefault(label, {})[w] = v
        elif not is_base(w):
            rest = ", ".join(f"{x:g}" for x in w[1:])
            out.setdefault(f"{label} ({rest})", {})[w[0]] = v
    return out
