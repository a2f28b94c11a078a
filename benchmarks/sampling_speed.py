"""Sampling and training speed of the EDM2 network on whatever device runs it (random weights, timing only).

Usage:
    python benchmarks/sampling_speed.py --presets edm2-xs edm2-s --batch 256          # a GPU (the real sizes)
    OMP_NUM_THREADS=1 python benchmarks/sampling_speed.py --tiny                       # a CPU, in a few minutes
    python benchmarks/sampling_speed.py --tiny --dry-run                               # print the cases only

Reports, per preset and precision (fp32, bf16; fp16 only on CUDA): denoiser evaluations/s (one network call
per image), guided samples/s through our sampler (heun_sample + Guided: two networks per step, cached weight
normalisation, no host syncs) next to a naive fp32 loop in the same run (two separate network calls per step
that re-normalise weights every call and read a value back each step, as a straightforward loop would), and
training img/s (EDM2 loss, Adam, plain engine). --tiny shrinks the network (model_channels 16, latents 64x64x4
kept unless --res) so a 2-core CPU finishes: XS and S keep their 2:3 width ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from sims_platform.config.schema import NetworkConfig, SamplerConfig, TrainConfig
from sims_platform.models.presets import build_network, count_parameters
from sims_platform.sampling.guidance import Guided, NetDenoiser
from sims_platform.sampling.heun import heun_sample, seeded_labels, seeded_noise
from sims_platform.training.engines import PlainEngine
from sims_platform.utils.accel import autocast


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call: one warm-up call, then the mean of `repeats`."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def build(preset: str, tiny: bool, res: int, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    from sims_platform.models.presets import PRESETS

    # --tiny: 1/8 of the preset's channels (XS 16, S 24), same depth, attention and latent shape.
    cfg = NetworkConfig(preset=preset, model_channels=PRESETS[preset]["model_channels"] // 8 if tiny else None)
    net = build_network(cfg, res, 4, 1000)
    with torch.no_grad():  # non-zero gains, so the output depends on every layer
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    return net.to(device)


def naive_guided(main, guide, noise, labels, cfg: SamplerConfig, w: float) -> torch.Tensor:
    """The baseline: fp32, weights re-normalised each call (grad-enabled eval nets), a host read every step."""
    t = torch.linspace(cfg.sigma_max, cfg.sigma_min, cfg.steps, dtype=torch.float64, device=noise.device)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64, device=noise.device)])
    x = noise.double() * t[0]
    for i in range(cfg.steps):
        with torch.no_grad():
            dm = main(x.float(), t[i].float(), labels).double()
            dg = guide(x.float(), t[i].float(), labels).double()
        d = dm + w * (dm - dg)
        x = x + (t[i + 1] - t[i]) * (x - d) / t[i]
        float(x.abs().max())  # a per-step host read (progress, NaN check): the sync a naive loop has
        if i < cfg.steps - 1:
            with torch.no_grad():
                dm = main(x.float(), t[i + 1].float(), labels).double()
                dg = guide(x.float(), t[i + 1].float(), labels).double()
    return x


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    rows = []
    for preset in args.presets:
        main = build(preset, args.tiny, args.res, device, 0).eval().requires_grad_(False)
        guide = build(preset, args.tiny, args.res, device, 1).eval().requires_grad_(False)
        seeds = torch.arange(args.batch)
        noise = seeded_noise(seeds, (4, args.res, args.res), device)
        labels = seeded_labels(seeds, 1000).to(device)
        sigma = torch.full((args.batch,), 1.0, device=device)
        params = count_parameters(main) / 1e6
        for precision in precisions:
            cfg = SamplerConfig(steps=args.steps, precision=precision)
            with torch.no_grad():
                def one_eval():
                    with autocast(device, precision):
                        main(noise, sigma, labels)
                t_eval = timed(one_eval, device, args.repeats)
            guided = Guided(NetDenoiser(main), NetDenoiser(guide), 1.0)
            t_guided = timed(lambda: heun_sample(guided, noise, labels, cfg), device, 1)
            rows.append({"preset": preset, "params_M": params, "precision": precision, "batch": args.batch,
                         "evals_per_s": args.batch / t_eval, "guided_samples_per_s": args.batch / t_guided})
        # The naive loop: fp32, re-normalising networks (grad on), a host read each step.
        n_main = build(preset, args.tiny, args.res, device, 0).eval()
        n_guide = build(preset, args.tiny, args.res, device, 1).eval()
        cfg = SamplerConfig(steps=args.steps)
        t_naive = timed(lambda: naive_guided(n_main, n_guide, noise, labels, cfg, 1.0), device, 1)
        for r in rows:
            if r["preset"] == preset:
                r["naive_fp32_samples_per_s"] = args.batch / t_naive
                r["speedup_vs_naive"] = r["guided_samples_per_s"] / r["naive_fp32_samples_per_s"]
        # Training img/s, plain engine, per precision the plain engine supports (fp16 needs DeepSpeed).
        for precision in ("fp32", "bf16"):
            net = build(preset, args.tiny, args.res, device, 0).train()
            tcfg = TrainConfig(images=10**6, batch_size=args.train_batch,
                               distributed={"backend": "plain", "precision": precision})
            engine = PlainEngine(net, tcfg, device)
            x = torch.randn(args.train_batch, 4, args.res, args.res, device=device) * 0.5
            y = torch.nn.functional.one_hot(torch.arange(args.train_batch, device=device) % 1000, 1000).float()
            from sims_platform.models.loss import edm2_loss

            def step():
                rnd = torch.randn(args.train_batch, 1, 1, 1, device=device)
                n = torch.randn_like(x)
                with engine.autocast():
                    loss = edm2_loss(net, x, y, rnd, n, -0.4, 1.0, 0.5).sum() / args.train_batch
                engine.backward(loss)
                engine.step()
            t_train = timed(step, device, args.repeats)
            for r in rows:
                if r["preset"] == preset and r["precision"] == precision:
                    r["train_img_per_s"] = args.train_batch / t_train
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["edm2-xs", "edm2-s"])
    p.add_argument("--tiny", action="store_true", help="1/8 of the preset's channels (same depth and attention)")
    p.add_argument("--res", type=int, default=64, help="latent resolution (EDM2 ImageNet-512: 64)")
    p.add_argument("--batch", type=int, default=64, help="sampling batch")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=32, help="Heun steps (2*steps-1 evaluations per network)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", help="default: cuda if visible, else cpu")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        print(vars(args))
        return 0
    t0 = time.perf_counter()
    rows = run(args)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else f"CPU {platform.machine()} x{os.cpu_count()}, {torch.get_num_threads()} torch threads"
    print(f"device: {dev}; torch {torch.__version__}; python {sys.version.split()[0]}; "
          f"wall {time.perf_counter() - t0:.0f} s; command: {' '.join(sys.argv)}")
    cols = ["preset", "params_M", "precision", "batch", "evals_per_s", "guided_samples_per_s",
            "naive_fp32_samples_per_s", "speedup_vs_naive", "train_img_per_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
