"""EDM2's network pickles (training snapshots, post-hoc-EMA exports) read as plain state: no code they carry runs.

EDM2 pickles whole objects: every network class is a `torch_utils.persistence` class, pickled as a call of
`_reconstruct_persistent_obj(meta)` whose meta holds the class's module source, its name and its state
(`__dict__`, with `_init_kwargs`: the constructor arguments). Unpickling that normally exec()s the source.
Here a restricted unpickler maps each allowed global to a function that keeps only data (the source is
never looked at), so a snapshot becomes a state dict plus constructor arguments, which build our own
`Precond` (same state-dict names and outputs as EDM2's). Anything not on the allow-list is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import re
from typing import Any

import numpy as np
import torch
import torch._utils

from sims_platform.models.precond import Precond
from sims_platform.storage import fsio
from sims_platform.storage.safe_pickle import UnsafePickleError, restricted_loads

# ----------------------------------------------------------------------------
# Plain stand-ins for what the pickle names

# EDM2 classes whose state we accept (networks_edm2, training_loop's loss, encoders); others are refused.
PERSISTENT_CLASSES = frozenset({"Precond", "UNet", "Block", "MPConv", "MPFourier", "EDM2Loss",
                                "StabilityVAEEncoder", "StandardRGBEncoder"})


@dataclasses.dataclass
class PersistentState:
    """A torch_utils.persistence object as data: its class name and its state (module source dropped)."""

    class_name: str
    state: dict[str, Any]


class ModuleState:
    """A torch.nn container (ModuleDict) as data: pickle's NEWOBJ makes it, BUILD hands it its state."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"ModuleDict state is a {type(state).__name__}, expected a dict")
        self.state = state


class EasyDictState(dict):
    """dnnlib.util.EasyDict (a dict with attribute access) as a plain dict."""


def _reconstruct_persistent(meta: Any) -> PersistentState:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError(f"unexpected persistent-object record {type(meta).__name__} "
                                f"(type {meta.get('type') if isinstance(meta, dict) else None!r})")
    name, state = meta.get("class_name"), meta.get("state")
    if name not in PERSISTENT_CLASSES:
        raise UnsafePickleError(f"persistent class {name!r} is not one EDM2 networks are made of "
                                f"({', '.join(sorted(PERSISTENT_CLASSES))})")
    if not isinstance(state, dict):
        raise UnsafePickleError(f"persistent object {name} has state of type {type(state).__name__}")
    return PersistentState(name, dict(state))  # meta['module_src'] is never executed nor kept


def _storage_from_bytes(data: bytes) -> Any:
    # What torch.storage._load_from_bytes would read, but with torch's own weights-only unpickler.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter(data: torch.Tensor, requires_grad: bool = False, backward_hooks: Any = None,
               state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"a parameter holds {type(data).__name__}, expected a tensor")
    return data


def _tensor(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False,
            backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise UnsafePickleError(f"a tensor is built on {type(storage).__name__}, expected a storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # The VAE encoder keeps its latent scale and bias as float32 arrays; numpy 1.x and 2.x name them apart.
    core = np._core if hasattr(np, "_core") else np.core
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = core.multiarray._reconstruct
        allowed[(mod, "scalar")] = core.multiarray.scalar
    return allowed


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("torch.nn.modules.container", "ModuleDict"): ModuleState,
    ("dnnlib.util", "EasyDict"): EasyDictState,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    **_numpy_globals(),
}


def read_pickle(data: bytes, where: str) -> Any:
    """Unpickle an EDM2 pickle (network or statistics) with only ALLOWED_GLOBALS; refusals name `where`."""
    try:
        return restricted_loads(data, ALLOWED_GLOBALS, where)
    except UnsafePickleError as err:
        msg = str(err)
        raise UnsafePickleError(msg if msg.startswith(where) else f"{where}: refused to load: {msg}") from None


# ----------------------------------------------------------------------------
# Snapshot -> state dict and constructor arguments of our Precond

# EDM2's constructor defaults (networks_edm2.py), so an imported network's arguments are all explicit.
EDM2_DEFAULTS: dict[str, Any] = {
    "sigma_data": 0.5, "logvar_channels": 128, "model_channels": 192, "channel_mult": [1, 2, 3, 4],
    "num_blocks": 3, "attn_resolutions": [16, 8], "label_balance": 0.5, "concat_balance": 0.5,
    "channels_per_head": 64, "dropout": 0.0, "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256,
}
_REQUIRED = ("img_resolution", "img_channels", "label_dim")
# Arguments our network does not take, accepted only at the value that makes EDM2's network equal ours.
_FIXED = {"channel_mult_noise": None, "channel_mult_emb": None, "resample_filter": [1, 1]}
_DROPPED = ("use_fp16",)  # precision is the sampler's choice here; imported weights are float32


def precond_kwargs(init_kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """EDM2 Precond's `_init_kwargs` -> our Precond's keyword arguments (errors name the argument)."""
    missing = [k for k in _REQUIRED if k not in init_kwargs]
    if missing:
        raise ValueError(f"{where}: the network's constructor arguments lack {', '.join(missing)}")
    out: dict[str, Any] = {k: int(init_kwargs[k]) for k in _REQUIRED}
    for key, value in init_kwargs.items():
        if key in _REQUIRED or key in _DROPPED:
            continue
        if key in _FIXED:
            if (list(value) if isinstance(value, (list, tuple)) else value) != _FIXED[key]:
                raise ValueError(f"{where}: {key}={value!r} is not supported (our network is EDM2's with "
                                 f"{key}={_FIXED[key]!r})")
            continue
        if key not in EDM2_DEFAULTS:
            raise ValueError(f"{where}: unknown network argument {key}={value!r} (expected "
                             f"{', '.join([*_REQUIRED, *EDM2_DEFAULTS, *_FIXED, *_DROPPED])})")
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return {**EDM2_DEFAULTS, **out}


def _state_dict(obj: Any, prefix: str, out: dict[str, torch.Tensor], where: str) -> None:
    if not isinstance(obj, (PersistentState, ModuleState)):
        raise UnsafePickleError(f"{where}: {prefix or 'ema'} is a {type(obj).__name__}, expected a module")
    st = obj.state
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (st.get(group) or {}).items():
            if t is None or name in skip:
                continue
            if not isinstance(t, torch.Tensor):
                raise UnsafePickleError(f"{where}: {prefix}{name} is a {type(t).__name__}, expected a tensor")
            out[prefix + name] = t.to(torch.float32) if t.is_floating_point() else t
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            _state_dict(child, f"{prefix}{name}.", out, where)


@dataclasses.dataclass
class Edm2Network:
    """A network as data: our Precond's arguments (None: the file does not say) and a float32 state dict."""

    kwargs: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    images: int | None  # training images behind the weights, from the file name (EDM2 names them so)
    source: str
    encoder: dict[str, Any] | None = None  # the space the network was trained in (encoder_settings), if recorded

    def build(self) -> Precond:
        if self.kwargs is None:
            raise ValueError(f"{self.source}: the file does not describe its network; load it with the config's")
        net = Precond(**self.kwargs)
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{self.source}: the weights do not fit the network its arguments describe "
                             f"({self.kwargs}): {err}") from None
        return net.eval().requires_grad_(False)


_IMAGES = re.compile(r"-(\d{6,7})(?:-\d+\.\d+)?\.pkl$")  # network-snapshot-0134217-0.100.pkl, ...-2147483-0.130.pkl


def read_edm2(uri: str, raw: bytes | None = None) -> Edm2Network:
    """The network of an EDM2 pickle (its 'ema' entry) at uri (or its bytes, already read), as plain data."""
    data = read_pickle(fsio.read_bytes(uri) if raw is None else raw, uri)
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{uri}: not an EDM2 network pickle (expected a dict with an 'ema' network, got "
                         f"{type(data).__name__}{' with keys ' + ', '.join(map(str, data)) if isinstance(data, dict) else ''})")
    ema = data["ema"]
    if not isinstance(ema, PersistentState) or ema.class_name != "Precond":
        raise ValueError(f"{uri}: 'ema' is {getattr(ema, 'class_name', type(ema).__name__)}, expected EDM2's Precond")
    init_kwargs = ema.state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"{uri}: the network carries no constructor arguments (_init_kwargs)")
    state: dict[str, torch.Tensor] = {}
    _state_dict(ema, "", state, uri)
    m = _IMAGES.search(os.path.basename(uri))
    return Edm2Network(precond_kwargs(dict(init_kwargs), uri), state, int(m.group(1)) * 1000 if m else None, uri,
                       encoder_settings(data.get("encoder"), uri))


def encoder_settings(encoder: Any, where: str) -> dict[str, Any] | None:
    """The pickle's encoder as data: {'kind': 'pixel'} or {'kind': 'latent', 'scale': [...], 'bias': [...]}, the
    per-channel affine map EDM2 applies to the VAE's raw latents (final = raw * scale + bias); None if absent."""
    if encoder is None:
        return None
    if not isinstance(encoder, PersistentState):
        raise ValueError(f"{where}: 'encoder' is a {type(encoder).__name__}, expected an EDM2 encoder")
    if encoder.class_name == "StandardRGBEncoder":
        return {"kind": "pixel"}
    if encoder.class_name != "StabilityVAEEncoder":
        raise ValueError(f"{where}: 'encoder' is {encoder.class_name}, expected StabilityVAEEncoder or "
                         "StandardRGBEncoder")
    out: dict[str, Any] = {"kind": "latent"}
    for key in ("scale", "bias"):
        value = np.asarray(encoder.state.get(key), dtype=np.float64)
        if value.ndim != 1 or value.size == 0:
            raise ValueError(f"{where}: the encoder's {key} is not a per-channel vector")
        out[key] = [float(v) for v in value]
    return out


def load_edm2(uri: str) -> Precond:
    """EDM2 checkpoint (network-snapshot-*.pkl or a post-hoc-EMA edm2-img512-*.pkl) -> our Precond, float32, eval."""
    return read_edm2(uri).build()
