"""The pipeline driver: create each stage's workload in dependency order, wait on it, fail with its reason.

Level-triggered and idempotent: for each step it reads the world (the stage's done marker in storage, then
the workload by its deterministic name), and only then acts (create, or wait). A restarted driver therefore
adopts what exists, never duplicates a finished stage, and recreates a stage deleted by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sims_platform.config import PipelineConfig
from sims_platform.k8s import labels as L
from sims_platform.k8s.backend import TrainingBackend, backend_for
from sims_platform.k8s.jobs import PERMANENT_EXITS
from sims_platform.k8s.kube import Apis, is_conflict, is_not_found, is_temporary, to_dict
from sims_platform.k8s.settings import DriverSettings
from sims_platform.k8s.state import Observed, Phase, job_observed
from sims_platform.k8s.workloads import Workload, plan
from sims_platform.storage import fsio
from sims_platform.steps import row
from sims_platform.storage.layout import RunLayout


def where(w: Workload) -> str:
    """'iter K', or '<loop> iter K' for a self-consuming loop's workload."""
    return f"{w.loop + ' ' if w.loop else ''}iter {w.iteration}"


class StageFailed(RuntimeError):
    """Permanent: a stage's workload failed. The pipeline stops; the message names the stage, why, and how
    to go on once the cause is fixed."""

    def __init__(self, workload: Workload, reason: str, namespace: str = "", release: str = "") -> None:
        self.workload, self.reason = workload, reason
        retry = (f"; after fixing the cause: kubectl -n {namespace} delete {workload.kind.lower()} {workload.name} "
                 f"--ignore-not-found && helm upgrade {release} charts/sims -n {namespace} --reuse-values"
                 if namespace and release else "")
        loop = f"loop {workload.loop}, " if workload.loop else ""
        super().__init__(f"stage {workload.stage} (step {workload.step}) of {loop}iteration {workload.iteration} "
                         f"failed: {workload.kind} {workload.name}: {reason}{retry}")


class RunConflict(RuntimeError):
    """Permanent: the run's workloads or storage belong to another release, or its pipeline changed mid-run."""


class ApiUnavailable(RuntimeError):
    """The API server kept failing past the retry budget (temporary errors that did not go away)."""


class Driver:
    def __init__(self, cfg: PipelineConfig, settings: DriverSettings, apis: Apis, *,
                 backend: TrainingBackend | None = None, owner: dict[str, Any] | None = None,
                 done: Callable[[str], bool] = fsio.exists,
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] | None = None,
                 max_retries: int = 8) -> None:
        self.cfg, self.settings, self.apis = cfg, settings, apis
        self.backend = backend or backend_for(settings)
        self.owner = owner  # the run's ConfigMap: every workload's ownerReference
        self.layout = RunLayout.of(cfg.storage.root)
        self.done, self.sleep = done, sleep
        self.log = log or (lambda msg: print(msg, flush=True))
        self.max_retries = max_retries
        self.ns = settings.namespace
        self._seen_exits: dict[str, list[str]] = {}  # workload -> its pods' last failures seen while it ran

    # ------------------------------------------------------------------------
    # The loop

    def run(self) -> None:
        steps = plan(self.cfg, self.settings, self.backend, self.owner)
        lp = self.cfg.loop
        over = (f"a shared generation 0 and {len(lp.loops())} loop(s) of {lp.generations} generations" if lp else
                f"{self.cfg.iterations.count} iteration(s)")
        self.log(f"run {self.cfg.name}: {len(steps)} workloads over {over} in namespace {self.ns}")
        for w in steps:
            marker = self.layout.in_loop(w.loop).done_marker(w.iteration, w.stage)
            if self._call(self.done, marker):
                self.log(f"[{where(w)} {w.step}] done ({marker}); skipping")
                continue
            self.run_step(w)
        self.log(f"run {self.cfg.name}: every stage succeeded")

    def run_step(self, w: Workload) -> None:
        """Bring one workload to success: adopt it or create it, then wait; raise StageFailed if it fails."""
        last: Observed | None = None
        created = False
        while True:
            obj = self.read(w)
            obs = self.observed(w, obj)
            if obs.phase is Phase.MISSING:
                seen = created or last is not None
                # Finished and TTL-deleted between two polls: its completion record says so, never re-run it.
                if seen and self._step_done(w):
                    self.log(f"[{where(w)} {w.step}] {w.kind} {w.name} finished and was deleted "
                             "(ttlSecondsAfterFinished); its completion record is in storage")
                    return
                self.create(w, again=seen)
                created = True
            elif obs.phase is Phase.SUCCEEDED:
                self.log(f"[{where(w)} {w.step}] {w.kind} {w.name} succeeded")
                return
            elif obs.phase is Phase.FAILED:
                self._check_ours(w, obj)
                failed = StageFailed(w, self._failure_detail(w, obs), self.ns, self.settings.release)
                if not w.is_job and self.backend.delete_failed:
                    self.log(f"[{where(w)} {w.step}] {failed}")  # recorded before the object goes
                    self.delete(w)
                raise failed
            elif not w.is_job and (permanent := self.backend.conflict(obj or {}) or self._permanent_exit(w)):
                # Admitted with a placement the stage cannot run with, or a pod exited with a permanent code (an
                # OnFailure pod restarts in place whatever its code): stop the gang ourselves.
                self._check_ours(w, obj)
                self.delete(w)
                raise StageFailed(w, permanent, self.ns, self.settings.release)
            elif last is None and not created:
                self._check_ours(w, obj)
                self.log(f"[{where(w)} {w.step}] adopting existing {w.kind} {w.name} ({obs.describe()})")
            if obs != last and obs.phase is not Phase.MISSING:
                self.log(f"[{where(w)} {w.step}] {w.kind} {w.name}: {obs.describe()}")
            last = obs
            self.sleep(self.settings.poll_seconds)

    # ------------------------------------------------------------------------
    # Reading and writing one workload

    def read(self, w: Workload) -> dict[str, Any] | None:
        try:
            if w.is_job:
                return to_dict(self._call(self.apis.batch.read_namespaced_job, w.name, self.ns))
            b = self.backend
            return to_dict(self._call(self.apis.custom.get_namespaced_custom_object, b.group, b.version,
                                      self.ns, b.plural, w.name))
        except Exception as err:
            if is_not_found(err):
                return None
            raise

    def observe(self, w: Workload) -> Observed:
        return self.observed(w, self.read(w))

    def observed(self, w: Workload, obj: dict[str, Any] | None) -> Observed:
        if obj is None:
            return Observed(Phase.MISSING)
        return job_observed(obj) if w.is_job else self.backend.observe(obj)

    def _step_done(self, w: Workload) -> bool:
        """The step's completion record: the stage's done marker, or for a reduced array's slices every part
        marker."""
        layout = self.layout.in_loop(w.loop)
        if w.step == w.stage and row(w.stage).reducer:  # the reducer writes the stage's marker; slices write parts
            count = self.settings.stage(w.step).shards
            return all(self._call(self.done, layout.part_marker(w.iteration, w.stage, i, count))
                       for i in range(count))
        return bool(self._call(self.done, layout.done_marker(w.iteration, w.stage)))

    def _check_ours(self, w: Workload, obj: dict[str, Any] | None) -> None:
        """Adopt only what this release created: a same-named run of another release is not ours to wait on."""
        labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
        theirs = labels.get("app.kubernetes.io/instance")
        if theirs and theirs != self.settings.release:
            raise RunConflict(f"{w.kind} {w.name} in namespace {self.ns} belongs to release '{theirs}', not "
                              f"'{self.settings.release}': two releases run pipeline.name '{self.cfg.name}' here. "
                              "Give this release another pipeline.name, or uninstall the other one.")

    def create(self, w: Workload, again: bool = False) -> None:
        try:
            if w.is_job:
                self._call(self.apis.batch.create_namespaced_job, self.ns, w.body)
            else:
                b = self.backend
                self._call(self.apis.custom.create_namespaced_custom_object, b.group, b.version, self.ns,
                           b.plural, w.body)
        except Exception as err:
            if is_conflict(err):  # created meanwhile (another driver pod): adopt it
                return
            raise
        verb = "recreated (it was deleted)" if again else "created"
        self.log(f"[{where(w)} {w.step}] {verb} {w.kind} {w.name}")

    def delete(self, w: Workload) -> None:
        """Delete a training workload (its pods go with it, in the background); already gone is fine."""
        b = self.backend
        try:
            self._call(self.apis.custom.delete_namespaced_custom_object, b.group, b.version, self.ns, b.plural,
                       w.name, propagation_policy="Background")
        except Exception as err:
            if not is_not_found(err):
                raise
        self.log(f"[{where(w)} {w.step}] deleted {w.kind} {w.name}")

    def _pods(self, w: Workload) -> list[dict[str, Any]]:
        """The step's pods (this loop's only)."""
        selector = ",".join(f"{k}={v}" for k, v in ((L.RUN, self.cfg.name), (L.ITERATION, str(w.iteration)),
                                                      (L.STEP, w.step)))
        selector += f",{L.LOOP}={w.loop}" if w.loop else ""
        pods = to_dict(self._call(self.apis.core.list_namespaced_pod, self.ns, label_selector=selector))
        # the same iteration and step of another loop (or of the shared pipeline) is not this step's
        return [p for p in pods.get("items") or [] if ((p.get("metadata") or {}).get("labels") or {}).get(L.LOOP)
                == w.loop]

    @staticmethod
    def _exits(pod: dict[str, Any]) -> list[dict[str, Any]]:
        """The container's terminations the pod still shows: the current state's and the last one's."""
        out = []
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state"), cs.get("lastState")):
                if (term := (state or {}).get("terminated")) and term.get("exitCode"):
                    out.append(term)
        return out

    def _permanent_exit(self, w: Workload) -> str | None:
        """A pod of the step exited with a code no retry can fix (jobs.PERMANENT_EXITS, carried out of torchrun by
        k8s/torchrun.py): the failure, naming the pod; None while every failure is worth retrying."""
        pods = self._pods(w)
        if seen := self._exit_lines(pods):  # kept: cleanPodPolicy Running deletes them once the job fails
            self._seen_exits[w.name] = seen
        for pod in pods:
            for term in self._exits(pod):
                if term["exitCode"] in PERMANENT_EXITS:
                    return (f"pod {pod['metadata']['name']} exited {term['exitCode']} (bad config or input: "
                            "permanent, not retried; its log names the cause: kubectl -n "
                            f"{self.ns} logs {pod['metadata']['name']})")
        return None

    def _failure_detail(self, w: Workload, obs: Observed) -> str:
        """The workload's failure reason plus what its pods' containers said (OOMKilled, exit codes)."""
        detail = ": ".join(p for p in (obs.reason, obs.message) if p) or "Failed"
        try:
            seen = self._exit_lines(self._pods(w))
        except Exception:  # the reason above is enough; pods may be gone already
            seen = []
        seen = seen or self._seen_exits.get(w.name, [])  # what its pods said while it ran, if they are gone now
        return detail + (f"; pods: {'; '.join(seen[:5])}" if seen else "")

    def _exit_lines(self, pods: list[dict[str, Any]]) -> list[str]:
        return sorted({f"{pod['metadata']['name']}: {term.get('reason') or 'Error'} (exit {term['exitCode']})"
                       for pod in pods for term in self._exits(pod)[:1]})

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the API (or storage), retrying temporary errors with exponential backoff."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if not is_temporary(err) or attempt == self.max_retries:
                    if is_temporary(err):
                        raise ApiUnavailable(f"{getattr(fn, '__name__', fn)}: still failing after "
                                             f"{self.max_retries} retries: {err}") from err
                    raise
                self.sleep(min(2.0 ** attempt, 60.0))
        raise AssertionError("unreachable")
