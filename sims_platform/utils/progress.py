"""Progress for long work: one line per interval on stderr, readable in a terminal and in pod logs alike."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """Reports `desc: done/total unit (pct) rate, eta` at most every `interval` seconds and at the end."""

    def __init__(self, desc: str, total: int, done: int = 0, unit: str = "it", interval: float | None = None):
        self.desc, self.total, self.unit = desc, max(int(total), 1), unit
        self.interval = float(os.environ.get("SIMS_PROGRESS_INTERVAL", 10.0)) if interval is None else interval
        self.start_done = self.done = done
        self.t0 = self.last = time.monotonic()
        self.extra: dict[str, object] = {}  # floats, or 0-d tensors read back only when a line is printed
        if done:
            self._emit(prefix="resumed at ")

    def update(self, done: int, **extra: object) -> None:
        self.done = done
        self.extra = extra
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit()

    def close(self) -> None:
        self._emit(prefix="done ")

    def _emit(self, prefix: str = "") -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        # Until work has been done there is no rate: "eta ?" rather than "0.0 it/s eta nan".
        speed = f"{rate:.1f} {self.unit}/s eta {(self.total - self.done) / rate:.0f}s" if rate > 0 else "eta ?"
        extra = "".join(f" {k}={v:.4g}" for k, v in self.extra.items())
        line = (f"[{self.desc}] {prefix}{self.done}/{self.total} {self.unit} "
                f"({100 * self.done / self.total:.0f}%) {speed}{extra}")
        print(line, file=sys.stderr, flush=True)
