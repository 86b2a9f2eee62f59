"""Landmark-guided correction: make any result honour a few landmark pairs, and keep the rest.

Where the user sees an error, they place guide pairs ``(f_i, m_i)`` (fixed and moving physical
points, LPS mm). The corrected transform (fixed points -> moving points) is

    T'(x) = T(x) + c(x),   c(x) = sum_i w_i exp(-|x - f_i|^2 / (2 sigma^2))

a Gaussian-RBF field that interpolates the residuals exactly (``c(f_i) = m_i - T(f_i)``, so
``T'(f_i) = m_i``) and fades out a few ``sigma`` away from the guides: far from them the field stays
put. ``sigma`` grows (up to 4 times) when the correction would fold the field, i.e. when the
residuals are large for the guides' spacing. The result is a dense displacement transform on the
fixed grid; the moving image is resampled once through it.
"""
from __future__ import annotations

import numpy as np

from . import metrics as M
from .spatial import field_to_transform, transform_to_field
from .types import Landmarks, Transform, Volume


def rbf_weights(points: np.ndarray, residuals: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Weights ``(N, 3)`` of the Gaussian RBF interpolating ``residuals`` ``(N, 3)`` at ``points`` ``(N, 3)``."""
    d2 = np.sum((points[:, None, :] - points[None, :, :]) ** 2, -1)
    k = np.exp(-d2 / (2 * sigma_mm ** 2)) + 1e-9 * np.eye(len(points))
    return np.linalg.solve(k, residuals)


def rbf_field(grid: Volume, points: np.ndarray, weights: np.ndarray, sigma_mm: float) -> np.ndarray:
    """The RBF displacement on every voxel of ``grid``: ``(z, y, x, 3)`` xyz mm."""
    zyx = np.indices(grid.shape).reshape(3, -1).T
    pts = grid.index_to_physical(zyx[:, ::-1])                       # (V, 3) xyz mm
    out = np.zeros((pts.shape[0], 3))
    for p, w in zip(points, weights):
        out += np.exp(-np.sum((pts - p) ** 2, 1) / (2 * sigma_mm ** 2))[:, None] * w
    return out.reshape(*grid.shape, 3)


def guided_correction(fixed: Volume, transform: Transform, guide_fixed: Landmarks, guide_moving: Landmarks, *,
                      sigma_mm: float = 20.0, field: Volume | None = None) -> tuple[Transform, Volume, dict]:
    """Correct ``transform`` so that it maps every fixed guide onto its moving partner.

    Parameters
    ----------
    fixed : Volume
        The fixed image (its grid carries the corrected field).
    transform : Transform
        Fixed physical points -> moving physical points (any kind).
    guide_fixed, guide_moving : Landmarks
        Matched guide pairs, ``(N, 3)`` LPS mm each, N >= 1.
    sigma_mm : float
        Reach of the correction (mm); grown when the correction would fold.
    field : Volume, optional
        ``transform``'s displacement on the fixed grid, when already computed.

    Returns
    -------
    (corrected Transform, its displacement field Volume ``(z, y, x, 3)`` mm, info dict with
    ``guide_tre_before_mm``, ``guide_tre_after_mm`` (mean), ``sigma_mm``, ``fold_fraction``).
    """
    f = np.asarray(guide_fixed.points, float)
    m = np.asarray(guide_moving.points, float)
    if f.shape != m.shape or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"guides must be matched (N, 3) point sets, got {f.shape} fixed and {m.shape} moving")
    if sigma_mm <= 0:
        raise ValueError(f"sigma_mm must be > 0, got {sigma_mm}")
    base = field if field is not None else transform_to_field(transform, fixed)
    residual = m - transform.transform_points(f)
    before = float(np.linalg.norm(residual, axis=1).mean())
    info: dict = {"guides": int(len(f)), "guide_tre_before_mm": before}
    base_fold = float(np.mean(M.jacobian_determinant(base.array, base.spacing, base.direction) <= 0))
    for grow in (1.0, 1.5, 2.0, 3.0, 4.0):
        sigma = sigma_mm * grow
        corr = rbf_field(fixed, f, rbf_weights(f, residual, sigma), sigma)
        new = base.with_array((base.array.astype(np.float64) + corr).astype(np.float32), name="field")
        jac = M.jacobian_determinant(new.array, new.spacing, new.direction)
        fold = float(np.mean(jac <= 0))
        if fold <= base_fold + 1e-6:
            break
    corrected = field_to_transform(new)
    after = float(np.linalg.norm(corrected.transform_points(f) - m, axis=1).mean())
    info.update(guide_tre_after_mm=after, sigma_mm=sigma, fold_fraction=fold)
    return corrected, new, info
