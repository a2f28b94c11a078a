"""Ctrl-C and SIGTERM during `sims run`: one line saying how to resume, the shell's exit code, no traceback, no
process of the run left behind; the rerun resumes and its terminal output is quiet (no NaN, dicts or MLflow
database notices)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from pipeline_support import tiny_config_dict

SIMS = [sys.executable, "-m", "sims_platform.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _as_from_a_terminal() -> None:
    """preexec_fn: SIGINT as a terminal's foreground job has it. A run started in the background of a shell
    inherits SIGINT ignored (and rightly keeps ignoring it), so a test run that way would never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_parts(proc: subprocess.Popen, timeout: float = 300) -> list[psutil.Process]:
    """The `sims stage` part processes of a running `sims run`, once both have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        kids = psutil.Process(proc.pid).children(recursive=True)
        if len(kids) >= 2:
            return kids
        time.sleep(0.2)
    raise AssertionError("the part processes never started")


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_stops_every_process_in_one_line_and_resumes(tmp_path, sig):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(str(tmp_path / "run"))))
    argv = SIMS + ["run", "--config", str(cfg), "--parts", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True, preexec_fn=_as_from_a_terminal)
    kids = _wait_for_parts(proc)
    time.sleep(3)  # the parts are inside their stage now
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C in a terminal signals the whole foreground process group
    else:
        proc.send_signal(sig)  # `kill`, or a pod's termination, signals the launcher alone
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-2000:] + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "again resumes from the completed stages" in err, err[-2000:]
    assert len([line for line in err.splitlines() if "stopped" in line]) == 1, err[-2000:]
    assert all(_gone(p) for p in kids)
    if sig == signal.SIGTERM:
        return
    # The rerun resumes and completes; the terminal shows progress and results only.
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "already complete" in done.stdout
    for text in (out + err, done.stdout + done.stderr):
        assert "Creating initial MLflow database tables" not in text
        assert "Updating database tables" not in text
    assert "nan" not in done.stdout.lower(), done.stdout
    assert "{'" not in done.stdout, done.stdout
    assert "eta nan" not in done.stderr
