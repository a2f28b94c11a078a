"""One step of the plan as processes on this machine, launched the way the cluster launches it (the step's kind in
the stage table): a training stage under torchrun (gloo on the CPU), a job array as parts then its reducer, any
other step as one process. Each process runs `sims stage ...`, the command a pod runs; `sims local-cluster`
launches every step through it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from sims_platform.launch.servers import free_port
from sims_platform.pipeline.processes import SIMS, run_parts, run_together, stage_argv
from sims_platform.steps import Step, row


@dataclass(frozen=True)
class Processes:
    """How many processes each kind of step runs as."""

    train: int = 1    # torchrun --nproc_per_node
    writers: int = 1  # parts of a job array that writes shards (generate, encode)
    arrays: int = 1   # parts of the other job arrays (reference, evaluate)


def run_step(step: Step, config: str, overrides: list[str], env: dict[str, str], n: Processes,
             tag: str = "[local]") -> None:
    """Run one step of the plan as its row's kind says: training under torchrun, a job array as parts (then its
    reducer), a single step as one process. A count of 1 runs the stage as one plain process."""
    r = row(step.stage)
    argv = stage_argv(step, config, overrides)
    if r.kind == "training" and n.train > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                    str(n.train), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    "-m", "sims_platform.cli"]
        run_together([torchrun + argv], env, f"{step.where()} (torchrun x{n.train})", tag)
    elif r.kind == "array":
        parts = n.writers if r.writes_shards else n.arrays
        run_parts(step, config, overrides, env, parts, tag)
        if r.reducer and parts > 1:
            reducer = Step(step.iteration, r.reducer, step.loop)
            run_together([SIMS + stage_argv(reducer, config, overrides)], env, reducer.where(), tag)
    else:
        run_together([SIMS + argv], env, step.where(), tag)
