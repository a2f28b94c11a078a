"""The training containers' entrypoint: torchrun over `sims`, exiting with a worker's permanent exit code.

torchrun's `@record` main re-raises a failed worker, so the container would exit 1 whatever the worker's code, and
the failure policies (PyTorchJob, JobSet) would retry a bad config as if a peer were lost. Here each worker runs
`sims` and, when it fails, writes torch-elastic's error file (TORCHELASTIC_ERROR_FILE, set per worker by the
agent); torchrun copies the first failure's file into its own error file with the worker's exit code as
`errorCode`. This launcher reads that file: a permanent code (PERMANENT_EXITS) becomes the container's exit code;
anything else keeps torchrun's own, which the policies retry.

    python -m sims_platform.k8s.torchrun stage train-base --config ...   (torchrun reads PET_* from the operator)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sims_platform.k8s.jobs import PERMANENT_EXITS

MODULE = "sims_platform.k8s.torchrun"  # this module, by name (as `python -m` runs it, __name__ is __main__)
WORKER = "--worker"  # the argv marker of a worker process (what torchrun starts)
ERROR_FILE = "TORCHELASTIC_ERROR_FILE"


def command() -> list[str]:
    """The container command; the `sims` argv follows as the container args."""
    return ["python", "-m", MODULE]


def worker_exit(argv: list[str]) -> int:
    """Run `sims ARGV` in this worker; on failure record its exit code where torchrun looks for it."""
    from sims_platform.cli import main

    code = main(argv)
    path = os.environ.get(ERROR_FILE)
    if code and path:
        # torch-elastic's error file format (errors/error_handler.py record_exception): torchrun's @record then
        # sets message.errorCode to this worker's exit code when it copies the file into its own.
        Path(path).write_text(json.dumps({"message": {
            "message": f"sims {' '.join(argv[:2])} exited {code}", "errorCode": code,
            "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))}}}))
    return code


def recorded_code(path: Path) -> int | None:
    """The failed worker's exit code torchrun wrote into its error file, or None (no file: no worker recorded)."""
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    code = message.get("errorCode") if isinstance(message, dict) else None
    return code if isinstance(code, int) else None


def container_exit(torchrun_code: int, recorded: int | None) -> int:
    """A permanent worker failure is the container's exit code; otherwise torchrun's, retried by the policies."""
    if torchrun_code != 0 and recorded in PERMANENT_EXITS:
        return recorded
    return torchrun_code


def launch(argv: list[str]) -> int:
    """torchrun with this module's workers; SIGTERM/SIGINT are passed on so torchrun stops its workers."""
    with tempfile.TemporaryDirectory(prefix="sims-torchrun-") as tmp:
        error_file = Path(tmp) / "error.json"
        env = dict(os.environ, **{ERROR_FILE: str(error_file)})
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "-m", MODULE, WORKER, *argv],
                                env=env)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        code = proc.wait()
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N
        return container_exit(code, recorded_code(error_file))


def main(argv: list[str]) -> int:
    if argv[:1] == [WORKER]:
        return worker_exit(argv[1:])
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
