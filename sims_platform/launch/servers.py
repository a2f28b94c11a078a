"""Loopback services for local cluster runs and tests: an S3 endpoint (moto) and an MLflow tracking server.

Each starts as a subprocess on 127.0.0.1 with a free port, is waited on until it answers, and is always
stopped (its whole process group) when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with code {proc.returncode}; log: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url}: no answer within {timeout:.0f} s; log: {log}")


@contextlib.contextmanager
def _process(argv: list[str], url: str, log: Path, env: dict[str, str] | None, timeout: float) -> Iterator[None]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(url, proc, timeout, log)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Variables that point boto3, s3fs and MLflow at this endpoint."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region}

    def create_bucket(self, name: str) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                          aws_secret_access_key=self.secret_key, region_name=self.region)
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_s3(workdir: Path, timeout: float = 60) -> Iterator[S3Endpoint]:
    """An in-memory S3 emulator (moto's standalone server) on loopback."""
    port = free_port()
    endpoint = S3Endpoint(f"http://127.0.0.1:{port}")
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with _process(argv, endpoint.url + "/moto-api/", workdir / "moto.log", env, timeout):
        yield endpoint


@contextlib.contextmanager
def mlflow_server(workdir: Path, artifacts: str, env: dict[str, str] | None = None,
                  timeout: float = 90) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts at `artifacts`); yields its http URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--serve-artifacts",
            "--artifacts-destination", artifacts, "--workers", "1"]
    # The GenAI job runner costs seconds of CPU and is unused; an inherited client URI must not leak in.
    full_env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    with _process(argv, uri + "/health", workdir / "mlflow-server.log", full_env, timeout):
        yield uri
