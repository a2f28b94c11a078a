"""The pipeline's plan: which stages run, for which iteration and loop, in which order. The local runner, the
local cluster and the Kubernetes driver all read this one plan."""

from __future__ import annotations


from sims_platform.config import PipelineConfig
from sims_platform.config.schema import Loop
from sims_platform.steps import Step, base_step, planned, row


def base_step_error(cfg: PipelineConfig, k: int, step: str, loop: Loop | None = None) -> str | None:
    """Why `step` cannot provide iteration k's base in this pipeline (None: it can, or it is no base step)."""
    if row(step).stage != "train-base":
        return None
    if step == base_step(cfg, k):
        return None
    where = f"stage {Step(k, step, loop.name if loop else None).cli()}"
    if step == "train-base":
        return (f"{where}: pretrained.base is set, so iteration 0's base is imported, not trained: run stage "
                f"{base_step(cfg, k)}")
    if k == 0:
        return f"{where}: pretrained.base is not set, so iteration 0's base is trained: run stage train-base"
    return (f"{where}: only iteration 0's base is imported (pretrained.base); iteration {k}'s is trained: run stage "
            "train-base")


def stages_for(cfg: PipelineConfig, k: int) -> list[str]:
    """Stage order of iteration k: the table's rows planned for it (steps.table.planned): encode (once, before
    iteration 0) for latent models; reference (once) unless evaluate.reference names published statistics; the
    base trained, or imported (base_step); select-aux only with a shift section; feed only when a later iteration
    trains on synthetic data."""
    return planned(cfg, k)


def loop_stages(cfg: PipelineConfig, loop: Loop, k: int) -> list[str]:
    """A loop's own stages of generation k. Generation 0 is shared, so the loop adds only its feed (standard: plain
    samples of the base; sims: guided at the w selected by the shared evaluation). From generation 1 on: a new
    base, then the standard arm evaluates it as it is, while the sims arm first samples its synthetic set and
    fine-tunes its aux; every generation but the last feeds the next."""
    assert cfg.loop is not None
    return planned(cfg, k, loop)


def pipeline_plan(cfg: PipelineConfig) -> list[Step]:
    """Every stage of the pipeline in run order: each iteration's stages; with a loop section, the shared
    generation 0 (once) then each loop's feed and generations 1..G-1, loop after loop."""
    if cfg.loop is None:
        return [Step(k, s) for k in range(cfg.iterations.count) for s in stages_for(cfg, k)]
    steps = [Step(0, s) for s in stages_for(cfg, 0)]
    for loop in cfg.loop.loops():
        steps += [Step(k, s, loop.name) for k in range(cfg.loop.generations) for s in loop_stages(cfg, loop, k)]
    return steps


def plan_groups(cfg: PipelineConfig) -> dict[tuple[str | None, int], list[str]]:
    """The plan's stages per (loop name, iteration): what must be complete before that iteration's run ends."""
    groups: dict[tuple[str | None, int], list[str]] = {}
    for st in pipeline_plan(cfg):
        groups.setdefault((st.loop, st.iteration), []).append(st.stage)
    return groups


def resolve_loop(cfg: PipelineConfig, name: str | None) -> Loop | None:
    """The loop a `--loop NAME` names (None for None); a ValueError names the valid ones."""
    if name is None:
        return None
    if cfg.loop is None:
        raise ValueError(f"--loop {name}: the pipeline has no loop section")
    try:
        return cfg.loop.find(name)
    except KeyError as err:
        raise ValueError(f"--loop {err.args[0]}") from None
