"""A guide section on Kubernetes: train-guide is a training workload of the backend's kind, on the GPU nodes, that
evaluate waits for; everything `sims k8s render` prints validates strictly."""

from __future__ import annotations

import io
import sys

import pytest
import yaml
from k8s_support import BACKENDS, K8S_VERSIONS, RELEASE, docs_of, sims_parser, validate_strictly

from sims_platform.k8s.render import render_objects, run_specs

TRAINING_KIND = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
GUIDE = {"network": {"preset": "digits-mini"}, "images": 50000, "batch_size": 128, "ema_std": 0.05,
         "checkpoint_images": 10000, "log_images": 5000}


def _template(helm, tmp_path, backend: str) -> str:
    extra = tmp_path / "guide.yaml"
    extra.write_text(yaml.safe_dump({"pipeline": {"guide": GUIDE, "evaluate": {"methods": [
        {"name": "sims", "weights": [0.5]}, {"name": "autoguidance", "weights": [0.5]}]}}}))
    return helm("template", RELEASE, "charts/sims", "-n", "sims", "--kube-version", K8S_VERSIONS[1], "-f",
                "values-digits-dev.yaml", "-f", str(extra), "--set", f"training.backend={backend}").stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_has_a_training_job_for_train_guide(helm, tmp_path, backend, monkeypatch, capsys):
    from sims_platform.k8s.cli import cmd_render

    text = _template(helm, tmp_path, backend)
    spec = run_specs(text)[0]
    assert spec.cfg.guide is not None and spec.cfg.iterations.count == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert cmd_render(sims_parser().parse_args(["k8s", "render", "-"])) == 0
    objs = docs_of(capsys.readouterr().out)
    assert [o["metadata"]["name"] for o in objs] == [o["metadata"]["name"] for o in render_objects(text)]
    names = [o["metadata"]["name"] for o in objs]
    for k in range(spec.cfg.iterations.count):
        (job,) = [o for o in objs if o["metadata"]["labels"]["sims.io/step"] == "train-guide"
                  and o["metadata"]["labels"]["sims.io/iteration"] == str(k)]
        assert job["kind"] == TRAINING_KIND[backend]
        assert job["metadata"]["labels"]["sims.io/stage"] == "train-guide"
        args = [a for c in _containers(job) for a in c.get("args", []) + c.get("command", [])]
        assert "train-guide" in args
        ev = next(o for o in objs if o["metadata"]["labels"]["sims.io/step"] == "evaluate"
                  and o["metadata"]["labels"]["sims.io/iteration"] == str(k))
        assert names.index(job["metadata"]["name"]) < names.index(ev["metadata"]["name"])
    for obj in docs_of(text) + objs:
        validate_strictly(obj, K8S_VERSIONS[1])


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] == "TrainJob":
        return [obj["spec"]["trainer"]]
    return [c for r in obj["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]]
