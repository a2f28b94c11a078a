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


def job_observed(job: dict[str, Any]) -> Observed:
    """batch/v1 Job: Complete / Failed / Suspended (Kueue holds it) / otherwise active or pending."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conds = true_conditions(status)
    if "Complete" in conds:
        return Observed(Phase.SUCCEEDED)
    if "Failed" in conds:
        return _failed(conds["Failed"])
    if "FailureTarget" in conds:  # terminal already; Failed follows once the pods are gone
        return _failed(conds["FailureTarget"])
    if "Suspended" in conds or spec.get("suspend"):
        reason = conds.get("Suspended", {}).get("reason") or "Suspended"
        return Observed(Phase.WAITING, reason, "waiting for admission (Kueue) or resume")
    if (status.get("ready") or 0) > 0 or ((status.get("active") or 0) > 0 and status.get("startTime")):
        return Observed(Phase.RUNNING)
    return Observed(Phase.WAITING, "Pending")
