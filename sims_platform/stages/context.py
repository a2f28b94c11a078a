"""What a stage function receives: the step it runs, its part of a job array, the config and layout as the step
sees them, lineage, the device, and two focused helpers: its data (RunData) and its model files (ModelIO)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import torch

from sims_platform.config.schema import Loop, PipelineConfig
from sims_platform.stages.model_io import ModelIO
from sims_platform.stages.run_data import RunData
from sims_platform.steps import Step
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import Lineage
from sims_platform.utils.accel import apply_tf32, resolve_device


@dataclass(frozen=True)
class Part:
    """This process's part of a job array: index of count (JOB_COMPLETION_INDEX of completions on a cluster)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"--index {self.index} is outside 0..{self.count - 1} (--count {self.count})")

    def owns(self, j: int) -> bool:
        """Whether item j (a shard, a block) is this part's: j mod count == index."""
        return j % self.count == self.index


@dataclass
class StageContext:
    """The inputs of one step's process, assembled by its launcher."""

    cfg: PipelineConfig
    layout: RunLayout
    iteration: int
    lineage: Lineage
    # None: from runtime.device (cuda:LOCAL_RANK when a GPU is visible, else the CPU); see utils/accel.py
    requested_device: InitVar[torch.device | str | None] = None
    part: int = 0   # this worker's index in a job-array stage (JOB_COMPLETION_INDEX in an Indexed Job)
    parts: int = 1  # how many workers share the stage
    # A self-consuming loop's stage (config `loop`): layout and config become the loop's view (RunLayout.in_loop,
    # PipelineConfig.for_loop); None: the shared pipeline.
    loop: Loop | None = None
    pipeline_cfg: PipelineConfig = field(init=False)  # the whole pipeline's config (cfg is a loop's view of it)
    device: torch.device = field(init=False)  # where this stage's networks and tensors live
    data: RunData = field(init=False)
    models: ModelIO = field(init=False)

    def __post_init__(self, requested_device: torch.device | str | None) -> None:
        Part(self.part, self.parts)  # a bad --index/--count fails here, before anything runs
        self.pipeline_cfg = self.cfg
        if self.loop is not None:
            self.layout = self.layout.in_loop(self.loop.name)
            self.cfg = self.cfg.for_loop(self.loop)
        self.device = torch.device(requested_device) if requested_device is not None else \
            resolve_device(self.cfg.runtime.device)
        apply_tf32(self.cfg.runtime.tf32)
        self.data = RunData(self.cfg, self.layout, self.iteration, self.device, self.loop)
        self.models = ModelIO(self.cfg, self.device, self.data.shape)

    def step(self, stage: str) -> Step:
        """This process's step of `stage`."""
        return Step(self.iteration, stage, self.loop_name)

    @property
    def job_part(self) -> Part:
        return Part(self.part, self.parts)

    @property
    def loop_name(self) -> str | None:
        return self.loop.name if self.loop is not None else None
