"""The digits classifier: a small CNN trained on the real labelled images, cached; FID uses its penultimate layer."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sims_platform.metrics.extractor import LabeledImagesLike, check_images
from sims_platform.storage.fsio import exists, join, load_torch, save_torch
from sims_platform.utils.progress import Progress

log = logging.getLogger(__name__)


def _digest(*parts: bytes | str | Tensor) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{list(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")  # separator, so ("ab", "c") and ("a", "bc") differ
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class DigitsClassifierHParams:
    width: int = 16  # channels of the first conv stage (the second has 2x)
    feature_dim: int = 64  # penultimate width = FID feature dim; small keeps the covariance well estimated
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.15  # held out of training, only to report accuracy


# Bump when the architecture or the training procedure changes: invalidates every cached classifier.
_DIGITS_VERSION = "digits-classifier/1"


class DigitsCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, feature_dim: int) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # any training resolution gives the same parameter count
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        # Pre-activation: after the ReLU, dead units give zero-variance dims that make FID's sqrtm singular.
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))


class DigitsClassifier:
    """FeatureExtractor over a trained DigitsCNN; also classifies (class histograms of samples)."""

    name = "digits-classifier"

    def __init__(self, net: DigitsCNN, *, in_channels: int, resolution: int, fingerprint: str,
                 metrics: dict[str, float], from_cache: bool) -> None:
        self.net = net.eval().requires_grad_(False)
        self.in_channels = in_channels
        self.resolution = resolution
        self.dim = net.head.in_features
        self.num_classes = net.head.out_features
        self.fingerprint = fingerprint
        self.metrics = metrics  # train/holdout accuracy and training time, as measured when trained
        self.from_cache = from_cache

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> DigitsClassifier:
        self.net.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """Any [N, 1|3, H, W] in [-1, 1] -> what the network was trained on."""
        check_images(images, "digits-classifier")
        # Samples are clipped like any image written to disk would be; guided samples overshoot.
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        c = x.shape[1]
        if c != self.in_channels:
            if c == 3 and self.in_channels == 1:
                luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * luma).sum(dim=1, keepdim=True)
            elif c == 1 and self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"digits-classifier: images have {c} channels, the network was "
                                 f"trained on {self.in_channels}")
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net.features(self.preprocess(images))

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """Class probabilities [N, num_classes]."""
        return self.net(self.preprocess(images)).softmax(dim=1)


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic kernels for the duration, without disturbing the caller's RNG or flags."""
    was, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        # CPU reductions split by thread count, so one thread makes the weights the same on any host;
        # the network is small enough (~2 s) that this costs little.
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was)
            torch.set_num_threads(threads)


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    if len(y) == 0:
        return float("nan")
    correct = sum(int((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def _train_digits(x: Tensor, y: Tensor, num_classes: int, hp: DigitsClassifierHParams,
                  seed: int) -> tuple[DigitsCNN, dict[str, float]]:
    t0 = time.perf_counter()
    n = len(y)
    with _deterministic(seed):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        n_hold = int(round(n * hp.holdout_fraction)) if n >= 20 else 0
        hold, train = perm[:n_hold], perm[n_hold:]
        net = DigitsCNN(x.shape[1], num_classes, hp.width, hp.feature_dim)
        opt = torch.optim.Adam(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        steps_per_epoch = -(-len(train) // hp.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr,
                                                    total_steps=hp.epochs * steps_per_epoch)
        net.train()
        # Tens of seconds on a CPU: a line per progress interval (and at the end) so the terminal is not silent.
        progress = Progress("digits-classifier", total=hp.epochs, unit="epoch")
        for epoch in range(hp.epochs):
            order = train[torch.randperm(len(train), generator=g)]
            for i in range(0, len(order), hp.batch_size):
                idx = order[i:i + hp.batch_size]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            progress.update(epoch + 1, loss=loss.detach())
        progress.close()
        net.eval()
        metrics = {"train_accuracy": _accuracy(net, x[train], y[train]),
                   "holdout_accuracy": _accuracy(net, x[hold], y[hold]),
                   "train_images": float(len(train)), "holdout_images": float(n_hold),
                   "train_seconds": time.perf_counter() - t0}
    return net, metrics


def train_digits_classifier(real: LabeledImagesLike, *, cache_uri: str, seed: int = 0,
                            hparams: DigitsClassifierHParams | None = None) -> DigitsClassifier:
    """Train (or load from {cache_uri}/digits-classifier.pt) the classifier on the real labelled images.

    Always trained on CPU: small, and the cached weights then do not depend on where they were built.
    Concurrent builders (an Indexed Job's ranks) each train the same network; atomic writes keep the
    cache whole.
    """
    hp = hparams or DigitsClassifierHParams()
    images, labels = real.images, getattr(real, "labels", None)
    check_images(images, "digits-classifier")
    if labels is None or labels.numel() == 0:
        raise ValueError("evaluate.features 'digits-classifier' needs class labels (data.num_classes > 0); "
                         "unlabelled data needs another feature network")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"digits-classifier: labels {list(labels.shape)} do not match images "
                         f"{list(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"digits-classifier: images must have 1 or 3 channels, got {images.shape[1]}")
    x = images.detach().to("cpu", torch.float32).contiguous()
    y = labels.detach().to("cpu", torch.int64).contiguous()
    num_classes = int(y.max()) + 1
    in_channels, resolution = x.shape[1], x.shape[-1]
    settings = {"version": _DIGITS_VERSION, "seed": seed, "hparams": dataclasses.asdict(hp),
                "num_classes": num_classes}
    fingerprint = _digest(json.dumps(settings, sort_keys=True), x, y)

    uri = join(cache_uri, "digits-classifier.pt")
    if exists(uri):
        record = load_torch(uri)
        if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
            net = DigitsCNN(in_channels, num_classes, hp.width, hp.feature_dim)
            net.load_state_dict(record["state_dict"])
            return DigitsClassifier(net, in_channels=in_channels, resolution=resolution,
                                    fingerprint=fingerprint, metrics=record["metrics"], from_cache=True)
        log.info("digits-classifier: cache at %s was built from other data or settings; retraining", uri)

    print(f"[digits-classifier] training the FID feature network on {len(y)} labelled images (once per data set; "
          f"cached at {uri})", file=sys.stderr, flush=True)
    net, metrics = _train_digits(x, y, num_classes, hp, seed)
    log.info("digits-classifier: trained in %.1f s, train accuracy %.4f, holdout accuracy %.4f",
             metrics["train_seconds"], metrics["train_accuracy"], metrics["holdout_accuracy"])
    save_torch(uri, {"fingerprint": fingerprint, "settings": settings, "metrics": metrics,
                     "in_channels": in_channels, "resolution": resolution,
                     "state_dict": net.state_dict()})
    return DigitsClassifier(net, in_channels=in_channels, resolution=resolution,
                            fingerprint=fingerprint, metrics=metrics, from_cache=False)
