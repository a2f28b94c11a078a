"""Run one step: skip it when its completion record stands, refuse a stale one, run its function (the stage
table's), and write the part's and the stage's completion records."""

from __future__ import annotations

import re
import time

from sims_platform.config import ConfigError
from sims_platform.pipeline.plan import base_step_error
from sims_platform.pipeline.provenance import Provenance, StaleStageError, explain, step_provenance
from sims_platform.stages import stage_function
from sims_platform.stages.context import StageContext
from sims_platform.steps import STAGE_NAMES, Step, base_step, row, stage_of
from sims_platform.storage import fsio
from sims_platform.utils.accel import PeakMemory, describe_device


def is_done(ctx: StageContext, stage: str) -> bool:
    return fsio.exists(ctx.layout.done_marker(ctx.iteration, stage))


def run_stage(ctx: StageContext, stage: str, force: bool = False) -> dict:
    """Run one stage (or one part of a job-array stage) unless its completion record exists.

    A rerun after a kill resumes inside the stage. A part records its own completion; the stage's record is
    written by whoever completes the whole stage (a stage function says so with result["complete"]), and a
    rerun of any part writes it if that part was killed before it could.

    Every record carries the step's provenance (pipeline.provenance); a record made under other settings is
    refused (StaleStageError) rather than reused, unless `force` runs the step again.
    """
    if stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage '{stage}', expected one of {', '.join(STAGE_NAMES)}")
    wrong = base_step_error(ctx.pipeline_cfg, ctx.iteration, stage, ctx.loop)
    if wrong:  # before any record or run: the other base step writes the same folder
        raise ConfigError(wrong)
    stage_marker = ctx.layout.done_marker(ctx.iteration, stage)
    marker = stage_marker if ctx.parts == 1 else \
        ctx.layout.part_marker(ctx.iteration, stage, ctx.part, ctx.parts)
    prov = step_provenance(ctx.pipeline_cfg, ctx.step(stage))
    for done in dict.fromkeys((stage_marker, marker)):
        if not force and fsio.exists(done):
            _check(ctx, stage, fsio.read_json(done), prov)
            if done != stage_marker and ctx.lineage.writes:
                _complete_from_parts(ctx, stage, stage_marker)
            where = f"{ctx.loop_name} " if ctx.loop else ""
            print(f"[{where}iter {ctx.iteration} {stage}] already complete ({done}); skipping", flush=True)
            return fsio.read_json(done)["result"]
    if force and ctx.parts == 1 and not any(row(s).reducer == stage for s in STAGE_NAMES):
        # Forced: from scratch, so nothing made under other settings (shards, checkpoints) is resumed from. Not for
        # one part of an array (the other parts' outputs share the folder) nor a reducer (it merges them).
        folder = ctx.layout.stage(ctx.iteration, stage_of(stage))
        if ctx.lineage.writes and fsio.exists(folder):
            fsio.remove(folder)
    run_id = ctx.lineage.stage_run(ctx.step(stage))
    if prov is not None:  # a tag, not a param: a redo under new settings logs into the same run
        ctx.lineage.set_tags(run_id, {"sims.provenance": prov.digest})
    t0, peak = time.time(), PeakMemory(ctx.device)
    try:
        result = stage_function(stage)(ctx, run_id)
    except BaseException as err:
        # The stage, its iteration and the pipeline end FAILED (KILLED on Ctrl-C); a retry reopens them.
        ctx.lineage.end_with_ancestors(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        missing = missing_input(ctx, stage, err) if isinstance(err, FileNotFoundError) else None
        if missing is not None:  # an earlier stage has not run: say which, not just the path
            raise missing from None
        raise
    if not ctx.lineage.writes:
        return result  # ranks other than 0 of a distributed stage: rank 0 records completion
    seconds, device, gib = time.time() - t0, describe_device(ctx.device), peak.gib()
    record = {"stage": stage, "iteration": ctx.iteration, "loop": ctx.loop_name, "mlflow_run_id": run_id,
              "seconds": seconds, "part": ctx.part, "parts": ctx.parts, "device": device,
              "peak_gpu_memory_gib": gib, "result": result}
    if prov is not None:
        record["provenance"] = prov.record()
    if ctx.parts > 1:
        fsio.write_json(marker, record)
    if ctx.parts == 1 or result.get("complete"):
        _complete(ctx, stage_marker, record, replace=force)
    return result


def _check(ctx: StageContext, stage: str, record: dict, prov: Provenance | None) -> None:
    """Refuse a completion record made under settings other than this config's (see pipeline.provenance)."""
    why = explain(record, prov) if prov is not None else None
    if why:
        where = f" --loop {ctx.loop_name}" if ctx.loop else ""
        raise StaleStageError(
            f"stage {stage} --iteration {ctx.iteration}{where} was {why}: run it again with `sims stage ... --force` "
            "(and the stages that read it), or `sims run ... --redo-from STAGE`, or delete the run folder")


def _complete(ctx: StageContext, stage_marker: str, record: dict, replace: bool) -> None:
    """Write the stage's completion record and close its MLflow run.

    The record is created only if absent: of two processes completing the stage at once (parts that both
    find the set complete), the first one's record stands. --force (replace) rewrites it.
    """
    if replace:
        fsio.write_json(stage_marker, record)
    else:
        try:
            fsio.create_json(stage_marker, record)
        except FileExistsError:
            where = f"{ctx.loop_name} " if ctx.loop else ""
            print(f"[{where}iter {ctx.iteration} {record['stage']}] completed meanwhile by another process "
                  f"({stage_marker}); keeping its record", flush=True)
    run_id, gib = record["mlflow_run_id"], record["peak_gpu_memory_gib"]
    ctx.lineage.set_tags(run_id, {"sims.device": record["device"]})
    ctx.lineage.log_metrics(run_id, {"stage_seconds": record["seconds"]} |
                            ({} if gib is None else {"peak_gpu_memory_gib": gib}), step=0)
    ctx.lineage.finish(run_id, "FINISHED")


def _complete_from_parts(ctx: StageContext, stage: str, stage_marker: str) -> None:
    """This part is done but the stage has no record: if a part recorded that it completed the stage and was
    killed before writing the stage's record (generate, feed, encode: the part that wrote the manifest),
    write it now from that part's record. Until every part has its record, the parts still to run complete
    the stage themselves; stages with a reducer never complete in a part (the reducer writes the record)."""
    parts = [ctx.layout.part_marker(ctx.iteration, stage, i, ctx.parts) for i in range(ctx.parts)]
    names = set(fsio.listdir(parts[0].rsplit("/", 1)[0]))
    if not all(p.rsplit("/", 1)[1] in names for p in parts):
        return
    for uri in parts:
        record = fsio.read_json(uri)
        if record.get("result", {}).get("complete"):
            _complete(ctx, stage_marker, record, replace=False)
            return


def missing_input(ctx: StageContext, stage: str, err: FileNotFoundError) -> FileNotFoundError | None:
    """A FileNotFoundError for an input another stage writes, restated to name that stage and the command that
    runs it (None when the missing file is not another stage's output: the original error says enough)."""
    candidates = [str(err.filename)] if err.filename else []
    local = ctx.layout.root[len("file://"):] if ctx.layout.root.startswith("file://") else ctx.layout.root
    candidates += re.findall(rf"(?:file://)?{re.escape(local)}[^\s'\":]*", str(err))
    for uri in candidates:
        found = ctx.layout.producer(uri)
        if found is None:
            continue
        if found.stage == "train-base":  # iteration 0's base may be imported instead
            found = Step(found.iteration, base_step(ctx.pipeline_cfg, found.iteration), found.loop)
        k, loop = found.iteration, found.loop
        if Step(k, stage_of(found.stage), loop) == Step(ctx.iteration, stage_of(stage), ctx.loop_name):
            return None  # the stage's own file (e.g. a checkpoint): not an input
        name = "model" if uri.endswith("/model.pt") else "input"
        return FileNotFoundError(f"{stage}: {name} not found at {uri}: it is written by stage {found.stage} of "
                                 f"iteration {k}{' in loop ' + loop if loop else ''}; run `sims stage {found.cli()}` "
                                 "first (`sims run` runs every stage in order)")
    return None


__all__ = ["is_done", "missing_input", "run_stage"]
