"""Deterministic workload names: one per run, iteration and step, so a restarted driver finds what exists."""

from __future__ import annotations

import hashlib
import re

from sims_platform.steps import Step

# Pods and Services are named after the workload (<job>-master-0, <job>-worker-12, <job>-<index>); their names
# must stay DNS-1035 labels of at most 63 characters, so the workload name itself keeps 11 spare.
MAX_NAME = 52
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def is_dns_label(name: str, limit: int = 63) -> bool:
    return len(name) <= limit and bool(_DNS1035.match(name))


def workload_name(run: str, at: Step) -> str:
    """'<run>-i<KK>-<step>' ('<run>-<loop>-i<KK>-<step>' for a self-consuming loop's step), shortened with a
    stable hash of the full name when it would exceed MAX_NAME."""
    iteration, step, loop = at.iteration, at.stage, at.loop
    tail = f"{'-' + loop if loop else ''}-i{iteration:02d}-{step}"
    full = f"{run}{tail}"
    if not full[0].isalpha():
        full = "r" + full
    if len(full) <= MAX_NAME:
        name = full
    else:
        digest = hashlib.sha256(full.encode()).hexdigest()[:8]
        short = f"{tail}-{digest}"
        if len(short) >= MAX_NAME - 1:  # a long loop name too: keep the step readable, the hash keeps it unique
            short = f"-i{iteration:02d}-{step}-{digest}"
        head = full[: MAX_NAME - len(short)].rstrip("-")
        name = head + short
    if not is_dns_label(name, MAX_NAME):
        raise ValueError(f"workload name '{name}' (run '{run}', iteration {iteration}, step '{step}'"
                         f"{', loop ' + repr(loop) if loop else ''}) is not a DNS-1035 label of at most {MAX_NAME} "
                         "characters")
    return name
