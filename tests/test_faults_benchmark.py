"""The fault-injection benchmark runs and its ruler can register a failure (docs/reliability.md)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import faults  # noqa: E402


def test_fuzzing_every_reader_finds_no_crash(tmp_path):
    assert faults.main(["fuzz", "--examples", "25", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "faults.json").read_text())
    assert {t["target"] for t in report["targets"]} == {
        "config loader", "shard reader", "manifest parser", "torch weights-only loader", "EDM2 restricted unpickler"}
    for t in report["targets"]:
        assert t["inputs"] == 25 and t["crashed"] == t["hung"] == t["code executed"] == 0, t


def test_the_ruler_counts_crashes_hangs_and_code_execution(tmp_path):
    """A reader that runs pickles, and one that raises a bare KeyError, are caught by the same counting."""
    canary = tmp_path / "canary"
    tally = faults.Tally("unsafe")

    class Touch:
        def __reduce__(self):
            return (Path.touch, (canary,))

    faults.observe(tally, lambda: pickle.loads(pickle.dumps(Touch())), hang_s=5, canary=canary)
    faults.observe(tally, lambda: {}["missing"], hang_s=5)
    faults.observe(tally, lambda: None, hang_s=-1)
    assert (tally.executed, tally.crashed, tally.hung, tally.accepted) == (1, 1, 1, 1)
    assert "KeyError" in next(iter(tally.crash_kinds))
