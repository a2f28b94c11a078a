"""One step of the plan as processes on this machine, launched the way the cluster launches it: a training stage
under torchrun (gloo on the CPU), a job-array stage (reference, generate, evaluate) as parts then its reducer, any
other step (import-base, select-aux, feed) as one process. Each process runs `sims stage ...`, the command a pod
runs.

`sims local-cluster` launches every step through it; `sims run` with runtime.local_parts > 1 launches its sampling
job arrays (generate, evaluate) as parts through it (run_parts) and runs everything else itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sims_platform.launch.servers import free_port
from sims_platform.pipeline.plan import Step
from sims_platform.storage.layout import REDUCERS, STEP_KINDS
from sims_platform.utils.interrupt import QUIET_ENV, ignore_sigint

# The job arrays this launcher splits into parts (encode, of latent models only, runs as one process here).
ARRAYS = ("reference", "generate", "evaluate")
SIMS = [sys.executable, "-m", "sims_platform.cli"]
STOP_GRACE_S = 30.0  # how long stopped processes get to record their state before they are killed


class StepFailed(RuntimeError):
    """A process of a step exited with an error (its own output says why)."""


@dataclass(frozen=True)
class Processes:
    """How many processes each kind of stage runs as."""

    train: int = 1     # torchrun --nproc_per_node
    generate: int = 1  # generate's job-array parts (shard writers)
    arrays: int = 1    # reference and evaluate parts


def stage_argv(stage: str, config: str, k: int, overrides: list[str], loop: str | None = None) -> list[str]:
    argv = ["stage", stage, "--config", config, "--iteration", str(k)] + (["--loop", loop] if loop else [])
    for o in overrides:
        argv += ["--set", o]
    return argv


def cpu_threads(processes: int) -> str:
    """OMP_NUM_THREADS for each of `processes` processes sharing this machine's cores (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return str(max(1, cores // processes))


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """In the main thread, SIGTERM raises SystemExit, so a launcher that is stopped stops its processes too (the
    `sims` command has its own handler, utils.interrupt; this covers other callers)."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then SIGKILL what has not exited after STOP_GRACE_S."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_together(commands: list[list[str]], env: dict[str, str], what: str, tag: str = "[local]") -> None:
    """Start the commands together (one job array or one torchrun), wait for all; StepFailed names the processes
    that failed. Interrupted or stopped, it stops its processes before it returns."""
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    try:
        with _sigterm_raises():
            # The children leave Ctrl-C to this launcher (which stops them) and print nothing when stopped.
            child_env = env | {QUIET_ENV: "1"}
            quiet = None if sys.platform == "win32" else ignore_sigint
            procs = [subprocess.Popen(c, env=child_env, preexec_fn=quiet) for c in commands]
            codes = [p.wait() for p in procs]
    finally:
        _stop(procs)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        which = ", ".join(f"process {i} exit code {c}" for i, c in bad)
        raise StepFailed(f"{what} failed ({which}); its output is above")
    print(f"{tag} {what}: ok in {time.time() - t0:.0f} s", flush=True)


def _what(step: Step) -> str:
    return f"{step.loop_name + ' ' if step.loop_name else ''}iter {step.iteration}"


def run_parts(step: Step, config: str, overrides: list[str], env: dict[str, str], parts: int,
              tag: str = "[local]") -> None:
    """A job-array stage's parts 0..parts-1 together, each `sims stage <stage> --index i --count parts` (a
    one-part array reduces its own result; more parts leave that to the stage's reducer)."""
    argv = stage_argv(step.stage, config, step.iteration, overrides, step.loop_name)
    run_together([SIMS + argv + ["--index", str(i), "--count", str(parts)] for i in range(parts)], env,
                 f"{_what(step)} {step.stage} ({parts} part{'s' if parts > 1 else ''})", tag)


def run_step(step: Step, config: str, overrides: list[str], env: dict[str, str], n: Processes,
             tag: str = "[local]") -> None:
    """Run one step of the plan as storage.layout.STEP_KINDS says: training under torchrun, a job array as parts
    (then its reducer), a single step as one process. A count of 1 runs the stage as one plain process."""
    k, stage, loop = step.iteration, step.stage, step.loop_name
    argv = stage_argv(stage, config, k, overrides, loop)
    if STEP_KINDS[stage] == "training" and n.train > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                    str(n.train), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    "-m", "sims_platform.cli"]
        run_together([torchrun + argv], env, f"{_what(step)} {stage} (torchrun x{n.train})", tag)
    elif stage in ARRAYS:
        parts = n.generate if stage == "generate" else n.arrays
        run_parts(step, config, overrides, env, parts, tag)
        if stage in REDUCERS and parts > 1:
            run_together([SIMS + stage_argv(REDUCERS[stage], config, k, overrides, loop)], env,
                         f"{_what(step)} {REDUCERS[stage]}", tag)
    else:
        run_together([SIMS + argv], env, f"{_what(step)} {stage}", tag)
