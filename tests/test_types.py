"""The package type-checks: mypy, as configured in pyproject.toml, finds no error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_finds_no_error():
    # A subprocess, so the check runs in its own xdist worker beside the other tests; the cache in .mypy_cache
    # makes a rerun on unchanged code take seconds.
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
