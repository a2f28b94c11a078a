"""MLflow lineage: one pipeline run, one nested run per iteration and per stage, joined by explicit ids.

Every stage may run in its own process or pod, so nothing here uses MLflow's global active-run stack:
runs are found or created through `MlflowClient` by their tags and addressed by run id.

Run tree (run names in quotes)::

    "<pipeline name>"            sims.kind=pipeline   (id kept in <root>/run.json)
    ├── "iter-<k>"               sims.kind=iteration  sims.iteration=<k>
    │   └── "iter-<k>/<stage>"   sims.kind=stage      sims.iteration=<k>  sims.stage=<stage>
    └── "<loop>"                 sims.kind=loop       sims.loop=<loop>    (config `loop`: one per arm x |D_p|)
        └── "<loop>/iter-<k>"    sims.kind=iteration  ... and sims.loop=<loop> on each run below it
            └── "<loop>/iter-<k>/<stage>"

Tags (the lineage contract; query them in the UI search box, e.g. tags.`sims.stage` = 'train-base'):

- ``mlflow.parentRunId``: the parent in the tree above (MLflow's own nesting tag).
- ``sims.kind``: pipeline | loop | iteration | stage.
- ``sims.run_name``, ``sims.storage_root``: the pipeline's name and storage root URI (on every run).
- ``sims.loop``: a self-consuming loop's name (e.g. ``sims-dp50``) on its loop, iteration and stage runs; the
  shared generation 0 (iter-0) has none. Its metrics (``mad.fid``, ``mad.precision``, ``mad.recall``, step =
  generation, generation 0 included) compare the loops in MLflow's chart view.
- ``sims.iteration``: k as a decimal string; ``sims.stage``: one of the stage table's stages (a reducer or
  import-base logs into the run of the stage it completes: evaluate, iteration 0's train-base). Run-level
  stages (scope "run" in the stage table, e.g. encode) hang directly under the pipeline run, named "<stage>",
  without ``sims.iteration``.
- ``sims.input.<name>`` / ``sims.output.<name>``: URIs a stage read / wrote (`Lineage.link`). A model
  and the data that fed it are joined by equal URIs: e.g. iter-1/train-base's ``sims.input.synthetic``
  equals iter-0/feed's ``sims.output.shards``. `Lineage.producers_of(uri)` answers that question.
  Inputs are also logged as MLflow datasets (the run page's "Datasets used"), named by their key, with
  a digest of a shard set's checksums (tracking.datasets).

Status (every run ends in a true one): a stage run is RUNNING while a process works on it and FINISHED when
the stage completes; starting a stage marks its iteration and pipeline runs RUNNING again; a failed stage
ends its own, its iteration's and the pipeline's run FAILED (KILLED on Ctrl-C). The launchers finish an
iteration run once every stage of its plan is complete, and the pipeline run once every iteration is
(pipeline.runner.close_complete_runs). A new local attempt first ends what a killed one left RUNNING
(`end_interrupted`). The experiment is tagged as model training (mlflow.experimentKind), so MLflow 3's UI
opens it on the runs table rather than its GenAI views.

At a distance (pods on a cluster): the tracking URI is tracking.uri, else MLFLOW_TRACKING_URI, e.g.
http://mlflow.mlflow.svc:5000; the storage root may be s3:// (run.json lives there). The server stores
artifacts in S3 itself and proxies them::

    mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://bucket/mlflow

(--serve-artifacts is the default), so pods upload over HTTP and need no artifact-store credentials; only
the server gets AWS_* (and MLFLOW_S3_ENDPOINT_URL for an S3-compatible store). Every process of a stage
logs into the one stage run (stage_run); on ranks other than 0 (env RANK) the writes are skipped, so
run-level results come from rank 0, from a single process, or from the evaluate reducer.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from sims_platform.config.loader import dump_config
from sims_platform.config.schema import PipelineConfig
from sims_platform.storage.fsio import exists, read_json, write_json
from sims_platform.steps import RUN_STAGES, STAGES, Step, row
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking.datasets import dataset_input
from sims_platform.tracking.store import LineageError, default_artifact_location, open_client, resolve_tracking_uri

log = logging.getLogger(__name__)

PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
KIND, ITERATION, STAGE, LOOP = "sims.kind", "sims.iteration", "sims.stage", "sims.loop"
NAME, ROOT = "sims.run_name", "sims.storage_root"
INPUT, OUTPUT = "sims.input.", "sims.output."
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# MLflow 3's UI picks an experiment's views from this tag: without it, a new experiment opens on the GenAI
# pages (traces, prompts); model training opens on the runs table with charts and comparisons.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# How old the oldest of racing runs must be before every process trusts it (Lineage._canonical): paid only
# right after a run is created. On a tracking server it bounds request latency plus clock skew between pods;
# a local store has one clock, so only the time between taking a start time and committing the run counts.
CREATE_SETTLE_S = 2.0
LOCAL_SETTLE_S = 0.2
# Tries of a params batch that a concurrent part of the same job array may race (log_params).
PARAM_ATTEMPTS = 3


def process_rank() -> int:
    """This process's rank in a distributed stage (env RANK, set by torchrun and PyTorchJob); 0 alone."""
    raw = os.environ.get("RANK", "") or "0"
    try:
        return int(raw)
    except ValueError:
        raise LineageError(f"environment variable RANK={raw!r}: expected an integer rank") from None


# ----------------------------------------------------------------------------
# Small pure helpers


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists stay one value (their repr), None becomes 'None'."""
    if isinstance(obj, Mapping):
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(obj)}


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _quote(value: str) -> str:
    if "'" in value:
        raise LineageError(f"cannot search MLflow for a value containing a quote: {value!r}")
    return f"'{value}'"


# ----------------------------------------------------------------------------
# Lineage


class Lineage:
    """Get-or-create the run tree of one pipeline in one experiment, and log to runs by id."""

    def __init__(self, tracking_uri: str, experiment: str, layout: RunLayout,
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.layout = layout
        self.client = open_client(tracking_uri)
        self.experiment_id = self._experiment(
            experiment, artifact_location or default_artifact_location(tracking_uri, layout))
        self._pipeline_id: str | None = None
        self._common: dict[str, str] | None = None
        # Ranks of one distributed stage share its run; only rank 0 writes, the others would duplicate it.
        self.writes = process_rank() == 0

    @classmethod
    def from_config(cls, cfg: PipelineConfig, layout: RunLayout) -> Lineage:
        return cls(resolve_tracking_uri(cfg, layout), cfg.tracking.experiment, layout)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND: MODEL_TRAINING})
            except MlflowException:
                # Another stage created it between our lookup and create.
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise LineageError(f"MLflow experiment '{name}' (id {exp.experiment_id}) at {self.tracking_uri} is "
                               f"deleted: restore it (mlflow experiments restore --experiment-id "
                               f"{exp.experiment_id}) or set tracking.experiment to another name")
        if exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # set once; also on an experiment made by hand
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id

    # run tree ----------------------------------------------------------------
    def _find(self, tags: Mapping[str, str]) -> list[tuple[int, str]]:
        """(start time in ms, run id) of the active runs carrying all these tags, oldest first."""
        flt = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt,
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=100)
        return sorted((r.info.start_time, r.info.run_id) for r in runs)

    def _canonical(self, tags: Mapping[str, str]) -> str | None:
        """The oldest run with these tags, once it is old enough that no older one can still appear.

        Start times come from the creating client's clock, taken before its request reaches the store. So
        a racer's run may land after ours yet sort first (same millisecond, or a clock slightly behind).
        Waiting until the oldest run is CREATE_SETTLE_S old (longer than a create request takes, plus the
        clock skew between pods) before trusting it makes every process agree on the same run.
        """
        settle = CREATE_SETTLE_S if self.tracking_uri.startswith(("http://", "https://")) else LOCAL_SETTLE_S
        while True:
            found = self._find(tags)
            if not found:
                return None
            start_ms, run_id = found[0]
            wait = start_ms / 1000 + settle - time.time()
            if wait <= 0:
                return run_id
            time.sleep(min(wait, settle))

    def _get_or_create(self, name: str, tags: dict[str, str],
                       extra: Mapping[str, str] | None = None) -> tuple[str, bool]:
        """The run with these (identifying) tags; created, with extra tags, if missing.
        Returns (run id, created)."""
        found = self._canonical(tags)
        if found:
            return found, False
        run_id = self.client.create_run(self.experiment_id, run_name=name,
                                        tags={**(extra or {}), **tags}).info.run_id
        # Several processes (the pods of a job array) may have raced to create it: all converge on the
        # oldest, and each loser deletes its own.
        canonical = self._canonical(tags)
        if canonical is None:
            raise LineageError(f"MLflow run {run_id} ({name}) vanished right after it was created at "
                               f"{self.tracking_uri}: was it deleted by hand?")
        if canonical != run_id:
            self.client.delete_run(run_id)
            return canonical, False
        return run_id, True

    def _run_record(self) -> dict[str, Any]:
        return read_json(self.layout.run_record) if exists(self.layout.run_record) else {}

    def pipeline_run(self, cfg: PipelineConfig) -> str:
        """The pipeline's single parent run: the one in run.json, else found by tags, else created."""
        record = self._run_record()
        if run_id := record.get("mlflow_run_id"):
            try:
                run = self.client.get_run(run_id)
            except MlflowException as err:
                raise LineageError(
                    f"{self.layout.run_record} names MLflow run {run_id} (tracking URI "
                    f"{record.get('tracking_uri', '?')}), but {self.tracking_uri} does not have it: point "
                    f"tracking.uri at the store that does, or delete the record to start a new run") from err
            if run.info.lifecycle_stage != "active":
                raise LineageError(f"MLflow run {run_id} named in {self.layout.run_record} is deleted: restore "
                                   "it (mlflow runs restore) or delete the record to start a new run")
            self._pipeline_id = run_id
            self._warn_config_change(run_id, cfg)
            return run_id

        tags = {KIND: "pipeline", ROOT: self.layout.root}
        run_id, created = self._get_or_create(cfg.name, tags, {NAME: cfg.name})
        if created:
            self.log_params(run_id, flatten(cfg.model_dump(mode="json")))
            self.log_artifact_bytes(run_id, "pipeline.yaml", dump_config(cfg).encode())
        else:
            self._warn_config_change(run_id, cfg)
        record.update(mlflow_run_id=run_id, tracking_uri=self.tracking_uri, experiment_id=self.experiment_id)
        write_json(self.layout.run_record, record)
        self._pipeline_id = run_id
        return run_id

    def _warn_config_change(self, run_id: str, cfg: PipelineConfig) -> None:
        logged = self.client.get_run(run_id).data.params
        now = {k: _clip(v, MAX_PARAM_VAL_LENGTH) for k, v in flatten(cfg.model_dump(mode="json")).items()}
        changed = sorted(k for k in now if k in logged and logged[k] != now[k])
        if changed:
            log.warning("pipeline config differs from the one logged to MLflow run %s in: %s",
                        run_id, ", ".join(changed))

    @property
    def pipeline_id(self) -> str:
        """The pipeline run id from this object or run.json; stages started alone find it there."""
        if self._pipeline_id is None:
            run_id = self._run_record().get("mlflow_run_id")
            if not run_id:
                raise LineageError(f"no pipeline run recorded in {self.layout.run_record}: call "
                                   "Lineage.pipeline_run(cfg) (sims run does) before starting stages")
            self._pipeline_id = run_id
        return self._pipeline_id

    def loop_run(self, loop: str) -> str:
        """The run '<loop>' under the pipeline run: a self-consuming loop's generations (created on first use)."""
        tags = {PARENT: self.pipeline_id, KIND: "loop", LOOP: loop}
        return self._get_or_create(loop, tags, self._common_tags())[0]

    def iteration_run(self, k: int, loop: str | None = None) -> str:
        """The run 'iter-<k>' under the pipeline run, or '<loop>/iter-<k>' under a loop's run (created on first
        use)."""
        if k < 0:
            raise ValueError(f"iteration must be >= 0, got {k}")
        if loop is None:
            tags = {PARENT: self.pipeline_id, KIND: "iteration", ITERATION: str(k)}
            return self._get_or_create(f"iter-{k}", tags, self._common_tags())[0]
        tags = {PARENT: self.loop_run(loop), KIND: "iteration", ITERATION: str(k), LOOP: loop}
        return self._get_or_create(f"{loop}/iter-{k}", tags, self._common_tags())[0]

    def stage_run(self, step: Step) -> str:
        """The run 'iter-<k>/<stage>' under 'iter-<k>' (in a loop: '<loop>/iter-<k>/<stage>'); a re-run reuses it
        and marks it RUNNING again.

        Every process of a stage (the parts of a job array, the ranks of a PyTorchJob, a restarted pod)
        gets the same run: it is found by its tags under the pipeline run named in run.json, and processes
        that create it at the same moment converge on the oldest (see _get_or_create). A step that completes
        another stage logs into that stage's run (its row's `completes` in the stage table): the evaluate reducer
        into evaluate's, import-base into iteration 0's train-base run.
        """
        k, loop = step.iteration, step.loop
        stage = row(step.stage).stage  # a reducer or import-base logs into the run of the stage it completes
        if stage in RUN_STAGES:  # once per pipeline, not per iteration
            tags = {PARENT: self.pipeline_id, KIND: "stage", STAGE: stage}
            name = stage
        else:
            tags = {PARENT: self.iteration_run(k, loop), KIND: "stage", ITERATION: str(k), STAGE: stage}
            name = f"iter-{k}/{stage}"
            if loop is not None:
                tags[LOOP], name = loop, f"{loop}/{name}"
        run_id, created = self._get_or_create(name, tags, self._common_tags())
        if self.writes:
            # This stage runs again, and with it its iteration, its loop and the pipeline (after a failure or a
            # kill).
            above = [tags[PARENT]] + ([self.loop_run(loop)] if loop is not None and stage in STAGES else []) + \
                [self.pipeline_id]
            for rid in ([] if created else [run_id]) + list(dict.fromkeys(above)):
                if self.client.get_run(rid).info.status != "RUNNING":
                    self.client.update_run(rid, status="RUNNING")
        return run_id

    def _common_tags(self) -> dict[str, str]:
        if self._common is None:
            parent = self.client.get_run(self.pipeline_id).data.tags
            self._common = {k: parent[k] for k in (NAME, ROOT) if k in parent}
        return self._common

    # logging -------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params (values clipped to MLflow's limit). MLflow params are immutable, so a re-run that
        changes one records the new value as tag 'sims.param.<key>' instead of failing.

        The parts of a job array log the same params to one run at the same moment: when another part inserted
        a key between our read and our write, the server refuses the batch; reading again sees it logged."""
        if not self.writes:
            return
        for attempt in range(PARAM_ATTEMPTS):
            logged = self.client.get_run(run_id).data.params
            new, changed = [], {}
            for key, value in params.items():
                value = _clip(str(value), MAX_PARAM_VAL_LENGTH)
                if key not in logged:
                    new.append(Param(key, value))
                elif logged[key] != value:
                    changed[f"sims.param.{key}"] = value
            try:
                for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
                    self.client.log_batch(run_id, params=chunk)
                break
            except MlflowException:
                if attempt == PARAM_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if changed:
            log.warning("run %s: params changed since first logged, kept as tags: %s", run_id, sorted(changed))
            self.set_tags(run_id, changed)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log several metrics at one step in batched calls (one round trip per 1,000)."""
        if not self.writes:
            return
        ts = int(time.time() * 1000)
        entries = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        if not self.writes:
            return
        entries = [RunTag(k, _clip(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_artifact_bytes(self, run_id: str, name: str, data: bytes) -> None:
        """Store data as artifact `name` (may contain '/', e.g. 'grids/w-1.0.png'); overwrites."""
        if not self.writes:
            return
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"artifact name must be a relative path without '..', got {name!r}")
        folder, base = os.path.split(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, base)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(run_id, path, artifact_path=folder or None)

    def log_png(self, run_id: str, name: str, png: bytes) -> None:
        """Log a PNG (from tracking.results) as an artifact; the UI previews it."""
        if not png.startswith(b"\x89PNG"):
            raise ValueError(f"artifact {name!r}: data is not a PNG")
        self.log_artifact_bytes(run_id, name if name.endswith(".png") else name + ".png", png)

    def link(self, run_id: str, inputs: Mapping[str, str] | None = None,
             outputs: Mapping[str, str] | None = None) -> None:
        """Record the URIs a stage read and wrote (tags sims.input.<name> / sims.output.<name>)."""
        if not self.writes:
            return
        inputs, outputs = dict(inputs or {}), dict(outputs or {})
        tags = {INPUT + k: v for k, v in inputs.items()} | {OUTPUT + k: v for k, v in outputs.items()}
        self.set_tags(run_id, tags)
        datasets = [dataset_input(name, uri) for name, uri in inputs.items()]
        if datasets:
            try:
                self.client.log_inputs(run_id, datasets=datasets)
            except MlflowException:
                # Parts of a job array log the same dataset at once and the loser's insert collides
                # (UNIQUE experiment/name/digest); by now the dataset exists and a retry links it.
                time.sleep(0.5)
                self.client.log_inputs(run_id, datasets=datasets)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in TERMINAL:
            raise ValueError(f"status must be one of {', '.join(TERMINAL)}, got {status!r}")
        if not self.writes:
            return
        self.client.set_terminated(run_id, status=status)

    def finish_if_running(self, run_id: str, status: str = "FINISHED") -> bool:
        """End run_id with status unless it already has that status; True if it changed."""
        if not self.writes or self.client.get_run(run_id).info.status == status:
            return False
        self.finish(run_id, status)
        return True

    def end_with_ancestors(self, run_id: str, status: str) -> None:
        """End a stage run and the iteration and pipeline runs above it (a failed stage fails its pipeline)."""
        if not self.writes:
            return
        while run_id:
            run = self.client.get_run(run_id)
            if run.info.status != status:
                self.finish(run_id, status)
            run_id = run.data.tags.get(PARENT, "")

    def end_interrupted(self, stage_complete: Callable[[int | None, str, str | None], bool],
                        iteration_complete: Callable[[int | None, str | None], bool]) -> list[str]:
        """Called when a new attempt of the whole pipeline starts: end the runs a killed attempt left RUNNING.

        A stage, iteration or loop run whose work is complete (say, killed between its completion record and
        its status update) ends FINISHED, the others KILLED; the new attempt marks those it continues
        RUNNING again. Only one attempt may run at a time on a storage root, so any RUNNING run other than
        the pipeline's is left over from a dead process. The callbacks get (iteration, stage, loop) and
        (iteration, loop), iteration None for a whole loop. Returns the names of the runs it ended.
        """
        if not self.writes:
            return []
        flt = f"attributes.status = 'RUNNING' and tags.`{ROOT}` = {_quote(self.layout.root)}"
        runs = self.client.search_runs([self.experiment_id], filter_string=flt,
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=10000)
        ended = []
        for r in runs:
            t = r.data.tags
            k = int(t[ITERATION]) if ITERATION in t else None
            loop = t.get(LOOP)
            if t.get(KIND) == "stage":
                done = stage_complete(k, t[STAGE], loop)
            elif t.get(KIND) == "iteration" and k is not None or t.get(KIND) == "loop":
                done = iteration_complete(k, loop)
            else:
                continue  # the pipeline run: the new attempt carries it on
            self.finish(r.info.run_id, "FINISHED" if done else "KILLED")
            ended.append(f"{r.info.run_name} ({'FINISHED' if done else 'KILLED'})")
        if self.client.get_run(self.pipeline_id).info.status != "RUNNING":
            self.client.update_run(self.pipeline_id, status="RUNNING")
        return ended

    # queries -------------------------------------------------------------------
    def stage_runs(self) -> list[dict[str, Any]]:
        """Every stage run of this pipeline: iteration, stage, run_id, status, inputs, outputs."""
        flt = f"tags.`{KIND}` = 'stage' and tags.`{ROOT}` = {_quote(self.layout.root)}"
        runs = self.client.search_runs([self.experiment_id], filter_string=flt,
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=10000)
        out = []
        for r in runs:
            t = r.data.tags
            out.append({
                "iteration": int(t[ITERATION]) if ITERATION in t else None, "stage": t[STAGE], "loop": t.get(LOOP),
                "run_id": r.info.run_id,
                "status": r.info.status,
                "inputs": {k[len(INPUT):]: v for k, v in t.items() if k.startswith(INPUT)},
                "outputs": {k[len(OUTPUT):]: v for k, v in t.items() if k.startswith(OUTPUT)},
            })
        order = RUN_STAGES + STAGES  # run-level stages (iteration None) come first, then the shared ones, then loops
        out.sort(key=lambda s: (s["loop"] or "", -1 if s["iteration"] is None else s["iteration"],
                                order.index(s["stage"])))
        return out

    def producers_of(self, uri: str) -> list[dict[str, Any]]:
        """The stage runs that wrote uri (the answer to 'which iteration's data fed this model')."""
        return [s for s in self.stage_runs() if uri in s["outputs"].values()]
