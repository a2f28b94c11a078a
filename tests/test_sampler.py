"""The Heun sampler against a Gaussian data distribution whose exact denoiser is known; guidance algebra."""

import math

import torch

from sims_platform.config.schema import SamplerConfig
from sims_platform.sampling.guidance import Guided, classifier_free
from sims_platform.sampling.heun import heun_sample, seeded_labels, seeded_noise, sigma_steps


def gaussian_denoiser(mu: torch.Tensor, s: float):
    """E[x0 | x] for x0 ~ N(mu, s^2 I) and x = x0 + sigma n."""
    def d(x, sigma, labels):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)
    return d


def test_sigma_steps_endpoints():
    cfg = SamplerConfig(steps=10, sigma_min=0.002, sigma_max=80, rho=7)
    t = sigma_steps(cfg)
    assert len(t) == 11 and math.isclose(t[0], 80) and math.isclose(t[-2], 0.002, rel_tol=1e-9) and t[-1] == 0
    assert torch.all(t[:-1] > t[1:])


def test_heun_solves_the_gaussian_probability_flow_exactly():
    mu, s, sigma_max = torch.tensor([0.3, -1.0]).reshape(1, 2, 1, 1), 0.7, 80.0
    noise = torch.randn(512, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(steps=256, sigma_max=sigma_max)
    x = heun_sample(gaussian_denoiser(mu, s), noise, None, cfg)
    # The ODE maps x_T = sigma_max n to mu + s (x_T - mu) / sqrt(s^2 + sigma_max^2).
    x_t = noise.double() * sigma_max
    exact = mu + s * (x_t - mu) / math.sqrt(s**2 + sigma_max**2)
    assert torch.allclose(x.double(), exact, atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.full((2,), s), atol=0.05) and torch.allclose(x.mean(dim=(0, 2, 3)), mu.flatten(), atol=0.05)


def test_heun_is_second_order():
    mu, s = torch.zeros(1, 1, 1, 1), 0.5
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    exact = s * noise * 80 / math.sqrt(s**2 + 80**2)
    errs = [float((heun_sample(gaussian_denoiser(mu, s), noise, None, SamplerConfig(steps=n)) - exact).abs().max())
            for n in (32, 64, 128)]
    # Halving the step size divides the error by about 4.
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0


def test_guidance_w0_is_the_base_exactly_and_guide_is_not_called():
    calls = []
    base = lambda x, s, y: x * 0.5 + 1  # noqa: E731
    guide = lambda x, s, y: calls.append(1) or x  # noqa: E731
    x = torch.randn(4, 1, 3, 3)
    assert torch.equal(Guided(base, guide, 0.0)(x, 1.0, None), base(x, 1.0, None)) and not calls


def test_guidance_algebra_sims_form_equals_lerp_form():
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    base, aux = (lambda x, s, y: 2 * x), (lambda x, s, y: x - 1)
    for w in (0.5, 1.0, 2.5):
        d = Guided(base, aux, w)(x, 1.0, None)
        # The forms sum in other orders: equal up to float32 rounding of values of a few units.
        torch.testing.assert_close(d, 2 * x + w * (2 * x - (x - 1)))
        # EDM2's autoguidance form: D_guide + (1 + w)(D_main - D_guide), and score form (1+w) s_r - w s_s.
        torch.testing.assert_close(d, (x - 1) + (1 + w) * (2 * x - (x - 1)))
        torch.testing.assert_close(d, (1 + w) * base(x, 1, None) - w * aux(x, 1, None))


def test_guidance_on_gaussians_moves_the_mean_away_from_the_guide():
    mu_r, mu_s, s = torch.tensor(1.0), torch.tensor(0.5), 0.3
    d = Guided(gaussian_denoiser(mu_r, s), gaussian_denoiser(mu_s, s), 1.0)
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = heun_sample(d, noise, None, SamplerConfig(steps=32))
    assert float(out.mean()) > float(mu_r) + 0.2  # pushed past the base mean, away from the aux mean


def test_cfg_uses_unconditional_labels():
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, sigma, labels):
            seen.append(labels)
            return x if labels is None else x + 1

    x = torch.zeros(2, 1, 2, 2)
    d = classifier_free(Net(), 1.0)(x, 1.0, torch.tensor([1, 2]))
    assert seen[1] is None and torch.allclose(d, x + 2)


def test_seeded_noise_and_labels_depend_only_on_the_seed():
    seeds = torch.arange(10, 16)
    a = seeded_noise(seeds, (1, 4, 4))
    b = seeded_noise(seeds[3:], (1, 4, 4))
    assert torch.equal(a[3:], b)
    la, lb = seeded_labels(seeds, 10), seeded_labels(seeds[3:], 10)
    assert torch.equal(la[3:], lb) and la.min() >= 0 and la.max() < 10
