"""The platform's stages, declared once (the stage table), and the identifier of one step of a run."""

from sims_platform.steps.step import Step
from sims_platform.steps.table import (ARRAYS, RUN_STAGES, STAGE_NAMES, STAGES, StageRow, base_step, planned, row,
                                       stage_of, steps_of)

__all__ = ["ARRAYS", "RUN_STAGES", "STAGES", "STAGE_NAMES", "StageRow", "Step", "base_step", "planned", "row",
           "stage_of", "steps_of"]
