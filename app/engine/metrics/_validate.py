"""Input checks shared by the metric modules (shapes, masks, spacing order)."""
from __future__ import annotations

from typing import Optional

import numpy as np


def _pair(a, b, mask=None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Validate two images of the same shape and an optional mask; return float64 arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"images are empty (shape {a.shape})")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {a.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError(f"mask of shape {mask.shape} selects no voxel")
    return a, b, mask


def _masked(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray]):
    if mask is None:
        return a.ravel(), b.ravel()
    return a[mask], b[mask]


def _spacing_zyx(spacing, ndim: int = 3) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers in xyz order (mm), "
                         f"got {spacing!r}")
    return s[::-1].copy()
