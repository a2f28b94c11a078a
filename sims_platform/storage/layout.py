"""Where each stage reads and writes under the run's storage root: one function per artifact."""

from __future__ import annotations

from dataclasses import dataclass
from sims_platform.steps import RUN_STAGES, STAGES, Step, row
from sims_platform.storage.fsio import join, normalize_uri

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
        """The folder of iteration k's stage (a step's: the stage it completes, storage.steps' table)."""
        r = row(row(stage).stage)
        if r.scope == "run":
            return join(self.root, r.folder or r.name)
        if self.loop is not None and (k > 0 or r.scope == "loop"):  # the loop's own; the rest of gen 0 is shared
            return join(self.loop_root(self.loop), f"iter-{k:02d}", r.name)
        return join(self.iteration(k), r.name)

    def of_step(self, step: Step) -> RunLayout:
        """This run's layout as the step sees it (its loop's view)."""
        return self.in_loop(step.loop)

    def producer(self, uri: str) -> Step | None:
        """The step whose folder holds uri, a path under this run's root (a local path without
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
        for name in RUN_STAGES:
            folder = (row(name).folder or name).split("/")
            if parts[:len(folder)] == folder:
                return Step(0, name)
        if len(parts) > 1 and parts[0].startswith("iter-") and parts[0][5:].isdigit() and parts[1] in STAGES:
            return Step(int(parts[0][5:]), parts[1], loop)
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

    def drift(self, k: int) -> str:
        """How far each aux model of iteration k moved from its base (stages/drift.py)."""
        return join(self.stage(k, "evaluate"), "drift.json")

    def snapshot(self, k: int, stage: str, images: int) -> str:
        return join(self.stage(k, stage), "snapshots", f"model-{images:010d}.pt")

    def shards(self, k: int, stage: str) -> str:
        """WebDataset shards of the generate (synthetic set), select-aux (shift's aux set) and feed (next
        generation's data) stages."""
        return join(self.stage(k, stage), "shards")
