"""A small latent SIMS pipeline end to end on one device: encode, train-base, generate, finetune-aux, evaluate.

Usage:
    python benchmarks/cuda_pipeline.py --out out/cuda-pipeline                 # a GPU: every stage on cuda:0
    OMP_NUM_THREADS=1 python benchmarks/cuda_pipeline.py --device cpu --out /tmp/p   # the same on a CPU

What it shows is where and in what precision the stages run, not a SIMS result: the VAE is a small random
AutoencoderKL (nothing can be downloaded), the data are the shipped digits fed to it as RGB, the sizes are a few
minutes' work. Training is bf16 mixed precision; sampling (generate, evaluate) is fp16 on CUDA and bf16 on a
CPU (fp16 is a GPU mode). Each stage's completion record says which device it ran on and its peak GPU memory;
the script prints them as a table (and --json writes it) and exits 1 when a stage ran elsewhere than --device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sims_platform.config import config_from_dict
from sims_platform.pipeline.runner import run_pipeline
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.utils.accel import resolve_device

# A small random VAE: 2x downsampling to 4 latent channels, as the SD VAE has (which downsamples 8x).
TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32}
STAGES = ("encode", "train-base", "generate", "finetune-aux", "evaluate")


def pipeline_dict(root: str, device: str, images: int) -> dict:
    sampling = "fp16" if device.startswith("cuda") else "bf16"
    sampler = {"steps": 16, "precision": sampling}
    train = {"batch_size": 64, "checkpoint_images": images // 2, "log_images": images // 4,
             "distributed": {"backend": "plain", "precision": "bf16"}}
    return {
        "name": "cuda-pipeline",
        "seed": 0,
        "data": {"source": "digits", "resolution": 32, "channels": 3, "num_classes": 10, "max_images": 1000},
        "encoder": {"kind": "latent", "vae_config": TINY_VAE, "batch_size": 64, "shard_size": 256},
        "network": {"preset": "digits-tiny", "model_channels": 32, "channel_mult": [1, 2]},
        "train_base": {"images": images, **train},
        "generate": {"num_samples": 512, "batch_size": 256, "shard_size": 256, "sampler": sampler},
        "finetune_aux": {"images": images // 4, **train},
        "evaluate": {"methods": [{"name": "sims", "weights": [0.5]}, {"name": "neon", "weights": [0.5]}],
                     "num_samples": 256, "repeats": 2, "batch_size": 256, "features": "digits-classifier",
                     "sampler": sampler},
        "runtime": {"device": device},
        "storage": {"root": root},
        "tracking": {"experiment": "cuda-pipeline"},
    }


def stage_records(root: str) -> list[dict]:
    layout = RunLayout.of(root)
    return [fsio.read_json(layout.done_marker(0, stage)) for stage in STAGES]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run folder (a rerun resumes it)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--images", type=int, default=8192, help="base training images (the fine-tune gets 1/4)")
    ap.add_argument("--json", help="write the per-stage table here")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    root = str(Path(args.out).resolve())
    cfg = config_from_dict(pipeline_dict(root, str(device), args.images))
    t0 = time.time()
    summary = run_pipeline(cfg)
    rows = [{"stage": r["stage"], "device": r["device"], "seconds": round(r["seconds"], 1),
             "peak_gpu_memory_gib": r["peak_gpu_memory_gib"]} for r in stage_records(root)]
    print(f"\ntorch {torch.__version__}, device {device}, {time.time() - t0:.0f} s "
          f"(stages that were already complete are not rerun)")
    print("| stage | device | seconds | peak GPU memory (GiB) |\n|---|---|---|---|")
    for r in rows:
        gib = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f}"
        print(f"| {r['stage']} | {r['device']} | {r['seconds']} | {gib} |")
    (row,) = summary["iterations"]
    print(f"FID base {row['fid_base']:.2f}; best {row['fid_best']:.2f} (random VAE: a smoke number, not a result)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                               "stages": rows, "fid": row["fid"]}, indent=1))
    elsewhere = [r["stage"] for r in rows if not r["device"].startswith(str(device))]
    if elsewhere:
        print(f"error: {', '.join(elsewhere)} ran elsewhere than {device}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
