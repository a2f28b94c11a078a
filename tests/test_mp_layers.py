"""Magnitude preservation of EDM2's layers: unit-variance inputs stay unit variance."""

import torch

from sims_platform.models.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample

torch.manual_seed(0)
N = 200_000


def var(x):
    return float(x.double().pow(2).mean())  # mean square (all inputs are zero-mean)


def test_normalize_gives_unit_rms_per_sample():
    g = torch.Generator().manual_seed(0)
    # Scales away from 0: EDM2's eps (1e-4) deliberately bends the norm of near-zero inputs.
    x = torch.randn(8, 16, 5, 5, generator=g) * (0.5 + 10 * torch.rand(8, 1, 1, 1, generator=g))
    y = normalize(x)
    assert torch.allclose(y.pow(2).mean(dim=(1, 2, 3)), torch.ones(8), rtol=1e-3)


def test_mp_silu_preserves_magnitude():
    assert abs(var(mp_silu(torch.randn(N))) - 1) < 0.02


def test_mp_sum_preserves_magnitude_for_any_balance():
    a, b = torch.randn(N), torch.randn(N)
    for t in (0.0, 0.3, 0.5, 0.9):
        assert abs(var(mp_sum(a, b, t)) - 1) < 0.02


def test_mp_cat_preserves_magnitude_and_balances_energy():
    a, b = torch.randn(1000, 48), torch.randn(1000, 16)
    y = mp_cat(a, b, dim=1, t=0.3)
    assert abs(var(y) - 1) < 0.02
    ea, eb = y[:, :48].pow(2).sum(), y[:, 48:].pow(2).sum()
    assert abs(float(eb / (ea + eb)) - 0.3**2 / (0.7**2 + 0.3**2)) < 0.02


def test_mpconv_preserves_magnitude_and_forces_weight_norm():
    conv = MPConv(64, 32, (3, 3)).train()
    with torch.no_grad():
        conv.weight.mul_(7.0)  # grown weights must not change the output scale
    y = conv(torch.randn(16, 64, 12, 12))
    assert abs(var(y[:, :, 1:-1, 1:-1]) - 1) < 0.05
    rms = conv.weight.detach().pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(rms, torch.ones(32), rtol=1e-3), "training forward re-normalises the stored weight"
    lin = MPConv(256, 64)
    assert abs(var(lin(torch.randn(4000, 256))) - 1) < 0.05


def test_fourier_features_have_unit_variance():
    f = MPFourier(512)
    assert abs(var(f(torch.randn(4000))) - 1) < 0.05


def test_resample_preserves_magnitude_on_smooth_and_keeps_shape():
    x = torch.randn(4, 3, 8, 8)
    assert resample(x, "down").shape == (4, 3, 4, 4)
    assert resample(x, "up").shape == (4, 3, 16, 16)
    assert abs(var(resample(x, "up")) - var(x)) < 1e-6
