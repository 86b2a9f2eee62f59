"""Scalar images and label maps: reading (NIfTI, NRRD, MetaImage, DICOM series) with every file
check, and writing; NIfTI header helpers shared with :mod:`.fields`."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..types import LabelMap, Volume
from .files import IMAGE_EXTS, ImageReadError, _ext, _itk_reason, atomic_path

_NIFTI_INTENT_DISPVECT = 1006
_NIFTI_INTENT_VECTOR = 1007


def _write_sitk_image(img: sitk.Image, path: Path) -> None:
    ext = _ext(path)
    if ext not in IMAGE_EXTS:
        raise ValueError(f"cannot write {path}: unsupported image extension '{ext or path.suffix}'; "
                         f"use one of {', '.join(IMAGE_EXTS)} (DICOM is read-only)")
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=ext != ".nii")
        except RuntimeError as e:
            raise RuntimeError(f"could not write {path}: {_itk_reason(e)}") from e
        if ext in (".nii", ".nii.gz") and img.GetNumberOfComponentsPerPixel() > 1:
            _ensure_vector_intent(tmp)


def _nifti_precheck(p: Path) -> None:
    """Refuse zero-size and truncated NIfTI files (ITK silently zero-fills a truncated NIfTI)."""
    import nibabel as nib
    expected = shape = None
    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.header.get_data_shape())
        # The data offset as read from the file (the image's header copy resets vox_offset).
        expected = int(img.dataobj.offset) + int(np.prod(shape, dtype=np.int64)) * img.header.get_data_dtype().itemsize
    except Exception:  # unparsable header: a truncated .nii.gz is caught below, the rest by ITK
        pass
    if shape is not None and any(s == 0 for s in shape):
        raise ImageReadError(f"{p} has a zero-size grid {shape}; nothing to read")
    if _ext(p) == ".nii":
        actual = p.stat().st_size
        if expected is None:
            if actual < 348:
                raise ImageReadError(f"{p} is truncated: {actual} bytes, shorter than a NIfTI header (348)")
            return
    else:
        if expected is not None:
            with open(p, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                if struct.unpack("<I", fh.read(4))[0] == expected % 2 ** 32:
                    return  # the gzip trailer records the expected uncompressed size
        actual = 0
        try:
            with gzip.open(p, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    actual += len(chunk)
        except gzip.BadGzipFile:
            return  # not gzip at all: ITK says what it is (or reads it uncompressed)
        except (EOFError, OSError, zlib.error) as e:
            raise ImageReadError(f"{p} is truncated or corrupt ({e})") from e
        if expected is None:
            return
    if actual < expected:
        raise ImageReadError(f"{p} is truncated: it holds {actual} bytes but its header describes "
                             f"{expected} (grid {shape})")


def _check_grid(p: Path, dim: int, size: tuple) -> bool:
    """Validate an image's dimension and size; True when trailing unit dims must be squeezed."""
    size = tuple(int(s) for s in size)
    if any(s == 0 for s in size):
        raise ImageReadError(f"{p} has a zero-size grid {size}; nothing to read")
    if dim < 3:
        raise ImageReadError(f"{p} is a {dim}D image (size {size}); a 3D volume is expected")
    squeeze = False
    if dim > 3:
        if any(s != 1 for s in size[3:]):
            axes = "x, y, z, t" if dim == 4 else "x, y, z, ..."
            raise ImageReadError(f"{p} is {dim}D ({axes} = {size}); a 3D volume is expected: "
                                 f"extract one volume (time point / channel) first")
        squeeze = True
    if any(s == 1 for s in size[:3]):
        raise ImageReadError(f"{p} is a single slice (size x, y, z = {size[:3]}), in effect 2D; "
                             f"a 3D volume is expected")
    return squeeze


def _read_dicom_series(folder: Path, series_id: Optional[str] = None) -> sitk.Image:
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise ImageReadError(f"{folder}: cannot scan for DICOM series ({_itk_reason(e)})") from e
    if not ids:
        raise ImageReadError(f"{folder} is a folder without a DICOM series (image files must be given "
                             f"as a file; a folder is read as DICOM)")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids}
    sid = series_id if series_id in files else max(files, key=lambda s: len(files[s]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[sid])
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(f"{folder}: DICOM series {sid} cannot be read ({_itk_reason(e)})") from e
    _check_grid(folder, img.GetDimension(), img.GetSize())
    return img


def _read_image(path) -> sitk.Image:
    """Read any supported image as a 3D SimpleITK image (scalar or vector), with all file checks.

    Refuses missing, empty, truncated, corrupt, non-image, 2D, 4D (unless the extra axes have
    size 1, which are squeezed) and zero-size inputs with :class:`ImageReadError`.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_dicom_series(p)
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p} is empty (0 bytes)")
    ext = _ext(p)
    if ext in (".nii", ".nii.gz"):
        _nifti_precheck(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(f"{p} is not an image that can be read ({_itk_reason(e)}); supported: "
                             f"NIfTI, NRRD, MetaImage (.mha/.mhd), DICOM series") from e
    if (reader.GetImageIO() or reader.GetImageIOFromFileName(str(p))) == "GDCMImageIO":
        # One DICOM file stands for its whole series.
        sid = reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else None
        return _read_dicom_series(p.parent, sid)
    squeeze = _check_grid(p, reader.GetDimension(), reader.GetSize())
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(f"{p} is truncated or corrupt ({_itk_reason(e)})") from e
    if squeeze:
        size = list(img.GetSize()[:3]) + [0] * (img.GetDimension() - 3)
        img = sitk.Extract(img, size, [0] * img.GetDimension(),
                           sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return img


def _nifti_nonfinite(p: Path) -> int:
    """Number of NaN/Inf values stored in a float NIfTI file (0 for integer data).

    ITK's NIfTI reader replaces NaN and Inf with 0 without a word, so the array SimpleITK returns
    cannot show them; the raw data are read again with nibabel (only for float dtypes, whose
    check costs one more read of the file).
    """
    import nibabel as nib
    try:
        img = nib.load(str(p))
        if img.header.get_data_dtype().kind not in "fc":
            return 0
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except Exception:  # unreadable for nibabel: ITK already read it, nothing more to learn
        return 0
    return int(raw.size - np.count_nonzero(np.isfinite(raw)))


def _check_finite(arr: np.ndarray, p: Path) -> None:
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if not bad and p.is_file() and _ext(p) in (".nii", ".nii.gz"):
        bad = _nifti_nonfinite(p)
    if bad:
        raise ImageReadError(f"{p} contains {bad} NaN/Inf voxel values (of {arr.size}); "
                             f"fix or mask them before registration")


def read_volume(path, *, name: Optional[str] = None) -> Volume:
    """Read a scalar 3D image as float32.

    Parameters
    ----------
    path : str or PathLike
        ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``, a folder holding a DICOM
        series (the series with most files is read) or one file of a DICOM series.
    name : str, optional
        Display name; defaults to the file (or folder) name.

    Returns
    -------
    Volume
        ``array`` float32 ``(z, y, x)``; spacing/origin/direction exactly as stored (LPS mm).

    Raises
    ------
    ImageReadError
        Missing, empty, truncated/corrupt, not an image, 2D, 4D, vector, zero-size, or holding
        NaN/Inf voxels; the message names the file.
    """
    p = Path(path)
    img = _read_image(p)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise ImageReadError(f"{p} is a vector image ({ncomp} components per voxel, e.g. a displacement "
                             f"field or RGB); a scalar 3D volume is expected (fields: read_field)")
    vol = Volume.from_sitk(sitk.Cast(img, sitk.sitkFloat32), name or p.name)
    _check_finite(vol.array, p)
    return vol


def write_volume(vol: Volume, path) -> None:
    """Write a scalar volume (atomically); a :class:`LabelMap` goes through :func:`write_labels`.

    The array dtype is kept (bool is written as uint8, float16 as float32).

    Parameters
    ----------
    vol : Volume
        Scalar ``(z, y, x)`` image with LPS geometry.
    path : str or PathLike
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd``.
    """
    if isinstance(vol, LabelMap):
        write_labels(vol, path)
        return
    if vol.is_vector:
        raise ValueError(f"cannot write {path} with write_volume: the volume is a vector image of shape "
                         f"{vol.array.shape}; use write_field for displacement fields")
    arr = vol.array
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    _write_sitk_image(vol.with_array(arr).to_sitk(), Path(path))


CONVERT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def convert_image(src, dst, dtype: Optional[str] = None) -> Volume:
    """Convert a scalar image between formats (atomically), keeping its pixel type unless asked.

    Parameters
    ----------
    src : str or PathLike
        Anything :func:`read_volume` reads (NIfTI, NRRD, MetaImage, a DICOM series folder or file).
    dst : str or PathLike
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd``.
    dtype : str, optional
        One of :data:`CONVERT_DTYPES`. None (default) keeps the stored pixel type (an int16 DICOM
        series stays int16, not float32 at twice the size). An integer type rounds to the nearest
        integer and refuses values outside its range.

    Returns
    -------
    Volume
        What was written: ``(z, y, x)`` array in the output dtype, geometry as stored (LPS mm).

    Raises
    ------
    ImageReadError
        Everything :func:`read_volume` refuses (vector images, NaN/Inf voxels included).
    ValueError
        Unknown ``dtype``, values that do not fit it, or an unsupported output extension.
    """
    p = Path(src)
    if dtype is not None and dtype not in CONVERT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(CONVERT_DTYPES)}")
    img = _read_image(p)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise ImageReadError(f"{p} is a vector image ({ncomp} components per voxel); convert reads scalar "
                             f"3D volumes")
    vol = Volume.from_sitk(img, p.name)
    arr = vol.array
    if arr.dtype.kind in "fc":
        _check_finite(arr, p)
    if dtype is not None and np.dtype(dtype) != arr.dtype:
        target = np.dtype(dtype)
        if target.kind in "iu":
            info = np.iinfo(target)
            rounded = np.rint(arr) if arr.dtype.kind == "f" else arr
            lo, hi = (rounded.min(), rounded.max()) if arr.size else (0, 0)
            if lo < info.min or hi > info.max:
                raise ValueError(f"{p} holds values {lo}..{hi}, outside the range of {dtype} "
                                 f"({info.min}..{info.max}); pick a wider --dtype")
            arr = rounded
        vol = vol.with_array(arr.astype(target))
    write_volume(vol, dst)
    return vol


def read_labels(path, reference: Optional[Volume] = None) -> LabelMap:
    """Read an integer label map, optionally brought onto ``reference``'s grid.

    Parameters
    ----------
    path : str or PathLike
        Any format :func:`read_volume` accepts.
    reference : Volume, optional
        When given and the label grid differs, labels are resampled onto the reference grid with
        nearest neighbour (identity transform, physical space); reference voxels outside the label
        map's extent become 0.

    Returns
    -------
    LabelMap
        int32 ``(z, y, x)`` labels; the reference's geometry when ``reference`` is given.

    Raises
    ------
    ImageReadError
        Everything :func:`read_volume` refuses, non-integer values, or a label map whose physical
        extent does not overlap the reference at all.
    """
    p = Path(path)
    img = _read_image(p)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{p} is a vector image ({img.GetNumberOfComponentsPerPixel()} components per "
                             f"voxel); a label map must hold one integer per voxel")
    arr = sitk.GetArrayFromImage(img)
    if not np.issubdtype(arr.dtype, np.integer):
        _check_finite(arr, p)
        rounded = np.round(arr)
        off = np.abs(arr - rounded) > 1e-3
        if off.any():
            raise ImageReadError(f"{p} holds non-integer values (e.g. {float(arr[off][0])!r} in "
                                 f"{int(off.sum())} voxels); a label map must hold integer label ids")
        arr = rounded
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ImageReadError(f"{p} holds label ids outside the int32 range ({arr.min()}..{arr.max()})")
    labels = LabelMap(arr.astype(np.int32), img.GetSpacing(), img.GetOrigin(),
                      np.asarray(img.GetDirection(), float).reshape(3, 3), p.name)
    if reference is None:
        return labels
    if labels.same_grid(reference):
        return LabelMap(labels.array, reference.spacing, reference.origin, reference.direction.copy(), labels.name)
    return _labels_onto(labels, reference, p)


def _labels_onto(labels: LabelMap, reference: Volume, p: Path) -> LabelMap:
    # Shift ids so that every voxel inside the label map is >= 1 and 0 marks "outside":
    # that tells "no overlap at all" apart from "overlap with background only".
    shift = 1 - int(labels.array.min())
    src = labels.with_array(labels.array.astype(np.int64) + shift).to_sitk()
    ref = sitk.Image([int(s) for s in reference.size_xyz], sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(tuple(reference.direction.reshape(-1)))
    out = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(3, sitk.sitkIdentity),
                                               sitk.sitkNearestNeighbor, 0, sitk.sitkInt64))
    if not out.any():
        lo, hi = labels.physical_bounds()
        rlo, rhi = reference.physical_bounds()
        raise ImageReadError(
            f"{p} does not overlap the reference image '{reference.name}' at all: labels span LPS "
            f"{np.round(lo, 1).tolist()}..{np.round(hi, 1).tolist()} mm, the reference "
            f"{np.round(rlo, 1).tolist()}..{np.round(rhi, 1).tolist()} mm; is it the right label file?")
    arr = np.where(out > 0, out - shift, 0).astype(np.int32)
    return LabelMap(arr, reference.spacing, reference.origin, reference.direction.copy(), labels.name)


def write_labels(labels: Volume, path) -> None:
    """Write a label map (atomically) in the smallest integer type that holds its ids.

    Parameters
    ----------
    labels : LabelMap or Volume
        Integer-valued ``(z, y, x)`` labels (a Volume is checked for integer values).
    path : str or PathLike
        Any extension :func:`write_volume` accepts.
    """
    if not isinstance(labels, LabelMap):
        labels = LabelMap.from_volume(labels)
    arr = labels.array
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            break
    else:
        dt = np.int64
    img = Volume(arr.astype(dt), labels.spacing, labels.origin, labels.direction, labels.name).to_sitk()
    _write_sitk_image(img, Path(path))


def _nifti_intent(p: Path) -> Optional[int]:
    import nibabel as nib
    try:
        return int(nib.load(str(p)).header["intent_code"])
    except Exception:
        return None


def _nifti_shape(p: Path) -> tuple:
    import nibabel as nib
    try:
        return tuple(int(s) for s in nib.load(str(p)).header.get_data_shape())
    except Exception:
        return ()


def _ensure_vector_intent(p: Path) -> None:
    """Make a vector NIfTI declare NIFTI_INTENT_VECTOR (1007), the code ITK/ANTs use for fields."""
    import nibabel as nib
    img = nib.load(str(p), mmap=False)  # the file is rewritten in place: no memory map into it
    if int(img.header["intent_code"]) == _NIFTI_INTENT_VECTOR:
        return
    data = np.array(img.dataobj.get_unscaled(), copy=True)
    hdr = img.header.copy()
    hdr.set_intent("vector")
    # affine=None keeps the header's qform/sform exactly as ITK wrote them.
    nib.save(nib.Nifti1Image(data, None, hdr), str(p))
