"""Networks from URIs: the platform's model records and EDM2 pickles, told apart by content; no code runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from sims_platform.config.schema import EncoderConfig
from sims_platform.models.edm2_pickle import EDM2_DEFAULTS, Edm2Network, precond_kwargs, read_edm2
from sims_platform.models.precond import Precond
from sims_platform.storage import fsio
from sims_platform.storage.safe_pickle import load_torch_bytes


def read_network(uri: str) -> Edm2Network:
    """Weights (float32) at uri and, when the file describes its network, the network's arguments.

    A torch.save file (zip) is a platform record: {"ema": state dict, "images": n, "precond": the network's
    arguments, ...} (model_record; records written before they carried "precond" load with the config's network).
    Anything else is read as an EDM2 pickle.
    """
    raw = fsio.read_bytes(uri)
    if not raw.startswith(b"PK"):  # torch.save's zip container; EDM2's pickles are plain pickles
        return read_edm2(uri, raw)
    rec = load_torch_bytes(raw, uri)
    if not isinstance(rec, dict) or not isinstance(rec.get("ema"), dict):
        raise ValueError(f"{uri}: not a model record (expected a dict with an 'ema' state dict)")
    kwargs = rec.get("precond")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{uri}: 'precond' is a {type(kwargs).__name__}, expected the network's arguments")
    if kwargs is not None:  # checked as an EDM2 pickle's are: only arguments our network takes
        kwargs = precond_kwargs(kwargs, uri)
    images = rec.get("images")
    encoder = rec.get("encoder")
    if encoder is not None and not isinstance(encoder, dict):
        raise ValueError(f"{uri}: 'encoder' is a {type(encoder).__name__}, expected the encoder's settings")
    return Edm2Network(kwargs, rec["ema"], int(images) if images is not None else None, uri,
                       encoder)


def model_record(net: Precond, images: int, **meta: Any) -> dict[str, Any]:
    """What a model file holds: the EMA weights, the training images behind them and the network's arguments (so
    it loads with its own architecture, e.g. a guide smaller than the config's network), plus `meta`."""
    return {"ema": net.state_dict(), "images": images, "precond": precond_kwargs(net.init_kwargs, "network"),
            **meta}


def import_edm2(src: str, dst: str) -> dict[str, Any]:
    """Convert an EDM2 pickle into a self-describing platform record at dst; returns what was written."""
    net = read_edm2(src)
    net.build()  # the weights fit the arguments: checked now, not when a stage first loads it
    fsio.save_torch(dst, {"ema": net.state_dict, "images": net.images or 0, "precond": net.kwargs,
                          "encoder": net.encoder, "source": src})
    return {"source": src, "model": dst, "images": net.images, "parameters": sum(t.numel() for t in
                                                                                  net.state_dict.values()),
            "precond": net.kwargs, "encoder": net.encoder}


def encoder_mismatch(trained: dict[str, Any] | None, cfg: EncoderConfig) -> str | None:
    """Why a network trained in the space `trained` describes (an EDM2 pickle's encoder) cannot run in cfg's, or
    None. EDM2's latent map is raw * scale + bias with scale = final_std / raw_std, bias = -raw_mean * scale: the
    config's latent_mean, latent_std and final_std must give the same numbers, or the network sees other latents."""
    if trained is None:
        return None
    if trained.get("kind") != cfg.kind:
        return f"it was trained in {trained.get('kind')} space, the config's encoder.kind is {cfg.kind}"
    if cfg.kind == "pixel":
        return None
    mean, std = np.asarray(cfg.latent_mean, np.float64), np.asarray(cfg.latent_std, np.float64)
    scale, bias = cfg.final_std / std, -mean * (cfg.final_std / std)
    want_scale, want_bias = np.asarray(trained["scale"]), np.asarray(trained["bias"])
    if scale.shape != want_scale.shape or not (np.allclose(scale, want_scale, rtol=1e-5, atol=1e-6)
                                               and np.allclose(bias, want_bias, rtol=1e-5, atol=1e-5)):
        raw_std = cfg.final_std / want_scale
        raw_mean = -want_bias / want_scale
        return (f"its latents are normalised with raw mean {np.round(raw_mean, 4).tolist()} and std "
                f"{np.round(raw_std, 4).tolist()} (for final_std {cfg.final_std}); set encoder.latent_mean / "
                "latent_std to those")
    return None


def mismatches(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """'key: have != want' for every architecture argument where a loaded network differs from the config's."""
    full_have, full_want = {**EDM2_DEFAULTS, **have}, {**EDM2_DEFAULTS, **want}
    out = []
    for key in sorted(set(full_have) | set(full_want)):
        a, b = full_have.get(key), full_want.get(key)
        norm = (lambda v: [*v] if isinstance(v, (list, tuple)) else v)  # noqa: E731
        if norm(a) != norm(b):
            out.append(f"{key}: checkpoint {a!r}, config {b!r}")
    return out


def check_encoder(net: Edm2Network, cfg: EncoderConfig, field: str) -> None:
    """ValueError naming `field` when the network at net.source was trained on another latent space than cfg's."""
    why = encoder_mismatch(net.encoder, cfg)
    if why is not None:
        raise ValueError(f"{field}: {net.source} does not fit the config's encoder: {why}")
