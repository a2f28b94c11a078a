"""What a workload's status conditions mean to the driver: waiting, running, succeeded or failed (and why)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Phase(str, enum.Enum):
    MISSING = "Missing"      # not created (or deleted by hand)
    WAITING = "Waiting"      # created, not running yet: pending pods, or suspended by Kueue until admitted
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


@dataclass(frozen=True)
class Observed:
    phase: Phase
    reason: str = ""
    message: str = ""

    def describe(self) -> str:
        detail = ": ".join(p for p in (self.reason, self.message) if p)
        return f"{self.phase.value}" + (f" ({detail})" if detail else "")


def true_conditions(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """type -> condition for the conditions whose status is "True"."""
    conds = (status or {}).get("conditions") or []
    return {c["type"]: c for c in conds if str(c.get("status")) == "True"}


def _failed(cond: dict[str, Any]) -> Observed:
    return Observed(Phase.FAILED, cond.get("reason") or "", cond.get("message") or "")


def settled(conds: dict[str, dict[str, Any]], done: str, suspended: bool,
            failed: tuple[str, ...] = ("Failed",)) -> Observed | None:
    """What every job kind reports alike through its true conditions: success (`done`), failure (the first of
    `failed` present), or waiting while suspended (Kueue holds it); None while it is neither."""
    if done in conds:
        return Observed(Phase.SUCCEEDED)
    for kind in failed:
        if kind in conds:
            return _failed(conds[kind])
    if "Suspended" in conds or suspended:
        reason = conds.get("Suspended", {}).get("reason") or "Suspended"
        return Observed(Phase.WAITING, reason, "waiting for admission (Kueue) or resume")
    return None


def job_observed(job: dict[str, Any]) -> Observed:
    """batch/v1 Job: Complete / Failed / Suspended (Kueue holds it) / otherwise active or pending."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    # FailureTarget is terminal already; Failed follows once the pods are gone.
    if seen := settled(true_conditions(status), "Complete", bool(spec.get("suspend")), ("Failed", "FailureTarget")):
        return seen
    if (status.get("ready") or 0) > 0 or ((status.get("active") or 0) > 0 and status.get("startTime")):
        return Observed(Phase.RUNNING)
    return Observed(Phase.WAITING, "Pending")
