"""Reading pickles from storage without running code they carry: a refused file is an UnsafePickleError."""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version

# torch.load(weights_only=True) could be made to run code before 2.6 (CVE-2025-32434); every file this platform
# reads from storage goes through it, so an older torch is refused at start-up rather than trusted.
SAFE_TORCH = Version("2.6")


class UnsafePickleError(ValueError):
    """A file asked to import or call something the loader does not allow (it may carry code), or is not a
    readable file of its format; nothing in it ran."""


def _refused_name(err: BaseException) -> str:
    # torch's message buries the offending global in a paragraph of advice meant for trusted files.
    m = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(err))
    return m.group(1) if m else str(err).strip().splitlines()[-1]


def _detail(err: BaseException) -> str:
    # torch wraps the cause in advice about trusted files; the line that says what was wrong is enough.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "Unsupported" in line or "error:" in line.lower()]
    return (specific or lines or ["no detail"])[0][:200]


def require_safe_torch(version: str | None = None) -> None:
    """Refuse a torch whose weights_only loader has a known bypass (UnsafePickleError, one line)."""
    found = Version((version or torch.__version__).split("+")[0])
    if found < SAFE_TORCH:
        raise UnsafePickleError(f"torch {found} is installed, but reading files from storage needs torch >= "
                                f"{SAFE_TORCH} (older weights_only loaders can be made to run code): upgrade torch")


def load_torch_bytes(data: bytes, where: str) -> Any:
    """torch.load restricted to tensors and plain containers (weights_only); refusals name `where`."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # damaged, not a refused import
            raise UnsafePickleError(f"{where}: not a readable torch file ({_detail(err)}); was it cut short or "
                                    "overwritten?") from None
        raise UnsafePickleError(
            f"{where}: refused to load: it needs '{_refused_name(err)}', which is not a tensor or plain "
            "container (dict, list, tuple, str, number). Files the platform writes never do; this one may "
            "carry code and was not executed. Remove it, or re-create it with the stage that writes it") from None
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in many ways inside torch.load; none ran code
        raise UnsafePickleError(f"{where}: not a readable torch file ({type(err).__name__}: {_detail(err)}); was "
                                "it cut short or overwritten?") from None


# ----------------------------------------------------------------------------
# Restricted plain pickles (EDM2's network and statistics pickles): an explicit allow-list of globals


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class only returns what `allowed` maps; anything else is refused.

    `allowed` maps (module, name) to the object to use in its place: the caller decides what each global
    turns into (usually a function building plain state), so nothing the file names is ever imported.
    """

    def __init__(self, file: io.BytesIO, allowed: dict[tuple[str, str], Callable[..., Any] | type],
                 where: str) -> None:
        super().__init__(file)
        self.allowed = allowed
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.where}: refused to load: it needs '{module}.{name}', which is not on the allow-list of "
                "this format; the file may carry code and nothing in it was executed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.where}: refused to load: unexpected persistent id {pid!r} "
                                "(not a plain pickle of this format)")


def restricted_loads(data: bytes, allowed: dict[tuple[str, str], Callable[..., Any] | type], where: str) -> Any:
    """Unpickle data with only the globals in `allowed`; malformed files raise UnsafePickleError too."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, where).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in many ways inside the unpickler; none ran code
        raise UnsafePickleError(f"{where}: not a readable pickle of the expected format ({type(err).__name__}: "
                                f"{err})") from None
