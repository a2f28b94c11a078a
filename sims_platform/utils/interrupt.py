"""Ctrl-C and SIGTERM as one line and a documented exit code instead of a traceback.

Both signals raise Stopped (a KeyboardInterrupt, so a stage's MLflow run ends KILLED, not FAILED), which unwinds
through the launchers' `finally` blocks (they stop their child processes) up to the CLI, which prints one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

# Set in the environment of the processes a launcher starts: the launcher reports the interruption once for all
# of them, so they stop without a line of their own.
QUIET_ENV = "SIMS_LAUNCHED"


class Stopped(KeyboardInterrupt):
    """The process received SIGINT or SIGTERM; exit_code is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def what(self) -> str:
        return "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "stopped (SIGTERM)"


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise Stopped (in the main thread; elsewhere signals are left alone). A
    SIGINT ignored at start (a launcher starts its processes so: it stops them itself, with SIGTERM) stays
    ignored. The previous handlers come back on exit (the CLI also runs inside other programs, e.g. tests)."""
    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _raise)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_sigint() -> None:
    """preexec_fn of a launcher's child processes: Ctrl-C in the terminal reaches the whole process group, but
    only the launcher acts on it (it stops its children with SIGTERM), so each child neither races it nor prints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def launched() -> bool:
    """Whether a launcher started this process (and reports an interruption itself)."""
    return os.environ.get(QUIET_ENV) == "1"


def report(err: Stopped, resume: str | None) -> int:
    """Print the one line for an interruption (unless a launcher reports it) and return the exit code."""
    if not launched():
        tail = f"; {resume}" if resume else ""
        print(f"{err.what}: every process of this command was stopped{tail}", file=sys.stderr, flush=True)
    return err.exit_code
