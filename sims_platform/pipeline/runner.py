"""Run the whole SIMS loop locally: every iteration's stages in order, then the summary."""

from __future__ import annotations

from sims_platform.config import PipelineConfig, dump_config
from sims_platform.stages import StageContext, run_stage
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import Lineage, format_table, read_summary, resolve_tracking_uri, write_summary


def stages_for(cfg: PipelineConfig, k: int) -> list[str]:
    """Stage order of iteration k; encode (once, before iteration 0) for latent models; reference (once, before
    iteration 0) unless evaluate.reference names published statistics; select-aux only with a shift section; feed
    only when a later iteration trains on synthetic data."""
    stages = ["encode"] if k == 0 and cfg.encoder.kind == "latent" else []
    if k == 0 and not cfg.evaluate.reference:
        stages.append("reference")
    stages += ["train-base", "generate"] + (["select-aux"] if cfg.shift is not None else []) + ["finetune-aux"]
    if any(m.name == "sims-real-aux" for m in cfg.evaluate.methods):
        stages.append("finetune-real-aux")
    stages.append("evaluate")
    it = cfg.iterations
    if k < it.count - 1 and it.train_data != "real":
        stages.append("feed")
    return stages


def open_run(cfg: PipelineConfig) -> tuple[RunLayout, Lineage, str]:
    """The run's layout and lineage; records the resolved config next to the results."""
    layout = RunLayout.of(cfg.storage.root)
    if fsio.exists(layout.config):
        previous = fsio.read_bytes(layout.config).decode()
        if previous != dump_config(cfg):
            print(f"note: {layout.config} differs from this config; stages already complete are kept "
                  "(delete the folder to start over)", flush=True)
    fsio.write_bytes(layout.config, dump_config(cfg).encode())
    lineage = Lineage(resolve_tracking_uri(cfg, layout), cfg.tracking.experiment, layout)
    return layout, lineage, lineage.pipeline_run(cfg)


def iteration_complete(cfg: PipelineConfig, layout: RunLayout, k: int) -> bool:
    """Every stage of iteration k's plan has its completion record."""
    return all(fsio.exists(layout.done_marker(k, s)) for s in stages_for(cfg, k))


def close_complete_runs(ctx: StageContext) -> None:
    """Finish ctx's iteration run once its whole plan is complete, and the pipeline run once every iteration is.

    Level-triggered (it reads the completion records, not which stage just ran), so every launcher calls it
    after each stage: the local runner, `sims stage` in a pod, a rerun with --force or after a kill.
    """
    cfg, layout, lin, k = ctx.cfg, ctx.layout, ctx.lineage, ctx.iteration
    if not lin.writes or not iteration_complete(cfg, layout, k):
        return
    lin.finish_if_running(lin.iteration_run(k))
    if all(iteration_complete(cfg, layout, j) for j in range(cfg.iterations.count)):
        lin.finish_if_running(lin.pipeline_id)


def end_interrupted_runs(cfg: PipelineConfig, layout: RunLayout, lineage: Lineage) -> None:
    """A new attempt of the whole pipeline: end the runs a killed attempt left RUNNING (see Lineage)."""
    ended = lineage.end_interrupted(
        stage_complete=lambda k, stage: fsio.exists(layout.done_marker(k or 0, stage)),
        iteration_complete=lambda k: k < cfg.iterations.count and iteration_complete(cfg, layout, k))
    if ended:
        print(f"ended runs left RUNNING by an earlier attempt: {', '.join(ended)}", flush=True)


def run_pipeline(cfg: PipelineConfig) -> dict:
    layout, lineage, parent = open_run(cfg)
    end_interrupted_runs(cfg, layout, lineage)
    for k in range(cfg.iterations.count):
        ctx = StageContext(cfg, layout, k, lineage)
        for stage in stages_for(cfg, k):
            run_stage(ctx, stage)
            close_complete_runs(ctx)
    # Each evaluate completion updated summary.json; keep this run's iterations (a shorter rerun drops the rest).
    rows = [r for r in read_summary(layout)["iterations"] if r["iteration"] < cfg.iterations.count]
    summary = write_summary(layout, rows, parent)
    lineage.finish(parent, "FINISHED")
    print(format_table(summary), flush=True)
    print(f"summary: {layout.summary}", flush=True)
    return summary
