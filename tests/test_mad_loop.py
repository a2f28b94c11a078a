"""Self-consuming loops (config `loop`): validation, the plan (one shared generation 0, each loop's own later
generations and feeds), and a tiny end-to-end loop whose lineage shows exactly which data fed which base."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from sims_platform.cli import main
from sims_platform.config import ConfigError, config_from_dict
from sims_platform.data import read_shards
from sims_platform.pipeline.plan import pipeline_plan, stages_for
from sims_platform.steps import Step
from sims_platform.pipeline.runner import open_run, run_pipeline
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.stages.sampling import feed_source
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.tracking import resolve_tracking_uri

from pipeline_support import tiny_config_dict

LOOP = {"arms": ["standard", "sims"], "feed_fractions": [0.5, 2.0], "generations": 3}


def loop_dict(root: str, **loop) -> dict:
    d = tiny_config_dict(root)
    d["loop"] = {**LOOP, **loop}
    return d


# ----------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("change,expected", [
    ({"iterations": {"count": 2, "train_data": "real+synthetic", "feed_samples": 8}}, r"iterations\.count must be 1"),
    ({"loop": {**LOOP, "generations": 1}}, r"loop\.generations: .*greater than or equal to 2"),
    ({"loop": {**LOOP, "feed_fractions": [0.125]}}, r"loop\.feed_fractions: .*whole percents"),
    ({"loop": {**LOOP, "feed_fractions": [0.5, 0.5]}}, r"loop\.feed_fractions: .*distinct"),
    ({"loop": {**LOOP, "arms": ["sims", "sims"]}}, r"loop\.arms: .*once"),
    ({"loop": {**LOOP, "arms": ["guided"]}}, r"loop\.arms\.0: .*'standard' or 'sims'"),
    ({"loop": {**LOOP, "train_data": "real"}}, r"loop\.train_data: .*'real\+synthetic' or 'synthetic'"),
    ({"evaluate": {"methods": [{"name": "neon", "weights": [1.0]}], "num_samples": 64, "repeats": 1}},
     r"loop\.method 'sims', which evaluate\.methods lacks"),
    ({"shift": {"target": "uniform", "w": 1.0}}, r"loop and shift cannot be combined"),
])
def test_loop_configs_that_cannot_run_are_rejected_naming_the_field(tmp_path, change, expected):
    d = loop_dict(str(tmp_path))
    d.update(copy.deepcopy(change))
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(d, "mad.yaml")


def test_sims_validate_rejects_a_bad_loop_without_a_traceback(tmp_path, capsys):
    d = loop_dict(str(tmp_path / "run"), generations=1)
    path = tmp_path / "mad.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "loop.generations" in err and "Traceback" not in err
    path.write_text(yaml.safe_dump(loop_dict(str(tmp_path / "run"))))
    assert main(["validate", str(path)]) == 0
    assert "standard-dp50, standard-dp200, sims-dp50, sims-dp200" in capsys.readouterr().out


def test_sims_stage_names_its_loop_and_refuses_steps_outside_the_plan(tmp_path, capsys):
    path = tmp_path / "mad.yaml"
    path.write_text(yaml.safe_dump(loop_dict(str(tmp_path / "run"))))
    for argv, expected in [(["--iteration", "1"], "not a step of this pipeline's plan; it runs in the loops"),
                           (["--iteration", "1", "--loop", "sims-dp25"], "no loop 'sims-dp25'"),
                           (["--iteration", "3", "--loop", "sims-dp50"], "loop.generations = 3"),
                           (["--iteration", "2", "--loop", "sims-dp50"], "not a step")]:  # the last feeds nothing
        assert main(["stage", "feed", "--config", str(path), *argv]) == 2
        assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------
# The plan


def test_plan_shares_generation_0_and_gives_each_loop_its_own_later_generations(tmp_path):
    cfg = config_from_dict(loop_dict(str(tmp_path)))
    steps = pipeline_plan(cfg)
    shared = [s for s in steps if s.loop is None]
    assert shared == [Step(0, s) for s in stages_for(cfg, 0)] and "feed" not in stages_for(cfg, 0)
    names = [lp.name for lp in cfg.loop.loops()]
    assert names == ["standard-dp50", "standard-dp200", "sims-dp50", "sims-dp200"]
    for loop in cfg.loop.loops():
        own = [(s.iteration, s.stage) for s in steps if s.loop == loop.name]
        model = [] if loop.arm == "standard" else ["generate", "finetune-aux"]
        assert own == [(0, "feed"), *[(1, s) for s in ["train-base", *model, "evaluate", "feed"]],
                       *[(2, s) for s in ["train-base", *model, "evaluate"]]]
    assert len(steps) == len(set(steps))

    root = RunLayout.of(cfg.storage.root)
    views = [root.in_loop(name) for name in names]
    for v in views:  # generation 0 is read from the very same URIs by every loop
        assert v.model(0, "train-base") == root.model(0, "train-base")
        assert v.shards(0, "generate") == root.shards(0, "generate")
        assert v.model(0, "finetune-aux") == root.model(0, "finetune-aux")
        assert v.stage(0, "evaluate") == root.stage(0, "evaluate") and v.stage(0, "reference") == root.stage(0, "reference")
        assert v.features == root.features and v.run_record == root.run_record
    for artifact in (lambda v: v.shards(0, "feed"), lambda v: v.model(1, "train-base"), lambda v: v.shards(1, "feed"),
                     lambda v: v.done_marker(2, "evaluate"), lambda v: v.summary):
        uris = [artifact(v) for v in views]
        assert len(set(uris)) == len(uris) and root.loops in uris[0]
    assert views[2].shards(0, "feed").endswith("/loops/sims-dp50/iter-00/feed/shards")


def test_feed_sources_previous_or_accumulated_and_each_arms_feed_sampler(tmp_path):
    d = loop_dict(str(tmp_path), generations=4)
    for accumulate, mode in ((False, "real+synthetic"), (True, "real+synthetic"), (True, "synthetic")):
        d["loop"].update(accumulate=accumulate, train_data=mode)
        cfg = config_from_dict(d)
        for loop in cfg.loop.loops():
            ctx = StageContext(cfg, RunLayout.of(cfg.storage.root), 3, None, requested_device="cpu", loop=loop)
            first = 0 if accumulate else 2
            assert ctx.data.feed_sources() == {f"feed_iter_{j}": ctx.layout.shards(j, "feed") for j in range(first, 3)}
            assert ctx.data.train_data_mode() == mode
            assert feed_source(ctx) == (("base", 0.0) if loop.arm == "standard" else ("sims", None))
            # the loop's view narrows the evaluation to its arm: the plain base, or the sims sweep
            methods = [(m.name, m.weights) for m in ctx.cfg.evaluate.methods]
            assert methods == ([("sims", [0.0])] if loop.arm == "standard" else [("sims", [1.0])])
            assert ctx.pipeline_cfg is cfg
    ctx0 = StageContext(cfg, RunLayout.of(cfg.storage.root), 0, None, requested_device="cpu")
    assert ctx0.data.feed_sources() == {} and ctx0.layout.loop is None


# ----------------------------------------------------------------------------
# A tiny loop end to end


def tiny_loop(root: str) -> dict:
    d = loop_dict(root, arms=["standard", "sims"], feed_fractions=[0.25], generations=3, accumulate=True)
    d["data"]["max_images"] = 200
    d["train_base"].update(images=256, checkpoint_images=256, log_images=128)
    d["finetune_aux"].update(images=128, checkpoint_images=128, log_images=128)
    d["generate"].update(num_samples=32, batch_size=32, shard_size=16, sampler={"steps": 2})
    d["evaluate"].update(num_samples=32, batch_size=32, sampler={"steps": 2}, grid_size=8)
    return d


@pytest.mark.slow
def test_tiny_loop_trains_each_generation_on_the_real_split_plus_its_named_feeds(tmp_path):
    from sims_platform.evaluation.methods import Networks
    from sims_platform.evaluation.plan import Arm
    from sims_platform.stages.seeds import sample_seeds
    from sims_platform.stages.sampling import sample_batch

    cfg = config_from_dict(tiny_loop(str(tmp_path / "run")))
    summary = run_pipeline(cfg)
    layout = RunLayout.of(cfg.storage.root)
    client = MlflowClient(resolve_tracking_uri(cfg, layout))
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=500)}
    tags = lambda name: runs[name].data.tags  # noqa: E731

    # Generation 0 ran once, and both arms' feeds read its base (and the sims arm its aux and evaluation).
    assert sum(n.endswith("train-base") for n in runs) == 1 + 2 * 2
    shared_base = tags("iter-0/train-base")["sims.output.model"]
    assert tags("standard-dp25/iter-0/feed")["sims.input.base_model"] == shared_base
    assert tags("sims-dp25/iter-0/feed")["sims.input.base_model"] == shared_base
    assert "sims-dp25/iter-0/train-base" not in runs and "standard-dp25/iter-0/evaluate" not in runs
    real_uri = tags("iter-0/train-base")["sims.input.real"]

    ctx0 = StageContext(cfg, layout, 0, None)
    n_real, n_feed = len(ctx0.data.real), round(0.25 * len(ctx0.data.real))
    for loop in cfg.loop.loops():
        for g in (1, 2):
            t = tags(f"{loop.name}/iter-{g}/train-base")
            feeds = {f"feed_iter_{j}": tags(f"{loop.name}/iter-{j}/feed")["sims.output.feed"] for j in range(g)}
            # exactly the real split plus this loop's feeds of every earlier generation (accumulate), no more
            assert {k[len("sims.input."):]: v for k, v in t.items() if k.startswith("sims.input.")} == \
                {"real": real_uri, **feeds}
            assert all(f"/loops/{loop.name}/iter-0{j}/feed/" in feeds[f"feed_iter_{j}"] + "/" for j in range(g))
            assert runs[f"{loop.name}/iter-{g}/train-base"].data.params["train_set_size"] == str(n_real + g * n_feed)
            assert t["sims.loop"] == loop.name
            ctx = StageContext(cfg, layout, g, None, loop=loop)
            x, y, sources = ctx.data.base_training_data()
            parts = [ctx.data.real_encoded] + [read_shards(uri)[:2] for uri in feeds.values()]
            assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
            assert sources == {"real": real_uri, **feeds}
        # each arm's feed: the standard arm samples its plain base, the sims arm its guided sampler at the selected w
        for g in (0, 1):
            rec = fsio.read_json(layout.in_loop(loop.name).done_marker(g, "feed"))["result"]
            ctx = StageContext(cfg, layout, g, None, loop=loop)
            if loop.arm == "standard":
                assert (rec["method"], rec["w"]) == ("base", 0.0)
                assert "sims.input.aux_model" not in tags(f"{loop.name}/iter-{g}/feed")
            else:
                results = fsio.read_json(fsio.join(ctx.layout.stage(g, "evaluate"), "results.json"))
                best = results["row"]["methods"]["sims"]["best_w"]
                assert rec["w"] == best and rec["method"] == ("sims" if best > 0 else "base")
            arm = Arm("base", 0.0) if rec["w"] == 0 else Arm(rec["method"], rec["w"])
            fed, _, _ = read_shards(ctx.layout.shards(g, "feed"))
            assert len(fed) == n_feed
            n = cfg.generate.shard_size  # the first shard, sampled as one batch: the same arithmetic as the feed's
            nets = Networks(ctx.cfg, ctx.layout, ctx.iteration, ctx.models.sampling)
            want, _ = sample_batch(ctx, nets.denoiser(arm), sample_seeds(cfg.seed, g, "feed", n),
                                   cfg.generate.sampler)
            assert torch.equal(fed[:n], want.half().float())

    # The standard arm's later generations evaluate the plain base and train no aux; the sims arm's do.
    assert "standard-dp25/iter-1/finetune-aux" not in runs and "sims-dp25/iter-1/finetune-aux" in runs
    assert "sims.input.aux_model" not in tags("standard-dp25/iter-1/evaluate")
    assert tags("sims-dp25/iter-1/evaluate")["sims.input.aux_model"] == \
        tags("sims-dp25/iter-1/finetune-aux")["sims.output.model"]

    # Results: every loop x generation with FID, precision, recall; the table, the plot, the loop runs' metrics.
    rows = summary["loops"]
    assert [(r["loop"], r["generation"]) for r in rows] == [(lp.name, g) for lp in cfg.loop.loops() for g in range(3)]
    row0 = summary["iterations"][0]["methods"]["sims"]
    assert rows[0]["fid"] == row0["fid"]["0.0"] and rows[3]["fid"] == row0["fid"][str(float(row0["best_w"]))]
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in rows)
    for uri in (layout.loop_results, layout.loop_table, layout.loop_plot):
        assert fsio.exists(uri)
    assert fsio.read_bytes(layout.loop_plot).startswith(b"\x89PNG")
    loop_run = runs["sims-dp25"]
    assert loop_run.data.tags["sims.kind"] == "loop" and loop_run.info.status == "FINISHED"
    history = client.get_metric_history(loop_run.info.run_id, "mad.fid")
    assert sorted(m.step for m in history) == [0, 1, 2]
    pipeline = client.get_run(summary["mlflow_run_id"])
    assert pipeline.info.status == "FINISHED"
    assert {"loops/fid_vs_generation.png", "loops/results.md"} <= \
        {a.path for a in client.list_artifacts(pipeline.info.run_id, "loops")}

    # Run again: every stage is skipped by its completion record, same results.
    again = run_pipeline(cfg)
    assert again["loops"] == rows

    # The sims arm feeds at whatever w its generation's evaluation selected (the tiny run may well select w = 0):
    # with w = 1 selected, its feed is the guided sampler's, not the base's.
    sims_loop = cfg.loop.find("sims-dp25")
    ctx = StageContext(cfg, layout, 1, open_run(cfg)[1], loop=sims_loop)
    results_uri = fsio.join(ctx.layout.stage(1, "evaluate"), "results.json")
    results = fsio.read_json(results_uri)
    results["row"]["methods"]["sims"]["best_w"] = 1.0
    fsio.write_json(results_uri, results)
    fsio.remove(ctx.layout.stage(1, "feed"))
    rec = run_stage(ctx, "feed")
    assert (rec["method"], rec["w"]) == ("sims", 1.0)
    fed, _, _ = read_shards(ctx.layout.shards(1, "feed"))
    seeds = sample_seeds(cfg.seed, 1, "feed", cfg.generate.shard_size)
    nets = Networks(ctx.cfg, ctx.layout, ctx.iteration, ctx.models.sampling)
    guided, _ = sample_batch(ctx, nets.denoiser(Arm("sims", 1.0)), seeds, cfg.generate.sampler)
    plain, _ = sample_batch(ctx, nets.denoiser(Arm("base", 0.0)), seeds, cfg.generate.sampler)
    assert torch.equal(fed[:len(seeds)], guided.half().float()) and not torch.allclose(guided, plain)
