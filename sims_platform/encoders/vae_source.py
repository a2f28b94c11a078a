"""Where the VAE comes from: a diffusers AutoencoderKL folder at a path or storage URI, pinned by the sha256 of its
weights file, or a hub id pinned to a revision. Nothing is loaded before its digest is checked, and only the
safetensors weights are ever read (a pickled `.bin` beside them is ignored): a file planted in the bucket can at
worst be refused, never run."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from sims_platform.config.schema import vae_kind
from sims_platform.storage import fsio

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name for a model folder's safetensors weights
CONFIG = "config.json"
_CHUNK = 1 << 22


class VaeSourceError(ValueError):
    """The VAE named by the config cannot be used: missing, not the pinned file, or not a VAE folder."""


@contextmanager
def vae_folder(vae: str, sha256: str | None, revision: str | None) -> Iterator[str]:
    """A local folder holding exactly config.json and the safetensors weights of `vae`, the weights' sha256
    checked against `sha256` (when given; a location always has one after validation). Removed on exit."""
    with tempfile.TemporaryDirectory(prefix="sims-vae-") as tmp:
        if vae_kind(vae) == "hub":
            src = _hub_snapshot(vae, revision)
        else:
            src = fsio.normalize_uri(vae)
        digest = _copy(fsio.join(src, WEIGHTS), os.path.join(tmp, WEIGHTS), vae)
        if sha256 is not None and digest != sha256.lower():
            raise VaeSourceError(f"encoder.vae_sha256: {fsio.join(src, WEIGHTS)} has sha256 {digest}, expected "
                                 f"{sha256.lower()} (a different or corrupted file; stage the VAE again or fix "
                                 "encoder.vae_sha256)")
        _copy(fsio.join(src, CONFIG), os.path.join(tmp, CONFIG), vae)
        yield tmp


def _copy(uri: str, dst: str, vae: str) -> str:
    """Copy uri to the local file dst, returning the sha256 of the bytes copied."""
    fs, path = fsio.filesystem(uri)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
    except FileNotFoundError:
        raise VaeSourceError(f"encoder.vae: {vae} has no {os.path.basename(dst)} (expected a diffusers "
                             f"AutoencoderKL folder: {CONFIG} and {WEIGHTS})") from None
    return h.hexdigest()


def _hub_snapshot(repo: str, revision: str | None) -> str:
    """The hub repo's config and safetensors weights at `revision`, downloaded (or found in the local hub cache)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=[CONFIG, WEIGHTS],
                                   cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception as err:  # offline, unknown repo or revision: the hub client raises many types
        raise VaeSourceError(f"encoder.vae: cannot fetch hub model '{repo}' at revision {revision} "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Stage the "
                             "VAE folder in storage and give its URI with encoder.vae_sha256 (docs/imagenet.md)") \
            from None
    return fsio.normalize_uri(folder)  # its files are read (and checked) through the cache's symlinks
