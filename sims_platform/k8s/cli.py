"""`sims k8s render|drive` and `sims status`: wired into the `sims` CLI with register(subparsers).

Examples:
  helm template sims-run charts/sims -f values-imagenet512.yaml | sims k8s render -
  sims k8s drive --config /etc/sims/pipeline.yaml --settings /etc/sims/driver.yaml   (the driver Job runs this)
  sims status imagenet512-edm2-s -n sims
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_render(args: argparse.Namespace) -> int:
    from sims_platform.k8s.render import render

    if args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file) as f:
            text = f.read()
    sys.stdout.write(render(text))
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    from sims_platform.config import load_config
    from sims_platform.k8s.driver import Driver, StageFailed
    from sims_platform.k8s.kube import connect
    from sims_platform.k8s.settings import load_settings

    cfg = load_config(args.config)
    settings = load_settings(args.settings)
    try:
        Driver(cfg, settings, connect()).run()
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sims_platform.k8s.kube import connect, current_namespace
    from sims_platform.k8s.status import run_status

    apis = connect()
    print(run_status(apis, args.namespace or current_namespace(), args.run), flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add `k8s` (render, drive) and `status` to the `sims` parser's subcommands."""
    p = subparsers.add_parser("k8s", help="Kubernetes: render the workloads, or drive the pipeline (in a pod)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    k8s = p.add_subparsers(dest="k8s_command", required=True)

    r = k8s.add_parser("render", help="print every object the driver would create, from `helm template` output")
    r.add_argument("file", help="rendered chart manifests ('-' for standard input)")
    r.set_defaults(func=cmd_render)

    d = k8s.add_parser("drive", help="create each stage's workload in order and wait on it (the driver Job)")
    d.add_argument("--config", required=True, help="pipeline YAML (the chart mounts /etc/sims/pipeline.yaml)")
    d.add_argument("--settings", required=True, help="driver settings YAML (/etc/sims/driver.yaml)")
    d.set_defaults(func=cmd_drive)

    s = subparsers.add_parser("status", help="table of a Kubernetes run's iterations and stages")
    s.add_argument("run", help="the run name (pipeline.name; label sims.io/run)")
    s.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    s.set_defaults(func=cmd_status)
