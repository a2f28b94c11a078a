"""Stage pods run with a read-only root filesystem: HOME, TMPDIR and the run's storage root are the only places a
run may write (the chart mounts emptyDirs at HOME and /tmp, and the run's volume or bucket). A whole tiny
pipeline runs in a child process, started as the image starts it, whose audit hook records every write
elsewhere: files opened for writing, folders made, files renamed, linked or removed, SQLite databases opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline_support import tiny_config_dict

AUDITED_RUN = r"""
import json, os, runpy, sys

allowed = [os.path.realpath(p) for p in sys.argv[1].split(os.pathsep)]
report, config = sys.argv[2], sys.argv[3]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> the (path, dir_fd) argument positions of what it writes
PATH_EVENTS = {"os.mkdir": [(0, 2)], "os.rename": [(0, 2), (1, 3)], "os.remove": [(0, 1)], "os.rmdir": [(0, 1)],
               "os.link": [(1, 3)], "os.symlink": [(1, 2)], "os.truncate": [(0, None)], "os.chmod": [(0, 2)],
               "shutil.rmtree": [(0, 1)], "shutil.copyfile": [(1, None)], "shutil.move": [(0, None), (1, None)]}
writes = []


def outside(path, dir_fd=None):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None  # a file descriptor, opened (and checked) earlier
    p = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(p):  # relative to an open folder (shutil.rmtree's way)
        p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
    p = os.path.realpath(p)
    return None if p == os.devnull or any(p == a or p.startswith(a + os.sep) for a in allowed) else p


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
        if writing and outside(path):
            writes.append([event, outside(path)])
    elif event in PATH_EVENTS:
        for i, fd in PATH_EVENTS[event]:
            where = outside(args[i], args[fd] if fd is not None and fd < len(args) else None)
            if where:
                writes.append([event, where])
    elif event == "sqlite3.connect" and args[0] != ":memory:" and outside(args[0]):
        writes.append([event, outside(args[0])])


sys.addaudithook(hook)
sys.argv = ["sims", "run", "--config", config]
code = 0
try:
    runpy.run_module("sims_platform.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
sys.dont_write_bytecode = True
with open(report, "w") as f:
    json.dump({"code": code, "writes": writes}, f)
"""


@pytest.mark.slow
def test_a_run_writes_only_under_home_tmpdir_and_its_storage_root(tmp_path):
    home, tmp, root, cwd = (tmp_path / d for d in ("home", "tmp", "run", "image"))
    for d in (home, tmp, cwd):
        d.mkdir()
    cfg = tmp / "pipeline.yaml"  # the driver's copy of the config lives in a writable place too
    cfg.write_text(yaml.safe_dump(tiny_config_dict(str(root))))
    report = tmp / "writes.json"
    # A pod's environment, not this test process's (whose earlier tests may have set cache folders, e.g. torch's
    # inductor puts TORCHINDUCTOR_CACHE_DIR in os.environ): the image's variables, the chart's HOME and TMPDIR.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    # The working directory stands for the image's (read-only) WORKDIR: nothing may be written relative to it.
    proc = subprocess.run([sys.executable, "-c", AUDITED_RUN, os.pathsep.join(map(str, (home, tmp, root))),
                           str(report), str(cfg)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and report.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["code"] in (0, None), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (root / "summary.json").exists()
    assert result["writes"] == [], result["writes"][:20]
    assert not list(cwd.iterdir())
