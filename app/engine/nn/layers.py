"""Building blocks of the learned paradigms: spatial transformer, velocity integration, resizing.

All tensors are ``(B, C, D, H, W)``. Displacements inside this package are in **voxels of the
grid they live on, channels in array order (z, y, x)**, with the pull-back convention of
:func:`app.engine.spatial.warp_torch`: ``warped(i) = image(i + disp(i))``. They leave the package
only through :func:`app.engine.spatial.voxel_to_physical_field` (xyz LPS mm).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import spatial


def _check_field(disp: torch.Tensor, name: str = "displacement") -> None:
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, D, H, W) in zyx voxels, got {tuple(disp.shape)}")


class SpatialTransformer(nn.Module):
    """Warp an image by a voxel displacement: ``out(i) = image(i + disp_vox(i))``.

    A thin module around :func:`app.engine.spatial.warp_torch` (the one place that converts
    voxel indices to ``grid_sample`` coordinates).

    Parameters
    ----------
    mode : 'bilinear' (trilinear) or 'nearest'
    padding_mode : 'itk' (as ITK's resampler), 'zeros' or 'border'
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "itk"):
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, disp_vox: torch.Tensor) -> torch.Tensor:
        """image (B, C, D, H, W), disp_vox (B, 3, D, H, W) zyx voxels -> (B, C, D, H, W)."""
        return spatial.warp_torch(image, disp_vox, self.mode, self.padding_mode)


def integrate_velocity(v_vox: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    ``phi = exp(v)``: the velocity is scaled by ``2**-steps`` and the resulting small displacement
    composed with itself ``steps`` times (``d <- d + d o (id + d)``), which gives a displacement
    whose map ``i -> i + d(i)`` is (approximately) diffeomorphic.

    Parameters
    ----------
    v_vox : torch.Tensor (B, 3, D, H, W)
        Velocity in voxels of its own grid, channels (z, y, x).
    steps : int >= 0
        Number of squarings (0 returns ``v_vox`` unchanged).

    Returns
    -------
    torch.Tensor (B, 3, D, H, W): displacement in voxels, channels (z, y, x).
    """
    _check_field(v_vox, "velocity")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    disp = v_vox / (2 ** steps)
    for _ in range(steps):
        # Border padding: outside the grid the field continues at its edge value instead of
        # falling to zero (which would create an artificial shear at the boundary).
        disp = disp + spatial.warp_torch(disp, disp, "bilinear", "border")
    return disp


def resize_field(disp_vox: torch.Tensor, shape_zyx) -> torch.Tensor:
    """Resample a voxel displacement to another grid covering the same extent.

    The grids are related as a strided grid and its parent (voxel corners aligned,
    ``align_corners=False``): the field is interpolated trilinearly and each component is
    multiplied by the ratio of the grid sizes along its axis, so the displacement keeps its
    physical length.

    Parameters
    ----------
    disp_vox : torch.Tensor (B, 3, D, H, W), zyx voxels of the input grid
    shape_zyx : 3 ints, the output grid

    Returns
    -------
    torch.Tensor (B, 3, D', H', W'), zyx voxels of the output grid.
    """
    _check_field(disp_vox)
    shape_zyx = tuple(int(s) for s in shape_zyx)
    if tuple(disp_vox.shape[2:]) == shape_zyx:
        return disp_vox
    out = F.interpolate(disp_vox, size=shape_zyx, mode="trilinear", align_corners=False)
    scale = torch.tensor([n / o for n, o in zip(shape_zyx, disp_vox.shape[2:])],
                         dtype=out.dtype, device=out.device).view(1, 3, 1, 1, 1)
    return out * scale


def affine_index_map(matrix: torch.Tensor, shape_zyx) -> torch.Tensor:
    """Dense sampling indices of an index-space affine map.

    Parameters
    ----------
    matrix : torch.Tensor (B, 3, 4) or (B, 4, 4)
        Maps homogeneous voxel indices ``(z, y, x, 1)`` of the output grid to continuous voxel
        indices ``(z, y, x)`` of the image to sample.
    shape_zyx : 3 ints, the output grid

    Returns
    -------
    torch.Tensor (B, 3, D, H, W): indices (z, y, x), for :func:`app.engine.spatial.sample_at_indices`.
    """
    if matrix.dim() != 3 or matrix.shape[1] not in (3, 4) or matrix.shape[2] != 4:
        raise ValueError(f"matrix must be (B, 3, 4) or (B, 4, 4), got {tuple(matrix.shape)}")
    grid = spatial.identity_index_grid(shape_zyx, matrix.device, matrix.dtype)  # (1, 3, D, H, W)
    flat = grid.reshape(3, -1)
    out = torch.einsum("bij,jn->bin", matrix[:, :3, :3], flat) + matrix[:, :3, 3:]
    return out.reshape(matrix.shape[0], 3, *shape_zyx)
