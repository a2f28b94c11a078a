"""benchmarks/sims_effect.py: each fine-tune mode's overrides make a valid config, the aux methods of every mode
are reported side by side, and the paired SIMS-minus-control gap is a per-seed difference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sims_platform.config import load_config

BENCH = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
sims_effect = pytest.importorskip("sims_effect")
DEMO = str(Path(__file__).parent.parent / "pipelines" / "digits.yaml")


@pytest.mark.parametrize("mode", ["resume", "transfer", "restart"])
def test_each_mode_override_gives_a_runnable_config(mode):
    cfg = load_config(DEMO, sims_effect.mode_overrides(DEMO, mode, []))
    assert cfg.finetune_aux.init.mode == mode
    assert cfg.finetune_aux.optimizer.lr == cfg.train_base.optimizer.lr
    assert cfg.finetune_aux.optimizer.rampup_images == {"resume": cfg.train_base.optimizer.rampup_images,
                                                         "transfer": cfg.finetune_aux.images // 10,
                                                         "restart": 0}[mode]
    assert {m["name"] for m in sims_effect.aux_methods(DEMO, [])} == {"sims", "neon", "sims-real-aux"}


def _res(base: float, fids: dict[str, float], best: str) -> dict:
    fid = {"0.0": base, **fids}
    return {"fid": fid, "fid_selection": {k: v + 0.5 for k, v in fid.items()}, "best_w": float(best), "fid_base": base,
            "fid_best": fid[best], "gain": base - fid[best], "gain_sd": 0.5, "significant": False, "precision": {k: 0.8 for k in fid}, "recall": {k: 0.9 for k in fid}}


def records() -> list[dict]:
    """3 seeds, two modes: in every seed sims beats its control by 1 (resume) and by 0 (transfer) at w = 0.25."""
    out = []
    for seed, base in enumerate([20.0, 60.0, 40.0]):
        rows = {"resume": {"sampler_steps": 16, "repeats": 3, "num_samples": 500,
                           "fid_floor": {"mean": 3.0, "sd": 0.1, "sets": 2, "samples": 500},
                           "methods": {"sims": _res(base, {"0.25": base - 2}, "0.25"),
                                       "sims-real-aux": _res(base, {"0.25": base - 1}, "0.0"),
                                       "autoguidance": _res(base, {"0.5": base - 3}, "0.5")}},
                "transfer": {"sampler_steps": 16, "repeats": 3, "methods": {
                    "sims": _res(base, {"0.25": base + 1}, "0.0"),
                    "sims-real-aux": _res(base, {"0.25": base + 1}, "0.0")}}}
        row = sims_effect.merged_row(rows, ("resume", "transfer"))
        out.append({"seed": seed, "root": "x", "seconds": 1.0, "row": row})
    return out


def test_the_report_names_each_mode_and_pairs_sims_with_its_control():
    recs = records()
    assert list(recs[0]["row"]["methods"]) == ["sims [resume]", "sims-real-aux [resume]", "autoguidance",
                                               "sims [transfer]", "sims-real-aux [transfer]"]
    table, verdict = sims_effect.report(recs, "cmd")
    assert verdict["autoguidance"]["mean_gap"] == pytest.approx(3.0)
    assert verdict["sims [transfer]"]["mean_gap"] == 0  # every seed chose w = 0: forced zeros, counted
    assert "| sims [transfer] | 3 | 0.00 |" in table and "| 3/3 |" in table
    # resume: FID(control) - FID(sims) = 1 at w = 0.25 in every seed; at the selected w, control chose w = 0.
    assert "| resume | 0.25 | 1.00 | [1.00, 1.00] | yes | 3/3 |" in table
    assert "| resume | selected | 2.00 |" in table
    assert "| transfer | 0.25 | 0.00 |" in table
    assert "| 0 | 3.00 ± 0.10 | 2 x 500 |" in table


def test_the_selection_sets_compare_the_modes_without_touching_the_report_sets():
    table, _ = sims_effect.report(records(), "cmd")
    section = table.split("## The selection sets")[1]
    # selection FIDs are the report FIDs + 0.5 in this fixture, so the gaps are the report gaps: sims [resume]
    # 2 at w = 0.25 in every seed, 1 better than its control; sims [transfer] 1 worse than the base at 0.25.
    assert "| sims [resume] | 0.25 | 2.00 | 3/3 | 1.00 |" in section
    assert "| sims [resume] | selected | 2.00 | 3/3 |  |" in section
    assert "| sims [transfer] | 0.25 | -1.00 | 0/3 | 0.00 |" in section
    assert "| sims [transfer] | selected | 0.00 | 0/3 |  |" in section
