"""Landmark-guided correction: make any result honour a few landmark pairs, and keep the rest.

Where the user sees an error, they place guide pairs ``(f_i, m_i)`` (fixed and moving physical
points, LPS mm). The corrected transform (fixed points -> moving points) is

    T'(x) = T(x) + c(x),   c(x) = sum_i w_i exp(-|x - f_i|^2 / (2 sigma^2))

a Gaussian-RBF field that interpolates the residuals exactly (``c(f_i) = m_i - T(f_i)``, so
``T'(f_i) = m_i``) and fades out a few ``sigma`` away from the guides: far from them the field stays
put. Each guide's width is ``sigma`` narrowed to half the distance to its nearest guide and widened to
1.2 times its residual (:func:`guide_widths`): close guides stay independent and a bump never gets
steep enough to fold. The result is a dense displacement transform on the
fixed grid; the moving image is resampled once through it.

Two methods (``method``):

* ``"rbf"``: the Gaussian-RBF field above, composed on ``T``; it ignores the images. Seconds.
* ``"optimise"`` (image-aware): first :func:`app.engine.optimise.optimise` refines ``T`` with a
  stationary velocity field ``v`` (``T1(x) = T(exp(v)(x))``), minimising local NCC + ``smoothness``
  (diffusion) + ``landmark_weight`` times the mean squared guide distance (mm^2), so the guides pull
  their neighbourhood along the image's structures instead of pushing a bump through it. The
  refinement is then tapered: the corrected displacement is ``u_T + g (u_T1 - u_T)`` with ``g`` a
  Gaussian (``taper_mm``) of the distance to the nearest guide, so the field far from the guides stays
  put. Last, the RBF above snaps the small residual exactly. Tens of seconds on a CPU.

Which to use, measured on IXI inter-subject pairs with label-centroid guides:
``bench/bench_guidance.py`` and ``bench/results/guidance.md``.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np

from . import metrics as M
from .spatial import field_to_transform, transform_to_field
from .types import Landmarks, Progress, Transform, Volume, check_cancel

GUIDE_METHODS = ("rbf", "optimise")

# the image-aware method's optimiser settings (app.engine.optimise.optimise), chosen on 4 IXI TRAINING
# pairs (weakly results, 6 worst label-centroid guides; bench/results/guidance.md): smoothness 8 rather
# than the instance default 0.5 (which moved the held-back centroids 0.3-0.6 mm further off), the
# refinement tapered by a 30 mm Gaussian around the guides so that the rest of the field stays put, and a
# landmark weight of 0.01 / mm^2 (0.05 pulled the guides no closer but dragged their neighbours more)
OPTIMISE_DEFAULTS = {"similarity": "lncc", "smoothness": 8.0, "landmark_weight": 0.01, "levels": (4, 2),
                     "iterations": (60, 30), "taper_mm": 30.0}


def guide_widths(points: np.ndarray, residuals: np.ndarray, sigma_mm: float, floor_mm: float = 2.0) -> np.ndarray:
    """Width (mm) of each guide's Gaussian: ``sigma_mm``, but at most half the distance to the nearest
    other guide (so the interpolation system stays diagonally dominant: a wide Gaussian between close
    guides is ill-conditioned and swings far away), and at least ``1.2 |r_i|`` (a bump of height
    ``r`` and width ``s`` folds when ``r / (s sqrt(e)) > 1``) and ``floor_mm``."""
    n = len(points)
    widths = np.full(n, float(sigma_mm))
    if n > 1:
        d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.diag(np.full(n, np.inf))
        widths = np.minimum(widths, 0.5 * d.min(1))
    return np.maximum(widths, np.maximum(1.2 * np.linalg.norm(residuals, axis=1), floor_mm))


def rbf_weights(points: np.ndarray, residuals: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Weights ``(N, 3)`` of the Gaussian RBFs (one width per guide) interpolating ``residuals`` ``(N, 3)``
    at ``points`` ``(N, 3)``."""
    d2 = np.sum((points[:, None, :] - points[None, :, :]) ** 2, -1)
    k = np.exp(-d2 / (2 * widths[None, :] ** 2))
    return np.linalg.solve(k, residuals)


def rbf_field(grid: Volume, points: np.ndarray, weights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The RBF displacement on every voxel of ``grid``: ``(z, y, x, 3)`` xyz mm."""
    zyx = np.indices(grid.shape).reshape(3, -1).T
    pts = grid.index_to_physical(zyx[:, ::-1])                       # (V, 3) xyz mm
    out = np.zeros((pts.shape[0], 3))
    for p, w, s in zip(points, weights, widths):
        out += np.exp(-np.sum((pts - p) ** 2, 1) / (2 * s ** 2))[:, None] * w
    return out.reshape(*grid.shape, 3)


def guided_correction(fixed: Volume, transform: Transform, guide_fixed: Landmarks, guide_moving: Landmarks, *,
                      sigma_mm: float = 20.0, field: Optional[Volume] = None, method: str = "rbf",
                      moving: Optional[Volume] = None, options: Optional[dict] = None,
                      progress: Optional[Callable[[Progress], None]] = None,
                      cancel: Optional[threading.Event] = None, device: str = "auto"
                      ) -> tuple[Transform, Volume, dict]:
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
        Reach of the RBF correction (mm), narrowed between close guides (:func:`guide_widths`); for
        ``"optimise"`` the reach of the final snap of the residual.
    field : Volume, optional
        ``transform``'s displacement on the fixed grid, when already computed (``"rbf"``).
    method : 'rbf' or 'optimise'
        See the module docstring.
    moving : Volume, optional
        The moving image (needed by ``"optimise"``).
    options : dict, optional
        ``"optimise"``: overrides of :data:`OPTIMISE_DEFAULTS`.
    progress, cancel, device
        ``"optimise"``: reported once per iteration (stage ``"guidance"``), checked every iteration
        (:class:`~app.engine.types.Cancelled`), the torch device. ``"rbf"`` checks ``cancel`` once.

    Returns
    -------
    (corrected Transform, its displacement field Volume ``(z, y, x, 3)`` xyz mm on the fixed grid, info
    dict with ``method``, ``guide_tre_before_mm``, ``guide_tre_after_mm`` (mean), ``widths_mm``,
    ``fold_fraction``, ``seconds``; ``"optimise"`` adds ``guide_tre_optimised_mm`` (before the snap)
    and ``optimise`` (its settings)).
    """
    if method not in GUIDE_METHODS:
        raise ValueError(f"guide method must be one of {', '.join(GUIDE_METHODS)}, got {method!r}")
    f = np.asarray(guide_fixed.points, float)
    m = np.asarray(guide_moving.points, float)
    if f.shape != m.shape or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"guides must be matched (N, 3) point sets, got {f.shape} fixed and {m.shape} moving")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(m))):
        raise ValueError("guide points contain NaN or infinite coordinates")
    if sigma_mm <= 0:
        raise ValueError(f"sigma_mm must be > 0, got {sigma_mm}")
    t0 = time.perf_counter()
    check_cancel(cancel)
    before = float(np.linalg.norm(m - transform.transform_points(f), axis=1).mean())
    extra: dict = {}
    if method == "optimise":
        if moving is None:
            raise ValueError("the 'optimise' guide method needs the moving image")
        opts = dict(OPTIMISE_DEFAULTS)
        unknown = set(options or {}) - set(opts)
        if unknown:
            raise ValueError(f"unknown guide optimise option(s) {sorted(unknown)}; known: {sorted(opts)}")
        opts.update(options or {})
        levels, iterations = _usable_levels(fixed.shape, opts["levels"], opts["iterations"])
        from .optimise import optimise
        res = optimise(fixed, moving, "velocity", initial=transform, similarity=opts["similarity"],
                       weight=float(opts["smoothness"]), levels=levels,
                       iterations=iterations, landmarks=(f, m, float(opts["landmark_weight"])),
                       progress=progress, cancel=cancel, device=device, stage="guidance")
        if opts.get("taper_mm"):
            # keep the refinement near the guides: blend the refined field into the original with a
            # Gaussian of the distance to the nearest guide
            base = field if field is not None else transform_to_field(transform, fixed)
            full = transform_to_field(res.transform, fixed)
            w = np.exp(-_distance_to_points(fixed, f) ** 2 / (2 * float(opts["taper_mm"]) ** 2))[..., None]
            field = base.with_array((base.array + w * (full.array - base.array)).astype(np.float32), name="field")
            transform = field_to_transform(field)
        else:
            transform, field = res.transform, None
        extra = {"device": str(res.device), "guide_tre_optimised_mm": float(np.linalg.norm(m - transform.transform_points(f), axis=1).mean()),
                 "optimise": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
                              "levels_used": list(levels), "iterations_used": list(iterations)}}
        check_cancel(cancel)
    corrected, new, info = _rbf_snap(fixed, transform, f, m, sigma_mm, field)
    info = {"method": method, "guides": int(len(f)), "guide_tre_before_mm": before, **info, **extra,
            "seconds": round(time.perf_counter() - t0, 2)}
    return corrected, new, info


def _distance_to_points(grid: Volume, points: np.ndarray) -> np.ndarray:
    """Distance (mm) from every voxel of ``grid`` to the nearest of ``points`` ``(N, 3)``: ``(z, y, x)``."""
    zyx = np.indices(grid.shape).reshape(3, -1).T
    pts = grid.index_to_physical(zyx[:, ::-1])
    out = np.full(len(pts), np.inf)
    for p in points:
        out = np.minimum(out, np.linalg.norm(pts - p, axis=1))
    return out.reshape(grid.shape)


def _usable_levels(shape, levels, iterations, min_voxels: int = 8) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The pyramid levels (shrink factors) whose grid keeps at least ``min_voxels`` along every axis (a
    local-NCC window needs room), with their iterations; the finest level alone when none does."""
    levels = tuple(int(v) for v in levels)
    its = tuple(int(v) for v in iterations)
    its = its * len(levels) if len(its) == 1 else its
    if len(its) != len(levels):
        raise ValueError(f"one iteration count per level: got levels {levels} and iterations {its}")
    keep = [(lv, it) for lv, it in zip(levels, its) if min(shape) // lv >= min_voxels]
    if not keep:
        keep = [(min(levels), sum(its))]
    return tuple(k[0] for k in keep), tuple(k[1] for k in keep)


def _rbf_snap(fixed: Volume, transform: Transform, f: np.ndarray, m: np.ndarray, sigma_mm: float,
              field: Optional[Volume]) -> tuple[Transform, Volume, dict]:
    """The Gaussian-RBF correction of ``transform`` taking fixed guides ``f`` ``(N, 3)`` onto ``m``."""
    base = field if field is not None else transform_to_field(transform, fixed)
    residual = m - transform.transform_points(f)
    widths = guide_widths(f, residual, sigma_mm, floor_mm=2.0 * min(fixed.spacing))
    corr = rbf_field(fixed, f, rbf_weights(f, residual, widths), widths)
    new = base.with_array((base.array.astype(np.float64) + corr).astype(np.float32), name="field")
    fold = float(np.mean(M.jacobian_determinant(new.array, new.spacing, new.direction) <= 0))
    corrected = field_to_transform(new)
    after = float(np.linalg.norm(corrected.transform_points(f) - m, axis=1).mean())
    info = {"guide_tre_after_mm": after, "widths_mm": [round(float(w), 2) for w in widths], "fold_fraction": fold}
    return corrected, new, info
