"""A run installed into the simulated cluster: the chart rendered by real helm, the driver, and stand-in programs
for the stage containers (training checkpoints through the real checkpoint code, so a restart resumes), or, with
real_training, each training pod's own command as a real process (real torchrun over real `sims`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from k8s_support import RELEASE, REPO, docs_of
from sim_cluster import Node, PodRun, SimCluster

from sims_platform.k8s.cli import drive
from sims_platform.k8s.kube import Apis
from sims_platform.k8s.pods import CONFIG_DIR
from sims_platform.k8s.render import run_specs
from sims_platform.storage import fsio
from sims_platform.steps import row
from sims_platform.storage.layout import RunLayout
from sims_platform.training.checkpoints import latest, save_checkpoint

NS = "sims"
TICKS_PER_TRAINING = 4
CPU_NODE = Node("cpu-0", {"pool": "cpu"})
GPU_TAINT = {"key": "nvidia.com/gpu", "effect": "NoSchedule", "value": "present"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEV_VALUES = "values-digits-dev.yaml"
# The digits dev values made small and quick: one iteration, a 2-node training gang, a 1 s poll.
DEV_SETS = ("pipeline.iterations.count=1", "stages.train-base.nodes=2", "driver.pollSeconds=1")


def render(helm, root: str, *sets: str, release: str = RELEASE, backend: str = "pytorchjob", namespace: str = NS,
           values: str = DEV_VALUES) -> str:
    """`helm template` as `helm install RELEASE charts/sims -f VALUES` renders it: no -n, the namespace is the
    kubeconfig context's (HELM_NAMESPACE here)."""
    args = ["template", release, "charts/sims", "-f", values, "--set", f"pipeline.storage.root={root}",
            "--set", f"training.backend={backend}"]
    for s in (DEV_SETS if values == DEV_VALUES else ()) + sets:
        args += ["--set", s]
    return helm(*args, namespace=namespace).stdout


class World:
    def __init__(self, helm, root: str, *sets: str, backend: str = "pytorchjob", oom: dict | None = None,
                 namespace: str = NS, values: str = DEV_VALUES, setup: Any = None, real_training: bool = False) -> None:
        """setup(cluster), if given, prepares the cluster (nodes, queues, Secrets) before the install;
        real_training runs each training pod's own command (real torchrun) instead of the stand-in."""
        self.helm, self.root, self.backend, self.ns, self.values = helm, root, backend, namespace, values
        self.text = render(helm, root, *sets, backend=backend, namespace=namespace, values=values)
        self.docs = docs_of(self.text)
        self.spec = run_specs(self.text)[0]
        self.layout = RunLayout.of(self.spec.cfg.storage.root)
        self.oom = dict(oom or {})            # (step, index) -> how many times it is OOM-killed
        self.resumed: list[tuple[str, int]] = []  # (pod, images it resumed from)
        self.logs: list[str] = []
        self.real_training = real_training
        self.scratch = root if "://" not in root else tempfile.mkdtemp(prefix="sims-sim-")
        self.processes: list[str] = []  # pods whose container ran as a real process, once per start
        self._ports: dict[tuple[str, str], int] = {}
        self._born: dict[str, int] = {}  # workload name -> tick it first appeared (since_created)
        self.cluster = SimCluster(namespace, self.program)
        self.cluster.crds |= {"pytorchjobs", "trainjobs", "trainingruntimes", "localqueues"}  # Kueue's CRDs too
        for i in range(2):
            self.cluster.nodes[f"node-{i}"] = Node(f"node-{i}")
        self.cluster.kueue = {"flavors": []}
        if setup is not None:
            setup(self.cluster)
        self.cluster.helm_apply(self.docs)

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
        text = render(self.helm, self.root, *sets, backend=self.backend, namespace=self.ns, values=self.values)
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
        if row(step).kind == "training":
            return self.container if self.real_training else self.training
        return self.job_step

    # -- real processes --------------------------------------------------------------------------------
    def _mounted_config(self, pod: dict) -> Path:
        """The pod's `config` volume (its ConfigMap's keys as files), as the kubelet mounts it at /etc/sims."""
        (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
        cm = self.cluster.get("configmaps", vol["configMap"]["name"])
        folder = Path(tempfile.mkdtemp(prefix="etc-sims-", dir=self.scratch))
        for key, text in (cm.get("data") or {}).items():
            (folder / key).write_text(text)
        return folder

    def _torch_env(self, pod: dict) -> dict[str, str]:
        """What the operator injects for torchrun: PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE and the master's
        address. Training operator v1.9.4 pkg/controller.v1/pytorch/envvar.go:62-122 (the Master is rank 0, Worker i
        rank i+1) and master.go:45-57; Trainer v2.3.0 pkg/runtime/framework/plugins/torch/torch.go:145-166 (node
        Job index i is rank i). The master's Service is 127.0.0.1 here, one port per workload and attempt."""
        resource, owner = pod["owner"]
        name = pod["metadata"]["name"]
        if resource == "pytorchjobs":
            rank = 0 if name.endswith("-master-0") else int(name.rsplit("-", 1)[1]) + 1
            attempt = "0"
        else:
            rank = int(name.split("-node-0-")[1].split("-")[0])
            attempt = pod["metadata"]["labels"].get("jobset.sigs.k8s.io/restart-attempt", "0")
        port = self._ports.setdefault((owner, attempt), _free_port())
        return {"PET_NNODES": str(self._nodes_of(resource, owner)), "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}

    def container(self, run: PodRun) -> int | None:
        """The pod's own command and args as a real process (python -m sims_platform.k8s.torchrun: real torchrun
        over real `sims`), with the container's env, the operator's PET_* and the config mounted; None while it
        runs, else its exit code. A container restart (run.starts) starts a new process."""
        st = run.state
        if st.get("start") != run.starts:
            pod = run.pod
            (c,) = pod["spec"]["containers"]
            mount = self._mounted_config(pod)
            argv = [sys.executable if a == "python" else a for a in c["command"]]
            argv += [a.replace(CONFIG_DIR, str(mount)) for a in c["args"]]
            env = dict(os.environ, **{e["name"]: e["value"] for e in c.get("env") or [] if "value" in e})
            env.update(self._torch_env(pod), HOME=str(mount), PYTHONPATH=str(REPO))
            log = open(mount / "container.log", "wb")
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            st.clear()
            st.update(start=run.starts, proc=proc, log=mount / "container.log",
                      stop=lambda: (os.killpg(proc.pid, signal.SIGKILL), proc.wait()) if proc.poll() is None else None)
            self.processes.append(pod["metadata"]["name"])
        code = st["proc"].poll()
        if code is None:
            time.sleep(0.02)  # the process runs in real time: let it
        return code

    def _nodes_of(self, resource: str, name: str) -> int:
        obj = self.cluster.objects[(resource, name)]
        if resource == "trainjobs":
            return obj["spec"]["trainer"]["numNodes"]
        return sum(r["replicas"] for r in obj["spec"]["pytorchReplicaSpecs"].values())

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
        return self._nodes_of(*run.pod["owner"])

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
        gang = [p for p in self._gang(run) if p["node"] is None or self.cluster.nodes[p["node"]].ready]
        if "peers" not in st:
            if sum(1 for p in gang if p["status"]["phase"] == "Running") < self._nodes(run):
                return None  # rendezvous: every node's agent must join (a dead node's never does)
            st["peers"] = {p["metadata"]["uid"] for p in gang}
        if st["peers"] != {p["metadata"]["uid"] for p in gang}:
            return 1  # torchrun: a peer is gone or stopped answering (its node was lost); the agent exits 1
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
