"""The install path: `helm template` for Kubernetes 1.31 and 1.35 with both training backends, every object
strictly valid (core objects with kubernetes-validate, TrainJob/TrainingRuntime against the Trainer v2.3.0 CRDs)."""

from __future__ import annotations

import itertools

import jsonschema
import pytest
from crd_schema import validate_custom
from k8s_support import BACKENDS, K8S_VERSIONS, RELEASE, VALUES_FILES, docs_of, validate_strictly

from sims_platform.k8s import torchrun
from sims_platform.k8s.jobs import PERMANENT_EXITS
from sims_platform.k8s.render import render_objects, run_specs

ALL_VALUES = (None, *VALUES_FILES)


def _template(helm, version: str, backend: str, values: str | None, *extra: str, namespace: str = "sims") -> str:
    args = ["template", RELEASE, "charts/sims", "-n", namespace, "--kube-version", version,
            "--set", f"training.backend={backend}", *(["-f", values] if values else []), *extra]
    return helm(*args).stdout


@pytest.mark.parametrize("version, backend", list(itertools.product(K8S_VERSIONS, BACKENDS)))
def test_every_object_validates_strictly(helm, version, backend):
    kinds = set()
    for values in ALL_VALUES:
        text = _template(helm, version, backend, values, namespace="team-a")
        objs = docs_of(text) + render_objects(text)
        for obj in objs:
            validate_strictly(obj, version)
            kinds.add(obj["kind"])
            if obj["kind"] not in ("PriorityClass",):  # everything namespaced lands in the release namespace
                assert obj["metadata"].get("namespace", "team-a") == "team-a", obj["metadata"]
    training = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[backend]
    assert training in kinds and ("TrainingRuntime" in kinds) == (backend == "trainjob")
    assert {"Job", "ConfigMap", "Role", "Pod", "LocalQueue"} <= kinds  # Pod: the helm test preflight


def test_chart_renders_the_local_queue_in_the_release_namespace(helm):
    """The literal command (no -n) lands in the kubeconfig's namespace: the chart brings the LocalQueue there."""
    text = _template(helm, K8S_VERSIONS[1], "pytorchjob", "values-imagenet512.yaml", namespace="team-a")
    (lq,) = [o for o in docs_of(text) if o["kind"] == "LocalQueue"]
    assert lq["metadata"] == {**lq["metadata"], "name": "sims-gpu", "namespace": "team-a"}
    assert lq["spec"] == {"clusterQueue": "sims-gpu"}
    for o in render_objects(text):
        assert o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "sims-gpu"
    off = _template(helm, K8S_VERSIONS[1], "pytorchjob", "values-imagenet512.yaml", "--set",
                    "kueue.localQueue.create=false", namespace="team-a")
    assert not [o for o in docs_of(off) if o["kind"] == "LocalQueue"]
    other = _template(helm, K8S_VERSIONS[1], "pytorchjob", "values-imagenet512.yaml", "--set",
                      "kueue.clusterQueue=team-gpus", namespace="team-a")
    assert next(o for o in docs_of(other) if o["kind"] == "LocalQueue")["spec"]["clusterQueue"] == "team-gpus"


def test_kube_version_floor_is_1_31(helm):
    for version in ("1.31.0", "1.32.3"):
        helm("template", RELEASE, "charts/sims", "--kube-version", version)
    proc = helm("template", RELEASE, "charts/sims", "--kube-version", "1.30.9", check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_crd_validation_would_catch_a_typo(helm):
    text = _template(helm, K8S_VERSIONS[1], "trainjob", "values-imagenet512.yaml")
    tj = next(o for o in render_objects(text) if o["kind"] == "TrainJob")
    tj["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        validate_custom(tj)
    rt = next(o for o in docs_of(text) if o["kind"] == "TrainingRuntime")
    rt["spec"]["template"]["spec"]["failurePolicy"]["rules"][0]["action"] = "Retry"
    with pytest.raises(jsonschema.ValidationError, match="Retry"):
        validate_custom(rt)


def test_trainjob_backend_objects(helm):
    text = _template(helm, K8S_VERSIONS[1], "trainjob", "values-imagenet512.yaml")
    spec = run_specs(text)[0]
    (rt,) = [o for o in docs_of(text) if o["kind"] == "TrainingRuntime"]
    js = rt["spec"]["template"]["spec"]
    assert rt["spec"]["mlPolicy"]["torch"] == {} and js["failurePolicy"]["maxRestarts"] == spec.settings.backoff_limit
    (node,) = js["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert node["name"] == c["name"] == "node" and c["command"] == torchrun.command()
    rule = node["template"]["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == list(PERMANENT_EXITS)
    assert c["envFrom"][0]["secretRef"]["name"] == "sims-s3" and pod["securityContext"]["runAsNonRoot"]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == spec.settings.config_map
    assert node["template"]["spec"]["backoffLimit"] == 0  # one failed node fails the Job: JobSet restarts the gang
    tjs = [o for o in render_objects(text) if o["kind"] == "TrainJob"]
    assert {o["metadata"]["labels"]["sims.io/step"] for o in tjs} == {"train-base", "finetune-aux", "finetune-real-aux"}
    for o in tjs:
        assert o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "sims-gpu"
        assert o["spec"]["runtimeRef"] == {"name": rt["metadata"]["name"], "apiGroup": "trainer.kubeflow.org",
                                           "kind": "TrainingRuntime"}
        st = spec.settings.stage(o["metadata"]["labels"]["sims.io/step"])
        t = o["spec"]["trainer"]
        assert t["numNodes"] == st.nodes and t["numProcPerNode"] == st.gpus
        assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(st.gpus)
        patch = o["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pspec = patch["template"]["spec"]["template"]["spec"]
        assert pspec["nodeSelector"] == st.placement.node_selector and pspec["tolerations"]
        assert pspec["volumes"][0]["emptyDir"]["sizeLimit"] == st.shm_size


def test_stage_pods_service_account(helm):
    text = _template(helm, K8S_VERSIONS[1], "pytorchjob", "values-imagenet512.yaml",
                     "--set", "serviceAccount.stagePods=s3-reader")
    for o in render_objects(text):
        templates = ([r["template"] for r in o["spec"]["pytorchReplicaSpecs"].values()]
                     if o["kind"] == "PyTorchJob" else [o["spec"]["template"]])
        for t in templates:
            assert t["spec"]["serviceAccountName"] == "s3-reader"
            assert t["spec"]["automountServiceAccountToken"] is False  # an identity for S3, no API token


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_stages_keep_their_active_deadline(helm, backend):
    text = _template(helm, K8S_VERSIONS[1], backend, "values-imagenet512.yaml", "--set",
                     "stages.train-base.activeDeadlineSeconds=86400")
    for o in render_objects(text):
        if o["kind"] in ("PyTorchJob", "TrainJob") and o["metadata"]["labels"]["sims.io/step"] == "train-base":
            deadline = (o["spec"]["runPolicy"] if backend == "pytorchjob" else o["spec"]).get("activeDeadlineSeconds")
            assert deadline == 86400, o["metadata"]["name"]
            validate_strictly(o, K8S_VERSIONS[1])
