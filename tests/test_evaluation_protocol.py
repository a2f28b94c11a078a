"""The measurement protocol: held-out reference, disjoint seed sets, shared noise, exact w = 0, precision/recall."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sims_platform.config import config_from_dict
from sims_platform.config.schema import EvaluateConfig, MethodConfig
from sims_platform.data import holdout_split, load_images
from sims_platform.evaluation.plan import BASE, Arm, arms, report_sets, set_offset, work_units
from sims_platform.evaluation.floor import floor_row, not_computed
from sims_platform.evaluation.report import iteration_row, method_result
from sims_platform.metrics.prdc import precision_recall
from sims_platform.models.presets import build_network
from sims_platform.sampling.guidance import Guided, NetDenoiser, neon
from sims_platform.stages.seeds import sample_seeds
from sims_platform.tracking import format_table

from pipeline_support import tiny_config_dict

# ----------------------------------------------------------------------------
# Held-out split


def test_holdout_split_is_per_class_disjoint_and_deterministic():
    labels = torch.tensor([0] * 40 + [1] * 8 + [2] * 2 + [3] * 1)
    train, held = holdout_split(labels, 0.25, seed=0)
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(len(labels)))
    per_class = {c: int((labels[held] == c).sum()) for c in range(4)}
    assert per_class == {0: 10, 1: 2, 2: 1, 3: 0}  # round(0.25 n), each side keeps a class with >= 2 images
    again, _ = holdout_split(labels, 0.25, seed=0)
    assert torch.equal(train, again)
    other, _ = holdout_split(labels, 0.25, seed=1)
    assert not torch.equal(train, other)


def test_stage_context_never_trains_on_the_reference(tmp_path):
    from sims_platform.pipeline.runner import open_run
    from sims_platform.stages.context import StageContext

    cfg = config_from_dict(tiny_config_dict(str(tmp_path / "run")))
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    everything = load_images(cfg.data)
    x, _, _ = ctx.data.base_training_data()
    real_x, _, _ = ctx.data.real_training_data()
    ref = ctx.data.reference.images
    assert len(x) + len(ref) == len(everything) and len(ref) == pytest.approx(0.25 * len(everything), abs=10)
    # No held-out image is among the training images (digits has a few duplicates: compare by source index).
    train_idx, held_idx = holdout_split(everything.labels, cfg.data.holdout_fraction, cfg.data.holdout_seed)
    assert torch.equal(x, everything.images[train_idx]) and torch.equal(real_x, x)
    assert torch.equal(ref, everything.images[held_idx])
    # The split does not move with the run's seed: every training seed is measured on the same reference.
    cfg2 = config_from_dict({**tiny_config_dict(str(tmp_path / "run2")), "seed": 5})
    ctx2 = StageContext(cfg2, layout, 0, lineage)
    assert torch.equal(ctx2.data.reference.images, ref)


# ----------------------------------------------------------------------------
# Seed sets and shared noise


def _ev(**kw) -> EvaluateConfig:
    return EvaluateConfig(methods=[MethodConfig(name="sims", weights=[0.5, 1.0]),
                                   MethodConfig(name="neon", weights=[0.0, 0.5])], num_samples=70,
                          batch_size=16, repeats=3, **kw)


def test_selection_and_report_seed_sets_are_disjoint():
    ev = _ev()
    seeds = {}
    for u in work_units(ev):
        s = sample_seeds(0, 0, "evaluate", u.count, set_offset(ev, u.seed_set) + u.start)
        seeds.setdefault(u.seed_set, {}).setdefault(u.arm, []).extend(s.tolist())
    assert sorted(seeds) == [0, 1, 2, 3] and report_sets(ev) == [1, 2, 3]
    per_set = {s: set(by_arm[BASE]) for s, by_arm in seeds.items()}
    assert all(len(v) == 70 for v in per_set.values())
    for a in per_set:
        for b in per_set:
            assert a == b or per_set[a].isdisjoint(per_set[b])
    # Every arm of a set samples exactly the same seeds, in the same batches: the comparison is paired.
    for by_arm in seeds.values():
        assert len({tuple(v) for v in by_arm.values()}) == 1
    # The base is evaluated once for all methods (neon's w = 0 is the base arm).
    assert arms(ev) == [BASE, Arm("sims", 0.5), Arm("sims", 1.0), Arm("neon", 0.5)]


def test_nfe_per_sample_counts_both_networks():
    assert BASE.nfe_per_sample(16) == 31
    assert Arm("sims", 0.5).nfe_per_sample(16) == 62
    assert Arm("sims-real-aux", 0.5).nfe_per_sample(16) == 62
    assert Arm("neon", 0.5).nfe_per_sample(16) == 31


# ----------------------------------------------------------------------------
# w = 0 is the base, bit for bit; neon is weight-space extrapolation


def _nets():
    torch.manual_seed(0)
    base = build_network(config_from_dict(tiny_config_dict("/tmp/x")).network, 8, 1, 10).eval()
    torch.manual_seed(1)
    aux = build_network(config_from_dict(tiny_config_dict("/tmp/x")).network, 8, 1, 10).eval()
    return base, aux


def test_neon_and_sims_at_w0_equal_the_base_bit_exactly():
    base, aux = _nets()
    x, sigma, y = torch.randn(4, 1, 8, 8), torch.tensor(1.3), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        d_base = base(x, sigma, y)
        assert torch.equal(Guided(NetDenoiser(base), NetDenoiser(aux), 0.0)(x, sigma, y), d_base)
        assert torch.equal(neon(base, aux, 0.0)(x, sigma, y), d_base)


def test_neon_extrapolates_every_parameter_and_keeps_buffers():
    base, aux = _nets()
    w = 0.75
    net = neon(base, aux, w)
    b, a = dict(base.named_parameters()), dict(aux.named_parameters())
    for name, p in net.named_parameters():
        expected = ((1 + w) * b[name].double() - w * a[name].double()).float()
        assert torch.equal(p, expected), name
    for (name, buf), (_, base_buf) in zip(net.named_buffers(), base.named_buffers()):
        assert torch.equal(buf, base_buf), name
    assert all(torch.equal(p, b[n]) for n, p in base.named_parameters())  # the base itself is untouched


# ----------------------------------------------------------------------------
# Precision and recall


def test_precision_recall_match_the_library_on_a_known_case():
    from prdc import compute_prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8)).astype(np.float32)
    fake = (rng.normal(size=(200, 8)) * 0.5 + 0.5).astype(np.float32)
    ours = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3)
    lib = compute_prdc(real, fake, nearest_k=3)
    assert ours == pytest.approx({k: float(v) for k, v in lib.items()}, abs=0)
    # A known case: fakes far from every real are outside the real manifold, and vice versa.
    far = torch.from_numpy(real) + 1000
    known = precision_recall(torch.from_numpy(real), far, k=3)
    assert known["precision"] == 0 and known["recall"] == 0
    same = precision_recall(torch.from_numpy(real), torch.from_numpy(real).clone(), k=3)
    assert same["precision"] == 1 and same["recall"] == 1


# ----------------------------------------------------------------------------
# Selection on the selection set, report on the others


def _metrics(fids: dict[str, list[float]]) -> dict:
    out = {}
    for key, values in fids.items():
        out[key] = {"fid": dict(enumerate(values)), **{m: dict.fromkeys(range(len(values)), 0.5)
                                                       for m in ("precision", "recall", "density", "coverage")}}
    return out


def test_best_w_is_chosen_on_selection_seeds_and_reported_on_the_others():
    ev = EvaluateConfig(methods=[MethodConfig(name="sims", weights=[0.5, 1.0])], repeats=3)
    # Selection set (index 0) favours w = 1.0; the report sets would have favoured w = 0.5.
    metrics = _metrics({"base": [10.0, 10.0, 11.0, 12.0], "sims_w-0.5": [9.0, 7.0, 7.0, 7.0],
                        "sims_w-1.0": [8.0, 9.0, 9.5, 10.0]})
    res = method_result(ev, "sims", metrics, steps=16)
    assert res["best_w"] == 1.0
    assert res["fid_best"] == pytest.approx((9.0 + 9.5 + 10.0) / 3)
    assert res["fid_base"] == pytest.approx(11.0)
    assert res["gain"] == pytest.approx(1.5) and res["gain_sd"] == pytest.approx(0.5)
    assert res["significant"] is True  # 1.5 > 2 x 0.5
    assert res["fid_selection"]["1.0"] == 8.0 and res["nfe_per_sample"] == 62
    row = iteration_row(0, ev, {"sims": res}, floor_row(not_computed("no training split", ev.num_samples)))
    assert row["best_w"] == 1.0 and row["fid"]["0.0"] == pytest.approx(11.0) and row["repeats"] == 3
    assert row["fid_sd"]["0.0"] == pytest.approx(1.0) and row["sampler_steps"] == ev.sampler.steps
    table = format_table({"iterations": [row], "mlflow_run_id": None})
    assert "sims" in table and "1.0*" in table and "yes" in table


def test_no_gain_when_selection_keeps_the_base():
    ev = EvaluateConfig(methods=[MethodConfig(name="neon", weights=[0.5])], repeats=2)
    res = method_result(ev, "neon", _metrics({"base": [5.0, 6.0, 6.5], "neon_w-0.5": [5.5, 4.0, 4.0]}), steps=8)
    assert res["best_w"] == 0.0 and res["gain"] == 0.0 and res["significant"] is False
    assert math.isclose(res["fid_best"], res["fid_base"])


def test_without_a_selection_set_each_method_is_reported_at_its_preset_w_on_the_same_report_seeds():
    """evaluate.selection false: set 0 is never sampled, the report sets keep their seeds, and a preset w that
    loses to the base is reported as a loss (no forced zero)."""
    preset = EvaluateConfig(methods=[MethodConfig(name="neon", weights=[0.5])], repeats=2, num_samples=70,
                            batch_size=30, selection=False)
    selected = preset.model_copy(update={"selection": True})
    units = {(u.arm, u.seed_set, u.start, u.count) for u in work_units(preset)}
    assert {s for _, s, _, _ in units} == {1, 2}
    assert units == {(u.arm, u.seed_set, u.start, u.count) for u in work_units(selected) if u.seed_set != 0}
    # Worse than the base on both report sets: the gain is negative, not 0 ± 0.
    metrics = _metrics({"base": [5.0, 4.0, 4.0], "neon_w-0.5": [4.0, 5.0, 5.5]})
    metrics = {key: {m: {s: v for s, v in by_set.items() if s != 0} for m, by_set in m_.items()}
               for key, m_ in metrics.items()}  # what a run without the selection set has
    res = method_result(preset, "neon", metrics, steps=8)
    assert res["best_w"] == 0.5 and "fid_selection" not in res
    assert res["gain"] == pytest.approx(-1.25) and res["gain_sd"] == pytest.approx(0.3535534)
    assert res["significant"] is False
    row = iteration_row(0, preset, {"neon": res}, floor_row(not_computed("no training split", preset.num_samples)))
    table = format_table({"iterations": [row], "mlflow_run_id": None})
    assert "preset w" in table and "0.5*" in table and "no selection set" in table and "-1.25" in table


def test_without_a_selection_set_a_method_must_list_exactly_one_w():
    with pytest.raises(ValueError, match=r"evaluate.methods\[1\].weights.*neon lists 2"):
        EvaluateConfig(methods=[MethodConfig(name="sims", weights=[0.5]),
                                MethodConfig(name="neon", weights=[0.5, 1.0])], selection=False)
    EvaluateConfig(methods=[MethodConfig(name="sims", weights=[0.0, 0.5])], selection=False)  # w = 0 is the base
