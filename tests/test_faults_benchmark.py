"""The fault-injection benchmark runs and its ruler can register a failure (docs/reliability.md)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

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
    drift) counts for its stage, and the launcher's lines for none. Its point is the step's latest done/total."""
    log = tmp_path / "run.log"
    log.write_text("[local] starting\n")
    assert faults._position(log, 0) == (None, None)
    log.write_text("[digits-classifier] training\n[reference part 0/1] 5/10 img (50%)\n[real-vs-real floor] 3/6 img\n")
    assert faults._position(log, 0) == ("reference", 0.5)
    log.write_text("[iter 0 evaluate part 1/2] resumed at 5/10 img\n[drift] finetune-aux: weight distance 0.01\n"
                   "[local] iter 0 evaluate (2 parts): ok in 9 s\n")
    assert faults._position(log, 0) == ("evaluate", 0.5)
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write("[iter 1 train-base] 64/128 img\n")
    assert faults._position(log, offset) == ("train-base", 0.5)
    with log.open("a") as f:
        f.write("[iter 1 train-base] done 128/128 img (100%)\n[iter 1 generate] writing\n")
    assert faults._position(log, offset) == ("generate", None)
    offset = log.stat().st_size  # a restart: the steps it skips are not running
    with log.open("a") as f:
        f.write("[iter 1 generate] already complete (file:///run/iter-01/generate/_SUCCESS.json); skipping\n")
    assert faults._position(log, offset) == (None, None)
    with log.open("a") as f:
        f.write("[iter 1 finetune-aux] 8/32 img\n")
    assert faults._position(log, offset) == ("finetune-aux", 0.25)
    assert faults._steps_in(log) == ["evaluate", "train-base", "generate", "finetune-aux"]


class _Draws:
    """A stand-in for random.Random whose uniform(a, b) returns a + share * (b - a), share from a list."""

    def __init__(self, *shares: float) -> None:
        self.shares = list(shares)

    def uniform(self, a: float, b: float) -> float:
        return a + self.shares.pop(0) * (b - a)


def test_the_early_kills_land_near_each_steps_start_whatever_its_progress():
    plan = faults.KillPlan(_Draws(0.5), early=1, late=0, gap=1.0, early_s=8.0)
    assert not plan.due("train-base", None, 0.0)  # the step's first line: the kill comes 4 s on
    assert not plan.due("train-base", 0.99, 3.9)
    assert plan.due("train-base", 0.99, 4.0)
    plan.counts["train-base"] = 1
    plan.restart()
    assert not any(plan.due("train-base", f, t) for t, f in enumerate((0.0, 0.5, 1.0)))  # had its kill: undisturbed


def test_a_late_kill_lands_at_a_drawn_point_of_what_is_left_of_the_step():
    plan = faults.KillPlan(_Draws(0.9, 0.5, 0.5), early=1, late=1, gap=1.0, early_s=8.0)
    plan.counts["train-base"] = 1  # its early kill is done
    assert not plan.due("train-base", None, 0.0)  # no progress line yet: a no-progress instant, 7.2 s on
    assert not plan.due("train-base", 0.2, 1.0)  # the first line: the point is 0.2 + 0.5 * 0.8 = 0.6
    assert plan.target == pytest.approx(0.6) and plan.deadline is None
    assert not plan.due("train-base", 0.5, 2.0)
    assert not plan.due("train-base", 0.7, 3.0)  # past the point: the kill lands before the next line...
    assert plan.deadline == 3.5 and not plan.due("train-base", 0.7, 3.4)
    assert plan.due("train-base", 0.7, 3.5)  # ...at 3.5 s


def test_a_late_kill_reaches_a_steps_last_writes():
    plan = faults.KillPlan(_Draws(0.0, 0.99), early=0, late=1, gap=1.0, early_s=8.0)
    assert not plan.due("generate", 0.0, 0.0)  # the point: 0.99 of the way
    assert not plan.due("generate", 0.98, 5.0)
    assert plan.due("generate", 1.0, 6.0)  # done before the drawn point: killed while it writes its results


def test_a_step_that_ends_before_its_instant_is_killed_as_the_next_begins():
    plan = faults.KillPlan(_Draws(0.5, 0.5), early=20, late=0, gap=1.0, early_s=8.0)
    assert not plan.due("evaluate", None, 0.0)  # a reducer printing no progress: killed within 8 s, at 4 s...
    assert plan.due("feed", None, 2.0)  # ...but it ended at 2 s: the kill lands as the next step begins


def test_an_early_kill_comes_at_the_latest_as_a_phase_writes_its_results():
    """A step of a few seconds (the feature network's training) is killed by its `done` line if its drawn instant
    is later: an instant after its end would let it complete."""
    plan = faults.KillPlan(_Draws(0.9), early=20, late=0, gap=1.0, early_s=8.0)
    assert not plan.due("reference", None, 0.0)  # the instant: 7.2 s on
    assert not plan.due("reference", 0.67, 2.0)
    assert plan.due("reference", 1.0, 3.0)


def test_a_kill_after_a_steps_completion_record_is_told_apart_by_the_resumed_run(tmp_path):
    """The resumed run skips the steps that completed, in order: the last it skips is the one that completed last."""
    log = tmp_path / "run.log"
    log.write_text("[iter 0 reference] 3/6 img\n")
    offset = log.stat().st_size
    assert faults._last_skipped(log, offset) is None
    with log.open("a") as f:
        f.write("[iter 0 reference] already complete (file:///r/_SUCCESS.json); skipping\n"
                "[iter 0 train-base] already complete (file:///r/t/_SUCCESS.json); skipping\n"
                "[iter 0 generate] 0/8 img\n")
    assert faults._last_skipped(log, offset) == "train-base"
    # A stage whose parts completed is not complete: the kill came as it merged them.
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write("[iter 0 generate] already complete (file:///r/g/_SUCCESS.json); skipping\n"
                "[iter 0 evaluate] already complete (file:///r/e/parts/part-00000-of-00002.json); skipping\n"
                "[iter 0 evaluate] real vs real (floor): FID 16.5\n")
    assert faults._last_skipped(log, offset) == "generate"
