"""Standard metrics' networks (FID Inception-v3, FD_DINOv2) with random weights this test writes: shapes, EDM2's
preprocessing against references computed here from its description, weight files checked and never executed."""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sims_platform.metrics import build_feature_extractor
from sims_platform.metrics.dinov2 import VITL14, DINOv2Features, dinov2_config, dinov2_input, hub_position_table
from sims_platform.metrics.inception import FIDInceptionV3, inception_input
from sims_platform.metrics.preprocess import quantize_uint8
from sims_platform.metrics.weights import WeightsError, load_weights

NO_DATA = SimpleNamespace(images=torch.zeros(0, 3, 8, 8), labels=None)  # pretrained networks ignore the data
TINY_VIT = dict(VITL14, hidden_size=48, num_hidden_layers=2, num_attention_heads=3)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random FID Inception state dict as torch.save writes it (the layout of pytorch-fid's file)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    # BatchNorm statistics measured on a few images, as a trained network has: with the defaults (mean 0, var 1)
    # the signal of random convolutions fades over 20 layers and every image gets the same features.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = those of the batch seen
    with torch.no_grad():
        net.train()(inception_input(_uint8(3, 3, 32, 32, seed=9)))
    net.eval()
    path = tmp_path_factory.mktemp("w") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file):
    return build_feature_extractor("inception", cache_uri="unused", real=NO_DATA, weights=str(inception_file),
                                   sha256=_sha(inception_file))


# ----------------------------------------------------------------------------
# Inception


def test_inception_has_the_published_layout():
    net = FIDInceptionV3()
    # torchvision's inception_v3 without aux logits has 23,834,568 parameters; the TF graph's 1008-way fc adds 8 x 2049.
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 8 * 2049
    sd = net.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)


def test_inception_gives_2048_d_features_of_uint8_quantised_images(inception):
    assert inception.name == "inception" and inception.dim == 2048
    u = _uint8(2, 3, 48, 40)
    f = inception(u)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f[0] - f[1]).norm() > 0.1 * f[0].norm()  # different images, different features
    # Floats are quantised to uint8 first: any x within a level of u gives u's features exactly.
    x = (u.float() - 127.5) / 127.5
    assert torch.equal(inception(x + 0.4 / 127.5), f) and torch.equal(inception(x - 0.4 / 127.5), f)
    grey = _uint8(1, 1, 33, 33, seed=1)  # 1 channel: repeated to RGB
    assert torch.equal(inception(grey), inception(grey.expand(-1, 3, -1, -1)))
    big = torch.rand(1, 3, 320, 320) * 2 - 1  # larger than 299: shrunk, same features size
    assert inception(big).shape == (1, 2048)
    assert _sha_in(inception.fingerprint)


def _sha_in(fingerprint: str) -> bool:
    return "sha256:" in fingerprint and len(fingerprint.split("sha256:")[1]) == 64


def test_inception_preprocessing_matches_tf1_resize_reference():
    """EDM2's detector: uint8 -> TF1 resize_bilinear to 299 (src = dst * in / out, edges clamped) -> (x-128)/128."""
    def reference(u: np.ndarray) -> np.ndarray:  # u: [C, H, W] uint8
        c, h, w = u.shape
        v = u.astype(np.float64)

        def taps(n_in: int):
            src = np.arange(299) * (n_in / 299)
            i0 = np.floor(src).astype(int)
            return i0, np.minimum(i0 + 1, n_in - 1), src - i0

        y0, y1, wy = taps(h)
        x0, x1, wx = taps(w)
        rows = v[:, y0, :] * (1 - wy)[None, :, None] + v[:, y1, :] * wy[None, :, None]
        out = rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx
        return (out - 128) / 128

    for shape in [(3, 48, 64), (3, 512, 512), (3, 299, 299), (1, 17, 23)]:
        u = _uint8(1, *shape, seed=sum(shape))
        got = inception_input(u)[0].numpy()
        ref = reference(u[0].expand(3, -1, -1).numpy())
        assert got.shape == (3, 299, 299)
        assert np.abs(got - ref).max() < 1e-4, shape


def test_quantisation_is_edm2s():
    """EDM2's pixel decode: (x * 127.5 + 128) clipped to [0, 255], truncated to uint8."""
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.3, 0.999, 1.0, 1.2])
    assert quantize_uint8(x).tolist() == np.floor(np.clip(x.numpy() * 127.5 + 128, 0, 255)).astype(int).tolist()
    assert quantize_uint8(x).tolist() == [0, 0, 0, 128, 166, 255, 255, 255]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize_uint8(u.float() / 127.5 - 1), u)  # stored real images come back exactly
    assert quantize_uint8(u) is u


# ----------------------------------------------------------------------------
# Weight files


def test_weights_are_checked_and_never_executed(inception_file, tmp_path):
    with pytest.raises(WeightsError) as e:
        build_feature_extractor("inception", cache_uri="unused", real=NO_DATA, weights=str(inception_file),
                                sha256="0" * 64)
    assert str(inception_file) in str(e.value) and "0" * 64 in str(e.value)
    assert "evaluate.inception_weights" in str(e.value)

    with pytest.raises(WeightsError, match=r"evaluate\.dinov2_weights: no file at .*nowhere\.pth"):
        build_feature_extractor("dinov2", cache_uri="unused", real=NO_DATA, weights=str(tmp_path / "nowhere.pth"))

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "planted.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": Planted()}, bad)
    with pytest.raises(WeightsError, match=r"planted\.pth is not a plain tensor checkpoint"):
        load_weights(str(bad), None, field="evaluate.inception_weights")
    assert not marker.exists()

    wrong = tmp_path / "wrong.safetensors"  # a file of another network: names and shapes are reported
    save_file({"fc.weight": torch.zeros(10, 2048), "head.bias": torch.zeros(3)}, wrong)
    with pytest.raises(WeightsError) as e:
        build_feature_extractor("inception", cache_uri="unused", real=NO_DATA, weights=str(wrong))
    msg = str(e.value)
    assert str(wrong) in msg and "missing Conv2d_1a_3x3.conv.weight" in msg and "unexpected head.bias" in msg
    assert "fc.weight [10, 2048] (network: [1008, 2048])" in msg


def test_weights_from_a_storage_uri_and_safetensors(inception, inception_file):
    """fsspec URIs (memory:// stands in for s3://) and .safetensors give the same network."""
    import fsspec

    sd = torch.load(inception_file, weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # optional in the file
    uri = "memory://weights/fid-inception.safetensors"
    with fsspec.open(uri, "wb") as f:
        from safetensors.torch import save

        f.write(save(sd))
    with fsspec.open(uri, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    other = build_feature_extractor("inception", cache_uri="unused", real=NO_DATA, weights=uri, sha256=digest)
    u = _uint8(1, 3, 20, 20, seed=5)
    assert torch.equal(other(u), inception(u))
    assert other.fingerprint != inception.fingerprint  # another file: cached reference statistics are not reused


# ----------------------------------------------------------------------------
# DINOv2


def test_dinov2_full_size_is_vit_l14():
    cfg = dinov2_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (1024, 24, 16, 14)
    from transformers import Dinov2Model

    with torch.device("meta"):  # count without allocating 1.2 GB
        net = Dinov2Model(cfg)
    assert sum(p.numel() for p in net.parameters()) == 304_368_640  # dinov2_vitl14, with its 37x37 position table


def _tiny_vit_file(tmp_path, layout: str):
    """A random small DINOv2 in transformers' layout, or rewritten in one of the published layouts."""
    from transformers import Dinov2Model

    torch.manual_seed(1)
    sd = Dinov2Model(dinov2_config(TINY_VIT)).state_dict()
    with torch.no_grad():  # layer scales of 1 and zero biases would hide a swapped tensor
        for v in sd.values():
            v.add_(torch.randn_like(v) * 0.1)
    if layout == "transformers4":  # facebook/dinov2-* model.safetensors names
        sd = {k.replace(".attention.q_proj.", ".attention.attention.query.")
              .replace(".attention.k_proj.", ".attention.attention.key.")
              .replace(".attention.v_proj.", ".attention.attention.value.")
              .replace(".attention.o_proj.", ".attention.output.dense."): v for k, v in sd.items()}
    if layout == "hub":  # facebookresearch/dinov2 checkpoint: fused qkv, ls*.gamma, short names
        hub = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
               "pos_embed": sd["embeddings.position_embeddings"],
               "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
               "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
               "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
        for i in range(TINY_VIT["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            for t in ("weight", "bias"):
                hub[f"blocks.{i}.attn.qkv.{t}"] = torch.cat([sd[p + f"attention.{n}_proj.{t}"] for n in "qkv"])
                hub[f"blocks.{i}.attn.proj.{t}"] = sd[p + f"attention.o_proj.{t}"]
                for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                    hub[f"blocks.{i}.{n}.{t}"] = sd[p + f"{n}.{t}"]
            hub[f"blocks.{i}.ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
            hub[f"blocks.{i}.ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
        sd = hub
    path = tmp_path / f"dinov2-{layout}.pth"
    torch.save(sd, path)
    return path


def test_dinov2_gives_features_for_any_input_and_reads_every_layout(tmp_path):
    extractors = [DINOv2Features(load_weights(str(_tiny_vit_file(tmp_path, layout)), None, field="w"), arch=TINY_VIT)
                  for layout in ("transformers", "transformers4", "hub")]
    dino = extractors[0]
    assert dino.name == "dinov2" and dino.dim == 48
    for images in (_uint8(2, 3, 64, 48), torch.rand(3, 1, 31, 31) * 2 - 1, torch.rand(1, 3, 300, 300) * 2 - 1):
        f = dino(images)
        assert f.shape == (images.shape[0], 48) and torch.isfinite(f).all()
        for other in extractors[1:]:  # the three layouts of the same weights: the same network
            assert torch.equal(other(images), f)
    u = _uint8(2, 3, 40, 40, seed=3)
    assert torch.equal(dino((u.float() - 127.5) / 127.5 + 0.3 / 127.5), dino(u))  # quantised first
    assert torch.equal(dino(u[:, :1]), dino(u[:, :1].expand(-1, 3, -1, -1)))
    # Its position table is the hub model's resize of the stored one, at the 16x16 grid of 224x224 inputs.
    assert dino.net.embeddings.position_embeddings.shape == (1, 1 + 16 * 16, 48)


def test_registry_builds_vit_l14_and_refuses_other_sizes(tmp_path):
    small = _tiny_vit_file(tmp_path, "transformers")
    with pytest.raises(WeightsError) as e:
        build_feature_extractor("dinov2", cache_uri="unused", real=NO_DATA, weights=str(small), sha256=_sha(small))
    assert str(small) in str(e.value) and "(network: [1024" in str(e.value)


def test_hub_position_resize():
    """(grid + 0.1) / M as the scale factor, bicubic without antialias: the torch-hub DINOv2's resize."""
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = hub_position_table(table, 16)
    grid = table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic", align_corners=False)
    assert torch.equal(out[:, 0], table[:, 0])
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 8))
    # ...which is not transformers' own resize to the size (16 / 37): that would change the features
    other = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert not torch.allclose(other, ref, atol=1e-3)


def test_dinov2_preprocessing_matches_edm2s_pil_reference():
    """EDM2's reference resize (PIL bicubic to 224x224 of the uint8 RGB image), /255, ImageNet mean and std."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet's
    for size in (512, 64):
        # smooth images: PIL rounds and clips to uint8, the torch path EDM2 uses does not; overshoot would differ
        low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(size)) * 200 + 28
        u = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").round().to(torch.uint8)
        pil = np.asarray(Image.fromarray(u[0].permute(1, 2, 0).numpy(), "RGB").resize((224, 224),
                                                                                        Image.Resampling.BICUBIC))
        got = dinov2_input(u)[0].permute(1, 2, 0).numpy()
        assert got.shape == (224, 224, 3)
        levels = (got.astype(np.float64) * std + mean) * 255  # back to [0, 255]
        # PIL rounds to whole levels (with fixed-point weights); EDM2: "almost the same results"
        # rounding only: never a whole level off after rounding, no bias (rounding alone averages 0.25 levels)
        off = np.abs(levels - pil)
        assert np.abs(np.round(levels) - pil).max() <= 1 and off.mean() < 0.35, (size, off.max(), off.mean())
        wrong = torch.nn.functional.interpolate(u.float(), size=(224, 224), mode="bilinear", antialias=True)
        assert np.abs(wrong[0].permute(1, 2, 0).numpy() - pil).mean() > off.mean()  # the check can tell


def test_evaluate_stage_builds_the_configured_network(inception, inception_file, tmp_path):
    """evaluate.features + evaluate.inception_weights/_sha256 reach the network the evaluate stage uses."""
    from pipeline_support import tiny_config_dict

    from sims_platform.config import config_from_dict
    from sims_platform.evaluation.features import feature_extractor

    data = tiny_config_dict(str(tmp_path / "run"))
    data["evaluate"] |= {"features": "inception", "inception_weights": str(inception_file),
                         "inception_sha256": _sha(inception_file)}
    cfg = config_from_dict(data)
    features, cpu = str(tmp_path / "features"), torch.device("cpu")
    got = feature_extractor(cfg, features, NO_DATA, cpu)  # a standard network needs no training data
    u = _uint8(1, 1, 8, 8, seed=7)  # the tiny pipeline's 8x8 grey digits
    assert got.dim == 2048 and torch.equal(got(u), inception(u))
    cfg.evaluate.inception_sha256 = "1" * 64
    with pytest.raises(WeightsError, match="expected " + "1" * 64):
        feature_extractor(cfg, features, NO_DATA, cpu)
