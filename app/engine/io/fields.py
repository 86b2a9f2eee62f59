"""Displacement fields (``(z, y, x, 3)``, components xyz LPS mm) as ITK vector images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..types import Volume
from .files import ImageReadError, _ext
from .images import (_NIFTI_INTENT_DISPVECT, _NIFTI_INTENT_VECTOR, _check_finite, _nifti_intent, _nifti_shape,
                     _read_image, _write_sitk_image)


def read_field(path) -> Volume:
    """Read a displacement field as a vector Volume.

    Parameters
    ----------
    path : str or PathLike
        A 3-component vector image (``.nii``/``.nii.gz``, ``.nrrd``, ``.mha``...). NIfTI files
        must declare intent 1007 (NIFTI_INTENT_VECTOR; components stored in LPS, the ITK/ANTs
        convention) or 1006 (NIFTI_INTENT_DISPVECT; components stored in RAS, converted to LPS by
        ITK on read).

    Returns
    -------
    Volume
        ``array`` ``(z, y, x, 3)``, components xyz LPS mm, such that ``T(x) = x + field(x)``
        (ITK displacement field convention); float32 or float64 as stored.

    Raises
    ------
    ImageReadError
        Bad file (as :func:`read_volume`), wrong number of components, wrong NIfTI intent, NaN/Inf.
    """
    p = Path(path)
    if p.is_file() and _ext(p) in (".nii", ".nii.gz"):
        # Before reading: ITK reads a vector NIfTI without a vector intent as a 5D scalar image.
        intent = _nifti_intent(p)
        vector_shaped = len(shape := _nifti_shape(p)) == 5 and shape[4] == 3
        if intent is not None and vector_shaped and intent not in (_NIFTI_INTENT_DISPVECT, _NIFTI_INTENT_VECTOR):
            raise ImageReadError(f"{p} has NIfTI intent code {intent}; a displacement field must declare "
                                 f"1007 (NIFTI_INTENT_VECTOR) or 1006 (NIFTI_INTENT_DISPVECT)")
    img = _read_image(p)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 3:
        what = "a scalar image" if ncomp == 1 else f"a vector image with {ncomp} components"
        raise ImageReadError(f"{p} is {what}; a 3D displacement field needs 3 components (x, y, z) per voxel")
    if img.GetPixelID() not in (sitk.sitkVectorFloat32, sitk.sitkVectorFloat64):
        img = sitk.Cast(img, sitk.sitkVectorFloat32)
    vol = Volume.from_sitk(img, p.name)
    _check_finite(vol.array, p)
    return vol


def write_field(field: Volume, path) -> None:
    """Write a displacement field (atomically) as an ITK vector image.

    Readable as a displacement field by ITK/SimpleITK, ANTs, elastix and 3D Slicer: components
    are stored xyz in LPS mm; NIfTI files carry intent 1007 (NIFTI_INTENT_VECTOR).

    Parameters
    ----------
    field : Volume
        ``array`` ``(z, y, x, 3)``, float, components xyz LPS mm (``T(x) = x + field(x)``).
        float32 and float64 are kept; other dtypes are written as float32.
    path : str or PathLike
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd``.
    """
    a = field.array
    if a.ndim != 4 or a.shape[3] != 3:
        raise ValueError(f"cannot write {path}: a displacement field must be (z, y, x, 3), got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"cannot write {path}: the field holds NaN/Inf displacements")
    _write_sitk_image(field.with_array(a).to_sitk(), Path(path))
