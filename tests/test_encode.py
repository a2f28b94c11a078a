"""The encode stage: real images -> VAE latents -> shards, split across parts, read back for training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from sims_platform.config import config_from_dict
from sims_platform.data import SourceIndex, holdout_split, load_images, read_manifest, read_shards
from sims_platform.pipeline.runner import open_run, stages_for
from sims_platform.pipeline.execute import is_done, run_stage
from sims_platform.stages.context import StageContext
from sims_platform.storage import fsio

from pipeline_support import tiny_config_dict
from test_encoders import TINY_VAE


@pytest.fixture
def digit_folder(tmp_path):
    d = load_digits()
    for i in range(30):
        folder = tmp_path / "digits" / f"class{d.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 15).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return tmp_path / "digits"


def latent_cfg(tmp_path, digit_folder):
    d = tiny_config_dict(str(tmp_path / "run"))
    classes = len(list(digit_folder.iterdir()))
    d["data"] = {"source": "folder", "path": str(digit_folder), "resolution": 16, "channels": 3,
                 "num_classes": classes}
    d["encoder"] = {"kind": "latent", "vae_config": TINY_VAE, "shard_size": 8, "batch_size": 4}
    d["train_base"]["images"] = 256
    return config_from_dict(d)


def test_source_index_matches_load_images_order(digit_folder, tmp_path):
    cfg = latent_cfg(tmp_path, digit_folder)
    index, full = SourceIndex(cfg.data), load_images(cfg.data)
    assert len(index) == len(full) == 30
    part = index.load([5, 0, 29])
    assert torch.equal(part.images, full.images[[5, 0, 29]]) and torch.equal(part.labels, full.labels[[5, 0, 29]])


def test_encode_in_two_parts_then_train_on_latents(digit_folder, tmp_path):
    cfg = latent_cfg(tmp_path, digit_folder)
    assert stages_for(cfg, 0)[0] == "encode" and "encode" not in stages_for(cfg, 1)
    layout, lineage, _ = open_run(cfg)
    results = [run_stage(StageContext(cfg, layout, 0, lineage, part=i, parts=2), "encode") for i in (1, 0)]
    assert [r["complete"] for r in results] == [False, True]  # the part that finishes the set commits it
    # Only the training split is encoded: the held-out reference never reaches a training stage.
    everything = load_images(cfg.data)
    train, held = holdout_split(everything.labels, cfg.data.holdout_fraction, cfg.data.holdout_seed)
    manifest = read_manifest(layout.encoded)
    assert manifest["total"] == len(train) == 20 and len(manifest["shards"]) == 3
    assert manifest["encoder"] == "latent" and len(held) > 0
    x, y, keys = read_shards(layout.encoded)
    ctx = StageContext(cfg, layout, 0, lineage)
    assert torch.equal(keys, train) and set(keys.tolist()).isdisjoint(held.tolist())
    images = everything.images[train]
    expected = ctx.data.encoder.encode(images)
    # The shards keep the posterior as EDM2 does: the scaled mean, then the scaled std (stored as float16).
    assert manifest["posterior"] is True and manifest["shape"] == [8, 8, 8]
    assert torch.allclose(x[:, :4], expected, atol=2e-3 * expected.abs().max())
    dist = ctx.data.encoder.vae.encode((images.expand(-1, 3, -1, -1) + 1) / 2).latent_dist  # EDM2 feeds [0, 1]
    std = dist.std * ctx.data.encoder.scale
    assert (x[:, 4:] > 0).all() and torch.allclose(x[:, 4:], std, rtol=2e-3, atol=1e-4)
    assert ctx.data.shape() == (4, 8, 8)
    out = run_stage(ctx, "train-base")
    assert out["images"] == 256
    assert run_stage(StageContext(cfg, layout, 0, lineage, part=0, parts=2), "encode")["complete"]  # skipped


def test_a_kill_between_a_parts_record_and_the_stages_is_completed_by_a_rerun(digit_folder, tmp_path):
    """The part that completes encode is killed after its own record, before the stage's: rerunning either
    part writes the stage's record (before, both skipped as done and the stage never completed)."""
    cfg = latent_cfg(tmp_path, digit_folder)
    layout, lineage, _ = open_run(cfg)
    for i in (1, 0):
        run_stage(StageContext(cfg, layout, 0, lineage, part=i, parts=2), "encode")
    marker = layout.done_marker(0, "encode")
    for rerun in (1, 0):
        fsio.remove(marker)  # what the kill leaves: both part records, no stage record
        assert run_stage(StageContext(cfg, layout, 0, lineage, part=rerun, parts=2), "encode")["images"] == 20
        record = fsio.read_json(marker)
        assert record["part"] == 0 and record["result"]["complete"]  # the completing part's record
    assert is_done(StageContext(cfg, layout, 0, lineage), "encode")


def test_a_stage_record_written_meanwhile_is_kept(digit_folder, tmp_path, monkeypatch, capsys):
    """Two parts that both find the set complete: the first stage record stands, the second is not written
    over it."""
    cfg = latent_cfg(tmp_path, digit_folder)
    layout, lineage, _ = open_run(cfg)
    marker = layout.done_marker(0, "encode")
    theirs = {"stage": "encode", "part": 1, "result": {"complete": True}}

    def racing(ctx: StageContext, run_id: str) -> dict:  # the other part records the stage first
        fsio.write_json(marker, theirs)
        return {"complete": True}

    monkeypatch.setattr("sims_platform.stages.encode.encode", racing)
    assert run_stage(StageContext(cfg, layout, 0, lineage, part=0, parts=2), "encode") == {"complete": True}
    assert fsio.read_json(marker) == theirs
    assert "completed meanwhile by another process" in capsys.readouterr().out


def test_streamed_training_on_encoded_latents_and_synthetic_set(digit_folder, tmp_path):
    """loader: stream reads the shard sets through ShardStream (manifest checked) instead of RAM."""
    cfg = latent_cfg(tmp_path, digit_folder)
    for section in (cfg.train_base, cfg.finetune_aux):
        section.loader, section.loader_workers, section.shuffle_buffer = "stream", 1, 16
    cfg = config_from_dict(cfg.model_dump())  # revalidate the whole pipeline with the change
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    for stage in ("encode", "train-base", "generate", "finetune-aux"):
        run_stage(ctx, stage)
    from mlflow import MlflowClient

    runs = {r.info.run_name: r for r in MlflowClient(lineage.tracking_uri).search_runs(
        [lineage.experiment_id])}
    assert runs["iter-0/train-base"].data.params["loader"] == "stream"
    assert runs["iter-0/train-base"].data.params["train_set_size"] == "20"  # the training split
    assert runs["iter-0/finetune-aux"].data.params["train_set_size"] == "96"


def test_stream_loader_needs_one_shard_set(tmp_path):
    d = tiny_config_dict(str(tmp_path / "run"))
    d["train_base"]["loader"] = "stream"
    with pytest.raises(Exception, match="train_base.loader 'stream'"):
        config_from_dict(d)


def test_each_draw_of_an_image_gets_a_fresh_latent_from_the_step_generator():
    """As EDM2: a latent is drawn from the stored posterior every time a batch draws the image; the same step
    generator (a resumed run) draws the same latent, another step (the next epoch) another one."""
    from sims_platform.config.schema import TrainConfig
    from sims_platform.training.batches import draw_batch, draw_stream_batch
    from sims_platform.training.loop import step_generator

    mean, std = torch.randn(1, 4, 8, 8), torch.rand(1, 4, 8, 8) * 0.5 + 0.1
    data, labels, cfg = torch.cat([mean, std], dim=1), torch.zeros(1, dtype=torch.int64), TrainConfig(images=1)
    cpu = torch.device("cpu")

    def latents(n, step, span=None):
        gen = step_generator(0, step)
        d = draw_batch(data, labels, cfg, 10, n, gen, gen, span or (0, n), posterior=True)
        lo, hi = span or (0, n)
        return d.rows(lo, hi, cpu).x

    epoch0, again, epoch1 = latents(4, 0), latents(4, 0), latents(4, 1)
    assert epoch0.shape == (4, 4, 8, 8) and torch.equal(epoch0, again)
    assert not torch.equal(epoch0[0], epoch1[0]) and not torch.equal(epoch0[0], epoch0[1])
    assert torch.equal(latents(4, 0, (2, 4)), epoch0[2:])  # a rank's rows are the whole batch's rows
    # Scaled like a latent: the draws spread around the stored mean with the stored std.
    many = latents(4096, 2)
    assert torch.allclose(many.mean(0), mean[0], atol=5 * 0.6 / 64) and torch.allclose(many.std(0), std[0], rtol=0.1)

    class Rows:  # what StreamRows.take hands over: this rank's stored rows
        def take(self, n):
            return data.expand(n, -1, -1, -1), labels.expand(n)

    def streamed_rows(lo, hi):
        gen = step_generator(0, 0)
        return draw_stream_batch(Rows(), lo, hi, (8, 8, 8), cfg, 10, 4, gen, gen, posterior=True).rows(lo, hi, cpu).x
    streamed = streamed_rows(0, 4)
    assert streamed.shape == (4, 4, 8, 8) and not torch.equal(streamed[0], streamed[1])
    half = streamed_rows(2, 4)
    assert torch.equal(half, streamed[2:])  # a row's latent does not depend on which rank reads it
