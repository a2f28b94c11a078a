"""Where each stage reads and writes under the run's storage root: one function per artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sims_platform.storage.fsio import join, normalize_uri

# Iteration 0's base from an existing network: one process reads pretrained.base, checks it is the config's
# network and writes it as train-base's model; nothing is trained, so it needs no GPU, torchrun or gang.
IMPORT_BASE = "import-base"
# Stages of one iteration, in order; `evaluate-reduce` merges the evaluate job array's parts;
# `finetune-real-aux` is the control of the comparison (the aux fine-tune on real training data); `select-aux`
# (distribution shifting only) resamples the synthetic set per class into the aux fine-tuning set; `import-base`
# replaces train-base for iteration 0 when pretrained.base names a network (pipeline.plan.base_step).
STAGES = ("train-base", IMPORT_BASE, "generate", "select-aux", "finetune-aux", "finetune-real-aux", "evaluate",
          "evaluate-reduce", "feed")
# Stages of the run as a whole (not per iteration): `encode` turns the real images into VAE latents once;
# `reference` streams the held-out images through the feature network once (a job array; `reference-reduce`
# merges its parts into the statistics evaluate compares with).
RUN_STAGES = ("encode", "reference", "reference-reduce")
# Job arrays whose parts a reducer merges (float64 statistics); the reducer completes the stage in its folder,
# after every part. Every launcher reads this one table.
REDUCERS = {"reference": "reference-reduce", "evaluate": "evaluate-reduce"}
# Steps that complete another stage: they write its folder, completion record and MLflow run, so whatever reads
# that stage (the next stages, resumption, lineage queries) does not depend on which step produced it.
STAGE_OF = {reducer: stage for stage, reducer in REDUCERS.items()} | {IMPORT_BASE: "train-base"}

StepKind = Literal["training", "array", "single"]
# How each step runs, on every launcher: "training" is torchrun on N nodes (the training backend's PyTorchJob or
# TrainJob on a cluster); "array" is a job array whose parts own disjoint slices (an Indexed Job); "single" is one
# plain process (a single-pod Job). Every launcher reads this one table.
STEP_KINDS: dict[str, StepKind] = {
    "encode": "array", "reference": "array", "reference-reduce": "single",
    "train-base": "training", IMPORT_BASE: "single", "generate": "array", "select-aux": "single",
    "finetune-aux": "training", "finetune-real-aux": "training", "evaluate": "array", "evaluate-reduce": "single",
    "feed": "single",
}
TRAINING_STAGES = tuple(s for s, kind in STEP_KINDS.items() if kind == "training")  # derived: never listed twice


def stage_of(step: str) -> str:
    """The stage whose folder, completion record and MLflow run a step completes (itself for most steps)."""
    return STAGE_OF.get(step, step)


@dataclass(frozen=True)
class RunLayout:
    """The run's folders; with `loop` set, as that self-consuming loop's stages see them: generation 0 is the
    shared one (iter-00/, computed once for every loop) except the loop's own feed, and generations >= 1 live
    under loops/<loop>/iter-KK/. Run-level files (config, run record, features, encode) are the run's."""

    root: str
    loop: str | None = None

    @classmethod
    def of(cls, root: str) -> RunLayout:
        return cls(normalize_uri(root))

    def in_loop(self, loop: str | None) -> RunLayout:
        """This run's layout for one loop's stages (None: the shared pipeline's)."""
        return RunLayout(self.root, loop)

    # run level ------------------------------------------------------------
    @property
    def run_record(self) -> str:
        """JSON with the MLflow parent run id, so stages started separately join the same run."""
        return join(self.root, "run.json")

    @property
    def config(self) -> str:
        return join(self.root, "pipeline.yaml")

    @property
    def summary(self) -> str:
        """Evaluation rows per iteration: the shared pipeline's, or (in a loop) its generations >= 1."""
        return join(self.loop_root(self.loop), "summary.json") if self.loop else join(self.root, "summary.json")

    # self-consuming loops ----------------------------------------------------
    @property
    def loops(self) -> str:
        """Every loop's own stages, and the experiment's results beside them."""
        return join(self.root, "loops")

    def loop_root(self, loop: str) -> str:
        return join(self.loops, loop)

    @property
    def loop_results(self) -> str:
        """Per loop and generation: FID, precision, recall (JSON rows)."""
        return join(self.loops, "results.json")

    @property
    def loop_table(self) -> str:
        return join(self.loops, "results.md")

    @property
    def loop_plot(self) -> str:
        """FID vs generation, a line per loop (arm x |D_p|)."""
        return join(self.loops, "fid_vs_generation.png")

    @property
    def features(self) -> str:
        """Cached FID feature network and real-data reference statistics."""
        return join(self.root, "features")

    # iteration / stage level -----------------------------------------------
    def iteration(self, k: int) -> str:
        return join(self.root, f"iter-{k:02d}")

    def stage(self, k: int, stage: str) -> str:
        stage = stage_of(stage)
        if stage == "reference":  # next to the feature networks it is computed with
            return join(self.features, "reference")
        if stage in RUN_STAGES:
            return join(self.root, stage)
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}', expected one of {', '.join(STAGES + RUN_STAGES)}")
        if self.loop is not None and (k > 0 or stage == "feed"):  # the loop's own; the rest of gen 0 is shared
            return join(self.loop_root(self.loop), f"iter-{k:02d}", stage)
        return join(self.iteration(k), stage)

    def producer(self, uri: str) -> tuple[str, int, str | None] | None:
        """(stage, iteration, loop) whose folder holds uri, a path under this run's root (a local path without
        file:// too); None for anything else. Used to say which stage writes a missing input."""
        root = self.root.rstrip("/") + "/"
        local = root[len("file://"):] if root.startswith("file://") else None
        if local is not None and uri.startswith(local):
            uri = "file://" + uri
        if not uri.startswith(root):
            return None
        parts, loop = uri[len(root):].split("/"), None
        if parts[0] == "loops" and len(parts) > 3:
            loop, parts = parts[1], parts[2:]
        if parts[:2] == ["features", "reference"]:
            return "reference", 0, None
        if parts[0] in RUN_STAGES:
            return parts[0], 0, None
        if len(parts) > 1 and parts[0].startswith("iter-") and parts[0][5:].isdigit() and parts[1] in STAGES:
            return parts[1], int(parts[0][5:]), loop
        return None

    def done_marker(self, k: int, stage: str) -> str:
        return join(self.stage(k, stage), "_SUCCESS.json")

    def part_marker(self, k: int, stage: str, index: int, count: int) -> str:
        """Completion record of one part of a job-array stage (index of count)."""
        return join(self.stage(k, stage), "parts", f"part-{index:05d}-of-{count:05d}.json")

    @property
    def encoded(self) -> str:
        """The real data as model-space (latent) shards written by the encode stage."""
        return join(self.stage(0, "encode"), "shards")

    def checkpoints(self, k: int, stage: str) -> str:
        return join(self.stage(k, stage), "checkpoints")

    def model(self, k: int, stage: str) -> str:
        """The final (EMA) network a training stage hands to the next stages."""
        return join(self.stage(k, stage), "model.pt")

    def snapshot(self, k: int, stage: str, images: int) -> str:
        return join(self.stage(k, stage), "snapshots", f"model-{images:010d}.pt")

    def shards(self, k: int, stage: str) -> str:
        """WebDataset shards of the generate (synthetic set), select-aux (shift's aux set) and feed (next
        generation's data) stages."""
        return join(self.stage(k, stage), "shards")
