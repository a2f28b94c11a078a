"""benchmarks/mad_loop.py's across-seed statistics: the paired gap and drift are per-seed differences, and a
report can be rebuilt from records.json without running anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
mad_loop = pytest.importorskip("mad_loop")


def records() -> list[dict]:
    """3 seeds whose bases differ by far more than anything a loop does: FID = base + drift (+ SIMS offset)."""
    out = []
    for seed, base in enumerate([20.0, 120.0, 60.0]):
        rows = []
        for arm, offset in (("standard", 0.0), ("sims", -2.0 - seed)):
            for g in range(3):
                fid = base + offset + g * (5.0 if arm == "standard" else 3.0)
                rows.append({"arm": arm, "feed_fraction": 0.5, "generation": g, "w": 0.25 if arm == "sims" else 0,
                             "fid": fid, "fid_sd": 1.0, "precision": 0.7, "recall": 0.9})
        out.append({"seed": seed, "rows": rows, "loop": {"arms": ["standard", "sims"], "feed_fractions": [0.5],
                                                         "generations": 3, "accumulate": False,
                                                         "train_data": "real+synthetic", "method": "sims"}})
    return out


def test_gap_and_drift_are_paired_within_each_seed():
    _, verdict = mad_loop.report(records(), "cmd")
    # standard - sims at generation g: (2 + seed) + 2g on every seed: paired, the bases cancel
    assert verdict["gap"]["dp50/g2"]["values"] == [6.0, 7.0, 8.0]
    assert verdict["gap"]["dp50/g2"]["excludes_0"]
    assert verdict["drift"]["standard-dp50/g2"]["values"] == [10.0, 10.0, 10.0]
    assert verdict["drift"]["sims-dp50/g1"]["values"] == [3.0, 3.0, 3.0]
    assert mad_loop.plot(records())[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_rewrites_the_report_from_records(tmp_path):
    (tmp_path / "records.json").write_text(json.dumps({"records": records(), "command": "python bench --seeds 0 1 2"}))
    done = subprocess.run([sys.executable, str(BENCH / "mad_loop.py"), "--out", str(tmp_path), "--report-only"],
                          capture_output=True, text=True, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "Command: `python bench --seeds 0 1 2`" in report and "seeds [0, 1, 2]" in report
    assert (tmp_path / "fid_vs_generation.png").read_bytes()[:4] == b"\x89PNG"
    missing = subprocess.run([sys.executable, str(BENCH / "mad_loop.py"), "--out", str(tmp_path / "none"),
                              "--report-only"], capture_output=True, text=True, cwd=BENCH.parent)
    assert missing.returncode != 0 and "records.json not found" in missing.stderr and "Traceback" not in missing.stderr
