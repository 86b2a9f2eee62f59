"""Resampling, dense fields and transforms, all in physical (LPS mm) space.

Conventions: a :class:`~app.engine.types.Transform` maps fixed physical points to moving
physical points; a displacement ``field`` is a Volume of shape ``(z, y, x, 3)`` on the fixed grid
whose components are xyz LPS millimetres, with ``T(x) = x + field(x)``.

The torch functions at the end serve the learned paradigms. Two functions hold the only
conversions the rest of the code may use:

* :func:`voxel_to_physical_field` (and its inverse): network displacements in *voxels of the fixed
  grid*, channels in array order ``(z, y, x)``, <-> physical displacements in mm (xyz, LPS).
* :func:`grid_sample_coords`: continuous voxel indices (array order) -> the ``[-1, 1]``
  coordinates with channels reversed to ``(x, y, z)`` that ``torch.nn.functional.grid_sample``
  expects (``align_corners=True``).

torch is imported lazily so that the GUI and the conventional paradigm never load it.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .types import LabelMap, Transform, Volume

_INTERP = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "label": sitk.sitkLabelGaussian,
}


# --------------------------------------------------------------------------- SimpleITK side
def resample(moving: Volume, reference: Volume, transform: Transform | None = None,
             interpolation: str = "linear", default_value: float = 0.0) -> Volume:
    """Resample ``moving`` onto ``reference``'s grid: ``out(x) = moving(T(x))``.

    Parameters
    ----------
    moving : Volume
        Image to resample (any grid).
    reference : Volume
        Defines the output grid (shape, spacing, origin, direction).
    transform : Transform, optional
        Fixed (reference) physical points -> moving physical points. Identity if None.
    interpolation : {'linear', 'nearest', 'bspline'}
        'nearest' keeps integer labels; label maps are always resampled with nearest.

    Returns
    -------
    Volume (or LabelMap when ``moving`` is one) on the reference grid.
    """
    if interpolation not in _INTERP:
        raise ValueError(f"unknown interpolation '{interpolation}'; use one of {', '.join(_INTERP)}")
    is_labels = isinstance(moving, LabelMap)
    if is_labels:
        interpolation = "nearest"
    tx = (transform or Transform.identity()).itk
    img = moving.to_sitk()
    if not is_labels and not moving.is_vector and img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    ref = sitk.Image(reference.size_xyz, sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(tuple(reference.direction.reshape(-1)))
    out = sitk.Resample(img, ref, tx, _INTERP[interpolation], float(default_value), img.GetPixelID())
    v = Volume.from_sitk(out, name=moving.name)
    return LabelMap.from_volume(v) if is_labels else v


def transform_to_field(transform: Transform, reference: Volume) -> Volume:
    """Dense displacement ``T(x) - x`` (xyz mm, LPS) sampled on ``reference``'s grid.

    Returns a Volume of shape ``(z, y, x, 3)`` float32.
    """
    f = sitk.TransformToDisplacementField(
        transform.itk, sitk.sitkVectorFloat64, reference.size_xyz, reference.origin,
        reference.spacing, tuple(reference.direction.reshape(-1)))
    v = Volume.from_sitk(f, name="field")
    v.array = v.array.astype(np.float32)
    return v


def field_to_transform(field: Volume) -> Transform:
    """A displacement field Volume ``(z, y, x, 3)`` (xyz mm) -> ITK displacement-field Transform."""
    if not field.is_vector or field.array.shape[-1] != 3:
        raise ValueError(f"a displacement field must have shape (z, y, x, 3), got {field.array.shape}")
    img = field.to_sitk(sitk.sitkVectorFloat64)
    return Transform(sitk.DisplacementFieldTransform(img), "displacement")


def compose(*stages: Transform) -> Transform:
    """Compose stages in the order they were estimated (first = applied last to fixed points)."""
    out = Transform.identity()
    for t in stages:
        out = out.then(t)
    return out


def jacobian_map(field: Volume) -> Volume:
    """Jacobian determinant of ``x -> x + field(x)`` on the field's grid, as a scalar Volume."""
    from .metrics import jacobian_determinant
    det = jacobian_determinant(field.array, field.spacing, field.direction)
    return field.with_array(det.astype(np.float32), name="jacobian")


def deformation_grid(field: Volume, every_vox: int = 6, thickness: int = 1) -> Volume:
    """A grid-line image showing how a regular grid is deformed by the transform.

    Lines of a regular grid drawn in *moving* space (every ``every_vox`` voxels along each axis)
    are pulled back onto the fixed grid through ``T(x) = x + field(x)``, so straight lines bend
    where the registration deforms the moving image. Returns values in [0, 1] on the field's grid
    ``(z, y, x)``; render one slice of it over the fixed image.
    """
    if every_vox < 2:
        raise ValueError(f"grid spacing must be at least 2 voxels, got {every_vox}")
    shape = field.shape
    lines = np.zeros(shape, np.float32)
    idx = [np.arange(n) for n in shape]
    for ax in range(3):
        on = (idx[ax] % every_vox) < thickness
        sl = [slice(None)] * 3
        sl[ax] = on
        lines[tuple(sl)] = 1.0
    grid = field.with_array(lines, name="grid")
    return resample(grid, field.with_array(np.zeros(shape, np.float32)), field_to_transform(field), "linear")


# --------------------------------------------------------------------------- torch side
def axial_slice(array_zyx: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The middle axial slice of a 3D array on a grid with ``direction`` (3x3, columns = the physical
    LPS directions of the x, y, z index axes), shown as radiologists read it: rows from anterior to
    posterior, columns from the patient's right to left (the axial view's orientation).

    Works for any axis permutation / flip (the nearest axis to each physical one is taken; oblique
    grids are shown along their closest axes). Returns a 2D view of ``array_zyx``.
    """
    a = np.asarray(array_zyx)
    if a.ndim != 3:
        raise ValueError(f"axial_slice needs a 3D array, got shape {a.shape}")
    d = np.abs(np.asarray(direction, float).reshape(3, 3))
    # physical axis (0 = x/L, 1 = y/P, 2 = z/S) -> array axis (zyx order: index axis i is array axis 2 - i)
    order = [int(i) for i in np.argsort(-d.max(axis=1))]
    used: dict[int, int] = {}
    for phys in order:                                   # the most clear-cut physical axes choose first
        cands = [i for i in np.argsort(-d[phys]) if i not in used.values()]
        used[phys] = int(cands[0])
    arr_axis = {phys: 2 - idx for phys, idx in used.items()}
    sl = np.take(a, a.shape[arr_axis[2]] // 2, axis=arr_axis[2])
    rest = [ax for ax in range(3) if ax != arr_axis[2]]              # the two remaining array axes, in order
    rows_first = rest.index(arr_axis[1]) == 0
    out = sl if rows_first else sl.T
    direction = np.asarray(direction, float).reshape(3, 3)
    if direction[1, used[1]] < 0:                        # rows must run towards posterior (+y in LPS)
        out = out[::-1]
    if direction[0, used[0]] < 0:                        # columns towards the patient's left (+x in LPS)
        out = out[:, ::-1]
    return out


def voxel_to_physical_field(disp_vox, volume: Volume):
    """Network displacement in fixed-grid voxels -> physical displacement in mm.

    Parameters
    ----------
    disp_vox : torch.Tensor or np.ndarray, shape (B, 3, D, H, W) or (3, D, H, W)
        Displacement in voxel units of ``volume``'s grid, channels in array order (z, y, x).
    volume : Volume
        The grid (spacing, direction) the network works on.

    Returns
    -------
    Same type, shape (..., 3, D, H, W): xyz components in LPS mm.
    """
    m = volume.direction @ np.diag(volume.spacing)  # index xyz -> world xyz
    return _apply_channel_matrix(_flip_channels(disp_vox), m)


def physical_to_voxel_field(disp_mm, volume: Volume):
    """Inverse of :func:`voxel_to_physical_field`: (.., 3 xyz mm, D, H, W) -> (.., 3 zyx voxels, D, H, W)."""
    m = np.linalg.inv(volume.direction @ np.diag(volume.spacing))
    return _flip_channels(_apply_channel_matrix(disp_mm, m))


def _flip_channels(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return torch.flip(x, dims=[x.dim() - 4])
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.flip(x, axis=x.ndim - 4).copy()


def _apply_channel_matrix(x, m: np.ndarray):
    """Multiply the 3-vector in the channel axis (dim -4) by matrix ``m`` (3x3)."""
    import torch
    if isinstance(x, torch.Tensor):
        mt = torch.as_tensor(m, dtype=x.dtype, device=x.device)
        return torch.einsum("ij,...jdhw->...idhw", mt, x)
    return np.einsum("ij,...jdhw->...idhw", m, x)


def grid_sample_coords(index_zyx, shape_zyx):
    """Continuous voxel indices -> normalised ``grid_sample`` coordinates.

    Parameters
    ----------
    index_zyx : torch.Tensor, shape (B, 3, D, H, W)
        Continuous indices into an image of shape ``shape_zyx``, channels (z, y, x).
    shape_zyx : tuple of 3 ints
        Spatial shape of the image being sampled.

    Returns
    -------
    torch.Tensor, shape (B, D, H, W, 3), last axis ordered (x, y, z) in [-1, 1]
    (``align_corners=True``: -1 and 1 are the centres of the first and last voxels).
    """
    import torch
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape_zyx], dtype=index_zyx.dtype,
                         device=index_zyx.device).view(1, 3, 1, 1, 1)
    norm = index_zyx * scale - 1.0
    return norm.permute(0, 2, 3, 4, 1).flip(-1)


def identity_index_grid(shape_zyx, device=None, dtype=None):
    """Voxel index grid (1, 3, D, H, W), channels (z, y, x)."""
    import torch
    rng = [torch.arange(s, device=device, dtype=dtype or torch.float32) for s in shape_zyx]
    return torch.stack(torch.meshgrid(*rng, indexing="ij"), 0).unsqueeze(0)


def sample_at_indices(image, index_zyx, mode: str = "bilinear", padding_mode: str = "itk"):
    """Sample ``image`` at continuous voxel indices.

    Parameters
    ----------
    image : torch.Tensor (B, C, D, H, W)
    index_zyx : torch.Tensor (B, 3, D', H', W'), channels (z, y, x), voxels of ``image``
    padding_mode : 'itk' (as ITK's resampler: edge values within half a voxel beyond the edge
        centres, 0 further out), 'zeros' or 'border' (torch's own modes)
    """
    import torch
    import torch.nn.functional as F
    coords = grid_sample_coords(index_zyx, image.shape[2:]).to(image.dtype)
    torch_pad = "border" if padding_mode == "itk" else padding_mode
    out = F.grid_sample(image, coords, mode=mode, padding_mode=torch_pad, align_corners=True)
    if padding_mode == "itk":
        hi = torch.as_tensor(image.shape[2:], dtype=index_zyx.dtype, device=index_zyx.device).view(1, 3, 1, 1, 1) - 0.5
        inside = ((index_zyx >= -0.5) & (index_zyx <= hi)).all(1, keepdim=True)
        out = out * inside.to(out.dtype)
    return out


def warp_torch(image, disp_vox, mode: str = "bilinear", padding_mode: str = "itk"):
    """Warp ``image`` by a displacement in its own voxels: ``out(i) = image(i + disp(i))``.

    Parameters
    ----------
    image : torch.Tensor (B, C, D, H, W)
    disp_vox : torch.Tensor (B, 3, D, H, W), voxels, channels (z, y, x)
    mode : 'bilinear' (trilinear in 3D) or 'nearest'
    padding_mode : see :func:`sample_at_indices`
    """
    if image.dim() != 5 or disp_vox.dim() != 5 or disp_vox.shape[1] != 3:
        raise ValueError(f"expected image (B, C, D, H, W) and displacement (B, 3, D, H, W), "
                         f"got {tuple(image.shape)} and {tuple(disp_vox.shape)}")
    if image.shape[2:] != disp_vox.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} and displacement grid "
                         f"{tuple(disp_vox.shape[2:])} differ")
    grid = identity_index_grid(image.shape[2:], image.device, disp_vox.dtype) + disp_vox
    return sample_at_indices(image, grid, mode, padding_mode)


def warp_volume_torch(moving: Volume, fixed: Volume, field_mm: np.ndarray | None = None,
                      mode: str = "bilinear", device: str = "cpu") -> Volume:
    """Resample ``moving`` onto ``fixed``'s grid through ``T(x) = x + field_mm(x)`` with torch.

    The torch counterpart of :func:`resample` with a displacement-field transform; both grids may
    differ in shape, spacing, origin and direction.

    Parameters
    ----------
    field_mm : np.ndarray (z, y, x, 3), xyz LPS mm on the fixed grid, or None (identity).
    """
    import torch
    shape = fixed.shape
    idx = identity_index_grid(shape, device, torch.float64)[0]          # (3, D, H, W) zyx
    idx_xyz = idx.flip(0).reshape(3, -1)
    m_f = torch.as_tensor(fixed.direction @ np.diag(fixed.spacing), dtype=torch.float64, device=device)
    pts = m_f @ idx_xyz + torch.as_tensor(fixed.origin, dtype=torch.float64, device=device)[:, None]
    if field_mm is not None:
        fm = np.asarray(field_mm, np.float64)
        if fm.shape != (*shape, 3):
            raise ValueError(f"field shape {fm.shape} does not match the fixed grid {shape} + (3,)")
        pts = pts + torch.as_tensor(fm.reshape(-1, 3).T, device=device)
    m_m_inv = torch.as_tensor(np.linalg.inv(moving.direction @ np.diag(moving.spacing)), dtype=torch.float64, device=device)
    mov_idx_xyz = m_m_inv @ (pts - torch.as_tensor(moving.origin, dtype=torch.float64, device=device)[:, None])
    mov_idx_zyx = mov_idx_xyz.flip(0).reshape(1, 3, *shape)
    img = torch.as_tensor(np.ascontiguousarray(moving.array, dtype=np.float32), device=device)[None, None]
    out = sample_at_indices(img.double(), mov_idx_zyx, mode, "itk")
    return fixed.with_array(out[0, 0].float().cpu().numpy(), name=moving.name)
