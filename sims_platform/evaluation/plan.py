"""What an evaluation computes: arms (method, w), seed sets (selection + report repeats), and units of work.

An arm is one sampler: the base (w = 0, shared by every method) or a method at one w > 0. Seed set 0 is the
selection set, on which each method's best w is chosen (sampled only with evaluate.selection: a run without it
reports each method at its one preset w); sets 1..repeats are the report sets, whose FID, precision and recall are
reported as mean and sd. All sets are disjoint slices of the evaluation seed stream, and every arm samples exactly
the same seeds in each set, so arms differ only in their sampler (paired).
A unit is (arm, set, batch of seeds); a job array's part i computes a contiguous, balanced block of units.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sims_platform.config.schema import EvaluateConfig, ShiftConfig
from sims_platform.config.methods import Weights, method, metric_tag, w_key

SELECTION_SET = 0

__all__ = ["BASE", "SELECTION_SET", "Arm", "Unit", "w_key"]


@dataclass(frozen=True)
class Arm:
    """A sampler of the comparison: method 'base' at w = 0, or a method at one weight setting (one w > 0, or a
    vector with one w per guide, not all 0)."""

    method: str
    w: Weights

    @property
    def key(self) -> str:
        """Storage- and URL-safe name: 'base' or e.g. 'sims_w-0.5' ('sims+autoguidance_w-0.5,1.0' for a vector)."""
        return "base" if self.method == "base" else f"{metric_tag(self.method)}_w-{w_key(self.w)}"

    def nfe_per_sample(self, steps: int) -> int:
        """Network evaluations per sample with a Heun sampler of `steps` steps (2 steps - 1 per network)."""
        return 2 * steps - 1 if self.method == BASE.method else method(self.method).nfe_per_sample(steps, self.w)


BASE = Arm("base", 0.0)


def arms(ev: EvaluateConfig) -> list[Arm]:
    """The base first, then each method's w > 0 in config order; w = 0 of any method is the base."""
    return [BASE] + [Arm(m.name, w) for m in ev.methods for w in m.guided_weights]


def method_arms(ev: EvaluateConfig, method: str) -> list[Arm]:
    """A method's sweep including w = 0 (the base)."""
    return [BASE] + [Arm(method, w) for w in ev.method(method).guided_weights]


def arm_by_key(ev: EvaluateConfig) -> dict[str, Arm]:
    return {a.key: a for a in arms(ev)}


def seed_sets(ev: EvaluateConfig) -> list[int]:
    """Set indices: 0 = selection (with evaluate.selection), 1..repeats = report. A report set holds the same seeds
    with or without a selection set."""
    return ([SELECTION_SET] if ev.selection else []) + report_sets(ev)


def report_sets(ev: EvaluateConfig) -> list[int]:
    return list(range(1, ev.repeats + 1))


def set_offset(ev: EvaluateConfig, s: int) -> int:
    """First position of set s in the evaluation seed stream (sets are disjoint, num_samples each)."""
    return s * ev.num_samples


@dataclass(frozen=True)
class Unit:
    """Seeds [start, start + count) of seed set `seed_set` (positions within the set), sampled by `arm`."""

    arm: Arm
    seed_set: int
    batch: int  # index of this batch within its (arm, set)
    start: int
    count: int

    @property
    def tag(self) -> tuple[int, int]:
        return (self.seed_set, self.batch)


def work_units(ev: EvaluateConfig) -> list[Unit]:
    """Every unit, arm-major, then set, then batch."""
    return [Unit(a, s, b, start, min(ev.batch_size, ev.num_samples - start))
            for a in arms(ev) for s in seed_sets(ev)
            for b, start in enumerate(range(0, ev.num_samples, ev.batch_size))]


def part_block(num_units: int, part: int, parts: int) -> range:
    """Indices of the units part `part` of `parts` computes: contiguous blocks whose sizes differ by <= 1."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is outside 0..{parts - 1}")
    q, r = divmod(num_units, parts)
    start = part * q + min(part, r)
    return range(start, start + q + (part < r))


def owner(unit_index: int, num_units: int, parts: int) -> int:
    """The part whose block holds unit_index (inverse of part_block)."""
    q, r = divmod(num_units, parts)
    return unit_index // (q + 1) if unit_index < r * (q + 1) else r + (unit_index - r * (q + 1)) // max(q, 1)


def settings_digest(ev: EvaluateConfig, seed: int, arm: Arm, shift: ShiftConfig | None = None) -> str:
    """What an arm's part files depend on besides (arm, part): files computed under other settings must not merge.

    The w grids are left out (adding a w keeps the other arms' files); the arm's method settings are kept, and
    with a shift section the classifier kind (its parts also hold the judging classifier's class counts). Like
    the guide models' training settings, the aux set's selection is an input file, not an evaluate setting.
    """
    keep = ev.model_dump(mode="json", exclude={"methods", "grid_size"})
    method = {} if arm.method == "base" else ev.method(arm.method).model_dump(mode="json", exclude={"weights"})
    what = {"evaluate": keep, "method": method, "seed": seed}
    if shift is not None:
        what["shift_classifier"] = shift.classifier
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
