"""`sims status` on the simulated cluster: the driver row, why pods wait (missing Secret, unschedulable, Kueue),
restarts and OOM kills, checkpoint and part progress, and the read-only Role that covers every call it makes."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException
from sim_world import GPU_TAINT, NS, Node, World

from sims_platform.k8s.exit_codes import EXIT_NOT_READY, EXIT_STAGE_FAILED
from sims_platform.k8s.podstatus import pod_notes
from sims_platform.k8s.status import run_status, workload_status
from sims_platform.training.checkpoints import committed


class Killed(Exception):
    """The driver's pod died (raised from its sleep): the run is left as it was, for `sims status` to read."""


TRAIN_BASE = "digits-dev-i00-train-base"  # the first workload after the run-level reference stage


def drive_until(w: World, stop, most: int = 60, before=lambda: None) -> None:
    """Run the driver until stop() is true after a tick (or `most` ticks), then kill it; before() runs
    ahead of every tick (after the driver's preflight)."""
    ticks = {"n": 0}

    def sleep(_s: float) -> None:
        before()
        w.cluster.tick()
        ticks["n"] += 1
        if stop() or ticks["n"] >= most:
            raise Killed
    with pytest.raises(Killed):
        w.drive(sleep=sleep)


def status(w: World) -> tuple[str, dict]:
    text = run_status(w.apis, NS, w.spec.cfg.name)
    rows, _, driver = workload_status(w.apis, NS, w.spec)
    return text, {(r.iteration, r.step): r for r in rows} | {"driver": driver}


def test_a_deleted_s3_secret_shows_as_the_stage_pods_waiting_reason(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "s3.secretName=sims-s3").reference_done()
    w.cluster.put("secrets", {"metadata": {"name": "sims-s3"}})
    # the Secret goes away once the run started (rotated, deleted by hand): the preflight passed
    drive_until(w, lambda: w.since_created(TRAIN_BASE) >= 2,
                before=lambda: w.cluster.objects.pop(("secrets", "sims-s3"), None))
    text, by = status(w)
    row = by[(0, "train-base")]
    assert row.state.startswith("Running") or row.state.startswith("Waiting"), row
    assert row.pods == "0/2"
    assert any('CreateContainerConfigError: secret "sims-s3" not found' in n for n in row.notes), row.notes
    assert 'CreateContainerConfigError: secret "sims-s3" not found' in text
    assert "(+1 more)" in text  # both pods of the gang, one line


def test_an_unschedulable_stage_shows_the_schedulers_message(helm, tmp_path):
    w = World(helm, str(tmp_path / "run")).reference_done()
    w.cluster.nodes = {"gpu-0": Node("gpu-0", {"pool": "gpu"}, [GPU_TAINT])}  # nothing tolerates the taint
    drive_until(w, lambda: w.since_created(TRAIN_BASE) >= 1)
    text, by = status(w)
    assert any(n.endswith("Pending: Unschedulable: 0/1 nodes are available") for n in by[(0, "train-base")].notes)
    assert "Pending: Unschedulable: 0/1 nodes are available" in text


def test_a_workload_kueue_does_not_admit_says_so_and_why(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu").reference_done()
    c = w.cluster
    c.crds |= {"workloads"}  # the chart rendered the LocalQueue sims-gpu
    c.kueue = {"flavors": [{"name": "gpu", "resources": ["nvidia.com/gpu"]}]}  # no CPU/memory quota at all
    drive_until(w, lambda: w.since_created(TRAIN_BASE) >= 1)
    text, by = status(w)
    row = by[(0, "train-base")]
    assert row.state == "Waiting for Kueue admission"
    assert row.pods == "-"
    assert ("not admitted: Pending: couldn't assign flavors to pod set main: resource cpu unavailable in "
            "ClusterQueue") in row.notes[0]
    assert "Waiting for Kueue admission" in text and "resource cpu unavailable" in text
    # Kueue ignoring the kind (its integration off): suspended, but no Workload ever appears
    for key in [k for k in c.objects if k[0] == "workloads"]:
        del c.objects[key]
    _, by = status(w)
    assert "kubeflow.org/pytorchjob integration enabled?" in by[(0, "train-base")].notes[0]
    # a user without the status Role: the row still says it waits, and what to bind to learn why
    c.crds -= {"workloads"}
    real = c.custom.list_namespaced_custom_object

    def forbidden(group, version, namespace, plural, **kw):
        if plural == "workloads":
            raise ApiException(status=403, reason="Forbidden")
        return real(group, version, namespace, plural, **kw)
    c.custom.list_namespaced_custom_object = forbidden
    _, by = status(w)
    assert by[(0, "train-base")].state == "Waiting for Kueue admission"
    assert "status Role, e.g. sims-run-status" in by[(0, "train-base")].notes[0]  # the name the chart renders


def test_an_oom_killed_trainer_and_half_done_training_show_restarts_and_checkpoint_progress(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), oom={("train-base", 0): 1})
    drive_until(w, lambda: len(committed(w.layout.checkpoints(0, "train-base"))) >= 2)
    text, by = status(w)
    row = by[(0, "train-base")]
    total = w.spec.cfg.train_base.images
    assert row.progress == f"{total // 2}/{total} img (50%)"  # 2 of 4 checkpoints (sim_world.TICKS_PER_TRAINING)
    assert row.restarts == "1"
    assert any(n.endswith("-master-0: restarted 1x, last OOMKilled (exit 137)") for n in row.notes), row.notes
    assert by[(0, "generate")].progress == "0/2 parts" and by[(0, "generate")].state == "-"
    assert f"{total // 2}/{total} img (50%)" in text


def test_a_failed_stage_shows_the_driver_exit_parts_done_and_the_oom_killed_part(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), oom={("evaluate", 1): 9})
    pod = w.run_driver_job()
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == EXIT_STAGE_FAILED
    text, by = status(w)
    d = by["driver"]
    assert d.name.endswith("-driver-r1") and d.revision == 1
    assert d.state.startswith("Failed (PodFailurePolicy") and "failed 1" in d.counts
    assert any(n.endswith(f"exit {EXIT_STAGE_FAILED}: a stage failed (see its row below)") for n in d.notes)
    assert any(n.startswith("error: stage evaluate (step evaluate) of iteration 0 failed") for n in d.notes)
    ev = by[(0, "evaluate")]
    assert ev.state.startswith("Failed (FailedIndexes")
    assert ev.progress == "1/2 parts"
    assert ev.restarts == "3"  # backoffLimitPerIndex 2: three failed pods of index 1
    assert any("failed, last OOMKilled (exit 137)" in n for n in ev.notes), ev.notes
    assert by[(0, "train-base")].progress == "done"
    assert text.splitlines()[1].startswith(f"driver: Job {d.name} (revision 1): Failed")


def test_a_driver_that_cannot_start_names_what_is_missing(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"), "s3.secretName=sims-s3")  # the Secret was never created
    w.run_driver_job()
    text, by = status(w)
    d = by["driver"]
    assert any(n.endswith(f"exit {EXIT_NOT_READY}: cannot start: preflight, storage owned by another run, or a "
                          "changed pipeline") for n in d.notes)
    assert "Secret sims-s3 not found in namespace sims" in text
    assert all(r.state == "-" for k, r in by.items() if k != "driver")


def test_without_a_driver_job_status_says_how_to_start_one(helm, tmp_path):
    w = World(helm, str(tmp_path / "run"))
    for key in [k for k in w.cluster.objects if k[0] == "jobs"]:
        del w.cluster.objects[key]  # TTL-deleted after it finished
    text, _ = status(w)
    assert "driver: no driver Job of release" in text and "--reuse-values starts one" in text


def test_pod_notes_name_image_pull_and_group_pods():
    def pod(name: str, waiting: dict) -> dict:
        return {"metadata": {"name": name}, "status": {"phase": "Pending", "containerStatuses": [
            {"name": "sims", "restartCount": 0, "state": {"waiting": waiting}}]}}
    pull = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/x/sims:9"'}
    notes = pod_notes([pod("a-0", pull), pod("a-1", pull), pod("a-2", {"reason": "ContainerCreating"})])
    assert notes == ['pod a-0 (+1 more): ImagePullBackOff: Back-off pulling image "ghcr.io/x/sims:9"']


@pytest.mark.parametrize("backend,sets", [("pytorchjob", ("queue=sims-gpu",)), ("trainjob", ("queue=sims-gpu",)),
                                          ("pytorchjob", ())])
def test_every_status_call_is_allowed_by_the_status_role(helm, tmp_path, backend, sets):
    w = World(helm, str(tmp_path / "run"), *sets, backend=backend)
    w.cluster.crds |= {"workloads"}
    w.cluster.calls.clear()
    run_status(w.apis, NS, w.spec.cfg.name)
    calls = set(w.cluster.calls)
    role = next(d for d in w.docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-status"))
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert calls == allowed, (sorted(calls - allowed), sorted(allowed - calls))
    assert all(v == "list" for _, _, v in allowed)  # read-only


def test_a_dead_node_shows_its_terminating_pod_and_the_remedy(helm, tmp_path):
    """A node that stops (its Node object stays): its pod stays Terminating, the gang waits; `sims status` names the
    node and the out-of-service taint; once tainted, the pod is replaced and the run finishes."""
    w = World(helm, str(tmp_path / "run")).reference_done()
    w.cluster.nodes["node-2"] = Node("node-2")  # room for the replacement
    dead = {}

    def kill_a_worker_node() -> None:
        if not dead and len(committed(w.layout.checkpoints(0, "train-base"))) >= 1:
            worker = next(p for p in w.cluster.pods.values() if p["metadata"]["name"].endswith("-worker-0"))
            dead["node"] = worker["node"]
            w.cluster.node_dies(worker["node"])
    drive_until(w, lambda: False, most=40, before=kill_a_worker_node)
    assert dead
    text, by = status(w)
    note = next(n for n in by[(0, "train-base")].notes if "Terminating" in n)
    assert "digits-dev-i00-train-base-worker-0" in note and f"node {dead['node']}" in note
    assert f"kubectl taint nodes {dead['node']} node.kubernetes.io/out-of-service=nodeshutdown:NoExecute" in note
    assert "node.kubernetes.io/out-of-service" in text
    assert ("pytorchjobs", TRAIN_BASE) in w.cluster.objects and not any(
        c["type"] == "Succeeded" for c in w.cluster.objects[("pytorchjobs", TRAIN_BASE)]["status"]["conditions"])
    w.cluster.taint_out_of_service(dead["node"])  # the remedy
    assert w.drive() == 0, w.logs[-3:]


def test_a_kueue_without_the_pytorchjob_integration_never_runs_it_outside_quota(helm, tmp_path):
    """Kueue v0.19 ships with kubeflow.org/pytorchjob off: the PyTorchJob is created suspended, so it waits (and
    `sims status` says to enable the integration) instead of running its gang outside quota."""
    w = World(helm, str(tmp_path / "run"), "queue=sims-gpu").reference_done()
    w.cluster.kueue = {"flavors": [{"name": "any", "resources": ["cpu", "memory"]}], "integrations": {"jobs"}}
    w.cluster.crds |= {"workloads"}
    drive_until(w, lambda: w.since_created(TRAIN_BASE) >= 3)
    assert not [p for p in w.cluster.pods.values() if p["metadata"]["labels"].get("sims.io/step") == "train-base"]
    _, by = status(w)
    row = by[(0, "train-base")]
    assert row.state == "Waiting for Kueue admission"
    assert "kubeflow.org/pytorchjob integration enabled?" in row.notes[0]
