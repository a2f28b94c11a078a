"""FID's Inception-v3 (the TensorFlow 2015-12-05 graph) and its 2048-d pool features, preprocessed as EDM2 does.

The network: torchvision's Inception3 layer layout with the four changes that make it compute what the
TensorFlow graph computes (average pools that ignore padding; max pool in the last block), which is what
pytorch-fid and torch-fidelity build. Their published weight file (`pt_inception-2015-12-05-6726825d.pth`,
the same file under torch-fidelity's name `weights-inception-2015-12-05-6726825d.pth`) is a plain state dict
with torchvision's parameter names, and loads here unchanged. EDM2's own copy (NVIDIA's
`inception-2015-12-05.pkl`) is the same network as a pickle that runs code on load; it is not read.

Why the layers are written here: torchvision, pytorch-fid, torch-fidelity and timm (the libraries that carry
this network) all need torchvision, and the only torchvision that matches this project's torch on PyPI is
the CUDA build (0.28.0 for torch 2.13), whose import fails against the CPU torch wheel (its C++ extension
needs libc10_cuda.so, and `torchvision::nms` is then missing when it registers its ops). So the CPU test
environment could never import it.

Preprocessing (EDM2 `calculate_metrics.py` + NVIDIA's detector): uint8 RGB; resized to 299x299 the way
TensorFlow 1's `resize_bilinear` does (source pixel = destination pixel * in / out, no half-pixel offset,
no antialiasing, edges clamped); scaled by (x - 128) / 128; all in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sims_platform.metrics.preprocess import quantize_uint8, to_rgb
from sims_platform.metrics.weights import Weights, load_into

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax (1000 classes + 8 unused); kept so the published file loads strictly

# ----------------------------------------------------------------------------
# Layers (parameter names follow torchvision's Inception3, which the weight files use)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # TF's average pool divides by the number of real pixels under the window, not by 9 (torchvision's default).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        def row(a: int, b: int) -> BasicConv2d:  # the factorised 7x7: 1x7 and 7x1
            return BasicConv2d(a, b, (1, 7), padding=(0, 3))

        def col(a: int, b: int) -> BasicConv2d:
            return BasicConv2d(a, b, (7, 1), padding=(3, 0))

        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = row(c7, c7)
        self.branch7x7_3 = col(c7, 192)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = col(c7, c7)
        self.branch7x7dbl_3 = row(c7, c7)
        self.branch7x7dbl_4 = col(c7, c7)
        self.branch7x7dbl_5 = row(c7, 192)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """The last two blocks; the TF graph pools the first by average, the second (Mixed_7c) by max."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """[N, 3, 299, 299] scaled to [-1, 1) -> [N, 2048] pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # the 8x8 average pool of the TF graph


# ----------------------------------------------------------------------------
# Preprocessing


def resize_like_tf1(x: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Bilinear resize of float [N, C, H, W] to size x size as TF1's resize_bilinear(align_corners=False).

    Destination pixel j samples source coordinate j * in / out (no half-pixel centres, unlike
    F.interpolate), edges clamped, no antialiasing when shrinking. Done with grid_sample, like NVIDIA's
    detector that EDM2 loads, so the arithmetic matches it.
    """
    n, _, h, w = x.shape

    def axis(n_in: int) -> Tensor:
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)
        return (2 * src + 1) / n_in - 1  # grid_sample's normalised coordinate of that pixel position

    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype).expand(n, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(images: Tensor) -> Tensor:
    """[-1, 1] floats or uint8 [N, 1|3, H, W] -> what the network reads: [N, 3, 299, 299] in [-1, 1)."""
    x = to_rgb(quantize_uint8(images), "inception").to(torch.float32)
    return (resize_like_tf1(x) - 128) / 128


# ----------------------------------------------------------------------------
# Feature extractor

# Bump when the preprocessing changes: reference statistics are cached under the fingerprint.
_VERSION = "fid-inception-v3/edm2-preprocessing/1"


class InceptionFeatures:
    """FeatureExtractor: FID's 2048-d Inception-v3 pool features of images in [-1, 1] (or uint8)."""

    name = "inception"
    dim = FEATURE_DIM

    def __init__(self, weights: Weights, *, field: str = "evaluate.inception_weights") -> None:
        net = FIDInceptionV3()
        load_into(net, weights.state_dict, uri=weights.uri, field=field, optional=("num_batches_tracked",))
        self.net = net.eval().requires_grad_(False)
        self.fingerprint = f"{_VERSION}/sha256:{weights.sha256}"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> InceptionFeatures:
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net(inception_input(images.to(self.device)))
