"""Pretrained feature-network weights from a path or storage URI: sha256-checked, loaded without running code."""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from sims_platform.storage import fsio


class WeightsError(ValueError):
    """Weights that cannot be used: missing, not the expected file, or not a plain state dict."""


@dataclass(frozen=True)
class Weights:
    uri: str
    sha256: str  # of the file as read, whether or not one was expected
    state_dict: dict[str, Tensor]


def _state_dict(obj: object, uri: str) -> dict[str, Tensor]:
    # Checkpoints sometimes wrap the state dict (torch-hub and Lightning style); unwrap only that.
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise WeightsError(f"{uri}: expected a state dict (names -> tensors), got {type(obj).__name__}")
    return obj


def load_weights(uri: str, sha256: str | None, *, field: str) -> Weights:
    """Read uri (a path, file://, s3://, ... through fsspec), check its sha256, parse it as a state dict.

    `.safetensors` files go through safetensors; anything else through torch.load(weights_only=True),
    which refuses every pickle that would construct an object other than tensors and containers. So a
    file planted at the URI can at worst be refused, never run. `field` names the config field in errors.
    """
    try:
        data = fsio.read_bytes(uri)
    except FileNotFoundError as e:
        raise WeightsError(f"{field}: no file at {uri}") from e
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise WeightsError(f"{field}: {uri} has sha256 {digest}, expected {sha256.lower()} "
                           "(a different or corrupted file)")
    try:
        if uri.endswith(".safetensors"):
            obj: object = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{field}: {uri} is not a plain tensor checkpoint (refused to load it: {first})") from e
    return Weights(uri=uri, sha256=digest, state_dict=_state_dict(obj, uri))


def load_into(module: torch.nn.Module, state_dict: dict[str, Tensor], *, uri: str, field: str,
              optional: tuple[str, ...] = (), assign: bool = False) -> None:
    """load_state_dict(strict) with an error naming the file and the first mismatched names or shapes.

    Keys ending in one of `optional` (e.g. BatchNorm's num_batches_tracked) may be absent from the file.
    assign: take the file's tensors as the parameters (for a module built on the meta device).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith(optional)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {list(state_dict[k].shape)} (network: {list(v.shape)})" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"wrong shape {few(shapes)}" if shapes else ""]
        raise WeightsError(f"{field}: {uri} does not fit the network: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state_dict, strict=False, assign=assign)
