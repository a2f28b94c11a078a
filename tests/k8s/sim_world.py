"""A run installed into the simulated cluster: the chart rendered by real helm, the driver, and stand-in programs
for the stage containers (training checkpoints through the real checkpoint code, so a restart resumes)."""

from __future__ import annotations

from typing import Any

from k8s_support import RELEASE, docs_of
from sim_cluster import Node, PodRun, SimCluster

from sims_platform.k8s.cli import drive
from sims_platform.k8s.kube import Apis
from sims_platform.k8s.render import run_specs
from sims_platform.storage import fsio
from sims_platform.steps import row
from sims_platform.storage.layout import RunLayout
from sims_platform.training.checkpoints import latest, save_checkpoint

NS = "sims"
TICKS_PER_TRAINING = 4
CPU_NODE = Node("cpu-0", {"pool": "cpu"})
GPU_TAINT = {"key": "nvidia.com/gpu", "effect": "NoSchedule", "value": "present"}


def render(helm, root: str, *sets: str, release: str = RELEASE, backend: str = "pytorchjob") -> str:
    args = ["template", release, "charts/sims", "-n", NS, "-f", "values-digits-dev.yaml",
            "--set", f"pipeline.storage.root={root}", "--set", "pipeline.iterations.count=1",
            "--set", "stages.train-base.nodes=2", "--set", f"training.backend={backend}", "--set", "driver.pollSeconds=1"]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


class World:
    def __init__(self, helm, root: str, *sets: str, backend: str = "pytorchjob", oom: dict | None = None) -> None:
        self.helm, self.root, self.backend = helm, root, backend
        self.text = render(helm, root, *sets, backend=backend)
        self.docs = docs_of(self.text)
        self.spec = run_specs(self.text)[0]
        self.layout = RunLayout.of(self.spec.cfg.storage.root)
        self.oom = dict(oom or {})            # (step, index) -> how many times it is OOM-killed
        self.resumed: list[tuple[str, int]] = []  # (pod, images it resumed from)
        self.logs: list[str] = []
        self._born: dict[str, int] = {}  # workload name -> tick it first appeared (since_created)
        self.cluster = SimCluster(NS, self.program)
        self.cluster.crds |= {"pytorchjobs", "trainjobs", "trainingruntimes"}
        for i in range(2):
            self.cluster.nodes[f"node-{i}"] = Node(f"node-{i}")
        self.cluster.helm_apply(self.docs)
        self.cluster.kueue = {"flavors": []}

    @property
    def apis(self) -> Apis:
        c = self.cluster
        return Apis(c.batch, c.custom, c.core)

    def drive(self, sleep=None, **kw: Any) -> int:
        return drive(self.spec.cfg, self.spec.settings, self.apis, sleep=sleep or self.cluster.tick,
                     log=self.logs.append, **kw)

    def run_driver_job(self, **kw: Any) -> dict:
        """The current revision's driver Job runs one pod: the real driver, as in the chart's container."""
        name = next(d["metadata"]["name"] for d in self.docs if d["kind"] == "Job"
                    and d["metadata"]["labels"].get("app.kubernetes.io/component") == "driver")

        def go() -> tuple[int, str]:
            code = self.drive(**kw)
            return code, "\n".join(self.logs)
        return self.cluster.run_driver(name, go)

    def upgrade(self, *sets: str) -> None:
        text = render(self.helm, self.root, *sets, backend=self.backend)
        docs = docs_of(text)
        self.cluster.helm_apply(docs, previous=self.docs)
        self.text, self.docs, self.spec = text, docs, run_specs(text)[0]

    # -- the stand-in containers -----------------------------------------------------------------------
    def reference_done(self) -> World:
        """Record the run-level reference stage as complete, so the run's first workload is train-base's (tests of
        a training stage's pods)."""
        fsio.write_json(self.layout.done_marker(0, "reference"), {"result": {}})
        return self

    def since_created(self, name: str) -> int:
        """Ticks since a workload of this name appeared in the cluster, -1 while it does not exist (called once per
        tick, e.g. from a driver's sleep, it marks a point in the run independent of the stages before it)."""
        if name not in self._born:
            if not any(key == (kind, name) for kind in ("pytorchjobs", "trainjobs", "jobs")
                       for key in self.cluster.objects):
                return -1
            self._born[name] = self.cluster.now
        return self.cluster.now - self._born[name]

    def program(self, pod: dict):
        step = pod["metadata"]["labels"]["sims.io/step"]
        return self.training if row(step).kind == "training" else self.job_step

    def _marker(self, labels: dict) -> str:
        return self.layout.done_marker(int(labels["sims.io/iteration"]), labels["sims.io/stage"])

    def job_step(self, run: PodRun) -> int | None:
        labels = run.labels
        step, stage = labels["sims.io/step"], labels["sims.io/stage"]
        index = int(labels.get("batch.kubernetes.io/job-completion-index", 0))
        if self.oom.get((step, index), 0) > 0:
            self.oom[(step, index)] -= 1
            return 137
        if row(stage).reducer in (None, step):  # slices do not complete the stage
            fsio.write_json(self._marker(labels), {"result": {}})
        else:  # an evaluate or reference slice records its part
            count = self.spec.settings.stage(step).shards
            fsio.write_json(self.layout.part_marker(int(labels["sims.io/iteration"]), stage, index, count), {})
        return 0

    def _gang(self, run: PodRun) -> list[dict]:
        return [p for p in self.cluster.owned_pods(run.pod["owner"])]

    def _nodes(self, run: PodRun) -> int:
        resource, name = run.pod["owner"]
        obj = self.cluster.objects[(resource, name)]
        if resource == "trainjobs":
            return obj["spec"]["trainer"]["numNodes"]
        return sum(r["replicas"] for r in obj["spec"]["pytorchReplicaSpecs"].values())

    def training(self, run: PodRun) -> int | None:
        """torchrun: wait for every node (rendezvous), rank 0 trains and checkpoints; a lost peer -> exit 1."""
        labels = run.labels
        k, stage = int(labels["sims.io/iteration"]), labels["sims.io/stage"]
        if fsio.exists(self._marker(labels)):
            return 0
        rank0 = run.pod["metadata"]["name"].endswith("-master-0") or "-node-0-0-" in run.pod["metadata"]["name"]
        if rank0 and self.oom.get((labels["sims.io/step"], 0), 0) > 0:
            self.oom[(labels["sims.io/step"], 0)] -= 1
            return 137
        st = run.state
        if st.get("start") != run.starts:  # a new container start: rendezvous again, then resume
            st.clear()
            st["start"] = run.starts
        gang = self._gang(run)
        if "peers" not in st:
            if sum(1 for p in gang if p["status"]["phase"] == "Running") < self._nodes(run):
                return None
            st["peers"] = {p["metadata"]["uid"] for p in gang}
        if st["peers"] != {p["metadata"]["uid"] for p in gang}:
            return 1  # torchrun: a peer is gone (its node was lost); the agent exits 1
        name = run.pod["metadata"]["name"]
        if not (name.endswith("-master-0") or "-node-0-0-" in name):
            return None
        folder = self.layout.checkpoints(k, stage)
        total = self.spec.cfg.training(stage).images
        if "images" not in st:
            ck = latest(folder)
            st["images"] = ck.images if ck else 0
            self.resumed.append((name, st["images"]))
        st["images"] = min(total, st["images"] + -(-total // TICKS_PER_TRAINING))
        save_checkpoint(folder, st["images"], {"images": st["images"]}, keep=2)
        if st["images"] >= total:
            fsio.write_json(self._marker(labels), {"result": {"images": total}})
            return 0
        return None
