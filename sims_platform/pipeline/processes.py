"""The `sims stage ...` processes of one step on this machine, launched the way the cluster launches them: a job
array as its parts together, any command list together, each stopped when the launcher is. The local runner
(`sims run` with runtime.local_parts > 1) runs its sampling job arrays through it; the local cluster
(launch.processes) runs every step through it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sims_platform.steps import Step
from sims_platform.utils.interrupt import QUIET_ENV, ignore_sigint

SIMS = [sys.executable, "-m", "sims_platform.cli"]
STOP_GRACE_S = 30.0  # how long stopped processes get to record their state before they are killed


class StepFailed(RuntimeError):
    """A process of a step exited with an error (its own output says why)."""


def stage_argv(step: Step, config: str, overrides: list[str]) -> list[str]:
    """`sims stage ...` arguments (after the program) that run the step on this config with these overrides."""
    argv = ["stage", step.stage, "--config", config, "--iteration", str(step.iteration)] + \
        (["--loop", step.loop] if step.loop else [])
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


def run_parts(step: Step, config: str, overrides: list[str], env: dict[str, str], parts: int,
              tag: str = "[local]") -> None:
    """A job-array stage's parts 0..parts-1 together, each `sims stage <stage> --index i --count parts` (a
    one-part array reduces its own result; more parts leave that to the stage's reducer)."""
    argv = stage_argv(step, config, overrides)
    run_together([SIMS + argv + ["--index", str(i), "--count", str(parts)] for i in range(parts)], env,
                 f"{step.where()} ({parts} part{'s' if parts > 1 else ''})", tag)


