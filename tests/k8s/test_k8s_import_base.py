"""pretrained.base on Kubernetes: iteration 0's base is an import-base step, a single-pod batch/v1 Job without
GPUs (no training workload, no gang), with both training backends; later iterations still train; `sims status`
shows the step."""

from __future__ import annotations

import pytest
from k8s_support import BACKENDS, K8S_VERSIONS, RELEASE, containers, docs_of, sims_parser, validate_strictly
from sim_world import NS, World

from sims_platform.k8s.render import render_objects, run_specs
from sims_platform.k8s.status import workload_status

TRAINING_KIND = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
GPU = "nvidia.com/gpu"
# An imported base on the digits values: its aux models are fine-tuned by transfer (no training state to resume).
IMPORTED = ("pipeline.pretrained.base=s3://models/base.pt", "pipeline.finetune_aux.init.mode=transfer",
            "pipeline.finetune_aux.optimizer.rampup_images=3000")


def _template(helm, backend: str, values: str, *sets: str) -> str:
    args = ["template", RELEASE, "charts/sims", "-n", "sims", "--kube-version", K8S_VERSIONS[1], "-f", values,
            "--set", f"training.backend={backend}"]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


def _by_step(objs: list[dict]) -> dict[tuple[int, str], dict]:
    return {(int(o["metadata"]["labels"]["sims.io/iteration"]), o["metadata"]["labels"]["sims.io/step"]): o
            for o in objs}


@pytest.mark.parametrize("backend", BACKENDS)
def test_imagenet_base_is_imported_by_a_cpu_job_not_a_training_job(helm, backend):
    text = _template(helm, backend, "values-imagenet512.yaml")
    spec = run_specs(text)[0]
    assert spec.cfg.pretrained.base and spec.cfg.iterations.count == 3
    objs = render_objects(text)
    steps = _by_step(objs)
    kind = TRAINING_KIND[backend]

    # Iteration 0: no training workload for its base, only the import-base Job, which completes train-base.
    assert (0, "train-base") not in steps
    assert not [o for o in objs if o["kind"] == kind and o["metadata"]["labels"]["sims.io/stage"] == "train-base"
                and o["metadata"]["labels"]["sims.io/iteration"] == "0"]
    job = steps[(0, "import-base")]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["labels"]["sims.io/stage"] == "train-base"  # its done marker is train-base's
    assert "completionMode" not in job["spec"] and "completions" not in job["spec"]  # one pod, not a job array
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["sims"] and c["args"][:2] == ["stage", "import-base"]
    sims_parser().parse_args(c["args"])
    assert GPU not in c["resources"].get("requests", {}) and GPU not in c["resources"].get("limits", {})
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}  # the values' stages.import-base
    assert "nodeSelector" not in pod and "tolerations" not in pod  # not placed on the GPU nodes
    assert [o["metadata"]["name"] for o in objs].index(job["metadata"]["name"]) < \
        [o["metadata"]["name"] for o in objs].index(steps[(0, "generate")]["metadata"]["name"])

    # Iterations >= 1 train their bases with the backend's kind, on the GPU nodes.
    for k in (1, 2):
        assert (k, "import-base") not in steps
        trained = steps[(k, "train-base")]
        assert trained["kind"] == kind and trained["metadata"]["labels"]["sims.io/stage"] == "train-base"
        if kind == "TrainJob":
            assert trained["spec"]["trainer"]["resourcesPerNode"]["limits"][GPU] == "8"
        else:
            assert all(cc["resources"]["limits"][GPU] == "8" for cc in containers(trained))
    for obj in docs_of(text) + objs:  # everything still validates, the chart's objects included
        validate_strictly(obj, K8S_VERSIONS[1])


def test_import_base_pod_has_a_cpu_default_when_the_values_do_not_list_it(helm):
    from sims_platform.k8s.settings import DEFAULT_STAGES

    text = _template(helm, "pytorchjob", "values-digits-dev.yaml", *IMPORTED)
    spec = run_specs(text)[0]
    assert "import-base" not in spec.settings.stages
    job = _by_step(render_objects(text))[(0, "import-base")]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    default = DEFAULT_STAGES["import-base"].resources
    assert c["resources"] == {"requests": default.requests, "limits": default.limits}
    assert GPU not in c["resources"]["requests"] and "cpu" in c["resources"]["requests"]
    validate_strictly(job, K8S_VERSIONS[0])


def test_status_shows_the_import_base_job(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), *IMPORTED).reference_done()
    assert w.drive() == 0, w.logs
    assert w.cluster.objects[("jobs", "digits-dev-i00-import-base")]["kind"] == "Job"
    assert not [key for key in w.cluster.objects if key[0] in ("pytorchjobs", "trainjobs")
                and key[1].endswith("-i00-train-base")]
    rows, _, _ = workload_status(w.apis, NS, w.spec)
    by = {(r.iteration, r.step): r for r in rows}
    assert (0, "train-base") not in by
    row = by[(0, "import-base")]
    assert row.stage == "train-base" and row.name == "digits-dev-i00-import-base"
    assert row.state.startswith("Succeeded") and row.progress == "done"
