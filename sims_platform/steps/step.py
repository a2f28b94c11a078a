"""The identifier of one step of a run: (iteration, stage, loop), one value wherever a step travels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """Iteration k's `stage` (a stage or a step that completes one: a reducer, import-base), in the self-consuming
    loop named `loop` (None: the shared pipeline). Run-level stages (encode, reference) are iteration 0's."""

    iteration: int
    stage: str
    loop: str | None = None

    def __post_init__(self) -> None:
        if self.iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {self.iteration}")

    def where(self) -> str:
        """'iter 1 generate', 'sims-dp50 iter 1 feed': how progress lines name the step."""
        return f"{self.loop + ' ' if self.loop else ''}iter {self.iteration} {self.stage}"

    def cli(self) -> str:
        """The `sims stage` arguments that run this step: 'generate --iteration 1 --loop sims-dp50'."""
        return f"{self.stage} --iteration {self.iteration}{' --loop ' + self.loop if self.loop else ''}"
