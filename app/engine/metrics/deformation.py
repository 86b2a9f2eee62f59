"""Deformation quality: target registration error (mm) and Jacobian determinant statistics
(folding fraction, SDlogJ)."""
from __future__ import annotations

import numpy as np

from ._validate import _spacing_zyx


def tre(fixed_points, moving_points_mapped) -> dict:
    """Target registration error between corresponding points.

    Parameters
    ----------
    fixed_points : (N, 3) array
        Reference points, LPS mm, xyz.
    moving_points_mapped : (N, 3) array
        The corresponding points after mapping into the same space, LPS mm, xyz.

    Returns
    -------
    dict
        ``{"per_point": list of N floats (mm), "mean", "median", "max", "std"}`` (mm; the
        std is the population std). Summary values are NaN when ``N == 0``.
    """
    p = np.asarray(fixed_points, dtype=np.float64)
    q = np.asarray(moving_points_mapped, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"points must be (N, 3) arrays, got fixed {p.shape} and "
                         f"mapped moving {q.shape}")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"point counts differ: {p.shape[0]} fixed points vs "
                         f"{q.shape[0]} mapped moving points")
    d = np.linalg.norm(p - q, axis=1)
    if d.size == 0:
        nan = float("nan")
        return {"per_point": [], "mean": nan, "median": nan, "max": nan, "std": nan}
    return {"per_point": [float(x) for x in d], "mean": float(d.mean()),
            "median": float(np.median(d)), "max": float(d.max()), "std": float(d.std())}


def jacobian_determinant(field_zyx3, spacing, direction=None) -> np.ndarray:
    """Jacobian determinant of ``T(x) = x + u(x)`` for a displacement field in mm.

    Derivatives are central differences (``np.gradient``; one-sided at the borders) with
    respect to the voxel index, converted to physical coordinates by
    ``du/dx_world = (du/d index) @ inv(direction @ diag(spacing))``.

    Parameters
    ----------
    field_zyx3 : (Z, Y, X, 3) array
        Displacement ``u`` in mm, components xyz (LPS), on the grid; every grid axis
        needs at least 2 voxels.
    spacing : (3,) float
        Voxel size in mm, **xyz** order.
    direction : (3, 3) array, optional
        Columns are the world directions of the index axes x, y, z. Default identity.

    Returns
    -------
    (Z, Y, X) np.ndarray of float64
        ``det(I + du/dx)``; ``<= 0`` marks folding.
    """
    u = np.asarray(field_zyx3, dtype=np.float64)
    if u.ndim != 4 or u.shape[3] != 3 or min(u.shape[:3]) < 2:
        raise ValueError(f"field must be (z, y, x, 3) with at least 2 voxels per axis, "
                         f"got shape {u.shape}")
    s_xyz = _spacing_zyx(spacing)[::-1]
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be a 3x3 matrix, got shape {d.shape}")
    m = d @ np.diag(s_xyz)
    if abs(np.linalg.det(m)) < 1e-12:
        raise ValueError(f"direction is singular: {d.tolist()}")
    m_inv = np.linalg.inv(m)
    # grads[a] = du/d(index along array axis a); array axes are (z, y, x) = index (k, j, i)
    gz, gy, gx = np.gradient(u, axis=(0, 1, 2))
    g_index = np.stack([gx, gy, gz], axis=-1)        # (..., 3 components, 3 index axes i j k)
    jac = g_index @ m_inv                             # (..., 3, 3) du_c / dx_world_a
    jac[..., 0, 0] += 1.0
    jac[..., 1, 1] += 1.0
    jac[..., 2, 2] += 1.0
    return (jac[..., 0, 0] * (jac[..., 1, 1] * jac[..., 2, 2] - jac[..., 1, 2] * jac[..., 2, 1])
            - jac[..., 0, 1] * (jac[..., 1, 0] * jac[..., 2, 2] - jac[..., 1, 2] * jac[..., 2, 0])
            + jac[..., 0, 2] * (jac[..., 1, 0] * jac[..., 2, 1] - jac[..., 1, 1] * jac[..., 2, 0]))


def jacobian_stats(jac_det, mask=None, border: int = 0, style: str = "regstation") -> dict:
    """Summary statistics of a Jacobian determinant map (Learn2Reg style).

    Two definitions of SDlogJ are offered. ``style="regstation"`` (default, what RegStation's
    tables report): ``std(log(clip(det, 1e-9, 1e9)))``, the standard deviation of the log
    Jacobian determinant itself. ``style="learn2reg"``: ``std(log(clip(det + 3, 1e-9, 1e9)))``, as
    Learn2Reg's evaluation code computes it (it adds 3 inside the log, which compresses the
    spread: the same field reads several times lower). Both are population standard deviations
    (NumPy's default) over the voxels left after ``border`` and ``mask``.

    Parameters
    ----------
    jac_det : np.ndarray
        Determinants, ``(z, y, x)`` (from :func:`jacobian_determinant`).
    mask : np.ndarray of bool, optional
        Same shape; statistics use only voxels where it is True.
    border : int
        Voxels cropped from every face before the statistics (Learn2Reg crops 2, where
        the differences are one-sided); 0 keeps everything.

    Returns
    -------
    dict
        ``fold_fraction``: fraction of voxels with ``det <= 0``;
        ``sdlogj``: std of ``log(clip(det, 1e-9, 1e9))`` over all voxels (folded voxels
        enter clipped at 1e-9, as in Learn2Reg); with ``style="learn2reg"`` the std of
        ``log(clip(det + 3, 1e-9, 1e9))``;
        ``jac_min``, ``jac_max``: extremes of ``det``.
    """
    if style not in ("regstation", "learn2reg"):
        raise ValueError(f"style must be 'regstation' or 'learn2reg', got {style!r}")
    j = np.asarray(jac_det, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != j.shape:
            raise ValueError(f"mask shape {mask.shape} does not match jac_det shape {j.shape}")
    border = int(border)
    if border < 0 or any(n <= 2 * border for n in j.shape):
        raise ValueError(f"border {border} must be >= 0 and leave voxels in shape {j.shape}")
    if border:
        crop = (slice(border, -border),) * j.ndim
        j = j[crop]
        mask = None if mask is None else mask[crop]
    v = j.ravel() if mask is None else j[mask.astype(bool)]
    if v.size == 0:
        raise ValueError(f"no voxel left for Jacobian statistics (shape {j.shape}, "
                         f"border {border}, mask selects none)")
    return {"fold_fraction": float(np.mean(v <= 0)),
            "sdlogj": float(np.std(np.log(np.clip(v + (3.0 if style == "learn2reg" else 0.0), 1e-9, 1e9)))),
            "jac_min": float(v.min()), "jac_max": float(v.max())}
