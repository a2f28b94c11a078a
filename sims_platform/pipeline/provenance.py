"""What shaped each stage's results: a digest of the config settings it reads and of its inputs' digests.

Every completion record carries its stage's digest (pipeline.execute.run_stage), so a resumed run knows whether a completed
stage was made under the settings it would run with now. A stage's digest folds in the digests of the stages it
reads, so a change upstream reaches everything downstream. Digests are computed from the config and the plan
alone (canonical JSON of the pydantic dumps, no file is read or hashed): a plan's digests are known before any
stage runs, in every launcher, and are the same in every process of a job array.

Settings that never change results are left out: where the run folder is (storage, so a moved or copied folder
resumes), tracking, runtime (device, local_parts, channels_last and tf32 change results only within float
rounding, so `sims run --parts 2` and `sims stage` resume each other), the run's name, and iterations.count /
loop.generations (more iterations extend a run without touching the finished ones).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sims_platform.config import ConfigError, PipelineConfig
from sims_platform.pipeline.plan import pipeline_plan
from sims_platform.steps import Step, row, stage_of
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout

# Each step's settings (the config paths its results depend on) and inputs (the stages it reads) are its row's in
# the stage table (steps.table). A loop's stages also depend on its own settings (the arm and fraction are the
# loop's name). A stage on the base's data (train-base, train-guide) of k > 0 also reads the earlier feeds.
LOOP_SETTINGS = ("loop.accumulate", "loop.train_data", "loop.method")
EXCLUDED = {"iterations.count"}


@dataclass(frozen=True)
class Provenance:
    """One step's digest, the settings it was computed from, and the inputs (step names) it folds in."""

    digest: str
    settings: dict[str, Any]
    inputs: dict[str, str]

    def record(self) -> dict[str, Any]:
        return {"digest": self.digest, "settings": self.settings, "inputs": self.inputs}


def step_name(step: Step) -> str:
    """'iter-01/generate', 'sims-dp50/iter-01/feed', 'encode': how messages and --redo-from name a step."""
    stage = row(step.stage)
    if stage.scope == "run":
        return stage.stage
    return f"{step.loop + '/' if step.loop else ''}iter-{step.iteration:02d}/{stage.stage}"


def _pick(dump: dict[str, Any], path: str) -> Any:
    value: Any = dump
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _settings(cfg: PipelineConfig, step: Step) -> dict[str, Any]:
    loop = cfg.loop.find(step.loop) if cfg.loop is not None and step.loop is not None else None
    view = cfg.for_loop(loop) if loop is not None else cfg
    dump = view.model_dump(mode="json")
    paths = row(step.stage).settings + (LOOP_SETTINGS if step.loop is not None else ())
    if row(step.stage).base_data and step.iteration == 0:  # iteration 0's base trains on the real data alone
        paths = tuple(p for p in paths if p != "iterations")
    out = {p: _pick(dump, p) for p in paths}
    for path in EXCLUDED:
        head, _, tail = path.partition(".")
        if isinstance(out.get(head), dict):
            out[head] = {k: v for k, v in out[head].items() if k != tail}
    if step.loop is not None:
        out["loop.name"] = step.loop
    return out


def digest_of(value: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): the same value gives the same digest anywhere."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(step: Step) -> Step:
    """Steps that complete the same folder share a key (import-base is iteration 0's train-base)."""
    stage = row(step.stage)
    return Step(0, stage.stage) if stage.scope == "run" else Step(step.iteration, stage.stage, step.loop)


def plan_provenance(cfg: PipelineConfig) -> dict[Step, Provenance]:
    """Every step of the plan with its provenance, in plan order."""
    out: dict[Step, Provenance] = {}
    by_key: dict[Step, tuple[str, str]] = {}  # key -> (step name, digest)
    for step in pipeline_plan(cfg):
        names = [Step(step.iteration, s, step.loop) for s in row(step.stage).reads]
        if row(step.stage).base_data and (step.loop is not None or cfg.iterations.train_data != "real"):
            names += [Step(j, "feed", step.loop) for j in range(step.iteration)]
        inputs: dict[str, str] = {}
        for read in names:
            # A stage read from the shared pipeline: run-level, or a loop's generation 0 (all shared but its feed).
            for key in (read, _key(Step(read.iteration, read.stage))):
                if key in by_key:
                    inputs[by_key[key][0]] = by_key[key][1]
                    break
        settings = _settings(cfg, step)
        prov = Provenance(digest_of({"step": step.stage, "settings": settings, "inputs": inputs}), settings, inputs)
        out[step] = prov
        by_key[_key(step)] = (step_name(step), prov.digest)
    return out


def step_provenance(cfg: PipelineConfig, step: Step) -> Provenance | None:
    """The provenance of one step (a reducer's is its stage's); None when it is not a step of the plan (a stage run
    by hand outside the plan, which then records no digest)."""
    want = _key(step)
    for step, prov in plan_provenance(cfg).items():
        if _key(step) == want:
            return prov
    return None


def _changed(recorded: Any, now: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (dicts compared key by key)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        return [p for k in sorted(set(recorded) | set(now), key=str)
                for p in _changed(recorded.get(k), now.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if recorded == now else [prefix]


def explain(record: dict[str, Any], prov: Provenance) -> str | None:
    """Why a completion record does not match this config (None: it does)."""
    rec = record.get("provenance")
    if not isinstance(rec, dict) or "digest" not in rec:
        return "its record predates settings tracking, so it cannot be told whether it matches this config"
    if rec["digest"] == prov.digest:
        return None
    keys = _changed(rec.get("settings", {}), prov.settings)
    if keys:
        shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        return f"made with different settings ({shown})"
    stale = [name for name, d in prov.inputs.items() if rec.get("inputs", {}).get(name) != d]
    return f"made from inputs that changed since ({', '.join(stale) or 'its inputs'})"


class StaleStageError(ConfigError):
    """A completed stage's record was made under other settings than the run's config (one line per stage)."""


def _records(layout: RunLayout, step: Step) -> list[str]:
    """The step's completion record, or while it is incomplete its parts' records (a resumed job array skips
    the parts recorded complete)."""
    run = layout.of_step(step)
    marker = run.done_marker(step.iteration, step.stage)
    if fsio.exists(marker):
        return [marker]
    parts = fsio.join(run.stage(step.iteration, step.stage), "parts")
    return [fsio.join(parts, n) for n in fsio.listdir(parts) if n.endswith(".json")]


def stale_steps(cfg: PipelineConfig, layout: RunLayout, skip: Collection[Step] = ()) -> list[tuple[Step, str]]:
    """Every step of the plan (but `skip`) with a record that does not match this config, with the reason."""
    stale = []
    for step, prov in plan_provenance(cfg).items():
        if step in skip:
            continue
        for uri in _records(layout, step):
            why = explain(fsio.read_json(uri), prov)
            if why:
                stale.append((step, why))
                break
    return stale


def redo_steps(cfg: PipelineConfig, targets: list[str]) -> list[Step]:
    """The steps `--redo-from TARGET` reruns: each TARGET (a stage, in every iteration and loop; or one step as
    step_name writes it, e.g. iter-01/generate) and every step that reads what they write, directly or not."""
    plan = plan_provenance(cfg)
    stages = {stage_of(s.stage) for s in plan}
    names = {step_name(s) for s in plan}
    for target in targets:
        if target not in stages and target not in names:
            raise ConfigError(f"--redo-from {target}: not a stage or step of this pipeline's plan; give a stage "
                              f"({', '.join(sorted(stages))}) or a step such as {sorted(names)[-1]}")
    redo: list[Step] = []
    redone: set[str] = set()
    for step, prov in plan.items():
        name = step_name(step)
        if stage_of(step.stage) in targets or name in targets or any(i in redone for i in prov.inputs):
            redo.append(step)
            redone.add(name)
    return redo


def invalidate(layout: RunLayout, steps: list[Step]) -> list[str]:
    """Delete the folders of these steps (completion records, part records, checkpoints, models, shards,
    evaluation parts), so they run from scratch; returns the step names that had anything to delete."""
    deleted = []
    for step in steps:
        folder = layout.of_step(step).stage(step.iteration, step.stage)
        if fsio.exists(folder):
            fsio.remove(folder)
            deleted.append(step_name(step))
    return deleted


def stale_message(cfg: PipelineConfig, stale: list[tuple[Step, str]]) -> str:
    """One line per stale step, each with the fix: the fewest --redo-from stages (earliest first) that cover
    every stale step."""
    targets: list[str] = []
    covered: set[Step] = set()
    fix: dict[Step, str] = {}
    for step, _ in stale:
        if step not in covered:
            targets.append(stage_of(step.stage))
            covered |= set(redo_steps(cfg, [targets[-1]]))
        fix[step] = next(t for t in targets if step in redo_steps(cfg, [t]))
    return "\n".join(f"stage {step_name(step)} was {why}: rerun with `sims run ... --redo-from {fix[step]}` "
                     "(redoes it and every stage that reads it), or delete the run folder" for step, why in stale)


def plan_states(cfg: PipelineConfig, layout: RunLayout, redo_from: list[str] | None = None) -> list[tuple[Step, str]]:
    """What `sims run` would do with each step of the plan in this run folder: 'done' (its record matches this
    config: skipped), 'to redo' (a record made under other settings, or named by --redo-from, or reading a step
    that is redone), 'to resume' (some of its parts are recorded) or 'to run'."""
    redo = set(redo_steps(cfg, redo_from)) if redo_from else set()
    redone: set[str] = set()
    states = []
    for step, prov in plan_provenance(cfg).items():
        records = _records(layout, step)
        stale = next((why for uri in records if (why := explain(fsio.read_json(uri), prov))), None)
        if step in redo or stale or any(i in redone for i in prov.inputs):
            state = f"to redo ({stale})" if stale else "to redo"
            redone.add(step_name(step))
        elif records and records[0] == layout.of_step(step).done_marker(step.iteration, step.stage):
            state = "done"
        elif records:
            state = f"to resume ({len(records)} part(s) recorded)"
        else:
            state = "to run"
        states.append((step, state))
    return states
