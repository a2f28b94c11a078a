"""`sims run` with runtime.local_parts > 1: generate and evaluate as job-array parts in their own processes, the
rest in the `sims run` process, against local storage and the local SQLite MLflow store; the launcher's stopping."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline_support import tiny_config_dict

from sims_platform.config import config_from_dict
from sims_platform.pipeline.processes import cpu_threads
from sims_platform.pipeline.provenance import step_provenance
from sims_platform.steps import Step
from sims_platform.storage.layout import RunLayout

SIMS = [sys.executable, "-m", "sims_platform.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _sims_run(cfg, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(SIMS + ["run", "--config", str(cfg), *extra], capture_output=True, text=True, env=_env(),
                          timeout=900)


@pytest.mark.slow
def test_sims_run_samples_in_parts_and_agrees_with_one_process(tmp_path):
    d = tiny_config_dict(str(tmp_path / "parts"))
    d["evaluate"]["methods"] = [{"name": "sims", "weights": [1.0]}, {"name": "neon", "weights": [0.5]}]
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(d))
    proc = _sims_run(cfg, "--parts", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = os.environ.get("OMP_NUM_THREADS") or cpu_threads(2)  # a thread count the user set is kept
    assert f"generate and evaluate as 2 processes ({threads} CPU thread(s) each)" in proc.stdout
    assert "iter 0 generate (2 parts): ok" in proc.stdout and "iter 0 evaluate (2 parts): ok" in proc.stdout
    root = tmp_path / "parts"
    parts = {p.name for p in (root / "iter-00" / "evaluate" / "parts").glob("*/part-*.pt")}
    assert parts == {"part-00000-of-00002.pt", "part-00001-of-00002.pt"}  # both parts sampled, the reducer merged
    assert json.loads((root / "iter-00" / "generate" / "_SUCCESS.json").read_text())["parts"] == 2

    # One run tree in the local store, every run ended; the parts logged into the runs `sims run` opened.
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=100)}
    assert {"tiny", "iter-0", "reference", "iter-0/train-base", "iter-0/generate", "iter-0/finetune-aux",
            "iter-0/evaluate"} == set(runs)
    assert {name: r.info.status for name, r in runs.items()} == {name: "FINISHED" for name in runs}
    summary = json.loads((root / "summary.json").read_text())
    assert runs["tiny"].info.run_id == summary["mlflow_run_id"]
    assert runs["iter-0/evaluate"].data.metrics["eval_parts"] == 2

    # The sampling stages again, in one process, from the same base model: the same results up to float rounding
    # (a sample depends only on its seed, not on the part that drew it).
    base = root / "iter-00" / "train-base" / "model.pt"
    base_written = base.stat().st_mtime_ns
    one = _sims_run(cfg, "--redo-from", "generate")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "(2 parts)" not in one.stdout and base.stat().st_mtime_ns == base_written
    assert json.loads((root / "iter-00" / "generate" / "_SUCCESS.json").read_text())["parts"] == 1
    alone = json.loads((root / "summary.json").read_text())["iterations"][0]["methods"]
    for name, res in summary["iterations"][0]["methods"].items():
        for w, fid in res["fid"].items():
            assert fid == pytest.approx(alone[name]["fid"][w], rel=1e-5, abs=1e-6), (name, w)

    # A second `sims run` finds every stage complete and launches nothing.
    again = _sims_run(cfg, "--parts", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(2 parts)" not in again.stdout and "already complete" in again.stdout


@pytest.mark.parametrize("cores, set_by_user, each", [(4, None, "2"), (2, None, "1"), (1, None, "1"),
                                                      (4, "3", "3")])
def test_the_parts_share_the_cores_unless_the_user_set_a_thread_count(tiny_cfg, monkeypatch, capsys, cores,
                                                                       set_by_user, each):
    from sims_platform.pipeline import runner
    envs: list[str] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    if set_by_user is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", set_by_user)
    monkeypatch.setattr(runner, "run_stage", lambda ctx, stage: None)
    monkeypatch.setattr(runner, "is_done", lambda ctx, stage: False)
    monkeypatch.setattr(runner, "close_complete_runs", lambda ctx: None)
    monkeypatch.setattr(runner, "run_parts", lambda step, config, extra, env, n: envs.append(env["OMP_NUM_THREADS"]))
    cfg = tiny_cfg.model_copy(update={"runtime": tiny_cfg.runtime.model_copy(update={"local_parts": 2})})
    runner._run_with_parts(cfg, RunLayout.of(cfg.storage.root), None)
    assert envs and set(envs) == {each}
    assert f"as 2 processes ({each} CPU thread(s) each)" in capsys.readouterr().out


class _Payload:
    """Unpickling this runs os.system (creates the marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_failing_part_ends_sims_run_with_a_clear_error(tmp_path):
    """Each part reports the refused file in one line; `sims run` names the step that failed and how to resume."""
    root, marker = tmp_path / "run", tmp_path / "pwned"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(str(root))))
    # A base model planted in the run's folder, with a completion record so train-base is skipped.
    base = root / "iter-00" / "train-base"
    base.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"ema": _Payload(str(marker)), "images": 0}, buf)
    (base / "model.pt").write_bytes(buf.getvalue())
    # The record even carries the digest of this config's settings (computable by anyone who has the config), so
    # train-base is skipped and the parts meet the planted file itself.
    prov = step_provenance(config_from_dict(tiny_config_dict(str(root))), Step(0, "train-base"))
    (base / "_SUCCESS.json").write_text(json.dumps({"result": {"model": str(base / "model.pt")},
                                                    "provenance": prov.record()}))
    proc = _sims_run(cfg, "--parts", "2")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all("train-base/model.pt: refused to load" in e for e in errors[:2]), errors
    assert errors[2].startswith("error: iter 0 generate (2 parts) failed (process 0 exit code 2, process 1 exit "
                                "code 2)") and "resumes" in errors[2]
    assert not marker.exists()


def test_a_stopped_launcher_stops_its_processes(tmp_path):
    """SIGTERM to `sims run` (a pod's or a shell's kill) ends the processes of the running step too."""
    pids = tmp_path / "pids"
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from sims_platform.pipeline.processes import run_together
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
