"""The tiny pipeline the end-to-end tests run (a module of its own: tests/k8s has another conftest)."""

from __future__ import annotations


def tiny_config_dict(root: str) -> dict:
    """A whole pipeline that runs end to end in well under a minute on 2 cores."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"source": "digits", "resolution": 8, "channels": 1, "num_classes": 10, "max_images": 400},
        "network": {"preset": "digits-tiny", "model_channels": 16, "channel_mult": [1, 2]},
        "train_base": {"images": 2048, "batch_size": 64, "checkpoint_images": 512, "log_images": 256},
        "generate": {"num_samples": 96, "batch_size": 48, "shard_size": 40, "sampler": {"steps": 4}},
        "finetune_aux": {"images": 512, "batch_size": 64, "checkpoint_images": 256, "log_images": 256},
        "evaluate": {"methods": [{"name": "sims", "weights": [1.0]}], "num_samples": 64, "repeats": 1,
                     "batch_size": 64, "sampler": {"steps": 4}, "grid_size": 16},
        "storage": {"root": root},
        "tracking": {"experiment": "tests"},
    }
