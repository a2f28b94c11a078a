"""Writes pickles in the layout of EDM2's training snapshots, without EDM2's code (test fixtures).

EDM2 pickles an EasyDict(ema=..., encoder=..., loss_fn=..., dataset_kwargs=...) whose network classes are
torch_utils.persistence classes: each pickles as `_reconstruct_persistent_obj(meta)`, meta = dict(type,
version, module_src, class_name, state = the object's __dict__ with `_init_kwargs`), and the network is cast
to float16 first. Stand-ins below reproduce that byte layout; the module source they embed would create a
marker file if anything ever executed it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import pickle
import sys
import types
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def _fake_modules() -> dict[str, types.ModuleType]:
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # only its name is pickled; unpickling must never call EDM2's
        raise AssertionError("the fixture's reconstruct function was called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    torch_utils, dnnlib = types.ModuleType("torch_utils"), types.ModuleType("dnnlib")
    torch_utils.persistence, dnnlib.util = persistence, util
    return {"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
            "dnnlib.util": util}


@contextlib.contextmanager
def _edm2_names() -> Iterator[dict[str, types.ModuleType]]:
    mods = _fake_modules()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Persistent:
    def __init__(self, reconstruct, class_name: str, state: dict, module_src: str) -> None:
        self.args = (dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state),)
        self.reconstruct = reconstruct

    def __reduce__(self):
        return (self.reconstruct, self.args)


# Attributes our modules keep that EDM2's do not (MPConv's eval-mode weight-normalisation cache): not in its pickles.
_OURS_ONLY = {"_cache"}


def _convert(m: nn.Module, reconstruct, src: str, init_kwargs: dict):
    state = {k: v for k, v in m.__dict__.items() if k not in _OURS_ONLY}
    state["_modules"] = collections.OrderedDict(
        (n, None if c is None else _convert(c, reconstruct, src, {})) for n, c in m._modules.items())
    if isinstance(m, nn.ModuleDict):  # not persistent in EDM2: pickled as torch's own class
        out = nn.ModuleDict()
        out.__dict__.update(state)
        return out
    state.update(_init_args=(), _init_kwargs=dict(init_kwargs))
    return _Persistent(reconstruct, type(m).__name__, state, src)


RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]  # EDM2's StabilityVAEEncoder defaults


def edm2_pickle(net: nn.Module, init_kwargs: dict, marker: str, class_name: str | None = None,
                raw_mean: list[float] = RAW_MEAN, raw_std: list[float] = RAW_STD) -> bytes:
    """Bytes of a network-snapshot-*.pkl holding `net` (cast to float16 like EDM2) as its 'ema'."""
    src = f"import os\nos.system('touch {marker}')\n"  # a network module's source: must never be executed
    with _edm2_names() as mods:
        reconstruct = mods["torch_utils.persistence"]._reconstruct_persistent_obj
        easy = mods["dnnlib.util"].EasyDict
        ema = _convert(copy.deepcopy(net).half(), reconstruct, src, init_kwargs)
        if class_name is not None:
            ema.args[0]["class_name"] = class_name
        scale = np.float32(0.5) / np.float32(raw_std)
        # EDM2's latent networks (4 channels: SD-VAE latents) carry the VAE encoder, its pixel networks the RGB one.
        encoder = _Persistent(reconstruct, "StabilityVAEEncoder",
                              dict(_init_args=(), _init_kwargs={}, vae_name="stabilityai/sd-vae-ft-mse",
                                   scale=scale, bias=np.float32(0) - np.float32(raw_mean) * scale,
                                   batch_size=8, _vae=None), src) if init_kwargs.get("img_channels") == 4 else \
            _Persistent(reconstruct, "StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}), src)
        loss = _Persistent(reconstruct, "EDM2Loss", dict(_init_args=(), _init_kwargs={}, P_mean=-0.4, P_std=1.0,
                                                          sigma_data=0.5), src)
        data = easy(encoder=encoder, loss_fn=loss, ema=ema,
                    dataset_kwargs=easy(class_name="training.dataset.ImageFolderDataset", path="img512.zip",
                                        use_labels=True))
        return pickle.dumps(data, protocol=4)  # pickle.dump's default protocol where EDM2 ran
