"""Grid geometry for the learned two-stage pipeline (torch, batched, differentiable in ``theta``).

Three coordinate systems, all as homogeneous 4x4 matrices (float64 unless stated):

* **index** - continuous voxel indices of a grid in array order ``(z, y, x)``;
* **physical** - LPS millimetres, ``(x, y, z)`` (the Volume / Transform convention);
* **theta frame** - millimetres along a working grid's index axes ordered ``(z, y, x)``, centred on
  the grid's physical centre; :class:`~app.engine.nn.networks.AffineNet` predicts affines there.

A *physical transform* maps fixed points to moving points (the Transform convention), so an
image is warped by sampling the moving image at ``Gm^-1 T Gf i`` for fixed-grid index ``i``
(:func:`index_map`). Training and inference both go through these functions.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import spatial
from ..types import Volume

_REV = np.eye(4)[[2, 1, 0, 3]]    # swaps (z, y, x) <-> (x, y, z), homogeneous


def grid_matrix(grid: Volume) -> np.ndarray:
    """4x4: homogeneous index ``(z, y, x, 1)`` -> homogeneous physical ``(x, y, z, 1)`` LPS mm."""
    return grid.index_to_world @ _REV


def grid_centre(grid: Volume) -> np.ndarray:
    """Physical (LPS mm, xyz) position of the grid's centre (between the middle voxels)."""
    z, y, x = grid.shape
    return grid.index_to_physical([[(x - 1) / 2, (y - 1) / 2, (z - 1) / 2]])[0]


def theta_frame(grid: Volume) -> np.ndarray:
    """4x4: theta-frame point (centred mm along index axes, zyx) -> physical xyz."""
    m = np.eye(4)
    m[:3, :3] = grid.direction @ _REV[:3, :3]
    m[:3, 3] = grid_centre(grid)
    return m


def _t(a, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=ref.dtype, device=ref.device)


def homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """(B, 3, 4) -> (B, 4, 4)."""
    if theta.dim() != 3 or theta.shape[1:] != (3, 4):
        raise ValueError(f"theta must be (B, 3, 4), got {tuple(theta.shape)}")
    last = torch.zeros(theta.shape[0], 1, 4, dtype=theta.dtype, device=theta.device)
    last[:, 0, 3] = 1
    return torch.cat([theta, last], 1)


def theta_to_physical(theta: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Affine in the theta frame (B, 3, 4) -> physical transform (B, 4, 4): ``C theta C^-1``.

    ``frames`` (B, 4, 4) or (4, 4) are :func:`theta_frame` matrices of the fixed working grids.
    """
    c = frames.to(theta.dtype)
    return c @ homogeneous(theta) @ torch.linalg.inv(c)


def index_map(fixed_grids: torch.Tensor, moving_grids: torch.Tensor, physical: torch.Tensor) -> torch.Tensor:
    """Fixed-grid index -> moving-grid index through a physical transform: ``Gm^-1 T Gf``.

    All (B, 4, 4) (or broadcastable (4, 4)): :func:`grid_matrix` of each grid, transform fixed
    points -> moving points.
    """
    return torch.linalg.inv(moving_grids) @ physical @ fixed_grids


def sample_through(moving: torch.Tensor, index_affine: torch.Tensor, shape_zyx,
                   disp_vox: torch.Tensor | None = None, mode: str = "bilinear",
                   padding_mode: str = "itk") -> torch.Tensor:
    """Sample ``moving`` at ``K (i + disp_vox(i))`` for every index ``i`` of a fixed grid.

    Parameters
    ----------
    moving : (B, C, d, h, w), on its own grid.
    index_affine : (B, 4, 4) fixed index (zyx) -> moving index (zyx), e.g. :func:`index_map`.
    shape_zyx : the fixed grid's shape.
    disp_vox : (B, 3, D, H, W) displacement in fixed-grid voxels (zyx) applied *before* ``K``
        (the deformable stage, estimated after the affine one), or None.

    Returns
    -------
    (B, C, *shape_zyx): ``moving(K(i + u(i)))`` with a single interpolation.
    """
    # Indices in the image's precision (float32 normally): float64 index arithmetic over every
    # voxel is ~10x slower on CPUs, and 1e-7 relative error on indices < 1000 is irrelevant.
    dtype = moving.dtype if moving.dtype in (torch.float32, torch.float64) else torch.float32
    k = index_affine.to(dtype)
    grid = spatial.identity_index_grid(shape_zyx, moving.device, dtype)
    pts = grid if disp_vox is None else grid + disp_vox.to(dtype)
    b = k.shape[0]
    pts = pts.expand(b, -1, -1, -1, -1).reshape(b, 3, -1)
    idx = torch.bmm(k[:, :3, :3], pts) + k[:, :3, 3:]
    idx = idx.reshape(b, 3, *shape_zyx)
    return spatial.sample_at_indices(moving, idx, mode, padding_mode)


def translation(offset_xyz) -> np.ndarray:
    """4x4 physical translation ``x -> x + offset`` (mm, xyz)."""
    m = np.eye(4)
    m[:3, 3] = np.asarray(offset_xyz, float)
    return m
