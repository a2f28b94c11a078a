"""FD_DINOv2's network: DINOv2 ViT-L/14 (transformers' Dinov2Model) and its 1024-d features, preprocessed as EDM2.

EDM2 (`calculate_metrics.py`, after layer6ai-labs/dgm-eval) loads `dinov2_vitl14` from torch hub and feeds it
uint8 RGB resized to 224x224 (bicubic, antialiased, in float), divided by 255 and normalised with ImageNet's
mean and std; the feature is the model's output, the class token after the final LayerNorm (transformers:
`pooler_output`).

Weights are a state dict in any of three layouts: transformers' current names, transformers 4's names
(`facebook/dinov2-large`'s `model.safetensors`), or the original facebookresearch checkpoint
(`dinov2_vitl14_pretrain.pth`, fused qkv). The hub model resizes its 37x37 position table to the input's
16x16 patch grid with a bicubic scale factor of (16 + 0.1) / 37; transformers' own resize targets the size
(a factor of 16 / 37), which gives slightly different embeddings. So the table is resized once here, the
hub's way, and stored at 16x16: transformers then uses it as is, and the features are the hub model's.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sims_platform.metrics.preprocess import quantize_uint8, to_rgb
from sims_platform.metrics.weights import Weights, WeightsError, load_into

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_INTERPOLATE_OFFSET = 0.1  # the hub model's interpolate_offset (see the module docstring)

# dinov2_vitl14: what FD_DINOv2 means. Passed to transformers.Dinov2Config.
VITL14: dict[str, Any] = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                              patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                              use_swiglu_ffn=False, qkv_bias=True)

# ----------------------------------------------------------------------------
# Weight layouts -> transformers' names

# (pattern, replacement) applied in order to every key of a file; a key that no rule changes is kept.
_RENAMES: list[tuple[str, str]] = [
    # transformers 4 (the published facebook/dinov2-* checkpoints)
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    # facebookresearch/dinov2 (torch hub)
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.ls(\d)\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.", r"encoder.layer.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
    (r"^norm\.", "layernorm."),
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def to_transformers_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A DINOv2 state dict in any supported layout with transformers' Dinov2Model names."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _QKV.match(key)
        if m:  # the hub fuses q, k, v into one [3 * D, D] projection
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"encoder.layer.{m.group(1)}.attention.{name}_proj.{m.group(2)}"] = part
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# ----------------------------------------------------------------------------
# Network


def dinov2_config(arch: dict[str, Any] | None = None):  # -> transformers.Dinov2Config
    """transformers' config of the ViT (VITL14 unless the caller, e.g. a test, passes another size)."""
    from transformers import Dinov2Config  # imported here: transformers takes seconds to import

    return Dinov2Config(**(arch or VITL14))


def hub_position_table(table: Tensor, grid: int) -> Tensor:
    """[1, 1 + M*M, D] position embeddings -> [1, 1 + grid*grid, D], resized as the torch-hub DINOv2 does."""
    cls, patches = table[:, :1], table[:, 1:].float()
    m = int(round(patches.shape[1] ** 0.5))
    if m * m != patches.shape[1]:
        raise ValueError(f"dinov2: position table of {patches.shape[1]} patches is not a square grid")
    if m == grid:
        return table
    scale = (grid + POS_INTERPOLATE_OFFSET) / m
    x = patches.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", align_corners=False, antialias=False)
    if x.shape[-2:] != (grid, grid):
        raise ValueError(f"dinov2: resizing the {m}x{m} position table gave {list(x.shape[-2:])}, not {grid}x{grid}")
    return torch.cat([cls, x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)], dim=1)


def build_dinov2(weights: Weights, *, field: str = "evaluate.dinov2_weights", arch: dict[str, Any] | None = None):
    """Dinov2Model (eval, no grad) with the weights loaded and its position table set for 224x224 inputs."""
    from transformers import Dinov2Model

    config = dinov2_config(arch)
    with torch.device("meta"):  # no random init of 300M parameters that the file replaces anyway
        net = Dinov2Model(config)
    load_into(net, to_transformers_names(weights.state_dict), uri=weights.uri, field=field, assign=True)
    net.float()  # EDM2 runs it in float32, whatever the file stores
    grid = INPUT_SIZE // config.patch_size
    pos = net.embeddings.position_embeddings
    with torch.no_grad():
        net.embeddings.position_embeddings = torch.nn.Parameter(hub_position_table(pos.data, grid),
                                                                requires_grad=False)
    if net.embeddings.position_embeddings.shape[1] != 1 + grid * grid:  # pragma: no cover - guards the above
        raise WeightsError(f"{field}: {weights.uri}: position table does not fit {INPUT_SIZE}x{INPUT_SIZE} inputs")
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Preprocessing and feature extractor


def dinov2_input(images: Tensor) -> Tensor:
    """[-1, 1] floats or uint8 [N, 1|3, H, W] -> [N, 3, 224, 224] normalised as EDM2 feeds DINOv2."""
    x = to_rgb(quantize_uint8(images), "dinov2").to(torch.float32)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


# Bump when the preprocessing changes: reference statistics are cached under the fingerprint.
_VERSION = "dinov2/edm2-preprocessing/1"


class DINOv2Features:
    """FeatureExtractor: FD_DINOv2's features (the final class token) of images in [-1, 1] (or uint8)."""

    name = "dinov2"

    def __init__(self, weights: Weights, *, field: str = "evaluate.dinov2_weights",
                 arch: dict[str, Any] | None = None) -> None:
        self.net = build_dinov2(weights, field=field, arch=arch)
        self.dim = int(self.net.config.hidden_size)
        self.fingerprint = f"{_VERSION}/sha256:{weights.sha256}"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> DINOv2Features:
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net(pixel_values=dinov2_input(images.to(self.device))).pooler_output
