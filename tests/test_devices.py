"""Devices: the stage context picks cuda:LOCAL_RANK when CUDA is visible (simulated here), and every sampling
stage (generate, evaluate, feed) puts its networks, noise and labels on the context's device."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from sims_platform.cli import main
from sims_platform.config import ConfigError, config_from_dict
from sims_platform.pipeline.runner import open_run
from sims_platform.sampling.guidance import Guided, NetDenoiser, Unconditional
from sims_platform.sampling.heun import seeded_noise
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.storage.layout import RunLayout
from sims_platform.utils.accel import resolve_device, tf32_policy

from pipeline_support import tiny_config_dict

sampling_mod = importlib.import_module("sims_platform.stages.sampling")
evaluate_mod = importlib.import_module("sims_platform.stages.evaluate")
features_mod = importlib.import_module("sims_platform.evaluation.features")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A process that sees 4 GPUs (nothing is ever run on them: only the choice is checked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def context(cfg_dict: dict, **kw) -> StageContext:
    cfg = config_from_dict(cfg_dict)
    layout, lineage, _ = open_run(cfg)
    return StageContext(cfg, layout, 0, lineage, **kw)


def bare_context(cfg_dict: dict, **kw) -> StageContext:
    """Enough of a context to see its device and encoder (no run folder, no MLflow store)."""
    cfg = config_from_dict(cfg_dict)
    return StageContext(cfg, RunLayout.of(cfg.storage.root), 0, None, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------
# Which device


def test_stage_context_picks_cuda_local_rank_when_cuda_is_visible(tmp_path, fake_cuda, monkeypatch):
    d = tiny_config_dict(str(tmp_path / "run"))
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun / PyTorchJob
    assert bare_context(d).device == torch.device("cuda", 2)
    monkeypatch.delenv("LOCAL_RANK")  # an Indexed Job pod: one process, GPU 0
    assert bare_context(d).device == torch.device("cuda", 0)
    assert bare_context(d | {"runtime": {"device": "cuda:3"}}).device == torch.device("cuda", 3)
    assert bare_context(d | {"runtime": {"device": "cpu"}}).device == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError, match="sees 4 GPU"):
        bare_context(d)


def test_without_cuda_auto_is_the_cpu_and_asking_for_cuda_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = tiny_config_dict(str(tmp_path / "run"))
    assert bare_context(d).device == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    # The CLI override: validated with the config, reported without a traceback.
    cfg_file = tmp_path / "p.yaml"
    import yaml
    cfg_file.write_text(yaml.safe_dump(d))
    assert main(["stage", "generate", "--config", str(cfg_file), "--device", "gpu0"]) == 2
    assert "runtime.device" in capsys.readouterr().err
    assert main(["stage", "generate", "--config", str(cfg_file), "--device", "cuda:1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_tf32_policy_is_applied_by_the_stage_context(tmp_path):
    d = tiny_config_dict(str(tmp_path / "run"))
    bare_context(d | {"runtime": {"tf32": True}})
    assert tf32_policy() is True and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    bare_context(d)
    assert tf32_policy() is False and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


# ----------------------------------------------------------------------------
# Sampling stages put everything on ctx.device


def _networks(denoise) -> list[nn.Module]:
    if isinstance(denoise, Guided):
        return _networks(denoise.main) + _networks(denoise.guide)
    assert isinstance(denoise, (NetDenoiser, Unconditional)), type(denoise)
    return [denoise.net]


def test_every_sampling_stage_moves_networks_noise_and_labels_to_the_context_device(tmp_path, monkeypatch):
    """The 'meta' device stands in for a GPU: tensors there have no data, so a network, noise or label left on
    the CPU shows up as the wrong device. The integration itself is replaced by a spy that checks the devices
    and returns zeros on the CPU; the rest of each stage (shards, features, results) runs as usual."""
    d = tiny_config_dict(str(tmp_path / "run"))
    d["iterations"] = {"count": 2, "train_data": "real+synthetic", "feed_samples": 40, "feed_weight": 1.0}
    cpu = context(d, requested_device=torch.device("cpu"))
    for stage in ("train-base", "finetune-aux"):  # untrained stand-ins: only the devices matter here
        cpu.models.save(cpu.layout.model(0, stage), cpu.models.build(), 0)

    meta = torch.device("meta")
    seen: list[tuple[str, set]] = []

    def spy_heun(denoise, noise, labels, sampler):
        devices = {noise.device, labels.device} | {p.device for n in _networks(denoise) for p in n.parameters()}
        devices |= {b.device for n in _networks(denoise) for b in n.buffers()}
        seen.append((type(denoise).__name__, devices))
        return torch.zeros(noise.shape)

    real_noise = seeded_noise

    def spy_noise(seeds, shape, device=None):
        assert torch.device(device) == meta
        return real_noise(seeds, shape).to(meta)  # meta has no generator: CPU draws, moved (data-free) to meta

    extractor_devices: list[torch.device] = []
    real_build = features_mod.build_feature_extractor

    class Recording:  # the real feature network, kept on the CPU (features need values); records .to()
        def __init__(self, ext):
            self.ext, self.name, self.dim, self.fingerprint = ext, ext.name, ext.dim, ext.fingerprint

        def to(self, device):
            extractor_devices.append(torch.device(device))
            return self

        def __call__(self, images):
            return self.ext(images)

    def build(*a, device=None, **k):  # the device the stage asks for is recorded; the network stays on the CPU
        return Recording(real_build(*a, **k)).to(device) if device is not None else Recording(real_build(*a, **k))

    monkeypatch.setattr(features_mod, "build_feature_extractor", build)
    monkeypatch.setattr(sampling_mod, "heun_sample", spy_heun)
    monkeypatch.setattr(sampling_mod, "seeded_noise", spy_noise)
    # The aux drift diagnostic compares network outputs by value, which a meta tensor does not have; it samples
    # nothing, so it is not what this test is about.
    monkeypatch.setattr(evaluate_mod, "log_drift", lambda *a, **k: {})
    ctx = context(d, requested_device=meta)
    for stage in ("generate", "evaluate", "feed"):
        run_stage(ctx, stage)
    assert {kind for kind, _ in seen} == {"NetDenoiser", "Guided"}  # plain (generate, base arm) and guided
    assert all(devices == {meta} for _, devices in seen), seen
    assert extractor_devices and set(extractor_devices) == {meta}


def test_latent_encoder_runs_its_vae_on_the_context_device(tmp_path):
    d = tiny_config_dict(str(tmp_path / "run"))
    d["data"]["resolution"] = 16
    d["encoder"] = {"kind": "latent", "vae_config": {"block_out_channels": [8, 8], "layers_per_block": 1,
                                                     "norm_num_groups": 4, "latent_channels": 4,
                                                     "down_block_types": ["DownEncoderBlock2D"] * 2,
                                                     "up_block_types": ["UpDecoderBlock2D"] * 2}}
    ctx = bare_context(d, requested_device=torch.device("meta"))
    assert {p.device for p in ctx.data.encoder.vae.parameters()} == {torch.device("meta")}
    assert ctx.data.encoder.mean.device == torch.device("meta")


@pytest.mark.parametrize("channels_last", [True, False])
def test_sampling_networks_use_the_configured_memory_layout_and_agree_with_the_default(tmp_path, channels_last):
    d = tiny_config_dict(str(tmp_path / "run"))
    d["runtime"] = {"channels_last": channels_last}
    ctx = context(d, requested_device=torch.device("cpu"))
    uri = ctx.layout.model(0, "train-base")
    ctx.models.save(uri, ctx.models.build(), 0)
    sampler, plain = ctx.models.sampling(uri), ctx.models.load(uri)  # load: what training starts from
    convs = [p for p in sampler.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]  # layouts differ
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in convs)
    assert all(p.is_contiguous() for p in plain.parameters())
    x, sigma = torch.randn(6, 1, 8, 8), torch.full((6,), 0.7)
    labels = torch.arange(6) % 10
    with torch.no_grad():
        torch.testing.assert_close(sampler(x, sigma, labels), plain(x, sigma, labels), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Noise


def test_noise_on_the_cpu_is_unchanged_and_per_seed():
    seeds = torch.tensor([7, 11, 10**12 + 3])
    noise = seeded_noise(seeds, (2, 3, 3))
    for j, s in enumerate(seeds.tolist()):  # exactly the draw of a fresh CPU generator per seed
        assert torch.equal(noise[j], torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(s)))
    assert torch.equal(seeded_noise(seeds[1:], (2, 3, 3)), noise[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (per-seed noise drawn on the device)")
def test_noise_on_cuda_is_drawn_there_and_depends_only_on_the_seed():
    seeds = torch.tensor([5, 6, 7, 8])
    noise = seeded_noise(seeds, (4, 8, 8), "cuda")
    assert noise.device.type == "cuda"
    assert torch.equal(seeded_noise(seeds[2:], (4, 8, 8), "cuda"), noise[2:])
    assert torch.equal(seeded_noise(seeds, (4, 8, 8), "cuda"), noise)


# ----------------------------------------------------------------------------
# Training draws


def _rank_batches(device: torch.device, spans: list[tuple[int, int]], batch: int = 12):
    """A step's micro-batches as the ranks owning `spans` see them (in-memory data, label dropout on)."""
    from sims_platform.config.schema import TrainConfig
    from sims_platform.training.batches import draw_batch
    from sims_platform.training.loop import noise_generator, step_generator

    data, labels = torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 5
    cfg = TrainConfig(images=batch, label_dropout=0.5)
    out = []
    for lo, hi in spans:
        gen = step_generator(3, 7)
        d = draw_batch(data, labels, cfg, 5, batch, gen, noise_generator(3, 7, device, gen), (lo, hi))
        out.append(d.rows(lo, hi, device))
    return out


def _cat(batches):
    return [torch.cat([getattr(b, f) for b in batches]) for f in ("x", "y", "rnd", "noise")]


def test_a_training_step_draws_the_same_rows_whatever_the_ranks_on_the_cpu():
    from sims_platform.training.loop import noise_generator, step_generator

    gen = step_generator(0, 0)
    assert noise_generator(0, 0, torch.device("cpu"), gen) is gen  # one stream: the original draws, bit for bit
    whole = _cat(_rank_batches(torch.device("cpu"), [(0, 12)]))
    split = _cat(_rank_batches(torch.device("cpu"), [(0, 5), (5, 9), (9, 12)]))
    assert all(torch.equal(a, b) for a, b in zip(whole, split))
    assert whole[1].shape == (12, 5) and 0 < int((whole[1].sum(1) == 0).sum()) < 12  # one-hot rows, some dropped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (training normals drawn on the device)")
def test_a_training_step_draws_its_normals_on_cuda_whatever_the_ranks():
    cuda = torch.device("cuda")
    whole = _cat(_rank_batches(cuda, [(0, 12)]))
    split = _cat(_rank_batches(cuda, [(0, 6), (6, 12)]))
    assert all(t.device.type == "cuda" for t in whole)
    assert all(torch.equal(a, b) for a, b in zip(whole, split))
