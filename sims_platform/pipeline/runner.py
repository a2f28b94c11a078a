"""Run the whole SIMS loop locally: every stage of the plan in order, then the summary.

Every stage runs in this process; with runtime.local_parts = N > 1 the sampling job arrays (generate, evaluate)
run as N processes, `sims stage ... --index i --count N` as the cluster's Indexed Jobs run them, with the cores
shared among them, and their reducer runs here. Each sample depends only on its seed and the reduction only sums,
so the results agree with one process to float rounding; completion records, resumption and lineage do not
depend on the launcher.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from sims_platform.config import PipelineConfig, dump_config
from sims_platform.pipeline.execute import is_done, run_stage
from sims_platform.pipeline.plan import pipeline_plan, plan_groups, resolve_loop, stages_for
from sims_platform.pipeline.processes import cpu_threads, run_parts
from sims_platform.pipeline.provenance import StaleStageError, invalidate, redo_steps, stale_message, stale_steps
from sims_platform.stages.context import StageContext
from sims_platform.steps import Step, row
from sims_platform.steps.table import TABLE
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import Lineage, format_table, read_summary, resolve_tracking_uri, write_summary
from sims_platform.tracking.loops import format_loop_table, write_loop_results


def verify_run(cfg: PipelineConfig, redo_from: list[str] | None = None) -> None:
    """Before a resumed run starts: redo what --redo-from names (deleting those stages' folders), then refuse
    if any other completed stage was made under other settings (one line per stale stage, with the fix).

    The check comes first, so a refused run deletes nothing."""
    layout = RunLayout.of(cfg.storage.root)
    redo = redo_steps(cfg, redo_from) if redo_from else []
    stale = stale_steps(cfg, layout, skip=redo)
    if stale:
        raise StaleStageError(stale_message(cfg, stale))
    deleted = invalidate(layout, redo)
    if deleted:
        print(f"redo: removed {', '.join(deleted)}", flush=True)


def open_run(cfg: PipelineConfig) -> tuple[RunLayout, Lineage, str]:
    """The run's layout and lineage; records the resolved config next to the results (each completion record
    carries what shaped it: pipeline.provenance)."""
    layout = RunLayout.of(cfg.storage.root)
    fsio.write_bytes(layout.config, dump_config(cfg).encode())
    lineage = Lineage(resolve_tracking_uri(cfg, layout), cfg.tracking.experiment, layout)
    return layout, lineage, lineage.pipeline_run(cfg)


def iteration_complete(cfg: PipelineConfig, layout: RunLayout, k: int, loop: str | None = None) -> bool:
    """Every stage of iteration k's plan (in `loop`, or the shared pipeline's) has its completion record."""
    stages = plan_groups(cfg).get((loop, k), [])
    return all(fsio.exists(layout.in_loop(loop).done_marker(k, s)) for s in stages)


def loop_complete(cfg: PipelineConfig, layout: RunLayout, loop: str) -> bool:
    return all(iteration_complete(cfg, layout, k, name) for name, k in plan_groups(cfg) if name == loop)


def pipeline_complete(cfg: PipelineConfig, layout: RunLayout) -> bool:
    return all(iteration_complete(cfg, layout, k, loop) for loop, k in plan_groups(cfg))


def close_complete_runs(ctx: StageContext) -> None:
    """Finish ctx's iteration run once its whole plan is complete, its loop's run once every generation of the
    loop is, and the pipeline run once everything is (first writing a loop experiment's results).

    Level-triggered (it reads the completion records, not which stage just ran), so every launcher calls it
    after each stage: the local runner, `sims stage` in a pod, a rerun with --force or after a kill.
    """
    cfg, layout, lin, k, loop = ctx.pipeline_cfg, ctx.layout.in_loop(None), ctx.lineage, ctx.iteration, ctx.loop_name
    if not lin.writes or not iteration_complete(cfg, layout, k, loop):
        return
    lin.finish_if_running(lin.iteration_run(k, loop))
    if loop is not None and loop_complete(cfg, layout, loop):
        lin.finish_if_running(lin.loop_run(loop))
    if pipeline_complete(cfg, layout) and lin.status(lin.pipeline_id) != "FINISHED":
        if cfg.loop is not None:
            write_loop_results(cfg, layout, lin)
        lin.finish(lin.pipeline_id)


def end_interrupted_runs(cfg: PipelineConfig, layout: RunLayout, lineage: Lineage) -> None:
    """A new attempt of the whole pipeline: end the runs a killed attempt left RUNNING (see Lineage)."""
    groups = plan_groups(cfg)

    def stage_complete(k: int | None, stage: str, loop: str | None) -> bool:
        return fsio.exists(layout.in_loop(loop).done_marker(k or 0, stage))

    def group_complete(k: int | None, loop: str | None) -> bool:
        if k is None:
            return loop is not None and loop_complete(cfg, layout, loop)
        return (loop, k) in groups and iteration_complete(cfg, layout, k, loop)

    ended = lineage.end_interrupted(stage_complete=stage_complete, iteration_complete=group_complete)
    if ended:
        print(f"ended runs left RUNNING by an earlier attempt: {', '.join(ended)}", flush=True)


def _run_steps(cfg: PipelineConfig, layout: RunLayout, lineage: Lineage,
               launch: Callable[[StageContext, Step], object]) -> None:
    contexts: dict[tuple[str | None, int], StageContext] = {}
    for step in pipeline_plan(cfg):
        key = (step.loop, step.iteration)
        if key not in contexts:
            contexts[key] = StageContext(cfg, layout, step.iteration, lineage, loop=resolve_loop(cfg, step.loop))
        launch(contexts[key], step)
        close_complete_runs(contexts[key])


def _run_with_parts(cfg: PipelineConfig, layout: RunLayout, lineage: Lineage) -> None:
    """The stage table's local_parts stages (sampling: generate, evaluate, whose work dwarfs a process start;
    training and small arrays run faster in this process, docs/benchmarks.md) as runtime.local_parts processes (on
    this config, written resolved so they read exactly what this run was given; OMP_NUM_THREADS shares the cores
    unless it is set), the rest here."""
    n = cfg.runtime.local_parts
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", cpu_threads(n))
    with tempfile.TemporaryDirectory(prefix="sims-run-") as tmp:
        config = os.path.join(tmp, "pipeline.yaml")
        with open(config, "w") as fh:
            fh.write(dump_config(cfg))
        split = " and ".join(r.name for r in TABLE if r.local_parts)
        print(f"[local] {split} as {n} processes ({env['OMP_NUM_THREADS']} CPU thread(s) each)", flush=True)

        def launch(ctx: StageContext, step: Step) -> None:
            r = row(step.stage)
            if not r.local_parts or is_done(ctx, step.stage):  # a complete stage: skipped here
                run_stage(ctx, step.stage)
                return
            run_parts(step, config, [], env, n)
            if r.reducer:
                run_stage(ctx, r.reducer)

        _run_steps(cfg, layout, lineage, launch)


def run_pipeline(cfg: PipelineConfig, redo_from: list[str] | None = None) -> dict:
    """Run (or resume) the pipeline; `redo_from` names the stages (or steps) to redo with what reads them."""
    verify_run(cfg, redo_from)
    layout, lineage, parent = open_run(cfg)
    end_interrupted_runs(cfg, layout, lineage)
    if cfg.runtime.local_parts > 1:
        _run_with_parts(cfg, layout, lineage)
    else:
        _run_steps(cfg, layout, lineage, lambda ctx, step: run_stage(ctx, step.stage))
    # Each evaluate completion updated summary.json; keep this run's iterations (a shorter rerun drops the rest).
    rows = [r for r in read_summary(layout)["iterations"] if r["iteration"] < cfg.iterations.count]
    summary = write_summary(layout, rows, parent)
    if cfg.loop is not None:  # written when the last stage completed (close_complete_runs)
        if not fsio.exists(layout.loop_results):
            write_loop_results(cfg, layout, lineage)
        summary["loops"] = fsio.read_json(layout.loop_results)["rows"]
    lineage.finish(parent, "FINISHED")
    print(format_table(summary), flush=True)
    print(f"summary: {layout.summary}", flush=True)
    if cfg.loop is not None:
        print(f"\nself-consuming loops ({layout.loop_table}, plot {layout.loop_plot}):\n"
              f"{format_loop_table(summary['loops'])}", flush=True)
    return summary


__all__ = ["StaleStageError", "close_complete_runs", "end_interrupted_runs", "iteration_complete", "open_run",
           "pipeline_plan", "run_pipeline", "stages_for", "verify_run"]
