"""The stage table: every stage and step of the platform, declared once, and what every launcher reads of it.

A row says what a stage is (its scope, how it runs, its reducer), what it reads (earlier stages' outputs, config
settings) and where its function lives. The layout, the plan, provenance, the local runner, the local cluster,
the Kubernetes workloads, their progress and settings defaults, and the chart's values schema all read this table;
nothing else lists stages. The function is named by its import path and bound by the stages package when the step
runs, so this module imports nothing but the config: every layer can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sims_platform.config.schema import Loop, PipelineConfig

# "run": once per run (iteration 0's, shared by every loop); "iteration": once per iteration, and in a
# self-consuming loop once per generation >= 1 (generation 0 is the shared pipeline's); "loop": like "iteration",
# but each loop has its own from generation 0 on (its feed).
Scope = Literal["run", "iteration", "loop"]
# How the step runs on every launcher: "training" is torchrun on N nodes (the training backend's PyTorchJob or
# TrainJob on a cluster); "array" is a job array whose parts own disjoint slices (an Indexed Job); "single" is one
# plain process (a single-pod Job).
Kind = Literal["training", "array", "single"]
# Whether the step is in the plan of iteration k (of a loop; None: the shared pipeline).
When = Callable[[PipelineConfig, int, "Loop | None"], bool]


def _always(cfg: PipelineConfig, k: int, loop: Loop | None) -> bool:
    return True


@dataclass(frozen=True)
class StageRow:
    """One stage (or a step that completes one: a reducer, import-base) of the platform."""

    name: str
    about: str  # one line: what the step does (docs, the chart's values schema)
    scope: Scope
    kind: Kind
    function: str  # 'module:function' in sims_platform.stages: (inputs, run_id) -> result dict
    reads: tuple[str, ...] = ()  # the stages whose outputs it reads, when they are in the plan (provenance)
    settings: tuple[str, ...] = ()  # dotted config paths its results depend on (provenance)
    reducer: str | None = None  # the step that merges this job array's parts and completes the stage
    completes: str | None = None  # the stage whose folder, record and MLflow run this step writes
    when: When = _always  # in the plan of iteration k (steps that complete a stage follow it instead)
    local_parts: bool = False  # `sims run` splits it into runtime.local_parts processes (its work dwarfs a start)
    writes_shards: bool = False  # a job array whose parts own shards (the local cluster's shard writers)
    section: str | None = None  # a training stage's config section (PipelineConfig.<section>: TrainConfig)
    seed_salt: int = 0  # a training stage's offset of its training seed, so no two stages draw the same batches
    pods: Mapping[str, Any] = field(default_factory=dict)  # its pods on a cluster when the chart does not say
    cpu_only: bool = False  # never needs an accelerator (its process ignores runtime.device)
    folder: str | None = None  # a run-level stage's folder under the run's root, when not its name
    base_data: bool = False  # a training stage on iteration k's base data (for k > 0 with earlier feeds: provenance)

    def training_section(self) -> str:
        """The config section of a training stage's settings; a ValueError for any other step."""
        if self.section is None:
            raise ValueError(f"'{self.name}' is not a training stage")
        return self.section

    @property
    def stage(self) -> str:
        """The stage whose folder, completion record and MLflow run this step completes (usually itself)."""
        return self.completes or self.name


def _base_imported(cfg: PipelineConfig, k: int, loop: Loop | None) -> bool:
    """Iteration 0's base comes from pretrained.base (shared by every loop); every other base is trained."""
    return loop is None and k == 0 and cfg.pretrained.base is not None


def _sims_model(cfg: PipelineConfig, k: int, loop: Loop | None) -> bool:
    """The synthetic set and the aux: the shared pipeline's, and a loop's only in its SIMS arm."""
    return loop is None or loop.arm == "sims"


def _feeds(cfg: PipelineConfig, k: int, loop: Loop | None) -> bool:
    """A feed when a later iteration (generation) trains on synthetic data."""
    if loop is not None:
        return cfg.loop is not None and k < cfg.loop.generations - 1
    return k < cfg.iterations.count - 1 and cfg.iterations.train_data != "real"


MODEL = ("seed", "data", "encoder", "network")  # what every model-based stage depends on

TABLE: tuple[StageRow, ...] = (
    StageRow("encode", "the real images as VAE latents (latent models only)", "run", "array",
             "sims_platform.stages.encode:encode", settings=("data", "encoder"),
             when=lambda cfg, k, loop: cfg.encoder.kind == "latent", writes_shards=True),
    StageRow("reference", "the reference images' feature statistics, as parts", "run", "array",
             "sims_platform.stages.reference:reference", reducer="reference-reduce",
             folder="features/reference",  # next to the feature networks it is computed with
             settings=("data", "evaluate.features", "evaluate.features_seed", "evaluate.inception_weights",
                       "evaluate.precision_recall", "evaluate.batch_size",
                       "evaluate.num_samples", "evaluate.repeats"),  # the last two: the real-vs-real floor's sets
             when=lambda cfg, k, loop: not cfg.evaluate.reference),
    StageRow("reference-reduce", "merges the reference parts into the statistics evaluate compares with", "run",
             "single", "sims_platform.stages.reference:reference_reduce", completes="reference"),
    StageRow("train-base", "trains iteration k's base", "iteration", "training",
             "sims_platform.stages.training:train_base", reads=("encode",),
             settings=MODEL + ("train_base", "iterations"), section="train_base", base_data=True,
             when=lambda cfg, k, loop: not _base_imported(cfg, k, loop)),
    # Nothing is trained, so it needs no GPU, torchrun or gang: a few cores and room for the file, its weights and
    # the network at once (EDM2-XXL, the largest: ~3 GB as an fp16 pickle, ~6 GB per fp32 copy).
    StageRow("import-base", "iteration 0's base from pretrained.base, checked against network and data",
             "iteration", "single", "sims_platform.stages.import_base:import_base", completes="train-base",
             settings=("data", "encoder", "network", "pretrained.base"), when=_base_imported, cpu_only=True,
             pods={"resources": {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi"}}}),
    # EDM2's autoguidance: a smaller network on the base's data for a fraction of its images (the guide section).
    StageRow("train-guide", "trains autoguidance's guide on iteration k's base data (the guide section)",
             "iteration", "training", "sims_platform.stages.training:train_guide", reads=("encode",),
             settings=("seed", "data", "encoder", "guide", "iterations"), section="guide", seed_salt=314159,
             base_data=True,
             # a method's row guides with this stage's model (the method table)
             when=lambda cfg, k, loop: loop is None and any("train-guide" in m.row.stages(cfg)
                                                            for m in cfg.evaluate.methods)),
    StageRow("generate", "the base's synthetic set, as shard-writing parts", "iteration", "array",
             "sims_platform.stages.sampling:generate", reads=("train-base",), settings=MODEL + ("generate",),
             when=_sims_model, local_parts=True, writes_shards=True),
    StageRow("select-aux", "resamples the synthetic set per class into the aux set (shift only)", "iteration",
             "single", "sims_platform.stages.select_aux:select_aux", reads=("generate",),
             settings=MODEL + ("generate", "shift"),
             when=lambda cfg, k, loop: loop is None and cfg.shift is not None),
    StageRow("finetune-aux", "fine-tunes the base on the synthetic set into the aux", "iteration", "training",
             "sims_platform.stages.training:finetune_aux", reads=("encode", "train-base", "generate", "select-aux"),
             settings=MODEL + ("finetune_aux", "shift"), section="finetune_aux", seed_salt=104729,
             when=_sims_model),
    StageRow("finetune-real-aux", "the control: fine-tunes the base on the real training split", "iteration",
             "training", "sims_platform.stages.training:finetune_real_aux", reads=("encode", "train-base"),
             settings=MODEL + ("finetune_aux",), section="finetune_aux", seed_salt=209459,
             # a method's row guides with this stage's model (the method table)
             when=lambda cfg, k, loop: loop is None and any("finetune-real-aux" in m.row.stages(cfg)
                                                            for m in cfg.evaluate.methods)),
    StageRow("evaluate", "every method's samples' feature statistics, as parts", "iteration", "array",
             "sims_platform.stages.evaluate:evaluate", reducer="evaluate-reduce",
             reads=("encode", "reference", "train-base", "train-guide", "finetune-aux",
                    "finetune-real-aux"),
             settings=MODEL + ("evaluate", "shift", "pretrained.guide"), local_parts=True),
    StageRow("evaluate-reduce", "merges the evaluate parts into FID, precision, recall and the summary",
             "iteration", "single", "sims_platform.stages.evaluate:evaluate_reduce", completes="evaluate"),
    StageRow("feed", "the next iteration's synthetic training data, guided at the selected w", "loop", "single",
             "sims_platform.stages.sampling:feed", reads=("train-base", "train-guide", "finetune-aux", "evaluate"),
             settings=MODEL + ("generate", "evaluate", "iterations"), when=_feeds),
)

_ROWS = {r.name: r for r in TABLE}
STAGE_NAMES = tuple(_ROWS)  # every step, in table order (what `sims stage` and the chart's `stages:` accept)
RUN_STAGES = tuple(r.name for r in TABLE if r.scope == "run" and r.completes is None)
STAGES = tuple(r.name for r in TABLE if r.scope != "run" and r.completes is None)  # folders of an iteration
ARRAYS = tuple(r.name for r in TABLE if r.kind == "array")


def row(name: str) -> StageRow:
    """The table's row of a stage or step; a ValueError names the known ones."""
    try:
        return _ROWS[name]
    except KeyError:
        raise ValueError(f"unknown stage '{name}', expected one of {', '.join(STAGE_NAMES)}") from None


def stage_of(step: str) -> str:
    """The stage whose folder, completion record and MLflow run a step completes (itself for most steps)."""
    return row(step).stage


def steps_of(stage: str) -> tuple[str, ...]:
    """The steps a planned stage runs as, in order: itself, then its reducer if it has one."""
    r = row(stage)
    return (r.name,) + ((r.reducer,) if r.reducer else ())


def base_step(cfg: PipelineConfig, k: int) -> str:
    """The step that provides the shared pipeline's iteration k base: import-base for iteration 0 when
    pretrained.base names a network, else train-base (a loop's generations >= 1 always train)."""
    return next(r.name for r in TABLE if r.stage == "train-base" and r.when(cfg, k, None))


def planned(cfg: PipelineConfig, k: int, loop: Loop | None = None) -> list[str]:
    """The stages of iteration k in run order (table order): run-level stages once before iteration 0; in a loop,
    generation 0 adds only the loop's own ("loop" scope) stages, the rest of it being shared."""
    if loop is not None and k == 0:
        scopes: tuple[Scope, ...] = ("loop",)
    elif loop is not None or k > 0:
        scopes = ("iteration", "loop")
    else:
        scopes = ("run", "iteration", "loop")
    reducers = {r.reducer for r in TABLE}
    return [r.name for r in TABLE if r.scope in scopes and r.name not in reducers and r.when(cfg, k, loop)]
