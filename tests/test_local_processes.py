"""`sims run` with runtime.local_processes > 1: each stage launched as processes (torchrun training, job-array
parts and a reducer) against local storage and the local SQLite MLflow store; and the launcher's stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline_support import tiny_config_dict

SIMS = [sys.executable, "-m", "sims_platform.cli"]


@pytest.mark.slow
def test_sims_run_launches_each_stage_as_processes(tmp_path):
    root = tmp_path / "run"
    cfg = tmp_path / "pipeline.yaml"
    d = tiny_config_dict(str(root))
    d["evaluate"]["methods"] = [{"name": "sims", "weights": [1.0]}, {"name": "neon", "weights": [0.5]}]
    cfg.write_text(yaml.safe_dump(d))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}
    proc = subprocess.run(SIMS + ["run", "--config", str(cfg), "--processes", "2"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"each stage as 2 processes ({threads} CPU thread(s) each)" in out
    for line in ("iter 0 reference (2 parts): ok", "iter 0 reference-reduce: ok", "iter 0 train-base (torchrun x2): ok",
                 "iter 0 generate (2 parts): ok", "iter 0 finetune-aux (torchrun x2): ok",
                 "iter 0 evaluate (2 parts): ok", "iter 0 evaluate-reduce: ok"):
        assert line in out, line
    summary = json.loads((root / "summary.json").read_text())
    (row,) = summary["iterations"]
    assert set(row["methods"]) == {"sims", "neon"}
    per_arm = json.loads((root / "iter-00" / "evaluate" / "results.json").read_text())["per_arm"]
    assert set(per_arm) == {"base", "sims_w-1.0", "neon_w-0.5"}
    # Both parts of the array wrote their own part of the evaluation, and the reducer merged them.
    parts = {p.name for p in (root / "iter-00" / "evaluate" / "parts").glob("*/part-*.pt")}
    assert parts == {"part-00000-of-00002.pt", "part-00001-of-00002.pt"}

    # One run tree in the local store, every run ended: the processes logged into the runs the launcher opened.
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=100)}
    assert {"tiny", "iter-0", "reference", "iter-0/train-base", "iter-0/generate", "iter-0/finetune-aux",
            "iter-0/evaluate"} <= set(runs)
    assert len(runs) == len({r.info.run_id for r in runs.values()})  # no run created twice by racing processes
    assert {name: r.info.status for name, r in runs.items()} == {name: "FINISHED" for name in runs}
    assert runs["tiny"].info.run_id == summary["mlflow_run_id"]
    ev = runs["iter-0/evaluate"]
    assert ev.data.metrics["eval_parts"] == 2 and ev.data.tags["mlflow.parentRunId"] == runs["iter-0"].info.run_id

    # A second `sims run` finds every stage complete and launches nothing.
    again = subprocess.run(SIMS + ["run", "--config", str(cfg), "--processes", "2"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((root / "summary.json").read_text())["iterations"] == summary["iterations"]


def test_a_failing_stage_process_ends_sims_run_with_a_clear_error(tmp_path):
    """Each process of the step reports the bad input in one line; `sims run` names the step and how to resume."""
    (tmp_path / "images" / "0").mkdir(parents=True)
    (tmp_path / "images" / "0" / "a.png").write_bytes(b"not used: the class folders are checked first")
    cfg = tmp_path / "pipeline.yaml"
    d = tiny_config_dict(str(tmp_path / "run"))
    d["data"] = {"source": "folder", "path": str(tmp_path / "images"), "resolution": 8, "channels": 1,
                 "num_classes": 10}
    cfg.write_text(yaml.safe_dump(d))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(SIMS + ["run", "--config", str(cfg), "--processes", "2"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors[:2] == [f"error: data.num_classes is 10 but {tmp_path / 'images'} has 1 class folders: ['0']"] * 2
    assert errors[2].startswith("error: iter 0 reference (2 parts) failed (process 0 exit code 2, process 1 exit "
                                "code 2)") and "resumes" in errors[2]


def test_a_stopped_launcher_stops_its_processes(tmp_path):
    """SIGTERM to `sims run` (a pod's or a shell's kill) ends the processes of the running step too."""
    pids = tmp_path / "pids"
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from sims_platform.launch.processes import run_together
        child = [sys.executable, "-c", "import os, time; open({str(pids)!r} + str(os.getpid()), 'w'); time.sleep(120)"]
        run_together([child, child], {{}}, "sleepers")
    """))
    launcher = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("pids*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(p.name[len("pids"):]) for p in tmp_path.glob("pids*")]
    assert len(children) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(60) == 128 + signal.SIGTERM
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
