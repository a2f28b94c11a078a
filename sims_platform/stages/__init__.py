"""The SIMS stages as functions with explicit inputs and outputs (URIs); launchers only decide where they run.

Which function runs a step is its row's in the stage table (steps.table): stage_function imports it when the step
runs, so a launcher that only plans or renders never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from sims_platform.steps import row

if TYPE_CHECKING:
    from sims_platform.stages.context import StageContext

StageFunction = Callable[["StageContext", str], dict]


def stage_function(step: str) -> StageFunction:
    """The function of a step's row ('module:function'), imported now."""
    module, _, name = row(step).function.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["StageFunction", "stage_function"]
