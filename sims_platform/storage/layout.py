"""Where each stage reads and writes under the run's storage root: one function per artifact."""

from __future__ import annotations

from dataclasses import dataclass

from sims_platform.storage.fsio import join, normalize_uri

# Stages of one iteration, in order; `evaluate-reduce` merges the evaluate job array's parts;
# `finetune-real-aux` is the control of the comparison (the aux fine-tune on real training data); `select-aux`
# (distribution shifting only) resamples the synthetic set per class into the aux fine-tuning set.
STAGES = ("train-base", "generate", "select-aux", "finetune-aux", "finetune-real-aux", "evaluate", "evaluate-reduce",
          "feed")
# Stages of the run as a whole (not per iteration): `encode` turns the real images into VAE latents once;
# `reference` streams the held-out images through the feature network once (a job array; `reference-reduce`
# merges its parts into the statistics evaluate compares with).
RUN_STAGES = ("encode", "reference", "reference-reduce")
# Stages that train a network (torchrun on N nodes: a PyTorchJob or TrainJob on a cluster); the rest are
# job arrays or single processes. Every launcher reads this one list.
TRAINING_STAGES = ("train-base", "finetune-aux", "finetune-real-aux")
# Job arrays whose parts a reducer merges (float64 statistics); the reducer completes the stage in its folder,
# after every part. Every launcher reads this one table.
REDUCERS = {"reference": "reference-reduce", "evaluate": "evaluate-reduce"}


@dataclass(frozen=True)
class RunLayout:
    root: str

    @classmethod
    def of(cls, root: str) -> RunLayout:
        return cls(normalize_uri(root))

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
        return join(self.root, "summary.json")

    @property
    def features(self) -> str:
        """Cached FID feature network and real-data reference statistics."""
        return join(self.root, "features")

    # iteration / stage level -----------------------------------------------
    def iteration(self, k: int) -> str:
        return join(self.root, f"iter-{k:02d}")

    def stage(self, k: int, stage: str) -> str:
        stage = next((s for s, reducer in REDUCERS.items() if reducer == stage), stage)
        if stage == "reference":  # next to the feature networks it is computed with
            return join(self.features, "reference")
        if stage in RUN_STAGES:
            return join(self.root, stage)
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}', expected one of {', '.join(STAGES + RUN_STAGES)}")
        return join(self.iteration(k), stage)

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
