"""Inputs of :func:`app.engine.optimise.optimise`: their checks and their tensors.

The images, the schedule (levels, iterations) and the landmarks are checked (``ValueError`` naming
what was wrong); label maps become one-hot tensors of the labels present in both (fixed on its grid,
moving on the grid the model samples), a mask a fixed-grid weight tensor, and the landmark term
(:func:`_landmark_sq_distance`, mm^2) maps the fixed landmarks through the model and the initial
transform (:func:`_initial_points`).

Every name is re-exported by :mod:`app.engine.optimise`.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from . import spatial
from .nn.geometry import grid_matrix
from .optimise_grids import _linear_matrix, _tensor
from .optimise_models import _is_linear
from .types import LabelMap, Transform, Volume

def _check_image(v: Volume, name: str) -> None:
    if not isinstance(v, Volume):
        raise ValueError(f"{name} must be a Volume, got {type(v).__name__}")
    if v.is_vector:
        raise ValueError(f"{name} must be a scalar volume (z, y, x), got shape {v.array.shape}")
    if min(v.shape) < 4:
        raise ValueError(f"{name} is too small to register: shape {v.shape} (z, y, x)")


def _check_schedule(levels, iterations) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shrink factors and iterations per level (``"4,2,1"``, a number or a sequence each)."""
    from .paradigms.base import parse_number_list
    lv = parse_number_list(levels, int, "levels")
    it = parse_number_list(iterations, int, "iterations")
    if any(v < 1 or v > 64 for v in lv):
        raise ValueError(f"levels must be shrink factors between 1 and 64, got {levels!r}")
    if any(v < 0 for v in it):
        raise ValueError(f"iterations must be integers >= 0, got {iterations!r}")
    if len(it) == 1:
        it = it * len(lv)
    if len(it) != len(lv):
        raise ValueError(f"iterations gives {len(it)} numbers for {len(lv)} levels ({iterations!r} vs {levels!r})")
    return lv, it


def _check_landmarks(landmarks):
    if landmarks is None:
        return None
    if not isinstance(landmarks, (tuple, list)) or len(landmarks) != 3:
        raise ValueError("landmarks must be (fixed_points, moving_points, weight)")
    fp, mp, w = landmarks
    fp = np.asarray(getattr(fp, "points", fp), float)
    mp = np.asarray(getattr(mp, "points", mp), float)
    if fp.ndim != 2 or fp.shape[1] != 3 or fp.shape != mp.shape or len(fp) == 0:
        raise ValueError(f"landmarks must be two (N, 3) arrays of LPS mm with N >= 1 matched by row, "
                         f"got {fp.shape} and {mp.shape}")
    if not np.all(np.isfinite(fp)) or not np.all(np.isfinite(mp)):
        raise ValueError("landmarks contain NaN or infinite coordinates")
    if not float(w) >= 0:
        raise ValueError(f"landmark weight must be >= 0, got {w!r}")
    return fp, mp, float(w)


def _label_tensors(labels, fixed: Volume, mgrid: Volume, through: Optional[Transform], dev):
    """One-hot (1, K, ...) float32 maps of the labels present in both: fixed on its grid, moving on ``mgrid``."""
    if labels is None:
        return None
    if not isinstance(labels, (tuple, list)) or len(labels) != 2:
        raise ValueError("labels must be (fixed_labels, moving_labels)")
    fl, ml = labels
    for name, v in (("fixed_labels", fl), ("moving_labels", ml)):
        if not isinstance(v, Volume) or v.is_vector:
            raise ValueError(f"{name} must be a scalar label map (LabelMap), got {type(v).__name__}")
    fl = fl if fl.same_grid(fixed) else spatial.resample(LabelMap.from_volume(fl), fixed, None, "nearest")
    if through is not None and through.kind != "identity" or not ml.same_grid(mgrid):
        ml = spatial.resample(LabelMap.from_volume(ml), mgrid, through, "nearest")
    fa, ma = np.asarray(fl.array), np.asarray(ml.array)
    common = np.intersect1d(np.unique(fa), np.unique(ma))
    common = common[common != 0]
    if common.size == 0:
        raise ValueError("the fixed and moving label maps share no non-zero label")
    f1 = np.stack([(fa == k) for k in common]).astype(np.float32)
    m1 = np.stack([(ma == k) for k in common]).astype(np.float32)
    return (torch.as_tensor(f1, device=dev)[None], torch.as_tensor(m1, device=dev)[None])


def _mask_tensor(mask: Optional[Volume], fixed: Volume, dev):
    if mask is None:
        return None
    if not isinstance(mask, Volume) or mask.is_vector:
        raise ValueError(f"mask must be a scalar Volume, got {type(mask).__name__}")
    m = mask if mask.same_grid(fixed) else spatial.resample(LabelMap.from_volume(
        mask.with_array((np.asarray(mask.array) != 0).astype(np.int32))), fixed, None, "nearest")
    a = (np.asarray(m.array) != 0).astype(np.float32)
    if not a.any():
        raise ValueError("the mask is empty on the fixed grid")
    return _tensor(a, dev)


def _initial_points(t: Transform, fixed: Volume, dev) -> Optional[Callable]:
    """``y -> T0(y)`` for (N, 3) torch points (xyz mm), differentiable in ``y``.

    A non-linear ``T0`` is sampled as a dense displacement on the fixed grid and interpolated
    trilinearly (edge values outside).
    """
    if t.kind == "identity":
        return None
    if t.is_linear:
        m = torch.as_tensor(_linear_matrix(t), dtype=torch.float64, device=dev)
        return lambda y: y @ m[:3, :3].T + m[:3, 3]
    d0 = spatial.transform_to_field(t, fixed).array                             # (z, y, x, 3) xyz mm
    d0_t = torch.as_tensor(np.moveaxis(d0, -1, 0)[None].copy(), dtype=torch.float64, device=dev)
    g_inv = torch.as_tensor(np.linalg.inv(grid_matrix(fixed)), dtype=torch.float64, device=dev)

    def apply(y):
        idx = y @ g_inv[:3, :3].T + g_inv[:3, 3]                               # (N, 3) zyx index
        d = spatial.sample_at_indices(d0_t, idx.T.reshape(1, 3, -1, 1, 1), "bilinear", "border")
        return y + d.reshape(3, -1).T
    return apply


def _landmark_sq_distance(model, lm_t, disp_l, gf_l: torch.Tensor, pre_t: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (mm^2) between ``T(fixed landmark)`` and the moving landmark."""
    fp, mp, _, t0 = lm_t
    if _is_linear(model):
        m = pre_t @ model.matrix()
        y = fp @ m[:3, :3].T + m[:3, 3]
    else:
        g_inv = torch.linalg.inv(gf_l)
        idx = fp @ g_inv[:3, :3].T + g_inv[:3, 3]                               # (N, 3) level index zyx
        u = spatial.sample_at_indices(disp_l.double(), idx.T.reshape(1, 3, -1, 1, 1), "bilinear", "border")
        u_vox = u.reshape(3, -1).T                                              # (N, 3) zyx voxels
        y = fp + u_vox @ gf_l[:3, :3].T                                         # level index vector -> mm
    if t0 is not None:
        y = t0(y)
    return torch.mean(torch.sum((y - mp) ** 2, dim=1))
