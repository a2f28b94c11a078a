"""The fault-injection benchmark runs and its ruler can register a failure (docs/reliability.md)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import faults  # noqa: E402
from s3_support import s3_endpoint  # noqa: E402,F401 (fixture)


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


def test_the_s3_fault_proxy_injects_every_fault_and_the_platforms_s3_io_survives_them(s3_endpoint, monkeypatch):
    """Through the proxy at a 25% fault rate (a seeded, single-threaded sequence of draws), whole objects, one of
    them a multipart upload, are written and read back intact by the platform's S3 I/O."""
    import dataclasses
    import os

    import s3fs
    from s3_faults import FaultProxy
    from s3_support import s3_env

    from sims_platform.launch.servers import S3Endpoint
    from sims_platform.storage import fsio

    S3Endpoint(s3_endpoint).create_bucket("faults")
    with FaultProxy(s3_endpoint, rate=0.25, seed=3) as proxy:
        for k, v in s3_env(dataclasses.replace(S3Endpoint(s3_endpoint), url=proxy.url).url).items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        blob = os.urandom(11 * 2**20)
        sizes = [1 + 997 * i for i in range(40)] + [11 * 2**20]
        for i, n in enumerate(sizes):
            fsio.write_bytes(f"s3://faults/x{i}", blob[:n])
        assert all(fsio.read_bytes(f"s3://faults/x{i}") == blob[:n] for i, n in enumerate(sizes))
    s3fs.S3FileSystem.clear_instance_cache()
    assert all(proxy.counts[k] > 0 for k in ("500", "503", "slowdown", "reset-read", "reset-write")), proxy.counts


def test_the_kill_harness_attributes_each_instant_to_the_stage_that_runs(tmp_path):
    """A kill counts for the stage whose progress line came last; a phase's own tag (the feature network, the floor,
    drift) counts for its stage, and the launcher's lines for none."""
    log = tmp_path / "run.log"
    log.write_text("[local] starting\n")
    assert faults._current_step(log, 0) is None
    log.write_text("[digits-classifier] training\n[reference part 0/1] 5/10 img\n[real-vs-real floor] 3/6 img\n")
    assert faults._current_step(log, 0) == "reference"
    log.write_text("[iter 0 evaluate part 1/2] 5/10 img\n[drift] finetune-aux: weight distance 0.01\n"
                   "[local] iter 0 evaluate (2 parts): ok in 9 s\n")
    assert faults._current_step(log, 0) == "evaluate"
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write("[iter 1 train-base] 64/128 img\n")
    assert faults._current_step(log, offset) == "train-base"
