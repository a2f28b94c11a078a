"""The `sims` command line: validate a pipeline, run it locally, or run one stage (as a pod does).

Examples:
  sims validate pipelines/digits.yaml
  sims run --config pipelines/digits.yaml --out out/digits
  sims stage train-base --config pipelines/digits.yaml --iteration 0
  sims stage import-base --config pipelines/digits.yaml --set pretrained.base=s3://bucket/models/base.pt
  sims stage feed --config pipelines/digits-mad.yaml --iteration 1 --loop sims-dp50
  sims stage generate --config pipelines/digits.yaml --device cpu
  sims run --config pipelines/digits.yaml --set seed=1 --set finetune_aux.images=8192 --dry-run
  sims run --config pipelines/digits.yaml --out out/digits --set generate.sampler.steps=16 --redo-from generate
  sims import-edm2 edm2-img512-s-2147483-0.130.pkl s3://bucket/models/edm2-s.pt
  sims prepare --src imagenet/train --dst s3://bucket/datasets/imagenet-1k/train-512 --resolution 512
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING

from sims_platform.config import ConfigError, PipelineConfig, dump_config, load_config
from sims_platform.config.loader import is_values_file
from sims_platform.data.errors import DataError
from sims_platform.data.arguments import add_prepare_arguments, prepare_spec
from sims_platform.steps import STAGE_NAMES, Step, row
from sims_platform.storage.safe_pickle import UnsafePickleError, require_safe_torch
from sims_platform.utils import interrupt
from sims_platform.utils.arguments import subcommand

if TYPE_CHECKING:
    from sims_platform.stages.context import StageContext

# Exit codes (listed in `sims --help` and the README).
EXIT_OK = 0
EXIT_FAILED = 1       # a stage failed: its own output above says why
EXIT_BAD_INPUT = 2    # a bad command line, config, input file or missing cluster credentials: fix what it names
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): every process stopped; rerunning resumes
EXIT_STOPPED = 143      # SIGTERM: every process stopped; rerunning resumes
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    a stage failed (its output above says why; `sims run` again resumes)
  {EXIT_BAD_INPUT}    bad command line, config, input file or cluster credentials (the error line names it)
  10   sims k8s drive: a stage of the run failed
  11   sims k8s drive / preflight: the namespace is not ready for the run (the error line says what is missing)
  {EXIT_INTERRUPTED}  interrupted with Ctrl-C: every process of the run stopped; run the command again to resume
  {EXIT_STOPPED}  stopped with SIGTERM: every process of the run stopped; run the command again to resume
"""


def _load(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.set or [])
    if getattr(args, "out", None):
        overrides.append(f"storage.root={os.path.abspath(args.out)}")
    if getattr(args, "device", None):
        overrides.append(f"runtime.device={args.device}")  # validated with the rest of the config
    if getattr(args, "parts", None) is not None:
        overrides.append(f"runtime.local_parts={args.parts}")
    return load_config(args.config, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from sims_platform.data.check import check_data_paths

    cfg = load_config(args.file, list(args.set or []))
    notes = check_data_paths(cfg.data) + cfg.notes()
    sweeps = "; ".join(f"{m.name} w {m.weights}" for m in cfg.evaluate.methods)
    what = " (Helm values file: its pipeline)" if is_values_file(args.file) else ""
    print(f"{args.file}{what}: valid ({cfg.iterations.count} iteration(s), {sweeps})")
    for note in notes:
        print(f"note: {note}")
    if cfg.loop is not None:
        print(f"loops ({cfg.loop.generations} generations from a shared generation 0, {cfg.loop.train_data}"
              f"{', accumulating' if cfg.loop.accumulate else ''}): "
              + ", ".join(lp.name for lp in cfg.loop.loops()))
    if args.print:
        print(dump_config(cfg), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.dry_run:
        from sims_platform.pipeline.provenance import plan_states, step_name
        from sims_platform.storage.layout import RunLayout

        print(dump_config(cfg), end="")
        layout = RunLayout.of(cfg.storage.root)
        print(f"\nplan in {layout.root} (nothing was run):")
        for step, state in plan_states(cfg, layout, args.redo_from):
            print(f"  {step_name(step):<28} {state}")
        return 0
    from sims_platform.pipeline.processes import StepFailed
    from sims_platform.pipeline.runner import run_pipeline
    from sims_platform.storage.layout import RunLayout
    from sims_platform.tracking import resolve_tracking_uri, ui_command
    from sims_platform.utils.accel import resolve_device

    resolve_device(cfg.runtime.device)  # a missing GPU fails before any stage starts
    try:
        run_pipeline(cfg, redo_from=args.redo_from)
    except StepFailed as err:  # the failed processes printed their own errors above
        print(f"error: {err}; `sims run` again resumes from the completed stages", file=sys.stderr)
        return EXIT_FAILED
    layout = RunLayout.of(cfg.storage.root)
    sims = os.path.relpath(sys.argv[0]) if os.path.basename(sys.argv[0]) == "sims" else "sims"
    print(f"open the MLflow UI with:\n  {ui_command(resolve_tracking_uri(cfg, layout), layout, sims)}", flush=True)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on a local run folder's store, wherever the folder now is (its artifacts re-rooted first)."""
    from sims_platform.storage.layout import RunLayout
    from sims_platform.tracking.store import SQLITE, local_store, mlflow_ui_argv, open_client

    layout = RunLayout.of(args.folder)
    uri, _ = local_store(layout)
    db = uri[len(SQLITE):]
    if not os.path.isfile(db):
        raise ConfigError(f"{args.folder}: no MLflow store here (expected {db}); give the folder a `sims run --out` "
                          "wrote")
    open_client(uri)  # re-roots the artifact locations of a moved or copied folder
    argv = mlflow_ui_argv(layout) + ["--host", args.host, "--port", str(args.port)]
    print(f"[ui] {' '.join(argv[1:])}", flush=True)
    os.execv(argv[0], argv)
    return 0  # not reached


def _stage_loop(cfg: PipelineConfig, args: argparse.Namespace):
    """The loop `--loop` names (None: the shared pipeline), once (stage, iteration, loop) is known to be a step of
    the pipeline's plan."""
    from sims_platform.pipeline.plan import base_step_error, pipeline_plan, resolve_loop

    try:
        loop = resolve_loop(cfg, args.loop)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.loop is None:
        if args.iteration >= cfg.iterations.count:
            raise ConfigError(f"--iteration {args.iteration}: the pipeline has iterations.count = "
                              f"{cfg.iterations.count} (iterations are 0-based)")
    elif loop is not None and args.iteration >= cfg.loop.generations:
        raise ConfigError(f"--iteration {args.iteration}: the pipeline has loop.generations = "
                          f"{cfg.loop.generations} (generations are 0-based)")
    wrong = base_step_error(cfg, args.iteration, args.name, loop)
    if wrong:  # train-base and import-base write the same folder: only the plan's one may run
        raise ConfigError(wrong)
    if cfg.loop is None:
        return None
    stage = row(args.name)
    planned = set(pipeline_plan(cfg))
    if stage.scope != "run" and Step(args.iteration, stage.stage, args.loop) not in planned:
        loops = sorted({st.loop for st in planned if st.stage == stage.stage and st.iteration == args.iteration
                        and st.loop})
        where = f"; it runs in the loops {', '.join(loops)} (--loop NAME)" if loops and not args.loop else ""
        raise ConfigError(f"stage {args.name} --iteration {args.iteration}"
                          f"{' --loop ' + args.loop if args.loop else ''} is not a step of this pipeline's plan{where}")
    return loop


def part_index(args: argparse.Namespace) -> int:
    """This process's part of a job array: --index, else the Indexed Job's JOB_COMPLETION_INDEX, else 0."""
    return args.index if args.index is not None else int(os.environ.get("JOB_COMPLETION_INDEX", 0))


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = _load(args)
    loop = _stage_loop(cfg, args)
    from sims_platform.pipeline.runner import close_complete_runs, open_run
    from sims_platform.pipeline.execute import run_stage
    from sims_platform.stages.context import StageContext
    from sims_platform.utils.accel import resolve_device

    # Before the run is opened: a missing GPU fails fast. import-base only copies weights: its pod has no GPU.
    device = resolve_device("cpu" if row(args.name).cpu_only else cfg.runtime.device)

    index = part_index(args)
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, args.iteration, lineage, requested_device=device, part=index, parts=args.count,
                       loop=loop)
    result = run_stage(ctx, args.name, force=args.force)
    close_complete_runs(ctx)
    if not interrupt.launched():  # a launcher prints its own line per step; a pod's log gets this one
        print(stage_summary(args.name, ctx, result), flush=True)
    return 0


def stage_summary(stage: str, ctx: StageContext, result: dict) -> str:
    """One line on what a `sims stage` process did: its step and the result's plain values (URIs, counts)."""
    where = f"{ctx.loop_name} " if ctx.loop_name else ""
    part = f" part {ctx.part}/{ctx.parts}" if ctx.parts > 1 else ""
    fields = ", ".join(f"{k}={v}" for k, v in result.items()
                       if k != "complete" and v is not None and isinstance(v, (str, int, float)))
    if ctx.parts > 1 and not result.get("complete", True):
        fields += ("; " if fields else "") + "the stage completes when its other parts (or its reducer) have run"
    return f"[{where}iter {ctx.iteration} {stage}{part}] finished" + (f": {fields}" if fields else "")


def cmd_import_edm2(args: argparse.Namespace) -> int:
    import json

    from sims_platform.models.pretrained import import_edm2
    from sims_platform.storage.fsio import normalize_uri

    try:
        info = import_edm2(normalize_uri(args.src), normalize_uri(args.dst))
    except ValueError as err:
        if isinstance(err, UnsafePickleError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(info, indent=2), flush=True)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import json

    from sims_platform.data.prepare import run_part

    index = part_index(args)
    result = run_part(prepare_spec(args, workers=4), index, args.count,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result), flush=True)
    return 0


def cmd_local_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sims_platform.launch.local_cluster import run_local_cluster

    run_local_cluster(args.config, Path(args.out), procs=args.procs, writers=args.writers,
                      eval_parts=args.eval_parts, extra=list(args.set or []))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sims", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    set_help = "override a config value, KEY=VALUE with a dotted key (repeatable)"

    p = subcommand(sub, "validate", help="check a pipeline YAML file (or a Helm values file's pipeline); errors "
                   "name the field; local data paths are checked too")
    p.add_argument("file", help="pipeline YAML or Helm values file ('-' for standard input)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--print", action="store_true", help="print the resolved config with every default")
    p.set_defaults(func=cmd_validate)

    p = subcommand(sub, "run", help="run every iteration and stage of a pipeline on this machine")
    p.add_argument("--config", required=True, help="pipeline YAML")
    p.add_argument("--out", help="storage root (overrides storage.root), e.g. out/digits")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and what each stage of the "
                   "plan would do in the run folder (done, to run, to resume, to redo), and stop")
    p.add_argument("--device", help="where to compute: auto (default: cuda:LOCAL_RANK when a GPU is visible, "
                   "else cpu), cpu, cuda or cuda:N; sets runtime.device")
    p.add_argument("--parts", type=int, metavar="N", help="run generate and evaluate as N job-array parts, "
                   "each its own process on this machine; sets runtime.local_parts")
    p.add_argument("--redo-from", action="append", metavar="STAGE",
                   help="rerun STAGE and every stage that reads its results, in every iteration and loop (e.g. "
                   "generate), or one step only with what reads it (e.g. iter-01/generate, sims-dp50/iter-01/feed); "
                   "their folders are deleted first (repeatable). A resumed run keeps each completed stage only if "
                   "its record was made with the same settings (storage, tracking, runtime and the name aside), and "
                   "otherwise stops and names the stage and the changed keys")
    p.set_defaults(func=cmd_run)

    p = subcommand(sub, "stage", help="run one stage of one iteration (resumes from its newest checkpoint)")
    p.add_argument("name", choices=STAGE_NAMES)
    p.add_argument("--config", required=True, help="pipeline YAML")
    p.add_argument("--iteration", type=int, default=0, help="0-based iteration (default 0)")
    p.add_argument("--out", help="storage root (overrides storage.root)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--index", type=int, help="this worker's part of a job-array stage (encode, reference, "
                   "generate, evaluate); default: $JOB_COMPLETION_INDEX or 0")
    p.add_argument("--count", type=int, default=1, help="how many parts the stage is split into (default 1)")
    p.add_argument("--loop", help="a self-consuming loop's stage (config `loop`): its name, <arm>-dp<percent>, "
                   "e.g. sims-dp50; without it, the shared pipeline's (generation 0)")
    p.add_argument("--force", action="store_true", help="run even if the stage is marked complete (also when "
                   "its record was made with other settings, which is otherwise refused)")
    p.add_argument("--device", help="where to compute: auto (default: cuda:LOCAL_RANK when a GPU is visible, "
                   "else cpu), cpu, cuda or cuda:N; sets runtime.device")
    p.set_defaults(func=cmd_stage)

    p = subcommand(sub, "local-cluster", help="run a pipeline as the cluster does, on this machine: torchrun "
                   "training, job-array parts, a reducer, a loopback S3 endpoint and MLflow server")
    p.add_argument("--config", required=True, help="pipeline YAML")
    p.add_argument("--out", default="out/cluster-local", help="folder for server logs, MLflow database, summary")
    p.add_argument("--procs", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    p.add_argument("--writers", type=int, default=2, help="parts of the job arrays that write shards (generate, "
                   "encode)")
    p.add_argument("--eval-parts", type=int, default=2, help="parts of the other job arrays (reference, evaluate)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_local_cluster)

    p = subcommand(sub, "import-edm2", help="convert an EDM2 network pickle (training snapshot or post-hoc-EMA "
                   "export) into a model file, reading it without running any code it carries")
    p.add_argument("src", help="EDM2 pickle: path or URI (network-snapshot-*.pkl, edm2-img512-*.pkl)")
    p.add_argument("dst", help="model file to write: path or URI (usable as pretrained.base / pretrained.guide)")
    p.set_defaults(func=cmd_import_edm2)

    p = subcommand(sub, "ui", help="open the MLflow UI on a run folder (`sims run --out`), also after it was "
                   "moved or copied")
    p.add_argument("folder", help="the run's folder, e.g. out/digits")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.set_defaults(func=cmd_ui)

    p = subcommand(sub, "prepare", help="turn an ImageNet-style folder (one sub-folder of images per class) into "
                   "WebDataset shards of images cropped and resized as training reads them (PNG + cls)",
                   description="Shard j holds images [j*S, (j+1)*S) of the sorted file list; part i of N "
                   "writes the shards j with j % N == i, skipping shards already committed from the same "
                   "inputs, and whichever part finds every shard committed writes manifest.json. Rerun it "
                   "after a failure: it resumes.")
    add_prepare_arguments(p)
    p.add_argument("--index", type=int, help="this part (default: $JOB_COMPLETION_INDEX or 0)")
    p.add_argument("--count", type=int, default=1, help="how many parts write the shards (default 1)")
    p.set_defaults(func=cmd_prepare)

    from sims_platform.k8s.cli import register as register_k8s

    register_k8s(sub)
    return parser


# How each command resumes after an interruption (what the one line printed on Ctrl-C or SIGTERM says).
RESUME = {
    "run": "`sims run ...` again resumes from the completed stages",
    "stage": "`sims stage ...` again resumes from the stage's last checkpoint",
    "local-cluster": "`sims local-cluster ...` again resumes from the completed stages",
}


def main(argv: list[str] | None = None) -> int:
    command = ""
    try:
        with interrupt.handled():
            args = build_parser().parse_args(argv)
            command = args.command
            try:
                require_safe_torch()
                return args.func(args)
            except (ConfigError, FileNotFoundError, UnsafePickleError, DataError) as err:
                # Bad input: the message names the field or file and what was expected (a refused pickle ran
                # nothing).
                print(f"error: {err}", file=sys.stderr)
                return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the launchers' `finally` blocks stopped their processes
        stopped = err if isinstance(err, interrupt.Stopped) else interrupt.Stopped(signal.SIGINT)
        return interrupt.report(stopped, RESUME.get(command))


if __name__ == "__main__":
    sys.exit(main())
