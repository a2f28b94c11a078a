"""A self-consuming loop experiment on the cluster: the chart accepts `pipeline.loop`, and the driver's plan (the
same plan the local runner follows) renders one shared generation 0 and each loop's own workloads, with
deterministic, unique DNS names and `sims stage ... --loop NAME` commands the CLI accepts."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from k8s_support import K8S_VERSIONS, containers, sims_parser

from sims_platform.steps import Step
from sims_platform.k8s.names import MAX_NAME, is_dns_label, workload_name
from sims_platform.k8s.render import render_objects, run_specs
from sims_platform.k8s.workloads import plan
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.storage.layout import RunLayout

LOOP = {"arms": ["standard", "sims"], "feed_fractions": [0.5, 2], "generations": 3, "accumulate": True}


@pytest.fixture(scope="module")
def loop_manifests(helm) -> str:
    return helm("template", "sims-run", "charts/sims", "-f", "values-digits-dev.yaml",
                "--set", "pipeline.iterations.count=1", "--set-json", f"pipeline.loop={json.dumps(LOOP)}").stdout


def test_loop_renders_a_shared_generation_0_and_each_loops_own_workloads(loop_manifests):
    spec = run_specs(loop_manifests)[0]
    cfg = spec.cfg
    assert cfg.loop is not None and cfg.loop.accumulate
    workloads = plan(cfg, spec.settings)
    objs = render_objects(loop_manifests)
    names = [o["metadata"]["name"] for o in objs]
    assert names == [w.name for w in workloads]
    assert len(set(names)) == len(names) and all(is_dns_label(n, MAX_NAME) for n in names)
    # every step of the plan the local runner follows, each array stage with its reducer
    assert [(w.iteration, w.stage, w.loop) for w in workloads if w.step == w.stage] == \
        [(s.iteration, s.stage, s.loop) for s in pipeline_plan(cfg)]
    shared = [w for w in workloads if w.loop is None]
    assert {w.iteration for w in shared} == {0} and "feed" not in {w.stage for w in shared}
    assert sum(w.step == "train-base" for w in shared) == 1
    for loop in cfg.loop.loops():
        own = [w for w in workloads if w.loop == loop.name]
        assert [w.step for w in own if w.iteration == 0] == ["feed"]
        assert {w.step for w in own if w.iteration == 2} == (
            {"train-base", "evaluate", "evaluate-reduce"} | ({"generate", "finetune-aux"} if loop.arm == "sims" else set()))
        for w in own:
            labels = w.body["metadata"]["labels"]
            assert labels["sims.io/loop"] == loop.name and labels["sims.io/iteration"] == str(w.iteration)
            for c in containers(w.body):
                args = sims_parser().parse_args(c["args"])
                assert (args.loop, args.iteration) == (loop.name, w.iteration)
    # done markers: one per (loop, iteration, stage); the shared generation 0's are the run's own
    layout = RunLayout.of(cfg.storage.root)
    markers = {layout.in_loop(w.loop).done_marker(w.iteration, w.stage) for w in workloads}
    assert len(markers) == len({(w.loop, w.iteration, w.stage) for w in workloads})
    for o in objs:
        if o["kind"] == "Job":
            kubernetes_validate.validate(o, K8S_VERSIONS[0], strict=True)


def test_loop_workload_names_are_deterministic_and_unique_per_loop():
    a = workload_name("digits-dev", Step(1, "evaluate-reduce", "standard-dp200"))
    assert a == "digits-dev-standard-dp200-i01-evaluate-reduce" == workload_name(
        "digits-dev", Step(1, "evaluate-reduce", "standard-dp200"))
    assert a != workload_name("digits-dev", Step(1, "evaluate-reduce", "standard-dp50"))
    long = [workload_name("a" * 40, Step(2, "evaluate-reduce", loop)) for loop in ("sims-dp50", "sims-dp200")]
    assert len(set(long)) == 2 and all(is_dns_label(n, MAX_NAME) for n in long)
    assert workload_name("digits", Step(0, "train-base")) == "digits-i00-train-base"  # the shared pipeline's: as before
