"""The driver on the simulated cluster (sim_cluster.py): node loss, OOM, upgrade, uninstall, two installs, a
restarted driver, a missing Secret, TTL between polls, Kueue flavors on a tainted GPU pool."""

from __future__ import annotations

import pytest
import yaml
from k8s_support import REPO, docs_of
from s3_support import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from sim_world import CPU_NODE, GPU_TAINT, NS, Node, World

from sims_platform.k8s.exit_codes import EXIT_NOT_READY, EXIT_STAGE_FAILED
from sims_platform.k8s.ownership import owner_uri
from sims_platform.storage import fsio


TRAIN_BASE = "digits-dev-i00-train-base"


def kill_driver_once_training_started(w: World) -> None:
    """Run the driver until train-base has run for a tick (after the run-level reference stage), then kill it."""
    def dying(_s):
        w.cluster.tick()
        if w.since_created(TRAIN_BASE) >= 1:
            raise Killed
    with pytest.raises(Killed):
        w.drive(sleep=dying)


class Killed(Exception):
    """The driver's pod died (raised from its sleep)."""


def _lose_node_when_training(w: World, stage: str = "train-base", after: int = 2):
    """A sleep that loses the node of a non-rank-0 pod once `stage` has checkpointed `after` times."""
    state = {"lost": False}

    def sleep(_s: float) -> None:
        w.cluster.tick()
        from sims_platform.training.checkpoints import committed
        if not state["lost"] and len(committed(w.layout.checkpoints(0, stage))) >= after:
            victim = next(p for p in w.cluster.pods.values() if p["metadata"]["labels"].get("sims.io/step") == stage
                          and not (p["metadata"]["name"].endswith("-master-0") or "-node-0-0-" in p["metadata"]["name"]))
            w.cluster.lose_node(victim["node"])
            w.cluster.nodes[victim["node"]].ready = True  # a replacement node joins
            state["lost"] = True
    return sleep, state


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_node_lost_mid_training_restarts_and_resumes_from_s3_checkpoint(helm, s3_bucket, backend):  # noqa: F811
    w = World(helm, f"{s3_bucket}/run", backend=backend)
    sleep, state = _lose_node_when_training(w)
    assert w.drive(sleep=sleep) == 0, w.logs
    assert state["lost"]
    trains = [r for r in w.resumed if "train-base" in r[0]]
    assert trains[0][1] == 0 and trains[1][1] > 0, trains  # the restart resumed from the newest S3 checkpoint
    assert "every stage succeeded" in w.logs[-1]
    assert w.cluster.creates.count("digits-dev-i00-train-base") == 1  # restarted by its controller, not the driver


def test_exitcode_policy_would_fail_a_lost_node_for_good(helm, tmp_path):
    """What the chart did before: restartPolicy ExitCode treats torchrun's exit 1 after a lost peer as permanent."""
    w = World(helm, str(tmp_path / "run"))
    sleep, _ = _lose_node_when_training(w)
    real_put = w.cluster.put

    def put(resource, body):
        if resource == "pytorchjobs":
            for r in body["spec"]["pytorchReplicaSpecs"].values():
                r["restartPolicy"] = "ExitCode"
        return real_put(resource, body)
    w.cluster.put = put
    assert w.drive(sleep=sleep) == EXIT_STAGE_FAILED
    assert any("stage train-base" in m and "replica(s) failed" in m for m in w.logs)


def test_oom_in_an_indexed_job_part_is_retried_then_bounded(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), oom={("generate", 1): 2})  # backoffLimitPerIndex 2: 2 OOMs are retried
    assert w.drive() == 0
    w2 = World(helm, str(tmp_path / "run2"), oom={("generate", 1): 5})
    assert w2.drive() == EXIT_STAGE_FAILED
    msg = next(m for m in w2.logs if m.startswith("error:"))
    assert "stage generate" in msg and "FailedIndexes" in msg
    assert "kubectl -n sims delete job digits-dev-i00-generate" in msg and "helm upgrade sims-run" in msg


def test_oom_in_training_is_bounded_by_backoff_limit(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    real = w.training
    w.training = lambda run: 137 if run.labels["sims.io/step"] == "train-base" else real(run)
    assert w.drive() == EXIT_STAGE_FAILED
    assert any("backoff limit" in m for m in w.logs)
    assert not [p for p in w.cluster.pods.values() if p["status"]["phase"] == "Running"]  # cleanPodPolicy Running
    # the pods are gone with the failure, but the message still says how they ended (seen while it ran)
    assert any("backoff limit" in m and "OOMKilled (exit 137)" in m for m in w.logs if m.startswith("error:"))


def test_helm_upgrade_mid_run_never_mixes_two_configs(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    kill_driver_once_training_started(w)
    old_cm = w.spec.settings.config_map
    assert ("pytorchjobs", "digits-dev-i00-train-base") in w.cluster.objects
    # resources changed: a new ConfigMap (new name); the old one goes, and the workloads it owns with it
    w.upgrade("stages.train-base.resources.limits.memory=5Gi")
    assert w.spec.settings.config_map != old_cm
    w.cluster.tick_gc()
    assert ("pytorchjobs", "digits-dev-i00-train-base") not in w.cluster.objects
    assert w.drive() == 0
    for (resource, _), obj in w.cluster.objects.items():
        if resource in ("jobs", "pytorchjobs") and obj["metadata"].get("ownerReferences"):
            assert obj["metadata"]["ownerReferences"][0]["name"] == w.spec.settings.config_map
    # a changed pipeline of a started run is refused, naming the key
    w.upgrade("pipeline.train_base.batch_size=64")
    assert w.drive() == EXIT_NOT_READY
    # (the aux fine-tune resumes the base's training, so its batch size follows and is named too)
    assert any("changed since it started (" in m and "train_base.batch_size" in m for m in w.logs)


def test_uninstall_collects_workloads_through_owner_references(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    kill_driver_once_training_started(w)
    assert [k for k in w.cluster.objects if k[0] == "pytorchjobs"] and w.cluster.pods
    w.cluster.helm_uninstall(w.docs)
    assert not [k for k in w.cluster.objects if k[0] in ("jobs", "pytorchjobs", "configmaps")]
    w.cluster.tick_gc()  # the collector works in the background: the workloads' pods go on its next pass
    assert not w.cluster.pods


def test_same_run_installed_twice_is_refused(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    from sim_world import render
    other = docs_of(render(helm, str(tmp_path / "run"), release="second"))
    w.cluster.helm_apply(other)
    assert w.drive() == EXIT_NOT_READY
    assert any("already installed in namespace sims by release 'second'" in m for m in w.logs)


def test_two_namespaces_on_one_storage_root_are_refused(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    fsio.write_json(owner_uri(w.layout), {"namespace": "team-b", "release": "sims-run", "run": "digits-dev"})
    assert w.drive() == EXIT_NOT_READY
    assert any("belongs to release 'sims-run' (run 'digits-dev') in namespace 'team-b'" in m for m in w.logs)
    assert not w.cluster.creates


def test_restarted_driver_adopts_and_never_duplicates(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    kill_driver_once_training_started(w)
    before = list(w.cluster.creates)
    assert w.drive() == 0
    assert len(w.cluster.creates) == len(set(w.cluster.creates)) and w.cluster.creates[: len(before)] == before
    assert any("adopting existing" in m for m in w.logs)


def test_missing_secret_fails_fast_naming_it(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "s3.secretName=sims-s3")
    assert w.drive() == EXIT_NOT_READY
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "Secret sims-s3 not found in namespace sims" in msg and "kubectl -n sims create secret generic sims-s3" in msg
    assert not w.cluster.creates
    driver = next(d for d in w.docs if d["kind"] == "Job")
    assert driver["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["optional"] is True
    w.cluster.put("secrets", {"metadata": {"name": "sims-s3"}, "type": "Opaque"})
    assert w.drive() == 0


def test_preflight_names_missing_crd_and_local_queue(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu", "kueue.localQueue.create=false")
    w.cluster.crds -= {"pytorchjobs", "localqueues"}
    assert w.drive() == EXIT_NOT_READY
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "PyTorchJob CRD" in msg and "k8s/operator" in msg and "Kueue is not installed" in msg
    w.cluster.crds |= {"pytorchjobs", "localqueues"}
    w.logs.clear()
    assert w.drive() == EXIT_NOT_READY
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "LocalQueue sims-gpu not found in namespace sims" in msg and "kueue.localQueue.create" in msg
    assert "kind: LocalQueue" in msg and "kubectl -n sims apply -f -" in msg


def test_preflight_names_a_missing_cluster_queue(helm, tmp_path):
    """The chart's LocalQueue points at a ClusterQueue nobody created: Kueue marks it inactive; preflight says so."""
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu", "kueue.clusterQueue=team-gpus")
    w.cluster.kueue["clusterQueues"] = {"sims-gpu"}
    w.cluster.tick()  # Kueue's LocalQueue controller reconciles the new queue
    assert w.drive() == EXIT_NOT_READY
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "LocalQueue sims-gpu in namespace sims is inactive (ClusterQueueDoesNotExist: ClusterQueue team-gpus)" in msg
    assert "kubectl apply -k k8s/kueue" in msg and not w.cluster.creates


def _prepared_as_documented(secret: str = "sims-s3"):
    """k8s/README.md's steps on a GPU cluster: the operator (the World's CRDs), Kueue with k8s/kueue's flavors and
    ClusterQueue, GPU nodes with the taint, and the S3 Secret created in the namespace the release lands in."""
    def setup(c) -> None:
        c.nodes = {f"gpu-{i}": Node(f"gpu-{i}", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, [GPU_TAINT])
                   for i in range(4)}
        c.nodes["cpu-0"] = CPU_NODE
        c.kueue = {"flavors": _flavors(_queues()),
                   "clusterQueues": {d["metadata"]["name"] for d in _queues() if d["kind"] == "ClusterQueue"}}
        c.put("secrets", {"metadata": {"name": secret}, "type": "Opaque"})  # kubectl -n NS create secret ...
    return setup


def test_literal_install_without_namespace_runs_to_the_end(helm, tmp_path):
    """`helm install sims-run charts/sims -f values-imagenet512.yaml` (no -n) lands in the context's namespace,
    here team-a, prepared as k8s/README.md says; the run goes from its first stage to its last."""
    w = World(helm, str(tmp_path / "run"), namespace="team-a", values="values-imagenet512.yaml",
              setup=_prepared_as_documented())
    assert w.spec.settings.namespace == "team-a" and ("localqueues", "sims-gpu") in w.cluster.objects
    assert w.drive() == 0, w.logs[-5:]
    assert "every stage succeeded" in w.logs[-1]
    trained = [n for n in w.cluster.creates if n.endswith("-train-base")]
    assert trained and all(w.cluster.objects.get(("pytorchjobs", n), {}).get("metadata", {}).get("annotations", {})
                           .get("sims.test/flavor", "h100") == "h100" for n in trained)


def test_workload_finished_and_ttl_deleted_between_polls_is_not_rerun(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "ttlSecondsAfterFinished=0")
    assert w.drive() == 0
    assert len(w.cluster.creates) == len(set(w.cluster.creates)), w.cluster.creates
    assert any("finished and was deleted (ttlSecondsAfterFinished)" in m for m in w.logs)


def _queues() -> list[dict]:
    return docs_of((REPO / "k8s/kueue/queues.yaml").read_text())


def _flavors(docs: list[dict]) -> list[dict]:
    """The ClusterQueue's flavors in order, each with its ResourceFlavor's nodeLabels and tolerations, the resources
    it has quota for and the nominal quotas."""
    rf = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "ResourceFlavor"}
    cq = next(d for d in docs if d["kind"] == "ClusterQueue")
    out = []
    for group in cq["spec"]["resourceGroups"]:
        for f in group["flavors"]:
            from kubernetes.utils import parse_quantity
            fits = [r["name"] for r in f["resources"] if str(r["nominalQuota"]) not in ("0", "0Gi")]
            quota = {r["name"]: parse_quantity(str(r["nominalQuota"])) for r in f["resources"]}
            out.append({"name": f["name"], "resources": fits, "quota": quota, **rf[f["name"]]})
    return out


def test_kueue_flavors_keep_cpu_pods_off_the_tainted_gpu_pool(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu")
    c = w.cluster
    c.nodes = {"gpu-0": Node("gpu-0", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                                    [GPU_TAINT]), "cpu-0": CPU_NODE}
    c.kueue = {"flavors": _flavors(_queues())}
    assert w.drive() == 0, w.logs
    reduce = c.objects.get(("jobs", "digits-dev-i00-evaluate-reduce"))
    assert reduce is None or reduce["metadata"]["annotations"]["sims.test/flavor"] != "h100"
    # the old example queue (one H100 flavor for cpu, memory and GPUs, no tolerations) strands CPU pods
    old = [d for d in _queues() if d["kind"] != "ResourceFlavor" or d["metadata"]["name"] == "h100"]
    for d in old:
        if d["kind"] == "ResourceFlavor":
            d["spec"].pop("tolerations", None)
        if d["kind"] == "ClusterQueue":
            d["spec"]["resourceGroups"][0]["flavors"] = [f for f in d["spec"]["resourceGroups"][0]["flavors"]
                                                        if f["name"] == "h100"]
    w2 = World(helm, str(tmp_path / "run2"), "queue=sims-gpu")
    w2.cluster.nodes = dict(c.nodes)
    w2.cluster.kueue = {"flavors": _flavors(old)}
    ticks = {"n": 0}

    def bounded(_s):
        w2.cluster.tick()
        ticks["n"] += 1
        if ticks["n"] > 40:
            raise Killed
    with pytest.raises(Killed):
        w2.drive(sleep=bounded)
    stuck = [p for p in w2.cluster.pods.values() if p["node"] is None]
    assert stuck and stuck[0]["status"]["conditions"][0]["reason"] == "Unschedulable"


def test_every_driver_call_is_allowed_by_the_chart_role(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "s3.secretName=sims-s3", "queue=sims-gpu")
    c = w.cluster
    c.put("secrets", {"metadata": {"name": "sims-s3"}})
    c.kueue = {"flavors": [{"name": "any", "resources": ["cpu", "memory"]}]}
    assert w.drive() == 0, w.logs
    w2 = World(helm, str(tmp_path / "run2"), "s3.secretName=sims-s3", "queue=sims-gpu", oom={("generate", 0): 9})
    w2.cluster.put("secrets", {"metadata": {"name": "sims-s3"}})
    w2.cluster.kueue = c.kueue
    assert w2.drive() == EXIT_STAGE_FAILED
    w3 = World(helm, str(tmp_path / "run3"), "s3.secretName=sims-s3", "queue=sims-gpu")
    w3.cluster.put("secrets", {"metadata": {"name": "sims-s3"}})
    w3.cluster.kueue = c.kueue
    w3.training = lambda run: 2  # a bad config in a training pod: the driver deletes the gang
    assert w3.drive() == EXIT_STAGE_FAILED
    calls = set(c.calls) | set(w2.cluster.calls) | set(w3.cluster.calls)
    role = next(d for d in w.docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-driver"))
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert calls <= allowed, f"not in the Role: {sorted(calls - allowed)}"
    assert allowed == calls, f"the Role grants more than the driver uses: {sorted(allowed - calls)}"
    names = {r.get("resourceNames", [None])[0] for r in role["rules"] if "secrets" in r["resources"]}
    assert names == {"sims-s3"}  # only its own Secret


def test_kueue_pytorchjob_integration_steps_enable_it():
    """docs/kubernetes.md's sed turns on kubeflow.org/pytorchjob in Kueue v0.19.2's shipped config."""
    import re
    import subprocess

    doc = (REPO / "docs/kubernetes.md").read_text()
    sed = re.search(r"sed -E '([^']+)'", doc).group(1)
    src = (REPO / "tests/k8s/fixtures/kueue-v0.19.2/controller_manager_config.yaml").read_text()
    before = yaml.safe_load(src)["integrations"]["frameworks"]
    assert "kubeflow.org/pytorchjob" not in before and "trainer.kubeflow.org/trainjob" in before
    out = subprocess.run(["sed", "-E", sed], input=src, capture_output=True, text=True, check=True).stdout
    after = yaml.safe_load(out)["integrations"]["frameworks"]
    assert set(after) == set(before) | {"kubeflow.org/pytorchjob"}
    assert NS  # the namespace the docs install into


def _bad_config_in_the_pods(w: World) -> None:
    """The ConfigMap the stage pods mount holds a config `sims` refuses (exit 2), e.g. one edited by hand."""
    cm = w.cluster.get("configmaps", w.spec.settings.config_map)
    cfg = yaml.safe_load(cm["data"]["pipeline.yaml"])
    cfg["train_base"]["batch_size"] = "many"
    cm["data"]["pipeline.yaml"] = yaml.safe_dump(cfg)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_bad_config_in_a_2_node_training_stage_fails_on_the_first_attempt(helm, tmp_path, backend):
    """Real torchrun (k8s/torchrun.py) between the container and `sims`: its workers exit 2, the container exits 2,
    and the stage fails at once instead of restarting the gang backoffLimit times."""
    w = World(helm, str(tmp_path / "run"), backend=backend, real_training=True).reference_done()
    _bad_config_in_the_pods(w)
    assert w.drive() == EXIT_STAGE_FAILED, w.logs[-5:]
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "stage train-base" in msg and ("exited 2" in msg or "exit 2" in msg), msg
    assert sorted(w.processes) == sorted(set(w.processes)) and len(w.processes) == 2, w.processes  # one attempt
    assert w.cluster.creates.count(TRAIN_BASE) == 1
    w.cluster.tick()  # the garbage collector takes the deleted workload's pods
    assert not [p for p in w.cluster.pods.values() if p["status"]["phase"] == "Running"]  # the gang is stopped


def test_a_failed_trainjob_is_not_rerun_after_its_jobsets_ttl(helm, tmp_path):
    """Trainer v2.3 rebuilds the JobSet of a failed TrainJob once the JobSet's TTL deleted it; the driver deletes
    the failed TrainJob after recording why, so nothing runs again."""
    w = World(helm, str(tmp_path / "run"), "ttlSecondsAfterFinished=3", backend="trainjob").reference_done()
    real = w.training
    w.training = lambda run: 1 if run.labels["sims.io/step"] == "train-base" else real(run)  # fails every attempt
    assert w.drive() == EXIT_STAGE_FAILED
    assert any("stage train-base" in m and "jobset failed" in m for m in w.logs)  # its failure was recorded
    for _ in range(10):  # past the JobSet's TTL
        w.cluster.tick()
    gang = [p for p in w.cluster.pods.values() if p["metadata"]["labels"].get("sims.io/step") == "train-base"]
    assert not gang, [p["metadata"]["name"] for p in gang]
    assert ("trainjobs", TRAIN_BASE) not in w.cluster.objects


def test_a_toleration_kueue_would_drop_from_a_trainjob_is_refused_with_a_message(helm, tmp_path):
    """Kueue's TrainJob patch carries its flavor's tolerations only, and Trainer replaces toleration lists when it
    merges patches: the stage's extra toleration would vanish and its pods wait for ever on the tainted pool."""
    extra = [f"stages.train-base.placement.tolerations[0].{k}={v}"
             for k, v in (("key", "dedicated"), ("operator", "Equal"), ("value", "ml"), ("effect", "NoSchedule"))]
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu", "stages.train-base.gpus=1", *extra, backend="trainjob",
              setup=_prepared_as_documented()).reference_done()
    for node in w.cluster.nodes.values():
        if node.name.startswith("gpu-"):
            node.taints.append({"key": "dedicated", "value": "ml", "effect": "NoSchedule"})
    ticks = {"n": 0}

    def bounded(_s):
        w.cluster.tick()
        ticks["n"] += 1
        if ticks["n"] > 60:
            raise Killed
    assert w.drive(sleep=bounded) == EXIT_STAGE_FAILED
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "dropping [" in msg and "'key': 'dedicated'" in msg and "ResourceFlavor" in msg, msg
    assert ("trainjobs", TRAIN_BASE) not in w.cluster.objects


def _gpu_quota(gpus: int):
    """k8s/README.md's cluster, with the h100 flavor's GPU quota cut to `gpus`."""
    base = _prepared_as_documented()

    def setup(c) -> None:
        base(c)
        for f in c.kueue["flavors"]:
            if f["name"] == "h100":
                f["quota"]["nvidia.com/gpu"] = gpus
    return setup


def test_a_32_shard_array_on_8_gpus_of_quota_is_admitted_in_parts(helm, tmp_path):
    """Kueue admits the 32-pod Indexed Job 8 pods at a time (partial admission) and every shard runs."""
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu", "stages.generate.shards=32", "stages.generate.gpus=1",
              setup=_gpu_quota(8))
    ticks = {"n": 0}

    def bounded(_s):  # without partial admission the Job would wait for 32 GPUs of quota for ever
        w.cluster.tick()
        ticks["n"] += 1
        if ticks["n"] > 200:
            raise Killed
    assert w.drive(sleep=bounded) == 0, w.logs[-3:]
    gen = w.cluster.objects.get(("jobs", "digits-dev-i00-generate"))
    assert gen["spec"]["parallelism"] == 8 and gen["spec"]["completions"] == 32
    assert any("generate" in m and "succeeded" in m for m in w.logs)


class _Clock:
    """The driver's clock on the simulated cluster: each poll (a tick) takes pollSeconds."""

    def __init__(self, w: World, limit: int = 400) -> None:
        self.w, self.t, self.ticks, self.limit = w, 0.0, 0, limit

    def sleep(self, _s: float) -> None:
        self.w.cluster.tick()
        self.t += self.w.spec.settings.poll_seconds
        self.ticks += 1
        if self.ticks > self.limit:
            raise Killed

    def __call__(self) -> float:
        return self.t


def test_a_pod_pending_past_the_deadline_fails_its_stage_naming_why(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "driver.pendingTimeoutSeconds=120")
    w.cluster.nodes = {"gpu-0": Node("gpu-0", {}, [GPU_TAINT])}  # no node the CPU pods tolerate
    clock = _Clock(w)
    assert w.drive(sleep=clock.sleep, clock=clock) == EXIT_STAGE_FAILED, w.logs[-3:]
    msg = next(m for m in w.logs if m.startswith("error:"))
    assert "stayed Pending for" in msg and "driver.pendingTimeoutSeconds 120" in msg
    assert "Unschedulable: 0/1 nodes are available" in msg
    assert 120 <= clock.t <= 120 + 4 * w.spec.settings.poll_seconds  # at the deadline, not long after


def test_a_workload_kueue_holds_for_quota_is_not_a_pending_pod(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu", "stages.generate.gpus=1",
              "driver.pendingTimeoutSeconds=60", setup=_gpu_quota(0))
    clock = _Clock(w, limit=100)
    with pytest.raises(Killed):  # waits for quota (1500 s of polls), never failed by the pending deadline
        w.drive(sleep=clock.sleep, clock=clock)
    assert not any(m.startswith("error:") for m in w.logs)
    gen = w.cluster.objects.get(("jobs", "digits-dev-i00-generate"))
    assert gen is not None and gen["spec"]["suspend"] is True
    assert not [p for p in w.cluster.pods.values() if p["metadata"]["labels"].get("sims.io/step") == "generate"]
