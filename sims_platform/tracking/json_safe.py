"""Results as strict JSON: the non-finite floats of a diverged w or a one-repeat sd become null."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def json_safe(x: Any) -> Any:
    """x with every NaN/inf float (in nested mappings, lists and tuples too) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
