"""`sims k8s render|drive|preflight|prepare-job` and `sims status`: wired into the `sims` CLI with register(subparsers).

Examples:
  helm template sims-run charts/sims -f values-imagenet512.yaml | sims k8s render -
  sims k8s drive --config /etc/sims/pipeline.yaml --settings /etc/sims/driver.yaml   (the driver Job runs this)
  sims k8s preflight --config /etc/sims/pipeline.yaml --settings /etc/sims/driver.yaml   (`helm test`)
  sims status imagenet512-edm2-s -n sims
  helm template sims-run charts/sims -f values-imagenet512.yaml | sims k8s prepare-job - --parts 32 \
      --src s3://bucket/raw/imagenet/train --dst s3://bucket/datasets/imagenet-1k/train-512 --resolution 512
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sims_platform.k8s.exit_codes import EXIT_NOT_READY, EXIT_STAGE_FAILED


def cmd_render(args: argparse.Namespace) -> int:
    from sims_platform.k8s.render import render

    if args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file) as f:
            text = f.read()
    sys.stdout.write(render(text))
    return 0


def drive(cfg: Any, settings: Any, apis: Any, **driver_kwargs: Any) -> int:
    """Preflight, claim the run's storage, pin its config, then drive; returns the process exit code."""
    from sims_platform.k8s.driver import Driver, RunConflict, StageFailed
    from sims_platform.k8s.ownership import OwnershipError, claim, pin_config
    from sims_platform.k8s.preflight import PreflightFailed, preflight
    from sims_platform.storage.layout import RunLayout

    log = driver_kwargs.get("log") or (lambda m: print(m, flush=True))
    try:
        report = preflight(apis, settings, cfg.name)
        report.raise_if_failed(settings.namespace)
        layout = RunLayout.of(cfg.storage.root)
        claim(layout, settings.namespace, settings.release, cfg.name)
        pin_config(layout, cfg)
        Driver(cfg, settings, apis, owner=report.config_map, **driver_kwargs).run()
    except StageFailed as err:
        log(f"error: {err}")
        return EXIT_STAGE_FAILED
    except (PreflightFailed, OwnershipError, RunConflict) as err:
        log(f"error: {err}")
        return EXIT_NOT_READY
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    from sims_platform.config import load_config
    from sims_platform.k8s.kube import connect
    from sims_platform.k8s.settings import load_settings

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if msg.startswith("error:") else sys.stdout, flush=True)

    return drive(load_config(args.config), load_settings(args.settings), connect(), log=log)


def cmd_preflight(args: argparse.Namespace) -> int:
    from sims_platform.config import load_config
    from sims_platform.k8s.kube import connect
    from sims_platform.k8s.preflight import PreflightFailed, preflight
    from sims_platform.k8s.settings import load_settings

    cfg, settings = load_config(args.config), load_settings(args.settings)
    try:
        preflight(connect(), settings, cfg.name).raise_if_failed(settings.namespace)
    except PreflightFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_NOT_READY
    print(f"preflight passed: run {cfg.name} can start in namespace {settings.namespace}", flush=True)
    return 0


def cmd_prepare_job(args: argparse.Namespace) -> int:
    import yaml

    from sims_platform.data.arguments import prepare_spec
    from sims_platform.k8s.prepare_job import prepare_job
    from sims_platform.k8s.render import run_specs

    text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    settings = run_specs(text)[0].settings  # the release's image, namespace, queue, S3 Secret, volumes, env
    try:
        workers = max(1, int(float(args.cpu)))
    except ValueError:  # e.g. 500m: a fraction of a core
        workers = 1
    job = prepare_job(settings, prepare_spec(args, workers), args.parts, parallelism=args.parallelism,
                      cpu=args.cpu, memory=args.memory, name=args.name)
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False, explicit_start=True))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sims_platform.k8s.kube import connect, current_namespace
    from sims_platform.k8s.status import run_status

    apis = connect()
    print(run_status(apis, args.namespace or current_namespace(), args.run), flush=True)
    return 0


# What `sims k8s --help` shows (the module docstring above is for readers of the code).
K8S_DESCRIPTION = """\
Run a pipeline on Kubernetes. `helm install` of charts/sims starts a run: its driver Job runs `sims k8s drive`
and `helm test` runs `sims k8s preflight`; `sims k8s render` shows what the driver would create, and
`sims status RUN` shows a run's progress.

examples:
  helm template sims-run charts/sims -f values-imagenet512.yaml | sims k8s render -
  sims k8s preflight --config /etc/sims/pipeline.yaml --settings /etc/sims/driver.yaml
  sims status imagenet512-edm2-s -n sims
"""


def register(subparsers: Any) -> None:
    """Add `k8s` (render, drive, preflight) and `status` to the `sims` parser's subcommands."""
    from sims_platform.data.arguments import add_prepare_arguments
    from sims_platform.utils.arguments import subcommand  # the `sims` CLI's conventions

    p = subparsers.add_parser("k8s", help="Kubernetes: render the workloads, check a namespace, or drive a run "
                              "(the driver pod runs this)", description=K8S_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    k8s = p.add_subparsers(dest="k8s_command", required=True)

    r = subcommand(k8s, "render",
                   help="print every object the driver would create, from `helm template` output")
    r.add_argument("file", help="rendered chart manifests ('-' for standard input)")
    r.set_defaults(func=cmd_render)

    d = subcommand(k8s, "drive", help="create each stage's workload in order and wait on it (what the chart's "
                   "driver Job runs; exit 10: a stage failed, 11: the namespace is not ready)")
    d.add_argument("--config", required=True, help="pipeline YAML (the chart mounts /etc/sims/pipeline.yaml)")
    d.add_argument("--settings", required=True, help="driver settings YAML (/etc/sims/driver.yaml)")
    d.set_defaults(func=cmd_drive)

    f = subcommand(k8s, "preflight", help="check the namespace has what the run needs (CRDs, Secret, "
                   "LocalQueue; exit 11 when not)")
    f.add_argument("--config", required=True, help="pipeline YAML (/etc/sims/pipeline.yaml)")
    f.add_argument("--settings", required=True, help="driver settings YAML (/etc/sims/driver.yaml)")
    f.set_defaults(func=cmd_preflight)

    j = subcommand(k8s, "prepare-job", help="print the Indexed Job that runs `sims prepare` as N parts, with "
                   "the release's image, namespace, queue and S3 Secret (from `helm template` output)")
    j.add_argument("file", help="rendered chart manifests ('-' for standard input)")
    add_prepare_arguments(j)
    j.add_argument("--parts", type=int, required=True, help="Indexed Job completions: each writes the shards j "
                   "with j %% parts == its index")
    j.add_argument("--parallelism", type=int, help="pods at once (default: parts)")
    j.add_argument("--cpu", default="4", help="CPU request of each pod (default 4; also the default --workers)")
    j.add_argument("--memory", default="8Gi", help="memory request and limit of each pod (default 8Gi)")
    j.add_argument("--name", help="Job name (default: <release>-prepare-<hash of --dst>)")
    j.set_defaults(func=cmd_prepare_job)

    s = subcommand(subparsers, "status", help="show a Kubernetes run's iterations and stages as a table (needs "
                   "a kubeconfig, or a pod's ServiceAccount)")
    s.add_argument("run", help="the run name (pipeline.name; label sims.io/run)")
    s.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    s.set_defaults(func=cmd_status)
