"""One-file summaries for ``main.py info FILE``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..types import Landmarks, Transform

from .files import TRANSFORM_EXTS, _ext
from .images import _nifti_intent, _nifti_nonfinite, _read_image
from .landmarks import _parse_elastix, read_landmarks
from .transforms import _sniff_text, read_transform


def _geometry(img: sitk.Image) -> dict:
    return {"size": list(img.GetSize()), "spacing": [float(s) for s in img.GetSpacing()],
            "origin": [float(o) for o in img.GetOrigin()],
            "direction": np.asarray(img.GetDirection(), float).reshape(3, 3).round(6).tolist()}


def _looks_like_labels(arr: np.ndarray) -> bool:
    """Integer image with few distinct values that are mostly equal to their neighbour."""
    if not np.issubdtype(arr.dtype, np.integer):
        return False
    if len(np.unique(arr)) > 1000:
        return False
    fg = arr[:, :, 1:] != 0
    if not fg.any():
        return True
    same = arr[:, :, 1:] == arr[:, :, :-1]
    # Labels are piecewise constant; intensities vary voxel to voxel inside the object.
    return bool(same[fg].mean() > 0.5)  # measured: labels ~0.75 (2 mm MUSE), intensities < 0.05


def _describe_transform(t: sitk.Transform) -> dict:
    name = t.GetName()
    d = {"type": Transform(t).kind, "itk_class": name}
    if isinstance(t, sitk.CompositeTransform):
        d["components"] = [_describe_transform(t.GetNthTransform(i).Downcast())
                           for i in range(t.GetNumberOfTransforms())]
        return d
    d["n_parameters"] = len(t.GetParameters())
    if isinstance(t, sitk.DisplacementFieldTransform):
        f = t.GetDisplacementField()
        d["field"] = _geometry(f)
        mag = np.linalg.norm(sitk.GetArrayViewFromImage(f), axis=-1)
        d["max_displacement_mm"] = float(mag.max()) if mag.size else 0.0
    elif isinstance(t, sitk.BSplineTransform):
        d["mesh_size"] = list(t.GetMeshSize())
        d["order"] = t.GetOrder()
    elif hasattr(t, "GetMatrix"):
        d["matrix"] = np.asarray(t.GetMatrix()).reshape(3, 3).tolist()
        d["translation"] = list(t.GetTranslation())
        d["center"] = list(t.GetCenter())
    if len(t.GetParameters()) <= 30:
        d["parameters"] = list(t.GetParameters())
        d["fixed_parameters"] = list(t.GetFixedParameters())
    return d


def _describe_landmarks(lm: Landmarks) -> dict:
    d = {"kind": "landmarks", "count": len(lm), "names": lm.names[:20]}
    if len(lm):
        d["bounds_lps_mm"] = [lm.points.min(0).tolist(), lm.points.max(0).tolist()]
        d["centroid_lps_mm"] = lm.points.mean(0).tolist()
    return d


def describe_file(path) -> dict:
    """Summarise a file for ``main.py info FILE``.

    Returns
    -------
    dict
        Always ``path``, ``kind`` ('image', 'labels' (a guess), 'field', 'transform' or
        'landmarks') and ``file_bytes``. Images/labels/fields add ``size`` (xyz), ``spacing``,
        ``origin`` (LPS mm), ``direction``, ``dtype`` and the value range (labels: the ids; fields:
        displacement magnitude); transforms add type, ITK class and parameters; landmarks the count
        and bounds.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or folder")
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else p.stat().st_size
    base = {"path": str(p), "file_bytes": size}
    ext = _ext(p)
    if ext == ".txt":
        first = _sniff_text(p)
        ext = ".pts" if first in ("point", "index") else ".tfm"
    if ext in (".mrk.json", ".json", ".fcsv", ".csv", ".pts"):
        if ext == ".pts":
            kind, pts = _parse_elastix(p)
            d = _describe_landmarks(Landmarks(pts))
            d["coordinates"] = "voxel index (needs its image)" if kind == "index" else "LPS mm"
            return {**base, **d}
        return {**base, **_describe_landmarks(read_landmarks(p)), "coordinates": "LPS mm"}
    if ext in TRANSFORM_EXTS:
        return {**base, "kind": "transform", **_describe_transform(read_transform(p).itk)}
    img = _read_image(p)
    d = {**base, **_geometry(img), "dtype": img.GetPixelIDTypeAsString()}
    arr = sitk.GetArrayViewFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        d["kind"] = "field" if ncomp == 3 else "vector image"
        d["components"] = ncomp
        if ncomp == 3:
            mag = np.linalg.norm(arr, axis=-1)
            d["max_displacement_mm"] = float(np.nanmax(mag))
            d["mean_displacement_mm"] = float(np.nanmean(mag))
        if ext in (".nii", ".nii.gz"):
            d["nifti_intent"] = _nifti_intent(p)
        return d
    finite = np.isfinite(arr)
    d["nonfinite_voxels"] = int(arr.size - np.count_nonzero(finite))
    if not d["nonfinite_voxels"] and ext in (".nii", ".nii.gz"):
        d["nonfinite_voxels"] = _nifti_nonfinite(p)   # ITK read them as 0
    vals = arr[finite] if d["nonfinite_voxels"] else arr
    d["range"] = [float(vals.min()), float(vals.max())] if vals.size else None
    if _looks_like_labels(arr):
        ids = np.unique(arr)
        ids = ids[ids != 0]
        d["kind"] = "labels"
        d["n_labels"] = int(len(ids))
        d["labels"] = ids[:50].tolist()
    else:
        d["kind"] = "image"
        d["mean"] = float(vals.mean()) if vals.size else None
    return d
