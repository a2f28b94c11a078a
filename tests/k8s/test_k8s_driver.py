"""The driver against a fake API (the kubernetes client's method surface): order, failure, restart, RBAC."""

from __future__ import annotations

import inspect

import kubernetes.client as k8s
import pytest
from fake_kube import (
    DELETE,
    JOB_FAILED,
    JOB_SUSPENDED,
    PTJ_FAILED,
    PTJ_SUSPENDED,
    FakeBatchV1Api,
    FakeCluster,
    FakeCoreV1Api,
    FakeCustomObjectsApi,
)

from sims_platform.k8s.driver import Driver, StageFailed
from sims_platform.k8s.kube import Apis
from sims_platform.k8s.render import run_specs
from sims_platform.k8s.workloads import plan
from sims_platform.steps import row
from sims_platform.storage.layout import RunLayout


class Killed(Exception):
    """The driver pod was killed (raised from sleep)."""


@pytest.fixture
def spec(rendered):
    return run_specs(rendered("values-digits-dev.yaml"))[0]


class World:
    """A fake cluster plus the run's storage (done markers written when a stage's workload succeeds)."""

    def __init__(self, spec):
        self.spec = spec
        self.layout = RunLayout.of(spec.cfg.storage.root)
        self.markers: set[str] = set()
        self.cluster = FakeCluster(spec.settings.namespace, on_success=self._succeeded)
        self.logs: list[str] = []

    def _succeeded(self, labels):
        step, stage = labels["sims.io/step"], labels["sims.io/stage"]
        if row(stage).reducer in (None, step):  # slices do not mark the stage done
            self.markers.add(self.layout.done_marker(int(labels["sims.io/iteration"]), stage))

    def driver(self, sleep=lambda s: None) -> Driver:
        c = self.cluster
        return Driver(self.spec.cfg, self.spec.settings, Apis(c.batch, c.custom, c.core),
                      done=self.markers.__contains__, sleep=sleep, log=self.logs.append)


def test_fakes_have_the_real_client_signatures():
    for fake, real in ((FakeBatchV1Api, k8s.BatchV1Api), (FakeCustomObjectsApi, k8s.CustomObjectsApi),
                       (FakeCoreV1Api, k8s.CoreV1Api)):
        for name, fn in inspect.getmembers(fake, inspect.isfunction):
            if name.startswith("_"):
                continue
            assert hasattr(real, name), f"{real.__name__} has no method {name}"
            assert inspect.signature(fn) == inspect.signature(getattr(real, name)), name


def test_success_path_creates_each_workload_once_in_order(spec):
    w = World(spec)
    w.driver().run()
    expected = [x.name for x in plan(spec.cfg, spec.settings)]
    assert w.cluster.creates == expected
    assert len(w.markers) == sum(1 for x in plan(spec.cfg, spec.settings) if row(x.step).reducer is None)
    assert "every stage succeeded" in w.logs[-1]


def test_failing_stage_names_stage_and_reason(spec):
    w = World(spec)
    w.cluster.scripts["digits-dev-i00-generate"] = JOB_FAILED
    w.cluster.pods.append({"metadata": {"name": "digits-dev-i00-generate-1-abcde", "labels": {
        "sims.io/run": "digits-dev", "sims.io/iteration": "0", "sims.io/step": "generate"}},
        "status": {"containerStatuses": [{"name": "sims", "image": "x", "imageID": "", "ready": False,
                                           "restartCount": 0, "state": {"terminated": {
                                               "exitCode": 137, "reason": "OOMKilled"}}}]}})
    with pytest.raises(StageFailed) as err:
        w.driver().run()
    msg = str(err.value)
    assert "stage generate" in msg and "iteration 0" in msg and "BackoffLimitExceeded" in msg
    assert "OOMKilled (exit 137)" in msg
    assert "digits-dev-i00-finetune-aux" not in w.cluster.creates  # nothing after the failed stage


def test_failing_pytorchjob(spec):
    w = World(spec)
    w.cluster.scripts["digits-dev-i01-finetune-aux"] = PTJ_FAILED
    with pytest.raises(StageFailed, match=r"stage finetune-aux .*iteration 1.*PyTorchJobFailed"):
        w.driver().run()


def test_restarted_driver_adopts_and_never_duplicates(spec):
    w = World(spec)
    def dying_sleep(_):
        if "digits-dev-i00-finetune-aux" in w.cluster.creates:  # killed while the first finetune-aux is running
            raise Killed

    with pytest.raises(Killed):
        w.driver(dying_sleep).run()
    before = list(w.cluster.creates)
    assert before[-1] == "digits-dev-i00-finetune-aux"
    # TTL deleted the finished train-base: its done marker still says it is complete
    del w.cluster.objects[("pytorchjobs", "digits-dev-i00-train-base")]
    w.driver().run()
    assert len(w.cluster.creates) == len(set(w.cluster.creates)), w.cluster.creates
    assert w.cluster.creates[: len(before)] == before
    assert any("adopting existing PyTorchJob digits-dev-i00-finetune-aux" in m for m in w.logs)
    assert any("train-base] done" in m for m in w.logs)


def test_stage_deleted_by_hand_is_recreated(spec):
    w = World(spec)
    w.cluster.scripts["digits-dev-i00-evaluate"] = [{}, {"active": 1, "startTime": "2026-11-01T10:00:00Z"}, DELETE]
    w.driver().run()
    assert w.cluster.creates.count("digits-dev-i00-evaluate") == 2
    assert any("recreated (it was deleted) Job digits-dev-i00-evaluate" in m for m in w.logs)


def test_kueue_suspended_workloads_are_waiting_not_failed(spec):
    w = World(spec)
    w.cluster.scripts["digits-dev-i00-train-base"] = PTJ_SUSPENDED
    w.cluster.scripts["digits-dev-i00-generate"] = JOB_SUSPENDED
    w.driver().run()
    assert any("digits-dev-i00-train-base: Waiting (PyTorchJobSuspended" in m for m in w.logs)
    assert any("digits-dev-i00-generate: Waiting (JobSuspended" in m for m in w.logs)
    assert "every stage succeeded" in w.logs[-1]


def test_temporary_api_errors_are_retried(spec):
    w = World(spec)
    real_read = w.cluster.batch.read_namespaced_job
    failures = iter([k8s.exceptions.ApiException(status=503), k8s.exceptions.ApiException(status=429)])

    def flaky(name, namespace, **kwargs):
        err = next(failures, None)
        if err:
            raise err
        return real_read(name, namespace, **kwargs)

    w.cluster.batch.read_namespaced_job = flaky
    w.driver().run()
    assert len(w.cluster.creates) == len(plan(spec.cfg, spec.settings))


# The Role-covers-every-call check runs on the simulated cluster, with the preflight:
# tests/k8s/test_k8s_sim.py::test_every_driver_call_is_allowed_by_the_chart_role


def test_driver_uses_its_release_namespace(rendered):
    text = rendered("values-digits-dev.yaml").replace("namespace: \"default\"", "namespace: \"sims\"")
    spec = run_specs(text)[0]
    assert spec.settings.namespace == "sims"
    w = World(spec)
    w.driver().run()  # the fake asserts every call is in "sims"
    assert w.cluster.creates
