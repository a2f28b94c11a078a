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
from sims_platform.stages import StageContext, run_stage

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
    assert manifest["total"] == len(train) and len(manifest["shards"]) == -(-len(train) // 8)
    assert manifest["encoder"] == "latent" and len(held) > 0
    x, y, keys = read_shards(layout.encoded)
    ctx = StageContext(cfg, layout, 0, lineage)
    expected = ctx.encoder.encode(everything.images[train])
    assert torch.equal(keys, train) and set(keys.tolist()).isdisjoint(held.tolist())
    assert torch.allclose(x, expected, atol=2e-3 * expected.abs().max())  # stored as float16
    assert ctx.shape() == (4, 8, 8)
    out = run_stage(ctx, "train-base")
    assert out["images"] == 256
    assert run_stage(StageContext(cfg, layout, 0, lineage, part=0, parts=2), "encode")["complete"]  # skipped


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
    train, _ = holdout_split(load_images(cfg.data).labels, cfg.data.holdout_fraction, cfg.data.holdout_seed)
    assert runs["iter-0/train-base"].data.params["train_set_size"] == str(len(train))
    assert runs["iter-0/finetune-aux"].data.params["train_set_size"] == "96"


def test_stream_loader_needs_one_shard_set(tmp_path):
    d = tiny_config_dict(str(tmp_path / "run"))
    d["train_base"]["loader"] = "stream"
    with pytest.raises(Exception, match="train_base.loader 'stream'"):
        config_from_dict(d)
