"""One converter from engine values (numpy, paths, tensors, NaN) to plain JSON values.

Used wherever the engine writes JSON or plain metadata: metrics files, evaluation summaries,
checkpoint metadata and cards, ``main.py info``. Imports neither torch nor Qt.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Any

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(obj: Any, *, nonfinite_to_none: bool = True) -> Any:
    """Convert ``obj`` recursively into values :func:`json.dumps` writes as strict JSON.

    Parameters
    ----------
    obj : Any
        dict, list, tuple, set, numpy scalar or array, torch tensor (anything with ``tolist``),
        ``os.PathLike``, enum, dataclass instance, or a plain value.
    nonfinite_to_none : bool
        True (default): NaN and +-Inf become None (``null``), as strict JSON has no NaN.
        False: they stay floats (for metadata that is not written as JSON, e.g. inside a
        checkpoint, where NaN is a meaningful value).

    Returns
    -------
    Any
        dicts (keys as ``str``), lists (from tuples, sets and arrays), ``bool``, ``int``,
        ``float``, ``str`` or None. Anything else is written as ``str(obj)``.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nonfinite_to_none=nonfinite_to_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, nonfinite_to_none=nonfinite_to_none) for v in obj]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return None if nonfinite_to_none and not math.isfinite(f) else f
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), nonfinite_to_none=nonfinite_to_none)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, nonfinite_to_none=nonfinite_to_none)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), nonfinite_to_none=nonfinite_to_none)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy-like arrays
        return to_jsonable(obj.tolist(), nonfinite_to_none=nonfinite_to_none)
    return str(obj)
