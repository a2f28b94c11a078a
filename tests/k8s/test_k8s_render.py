"""`sims k8s render`: every workload of the pipeline, schema-valid, with the platform's batch features."""

from __future__ import annotations

import io
import sys

import kubernetes_validate
import pytest
from crd_schema import validate_custom
from k8s_support import CHART, K8S_VERSIONS, VALUES_FILES
from k8s_support import containers, docs_of, sims_parser
from kubeflow.training import ApiClient as KubeflowApiClient
from kubeflow.training import KubeflowOrgV1PyTorchJob

from sims_platform.k8s import torchrun
from sims_platform.k8s.names import is_dns_label
from sims_platform.k8s.render import render, render_objects, run_specs
from sims_platform.k8s.workloads import plan
from sims_platform.pipeline.plan import base_step

ALL_VALUES = (None, *VALUES_FILES)


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"]
    return [r["template"] for r in spec.get("pytorchReplicaSpecs", {}).values()] or [spec["template"]]


@pytest.mark.parametrize("values", ALL_VALUES)
def test_render_prints_every_stage_of_every_iteration(rendered, values, monkeypatch, capsys):
    from sims_platform.k8s.cli import cmd_render

    monkeypatch.setattr(sys, "stdin", io.StringIO(rendered(values)))
    assert cmd_render(sims_parser().parse_args(["k8s", "render", "-"])) == 0
    objs = docs_of(capsys.readouterr().out)
    spec = run_specs(rendered(values))[0]
    assert [o["metadata"]["name"] for o in objs] == [w.name for w in plan(spec.cfg, spec.settings)]
    iterations = spec.cfg.iterations.count
    steps = {(o["metadata"]["labels"]["sims.io/iteration"], o["metadata"]["labels"]["sims.io/step"]) for o in objs}
    for k in range(iterations):
        for step in (base_step(spec.cfg, k), "generate", "finetune-aux", "evaluate", "evaluate-reduce"):
            assert (str(k), step) in steps
    feeds = [s for s in steps if s[1] == "feed"]
    assert len(feeds) == (iterations - 1 if spec.cfg.iterations.train_data != "real" else 0)
    names = [o["metadata"]["name"] for o in objs]
    assert len(set(names)) == len(names) and all(is_dns_label(n, 52) for n in names)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", ALL_VALUES)
def test_everything_validates_against_kubernetes_openapi(rendered, values, version):
    chart_objs = docs_of(rendered(values))
    objs = chart_objs + render_objects(rendered(values))
    checked = 0
    for obj in objs:
        if obj["kind"] == "PyTorchJob":  # a CRD: its pod templates are core objects, validate those
            for i, t in enumerate(_pod_templates(obj)):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {
                    "name": f"{obj['metadata']['name']}-{i}"}, "template": t}, version, strict=True)
            continue
        if obj["apiVersion"].startswith("kueue.x-k8s.io/"):  # a CRD: against Kueue v0.19.2's (crd_schema.py)
            validate_custom(obj)
            checked += 1
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= len(chart_objs)


def test_strict_validation_would_catch_a_typo():
    objs = render_objects(_digits_manifests())
    job = next(o for o in objs if o["kind"] == "Job")
    job["spec"]["backoffLimitPerIndexx"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


def _digits_manifests() -> str:
    import subprocess

    from tools import ensure_tools
    return subprocess.run([str(ensure_tools() / "helm"), "template", "sims-run", "charts/sims", "-f",
                           "values-digits-dev.yaml"], cwd=CHART.parent.parent, check=True, capture_output=True,
                          text=True).stdout


@pytest.mark.parametrize("values", ALL_VALUES)
def test_pytorchjobs_deserialize_into_the_kubeflow_models(rendered, values):
    objs = [o for o in render_objects(rendered(values)) if o["kind"] == "PyTorchJob"]
    assert objs
    spec = run_specs(rendered(values))[0]
    for obj in objs:
        job = KubeflowApiClient()._ApiClient__deserialize(obj, "KubeflowOrgV1PyTorchJob")
        assert isinstance(job, KubeflowOrgV1PyTorchJob) and job.api_version == "kubeflow.org/v1"
        assert job.spec.run_policy is not None and job.spec.pytorch_replica_specs  # required fields
        step = obj["metadata"]["labels"]["sims.io/step"]
        st = spec.settings.stage(step)
        replicas = job.spec.pytorch_replica_specs
        assert replicas["Master"].replicas == 1
        assert (replicas["Worker"].replicas if "Worker" in replicas else 0) == st.nodes - 1
        assert job.spec.nproc_per_node == str(max(st.gpus, 1))
        assert job.spec.run_policy.ttl_seconds_after_finished == spec.settings.ttl_seconds_after_finished
        # every gang restart (a lost node: each pod's torchrun exits 1 once) costs one restart per pod
        assert job.spec.run_policy.backoff_limit == spec.settings.backoff_limit * st.nodes
        assert job.spec.run_policy.clean_pod_policy == "Running"  # a failed job's survivors free their GPUs
        for r in replicas.values():
            assert r.restart_policy == "OnFailure"  # torchrun exits 1 on a lost peer: restart, do not fail
            pod = r.template.spec
            (c,) = pod.containers
            assert c.name == "pytorch" and c.command == torchrun.command()  # torchrun, carrying exit 2 out
            env = {e.name for e in c.env}
            assert not env & {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR"}  # the operator/torchrun own them
            assert "SIMS_ZERO_STAGE" not in env  # the ZeRO stage is in the pipeline YAML
            shm = next(v for v in pod.volumes if v.name == "dshm")
            assert shm.empty_dir.medium == "Memory"
            if st.gpus:
                assert c.resources.limits["nvidia.com/gpu"] == c.resources.requests["nvidia.com/gpu"] == str(st.gpus)
            assert pod.node_selector == (st.placement.node_selector or None)
            if spec.settings.s3_secret:
                assert c.env_from[0].secret_ref.name == spec.settings.s3_secret


def test_batch_features_on_imagenet(rendered):
    spec = run_specs(rendered("values-imagenet512.yaml"))[0]
    objs = render_objects(rendered("values-imagenet512.yaml"))
    for o in objs:
        assert o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "sims-gpu"
        for t in _pod_templates(o):
            assert t["spec"]["priorityClassName"] == "sims-batch"
            assert t["spec"]["securityContext"]["runAsNonRoot"] is True
            assert t["spec"]["automountServiceAccountToken"] is False
    indexed = [o for o in objs if o["kind"] == "Job" and o["spec"].get("completionMode") == "Indexed"]
    # ImageNet-512 is latent: encode once; its reference (ImageNet val) is streamed once
    assert {o["metadata"]["labels"]["sims.io/step"] for o in indexed} == {"encode", "reference", "generate",
                                                                          "evaluate"}
    for o in indexed:
        s = o["spec"]
        assert s["completions"] == spec.settings.stage(o["metadata"]["labels"]["sims.io/step"]).shards
        assert s["backoffLimitPerIndex"] == 2 and s["template"]["spec"]["restartPolicy"] == "Never"
        assert "backoffLimit" not in s
    reduce = [o for o in objs if o["metadata"]["labels"]["sims.io/step"] == "evaluate-reduce"]
    assert len(reduce) == spec.cfg.iterations.count and all("completionMode" not in o["spec"] for o in reduce)


def test_gang_scheduling_through_run_policy(rendered, helm):
    text = helm("template", "sims-run", "charts/sims", "-f", "values-imagenet512.yaml", "--set", "gang.enabled=true",
                "--set", "gang.schedulerName=volcano").stdout
    for o in (o for o in render_objects(text) if o["kind"] == "PyTorchJob"):
        sp = o["spec"]["runPolicy"]["schedulingPolicy"]
        nodes = 1 + o["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        assert sp["minAvailable"] == nodes and sp["priorityClass"] == "sims-batch"
        assert "queue" not in sp  # the Kueue LocalQueue sims-gpu is no Volcano queue: Volcano's default one
        assert all(t["spec"]["schedulerName"] == "volcano" for t in _pod_templates(o))


@pytest.mark.parametrize("values", ALL_VALUES)
def test_every_container_command_is_accepted_by_the_sims_parser(rendered, values, capsys):
    objs = docs_of(rendered(values)) + render_objects(rendered(values))
    seen = 0
    for obj in objs:
        for c in containers(obj):
            if c["name"] == "mlflow":
                continue
            # sims, or the training entrypoint (torchrun over sims)
            assert c["command"] in (["sims"], ["python", "-m", "sims_platform.k8s.torchrun"]), c["command"]
            sims_parser().parse_args(c["args"])
            seen += 1
    assert seen > 5


def test_training_feed_and_driver_commands_parse(rendered):
    """Training, feed and the driver's commands, each parsed on its own (the job arrays are checked above)."""
    objs = docs_of(rendered("values-digits-dev.yaml")) + render_objects(rendered("values-digits-dev.yaml"))
    for obj in objs:
        step = obj["metadata"]["labels"].get("sims.io/step")
        if step in ("generate", "evaluate", "evaluate-reduce"):
            continue
        for c in containers(obj):
            if c["name"] != "mlflow":
                sims_parser().parse_args(c["args"])


def test_render_without_configmap_says_what_to_pipe():
    from sims_platform.config import ConfigError
    with pytest.raises(ConfigError, match="helm template"):
        render("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")


def test_reference_pods_on_gpus_unless_published_statistics(rendered, helm):
    """values-imagenet512.yaml measures against ImageNet val (data.reference_path): its statistics run as an
    Indexed Job on GPU nodes plus a CPU reducer, once per run, and evaluate's pods measure with the same Inception
    weights (a URI, sha256-checked) on GPUs. With EDM2's published statistics there is nothing to compute."""
    text = rendered("values-imagenet512.yaml")
    spec = run_specs(text)[0]
    objs = render_objects(text)
    ev = spec.cfg.evaluate
    assert ev.features == "inception" and ev.inception_weights.startswith("s3://") and ev.inception_sha256
    assert ev.reference is None and spec.cfg.data.reference_path.startswith("s3://")
    by_step = {o["metadata"]["labels"]["sims.io/step"]: o for o in objs}
    ref, red = by_step["reference"], by_step["reference-reduce"]
    assert [o["metadata"]["labels"]["sims.io/step"] for o in objs].index("reference-reduce") < \
        [o["metadata"]["labels"]["sims.io/step"] for o in objs].index("train-base")
    assert sum(o["metadata"]["labels"]["sims.io/step"] == "reference" for o in objs) == 1  # once per run
    st = spec.settings.stage("reference")
    assert ref["spec"]["completionMode"] == "Indexed" and ref["spec"]["completions"] == st.shards == 16
    (c,) = ref["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["stage", "reference"] and c["args"][-2:] == ["--count", "16"]
    (r,) = red["spec"]["template"]["spec"]["containers"]
    assert r["args"][:2] == ["stage", "reference-reduce"] and "--count" not in r["args"]
    assert "completionMode" not in red["spec"] and "nvidia.com/gpu" not in r["resources"].get("limits", {})
    evaluates = [o for o in objs if o["metadata"]["labels"]["sims.io/step"] == "evaluate"]
    assert len(evaluates) == spec.cfg.iterations.count
    for o in (ref, *evaluates):
        pod = o["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}

    published = helm("template", "sims-run", "charts/sims", "-f", "values-imagenet512.yaml",
                     "--set", "pipeline.data.reference_path=null",
                     "--set", "pipeline.evaluate.reference=s3://sims-ml/datasets/edm2-refs/img512.pkl").stdout
    steps = {o["metadata"]["labels"]["sims.io/step"] for o in render_objects(published)}
    assert not steps & {"reference", "reference-reduce"} and "evaluate" in steps
