"""The EDM2 U-Net: preset sizes, preconditioning, and shapes."""

import math

import pytest
import torch

from sims_platform.config.schema import NetworkConfig
from sims_platform.models.precond import Precond, edm_coefficients
from sims_platform.models.presets import EDM2_PARAMS_M, build_network, count_parameters


@pytest.mark.parametrize("preset", sorted(EDM2_PARAMS_M))
def test_edm2_imagenet512_parameter_counts_within_one_percent(preset):
    with torch.device("meta"):  # no memory: only shapes
        net = build_network(NetworkConfig(preset=preset), img_resolution=64, img_channels=4, label_dim=1000)
    got = count_parameters(net) / 1e6
    assert abs(got - EDM2_PARAMS_M[preset]) / EDM2_PARAMS_M[preset] < 0.01, got


def test_preconditioning_coefficients_match_edm():
    sd = 0.5
    for s in (0.002, 0.5, 3.0, 80.0):
        sigma = torch.tensor(s)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sd)
        assert math.isclose(c_skip, sd**2 / (s**2 + sd**2), rel_tol=1e-6)
        assert math.isclose(c_out, s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-6)
        assert math.isclose(c_in, 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-6)
        assert math.isclose(c_noise, math.log(s) / 4, rel_tol=1e-6)
        # Network input has unit variance when x = data (std sd) + noise (std sigma).
        assert math.isclose(float(c_in**2 * (sd**2 + s**2)), 1.0, rel_tol=1e-6)
        # Training target of F has unit variance: (y - c_skip x)/c_out with y ~ sd, n ~ sigma.
        target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2
        assert math.isclose(float(target_var), 1.0, rel_tol=1e-5)


def test_denoiser_is_identity_at_zero_noise_and_output_shapes():
    net = Precond(16, 1, 10, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]).eval()
    x = torch.randn(3, 1, 16, 16)
    d, logvar = net(x, torch.full((3,), 1e-4), torch.tensor([0, 3, 9]), return_logvar=True)
    assert d.shape == x.shape and logvar.shape == (3, 1, 1, 1)
    assert torch.allclose(d, x, atol=1e-3), "c_skip -> 1 and c_out -> 0 as sigma -> 0"
    # Fresh network (zero output gain) returns the EDM prior mean: c_skip * x.
    c_skip = 0.25 / (1.0 + 0.25)
    assert torch.allclose(net(x, 1.0, torch.tensor([1, 2, 3])), c_skip * x, atol=1e-6)


def test_unknown_preset_names_the_field():
    with pytest.raises(ValueError, match="network.preset"):
        build_network(NetworkConfig(preset="nope"), 16, 1, 10)
