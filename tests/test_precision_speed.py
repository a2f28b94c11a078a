"""Reduced precision (sampler.precision, bf16 training) and the speed paths: the cached weight normalisation,
guided sampling without host syncs, and a training loop that reads the loss back only at log points."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sims_platform.config.schema import SamplerConfig, TrainConfig
from sims_platform.models.precond import Precond
from sims_platform.sampling.guidance import Guided, NetDenoiser, neon, sims
from sims_platform.sampling.heun import heun_sample, seeded_labels, seeded_noise
from sims_platform.training.loop import train


def make_net(seed: int = 0, attn: bool = True) -> Precond:
    """A tiny conditional network with non-zero gains (a fresh one outputs c_skip x whatever its weights)."""
    torch.manual_seed(seed)
    net = Precond(8, 2, 10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4] if attn else [], channels_per_head=16)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.8)
    return net


def frozen(net: Precond) -> Precond:
    return net.eval().requires_grad_(False)


def sample(denoise, precision: str, n: int = 8, steps: int = 6) -> torch.Tensor:
    seeds = torch.arange(n)
    cfg = SamplerConfig(steps=steps, precision=precision)
    return heun_sample(denoise, seeded_noise(seeds, (2, 8, 8)), seeded_labels(seeds, 10), cfg)


# ----------------------------------------------------------------------------
# Precision

# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); over 11 network calls the samples (std ~0.5-1) move by
# a few hundredths at most. Stated tolerance: max |bf16 - fp32| <= 0.05, mean <= 0.01.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.05, 0.01


def test_bf16_samples_match_fp32_within_tolerance_on_the_cpu():
    net = frozen(make_net())
    a = sample(NetDenoiser(net), "fp32")
    b = sample(NetDenoiser(net), "bf16")
    assert a.dtype == b.dtype == torch.float32
    diff = (a - b).abs()
    assert 0 < diff.max() <= BF16_MAX_ABS, diff.max()  # > 0: bf16 really ran
    assert diff.mean() <= BF16_MEAN_ABS, diff.mean()
    # Guided sampling (two networks) stays within the same tolerance.
    g = sims(net, frozen(make_net(1)), 1.0)
    diff = (sample(g, "fp32") - sample(g, "bf16")).abs()
    assert 0 < diff.max() <= 2 * BF16_MAX_ABS and diff.mean() <= 2 * BF16_MEAN_ABS


def test_fp32_precision_is_the_plain_path_bit_for_bit():
    net = frozen(make_net())
    seeds = torch.arange(4)
    noise, labels = seeded_noise(seeds, (2, 8, 8)), seeded_labels(seeds, 10)
    cfg = SamplerConfig(steps=3)
    x = noise.double() * 80.0
    plain = net(x.float(), torch.tensor(80.0), labels)
    calls = []

    def spy(x_, sigma, labels_):
        calls.append((x_.dtype, torch.is_autocast_enabled("cpu")))
        return net(x_, sigma, labels_)

    heun_sample(spy, noise, labels, cfg)
    assert torch.equal(spy(x.float(), torch.tensor(80.0), labels), plain)
    assert set(calls[:-1]) == {(torch.float32, False)}


def test_under_autocast_the_preconditioning_and_logvar_stay_fp32_and_the_sampler_state_fp64():
    net = frozen(make_net())
    seen = []

    def spy(x_, sigma, labels_):
        seen.append((x_.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        d, logvar = net(x_, sigma, labels_, return_logvar=True)
        seen.append((d.dtype, logvar.dtype))
        return d

    sample(spy, "bf16", n=2, steps=2)
    assert seen[0] == (torch.float32, True, torch.bfloat16)  # fp32 state handed in, the U-Net under autocast
    assert seen[1] == (torch.float32, torch.float32)  # D(x) and u(sigma) come back fp32
    # The log-variance is computed entirely in fp32: equal to the fp32 network's, bit for bit.
    x, s = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 3.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, lv_bf16 = net(x, s, None, return_logvar=True)
    assert torch.equal(lv_bf16, net(x, s, None, return_logvar=True)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 sampling is a GPU mode; no CUDA device here")
def test_fp16_samples_match_fp32_on_cuda():
    net = frozen(make_net()).cuda()
    seeds = torch.arange(8)
    cfg32, cfg16 = SamplerConfig(steps=6), SamplerConfig(steps=6, precision="fp16")
    noise, labels = seeded_noise(seeds, (2, 8, 8), "cuda"), seeded_labels(seeds, 10).cuda()
    a = heun_sample(NetDenoiser(net), noise, labels, cfg32)
    b = heun_sample(NetDenoiser(net), noise, labels, cfg16)
    diff = (a - b).abs()
    assert torch.isfinite(b).all() and diff.max() <= BF16_MAX_ABS  # fp16 has 3 more mantissa bits than bf16


def test_bf16_training_runs_on_the_cpu_with_the_plain_engine(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, 8, 8, generator=g) * 0.5, torch.randint(10, (32,), generator=g)
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(images=128, batch_size=16, checkpoint_images=10**6, log_images=32,
                          distributed={"backend": "plain", "precision": precision})
        results[precision] = train(make_net(), x, y, cfg, seed=0, checkpoints=str(tmp_path / precision))
    fp32, bf16 = ([loss for _, loss in results[p].losses] for p in ("fp32", "bf16"))
    assert all(map(lambda v: v == v and abs(v) < 1e6, bf16))  # finite
    assert max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16)) < 0.05  # same trajectory within bf16 noise
    assert fp32 != bf16
    assert {p.dtype for p in results["bf16"].ema.parameters()} == {torch.float32}  # fp32 master weights


# ----------------------------------------------------------------------------
# Cached weight normalisation


def uncached(net: Precond) -> Precond:
    """The same weights on the path that normalises at every call (eval mode, grad on)."""
    return net.eval().requires_grad_(True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_normalisation_is_bit_identical(precision):
    x, s, y = torch.randn(4, 2, 8, 8), torch.tensor([0.1, 1.0, 5.0, 40.0]), torch.tensor([0, 3, 5, 9])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        ref = uncached(make_net())(x, s, y)
        net = frozen(make_net())
        first, second = net(x, s, y), net(x, s, y)  # the second call reads the cache
    assert net.unet.enc["8x8_conv"]._cache.tensors  # it was filled
    assert torch.equal(first, ref) and torch.equal(second, ref)


def test_cache_is_invalidated_by_load_state_dict_in_place_updates_and_neon():
    x, s, y = torch.randn(3, 2, 8, 8), torch.tensor([0.3, 2.0, 20.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        net = frozen(make_net(0))
        before = net(x, s, y)
        other = make_net(1)
        net.load_state_dict(other.state_dict())
        assert torch.equal(net(x, s, y), uncached(other)(x, s, y))
        assert not torch.equal(net(x, s, y), before)

        for p in net.parameters():  # in place, as the EMA's lerp_ does
            p.mul_(1.5).add_(0.01)
        got = net(x, s, y)  # cached path, after the weights changed in place
        assert torch.equal(got, uncached(net)(x, s, y))
        frozen(net)

        base, aux = frozen(make_net(0)), frozen(make_net(1))
        base(x, s, y), aux(x, s, y)  # fill both caches
        extrapolated = neon(base, aux, 0.5)  # a deep copy of base with rewritten weights
        expected = uncached(neon(make_net(0), make_net(1), 0.5))(x, s, y)
        assert torch.equal(extrapolated(x, s, y), expected)
        assert torch.equal(base(x, s, y), uncached(make_net(0))(x, s, y))  # the base's cache still holds

        moved = frozen(make_net(0))
        moved(x, s, y)
        moved.double().float()  # new storage for every weight (same values)
        assert torch.equal(moved(x, s, y), uncached(make_net(0))(x, s, y))


# ----------------------------------------------------------------------------
# No host syncs


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way a tensor's value reaches Python (or the CPU) raises: a GPU would have to wait for it."""
    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"host read: Tensor.{name}")
        return f
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "__index__"):
            m.setattr(torch.Tensor, name, refuse(name))
        yield


def test_guided_sampling_reads_nothing_back_to_the_host(monkeypatch):
    base, aux = frozen(make_net(0)), frozen(make_net(1))
    seeds = torch.arange(3)
    noise, labels = seeded_noise(seeds, (2, 8, 8)), seeded_labels(seeds, 10)
    cfg = SamplerConfig(steps=3, precision="bf16")
    expected = heun_sample(Guided(NetDenoiser(base), NetDenoiser(aux), 1.5), noise, labels, cfg)
    with no_host_reads(monkeypatch):
        got = heun_sample(Guided(NetDenoiser(base), NetDenoiser(aux), 1.5), noise, labels, cfg)
    assert torch.equal(got, expected)


def _platform_reads(monkeypatch, names=("item", "tolist")) -> dict[str, int]:
    """Counts host reads of tensor values made by platform code (torch's own, e.g. Adam's CPU step counter, are
    host scalars that never wait for a GPU)."""
    import traceback

    reads = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            # The caller, looking through Tensor's own Python methods (f-string formatting calls .item()).
            callers = [f.filename for f in traceback.extract_stack()[:-1] if not f.filename.endswith("torch/_tensor.py")]
            if callers and "sims_platform" in callers[-1]:
                reads[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_training_reads_the_loss_back_only_at_log_points(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, 8, 8, generator=g) * 0.5, torch.randint(10, (32,), generator=g)
    monkeypatch.setenv("SIMS_PROGRESS_INTERVAL", "1e9")  # progress prints (and reads the loss) only at the end
    runs = {}
    for images in (128, 256):  # 8 and 16 steps of 2 micro-batches; a log point every 4 steps
        cfg = TrainConfig(images=images, batch_size=16, checkpoint_images=10**6, log_images=64,
                          distributed={"micro_batch": 8})
        with monkeypatch.context() as m:
            reads = _platform_reads(m)
            result = train(make_net(), x, y, cfg, seed=3, checkpoints=str(tmp_path / str(images)))
        runs[images] = (reads, result.losses)
    for images, (reads, losses) in runs.items():
        # One tolist per log point; one item: the progress line at the end. Nothing per step or micro-batch.
        assert reads == {"item": 1, "tolist": images // 64}, (images, reads)
    assert runs[256][1][:2] == runs[128][1]  # same steps, same logged losses
