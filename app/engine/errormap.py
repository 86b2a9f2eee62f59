"""Where is a registration likely wrong? Estimated registration-error maps for any result.

A result's transform ``T`` maps fixed physical points to moving physical points (LPS mm). Its true
error at a fixed point ``x`` is ``|T(x) - T*(x)|`` for the unknown correct ``T*``. Three estimators,
all in mm on the fixed grid:

* ``consistency`` (model-free, any paradigm or pipeline): register the reverse direction with the
  same paradigm and parameters, ``R`` mapping moving points to fixed points, and measure the
  inverse-consistency error ``ic(x) = |R(T(x)) - x|`` (zero for a perfectly consistent pair; forward
  and backward errors add up in it), combined with the local dissimilarity after warping
  ``d(x) = 1 - LNCC(fixed, warped)(x)`` (a misaligned edge looks dissimilar even where both
  directions agree):  ``e(x) = a * ic(x) + b * d(x)``, with ``a``, ``b`` fitted by least squares on
  synthetic cases made from *training* subjects (``bench/bench_error_map.py --calibrate``).
* ``dissimilarity`` (the default; no extra registration: seconds): ``e(x) = b' * d(x)`` alone;
* ``tta`` (test-time augmentation, for the fast learned paradigms): register ``samples`` more times,
  each from a small random rigid perturbation of the start (``initial``), and take the per-voxel RMS
  spread of the resulting ``T_k(x)``: ``e(x) = c * spread(x)``.

Validated on held-back subjects warped by known smooth fields (Spearman correlation between the
estimate and the true error over brain voxels): ``bench/results/error_map.md``.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .spatial import transform_to_field
from .types import Progress, ProgressFn, RegistrationResult, Transform, Volume, check_cancel

METHODS = ("consistency", "dissimilarity", "tta")
# e = A_IC * ic + B_DISSIM * d (mm): fitted on training subjects by bench/bench_error_map.py --calibrate
A_IC = 0.523
B_DISSIM = 5.73
# e = B_ONLY * d (mm), the dissimilarity alone
B_ONLY = 8.08
# e = C_TTA * spread (mm): the RMS spread itself, not calibrated (tta ranked the true error poorly on the
# training subjects, rho 0.05-0.25, so it was not worth fitting)
C_TTA = 1.0


def displacement_norm(transform: Transform, reference: Volume) -> np.ndarray:
    """``|transform(x) - x|`` in mm at every voxel of ``reference``, ``(z, y, x)`` float32."""
    f = transform_to_field(transform, reference).array
    return np.sqrt(np.sum(f.astype(np.float64) ** 2, axis=-1)).astype(np.float32)


def inverse_consistency(forward: Transform, reverse: Transform, fixed: Volume) -> np.ndarray:
    """``|reverse(forward(x)) - x|`` (mm) on the fixed grid, ``(z, y, x)``.

    ``forward`` maps fixed points to moving points, ``reverse`` moving points to fixed points.
    """
    return displacement_norm(reverse.then(forward), fixed)


def local_dissimilarity(fixed: Volume, warped: Volume, window_mm: float = 5.0, smooth_mm: float = 4.0) -> np.ndarray:
    """``1 - LNCC`` of the fixed and the warped image in cubic windows of ``window_mm`` (physical size,
    rounded to an odd voxel count per axis), then Gaussian-smoothed with ``smooth_mm`` (registration
    errors are smooth; the raw map follows edges), ``(z, y, x)`` in ``[0, 2]``; 0 where both are flat.

    Window and smoothing were chosen on training subjects (``bench/bench_error_map.py``): a 5 mm
    window smoothed by 4 mm ranked the true error best (Spearman 0.61-0.65 for the learned models,
    against 0.43-0.46 unsmoothed and 0.46-0.52 for a 7-11 mm window).
    """
    from scipy.ndimage import gaussian_filter, uniform_filter
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed {fixed.shape} and warped {warped.shape} must share the grid (z, y, x)")
    size = [max(3, int(round(window_mm / s)) | 1) for s in fixed.spacing[::-1]]   # zyx
    a = fixed.array.astype(np.float64)
    b = warped.array.astype(np.float64)
    ma, mb = uniform_filter(a, size), uniform_filter(b, size)
    va = uniform_filter(a * a, size) - ma * ma
    vb = uniform_filter(b * b, size) - mb * mb
    cov = uniform_filter(a * b, size) - ma * mb
    scale = max(float(np.var(a)), 1e-12)
    eps = 1e-3 * scale
    ncc = cov / np.sqrt(np.maximum(va, 0) * np.maximum(vb, 0) + eps * eps)
    flat = (va < eps) & (vb < eps)
    d = np.where(flat, 0.0, 1.0 - np.clip(ncc, -1.0, 1.0))
    if smooth_mm > 0:
        d = gaussian_filter(d, [smooth_mm / s for s in fixed.spacing[::-1]])
    return d.astype(np.float32)


def _perturbation(rng: np.random.Generator, centre_xyz, rot_deg: float, trans_mm: float) -> Transform:
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in centre_xyz))
    r = np.deg2rad(rng.uniform(-rot_deg, rot_deg, 3))
    t.SetRotation(*map(float, r))
    t.SetTranslation(tuple(map(float, rng.uniform(-trans_mm, trans_mm, 3))))
    return Transform(t, "rigid")


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """Voxel indices (N, 3) zyx of the largest connected piece of ``mask`` (the worst region: the
    centroid of scattered top voxels could fall between them, where the estimate is low)."""
    from scipy.ndimage import label
    lab, n = label(mask)
    if n == 0:
        return np.zeros((0, 3))
    sizes = np.bincount(lab.ravel())[1:]
    return np.argwhere(lab == 1 + int(np.argmax(sizes)))


def estimate_error_map(spec: str, fixed: Volume, moving: Volume, result: RegistrationResult, params=None, *,
                       method: str = "dissimilarity", checkpoint=None, samples: int = 4, seed: int = 0,
                       progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                       device: str = "auto") -> tuple[Volume, dict]:
    """Estimated registration error (mm) of ``result`` at every fixed voxel.

    Parameters
    ----------
    spec : str
        The paradigm or pipeline that produced ``result`` (``"weakly"``, ``"unsupervised+instance"``).
    fixed, moving : Volume
        The pair ``result`` registered (scalar, ``(z, y, x)``, LPS geometry).
    result : RegistrationResult
        Its ``transform`` maps fixed points to moving points; ``warped`` is on the fixed grid.
    params : dict or list, optional
        The parameters ``result`` was run with (as for :func:`app.engine.pipeline.register_pipeline`).
    method : {'dissimilarity', 'consistency', 'tta'}
        See the module docstring; 'dissimilarity' (the default) ranked the true error best in the
        validation and costs seconds.
    samples : int
        ``tta``: extra registrations.

    Returns
    -------
    (Volume of the estimate, ``(z, y, x)`` mm on the fixed grid; dict with ``error_map_mean_mm``,
    ``error_map_p95_mm``, ``error_map_method``, ``error_map_seconds`` and the worst region's centre
    ``error_map_peak_mm`` (LPS xyz of the centroid of the largest connected piece of the head voxels
    above the 99th percentile)).
    """
    from .pipeline import register_pipeline
    if method not in METHODS:
        raise ValueError(f"error map method must be one of {', '.join(METHODS)}, got {method!r}")
    t0 = time.perf_counter()
    check_cancel(cancel)

    def relay(p: Progress) -> None:
        if progress and p.stage != "done":
            progress(Progress("error map", p.iteration, p.total, p.loss, p.fraction,
                              f"error map ({method}): {p.message}"))

    if method == "consistency":
        reverse = register_pipeline(spec, moving, fixed, params, checkpoint=checkpoint, progress=relay,
                                    cancel=cancel, device=device)
        check_cancel(cancel)
        ic = inverse_consistency(result.transform, reverse.transform, fixed)
        d = local_dissimilarity(fixed, result.warped)
        est = A_IC * ic + B_DISSIM * d
        parts = {"inverse_consistency_mean_mm": float(ic.mean()), "dissimilarity_mean": float(d.mean())}
    elif method == "dissimilarity":
        est = B_ONLY * local_dissimilarity(fixed, result.warped)
        parts = {}
    else:
        rng = np.random.default_rng(seed)
        lo, hi = fixed.physical_bounds()
        centre = (np.asarray(lo) + np.asarray(hi)) / 2
        pos = []
        base = transform_to_field(result.transform, fixed).array.astype(np.float64)
        for k in range(int(samples)):
            check_cancel(cancel)
            start = _perturbation(rng, centre, 2.0, 2.0)
            r = register_pipeline(spec, fixed, moving, params, checkpoint=checkpoint, initial=start,
                                  progress=relay, cancel=cancel, device=device)
            pos.append(transform_to_field(r.transform, fixed).array.astype(np.float64) - base)
        stack = np.stack(pos + [np.zeros_like(base)], 0)
        spread = np.sqrt(np.mean(np.sum((stack - stack.mean(0)) ** 2, -1), 0))
        est = C_TTA * spread
        parts = {"tta_samples": int(samples)}
    est = est.astype(np.float32)
    vol = fixed.with_array(est, name="error_map")
    head = fixed.array > np.percentile(fixed.array, 60)          # summary over the head, not the air
    vals = est[head] if head.any() else est.ravel()
    peak = _largest_piece((est >= np.percentile(vals, 99)) & head) if vals.size else np.zeros((0, 3))
    info = {"error_map_method": method, "error_map_mean_mm": float(vals.mean()),
            "error_map_p95_mm": float(np.percentile(vals, 95)),
            "error_map_seconds": round(time.perf_counter() - t0, 3), **parts}
    if len(peak):
        info["error_map_peak_mm"] = [round(float(v), 2) for v in
                                     fixed.index_to_physical(peak.mean(0)[::-1][None])[0]]
    return vol, info
