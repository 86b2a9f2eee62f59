"""Grids and sampling of :func:`app.engine.optimise.optimise`: how the moving image is sampled.

* :func:`_working`: the image the model samples (the moving image on its own grid for a linear model
  with a linear initial transform, else the *working image*: ``moving`` resampled once through the
  initial transform onto the fixed grid) and the matrix in front of the model;
* :func:`_sampler`: the warp of that image onto a pyramid level of the fixed grid at the model's
  current parameters (a linear model samples through one 4x4 index map, a field model warps with
  its displacement);
* the pyramid: :func:`_downsample` (box averaging, corners aligned) and :func:`_level_scale` (level
  index -> full-grid index); :func:`_linear_matrix` (4x4 xyz mm of a linear Transform) and
  :func:`_tensor` (array -> (1, 1, D, H, W) float32).

Every name is re-exported by :mod:`app.engine.optimise`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import spatial
from .nn.geometry import sample_through
from .optimise_models import _is_linear
from .types import Transform, Volume

def _tensor(a: np.ndarray, dev) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=dev)[None, None]


def _downsample(img: torch.Tensor, shape) -> torch.Tensor:
    """Area (box) downsampling of (B, C, D, H, W) to ``shape``; the full grid is returned as is.

    Box averaging keeps the grids related as a strided grid and its parent (corners aligned), as
    :func:`app.engine.nn.layers.resize_field` and :func:`_level_scale` assume.
    """
    if tuple(img.shape[2:]) == tuple(shape):
        return img
    return F.adaptive_avg_pool3d(img, tuple(shape))


def _level_scale(full_shape, level_shape) -> np.ndarray:
    """4x4: level-grid index (z, y, x) -> full-grid index of the same point (corners aligned)."""
    s = np.eye(4)
    for ax, (n_full, n_level) in enumerate(zip(full_shape, level_shape)):
        r = n_full / n_level
        s[ax, ax] = r
        s[ax, 3] = 0.5 * r - 0.5
    return s


def _linear_matrix(t: Transform) -> np.ndarray:
    """4x4 homogeneous matrix (xyz mm) of a linear Transform, from the images of 4 points."""
    pts = np.vstack([np.zeros(3), np.eye(3)])
    img = t.transform_points(pts)
    m = np.eye(4)
    m[:3, 3] = img[0]
    m[:3, :3] = (img[1:] - img[0]).T
    return m


def _working(linear: bool, fixed: Volume, moving: Volume, init_t: Transform, folded: bool):
    """(image to sample, its grid, 4x4 matrix in front of the model) for the model kind and initial.

    Linear models with a linear initial transform sample the moving image on its own grid (the
    initial is folded into the model, or kept as the matrix in front of it); everything else
    samples the working image: ``moving`` resampled once through ``init_t`` onto the fixed grid.
    """
    if linear and init_t.is_linear:
        return moving, moving, (np.eye(4) if folded or init_t.kind == "identity" else _linear_matrix(init_t))
    if init_t.kind == "identity" and moving.same_grid(fixed):
        return moving, fixed, np.eye(4)
    return spatial.resample(moving, fixed, init_t, "linear"), fixed, np.eye(4)


def _sampler(model, shape_zyx, gm_inv: torch.Tensor, pre: torch.Tensor, gf: torch.Tensor, padding_mode: str):
    """(warp(image) -> image on the fixed-level grid, level displacement or None) for the current parameters.

    ``gf`` maps the fixed level grid's indices to physical points, ``gm_inv`` physical points to the
    sampled image's indices (4x4, float64); ``pre`` is the matrix in front of a linear model.
    """
    if _is_linear(model):
        k = gm_inv @ pre @ model.matrix() @ gf
        return (lambda img: sample_through(img, k[None], shape_zyx, padding_mode=padding_mode)), None
    disp = model.displacement(shape_zyx)
    return (lambda img: spatial.warp_torch(img, disp, padding_mode=padding_mode)), disp
