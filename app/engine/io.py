"""Every file format RegStation reads or writes, and nothing else.

Images, label maps, displacement fields, transforms, landmarks and pair manifests enter and
leave the engine here, already in the engine's conventions (see :mod:`app.engine.types`):

* arrays ``(z, y, x)`` (fields ``(z, y, x, 3)``), geometry xyz in **LPS** millimetres;
* a :class:`~app.engine.types.Transform` maps fixed physical points to moving physical points;
* landmarks ``(N, 3)`` LPS mm.

Files that declare RAS coordinates (Slicer markups, old ``.fcsv``) are flipped to LPS on read;
everything is written in LPS. SimpleITK already reports NIfTI geometry in LPS, so no nibabel
affine is ever turned into geometry; nibabel only inspects NIfTI headers (truncation, intent).

Every writer goes through :func:`atomic_path`: the file is written under a temporary name in the
destination folder and renamed into place, so a failed or cancelled write leaves no partial file.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk

from .types import LabelMap, Landmarks, Transform, Volume

__all__ = [
    "ImageReadError", "LandmarkError", "TransformIOError", "atomic_path",
    "read_volume", "write_volume", "read_labels", "write_labels",
    "read_field", "write_field", "read_transform", "write_transform",
    "read_landmarks", "write_landmarks", "read_pairs_csv", "describe_file",
]


class ImageReadError(ValueError):
    """An image, label map or field file is missing, unreadable or not a usable 3D volume."""


class LandmarkError(ValueError):
    """A landmark file is missing, malformed or in an unsupported coordinate system."""


class TransformIOError(ValueError):
    """A transform file cannot be read or written."""


IMAGE_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TRANSFORM_EXTS = (".tfm", ".txt", ".h5", ".hdf5", ".mat")
LANDMARK_EXTS = (".mrk.json", ".json", ".fcsv", ".csv", ".txt", ".pts")
_DICOM_EXTS = (".dcm", ".ima")
# Formats whose header names a separate data file: written in a temporary folder (see atomic_path).
_DETACHED_EXTS = (".mhd", ".nhdr")
_NIFTI_INTENT_DISPVECT = 1006
_NIFTI_INTENT_VECTOR = 1007
_PAIR_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")


def _ext(path) -> str:
    """Lower-case extension including double ones ('.nii.gz', '.mrk.json'); '' if none."""
    name = Path(path).name.lower()
    for e in (".nii.gz", ".mrk.json") + IMAGE_EXTS + TRANSFORM_EXTS + LANDMARK_EXTS + _DICOM_EXTS:
        if name.endswith(e):
            return e
    return Path(name).suffix


def _itk_reason(exc: Exception) -> str:
    """The useful part of a SimpleITK exception (drop the C++ source locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ERROR:" in ln:
            return ln.split("ERROR:", 1)[1].strip()[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` to; rename it into place when the block succeeds.

    The temporary file lives in the destination folder (so the final ``os.replace`` is atomic) and
    keeps the real extension at the end of its name (``.tmp-1a2b3c4d-warped.nii.gz``), so writers
    that pick a format by extension (ITK) still work. If the block raises, the temporary file is
    removed and ``path`` is left untouched (an older version of it survives).

    Formats with a detached data file (``.mhd``, ``.nhdr``) are written into a temporary folder
    under their real name, because the header records the data file's name; the data file is
    moved into place first and the header last.

    Parameters
    ----------
    path : str or PathLike
        The final destination. Its folder must exist.

    Yields
    ------
    Path
        Where the caller must write.
    """
    final = Path(path)
    parent = final.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {final}: folder {parent} does not exist")
    if _ext(final) in _DETACHED_EXTS:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        tmp = tmp_dir / final.name
        try:
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"writing {final} produced no file")
            for f in sorted(tmp_dir.iterdir(), key=lambda f: f.name == final.name):
                os.replace(f, parent / f.name)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    # Not mkstemp: the writer creates the file itself, so it gets the usual umask permissions.
    tmp = parent / f".tmp-{secrets.token_hex(4)}-{final.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writing {final} produced no file")
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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


# --------------------------------------------------------------------------- image reading
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


def _check_finite(arr: np.ndarray, p: Path) -> None:
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
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


# --------------------------------------------------------------------------- label maps
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


# --------------------------------------------------------------------------- displacement fields
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


# --------------------------------------------------------------------------- transforms
def _flatten_itk(t: sitk.Transform) -> list[sitk.Transform]:
    """Composite -> list of its leaf transforms (in ITK's order), each downcast to its class."""
    if t.GetName() != "CompositeTransform":
        try:
            return [t.Downcast()]
        except RuntimeError:
            return [t]
    comp = t if isinstance(t, sitk.CompositeTransform) else sitk.CompositeTransform(t)
    n = comp.GetNumberOfTransforms()
    out = []
    for i in range(n):
        sub = comp.GetNthTransform(i)
        if n == 1 and sub.GetName() == "CompositeTransform":
            # SimpleITK wraps a transform class it has no Python class for in a one-element
            # composite, and hands the same wrapper back from GetNthTransform: keep it whole.
            return [comp]
        out.extend(_flatten_itk(sub))
    return out


def _read_itk_transform(p: Path) -> sitk.Transform:
    """sitk.ReadTransform, reading ITK text files that name MatrixOffsetTransformBase as affine.

    MatrixOffsetTransformBase (written e.g. by the MS dataset's authors) has exactly the
    parameters of AffineTransform (matrix row-major, translation; fixed: centre), but SimpleITK has
    no class for it, so the text is read under the affine name.
    """
    if _ext(p) in (".txt", ".tfm"):
        text = p.read_text(encoding="utf-8", errors="replace")
        if "MatrixOffsetTransformBase_" in text:
            with tempfile.TemporaryDirectory() as d:
                tmp = Path(d) / "transform.tfm"
                tmp.write_text(re.sub(r"MatrixOffsetTransformBase_(\w+?)_(\d)_\2",
                                      r"AffineTransform_\1_\2_\2", text), encoding="utf-8")
                return sitk.ReadTransform(str(tmp))
    return sitk.ReadTransform(str(p))


def _sniff_text(p: Path) -> str:
    """First non-empty line of a small text file (lower-case), '' if binary or unreadable."""
    try:
        with open(p, "r", encoding="utf-8") as fh:
            for _ in range(50):
                line = fh.readline()
                if not line:
                    break
                if line.strip():
                    return line.strip().lower()
    except (UnicodeDecodeError, OSError):
        pass
    return ""


def read_transform(path) -> Transform:
    """Read an ITK transform file (or a displacement field image) as a :class:`Transform`.

    Parameters
    ----------
    path : str or PathLike
        ``.tfm``/``.txt`` (ITK text), ``.h5``/``.hdf5`` (ITK HDF5, composite transforms with
        displacement fields or B-splines included), ``.mat`` (ITK/ANTs binary affine), or a
        displacement field image (read with :func:`read_field`).

    Returns
    -------
    Transform
        Fixed physical points -> moving physical points, as ITK defines the file's transform.
        A composite holding a single transform is unwrapped; nested composites are flattened.

    Raises
    ------
    TransformIOError
        Missing, empty, not an ITK transform, or not 3D; the message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise TransformIOError(f"{p}: no such file")
    if p.is_file() and p.stat().st_size == 0:
        raise TransformIOError(f"{p} is empty (0 bytes)")
    ext = _ext(p)
    if ext in IMAGE_EXTS:
        try:
            field = read_field(p)
        except ImageReadError as e:
            raise TransformIOError(str(e)) from e
        img = field.to_sitk(sitk.sitkVectorFloat64)
        return Transform(sitk.DisplacementFieldTransform(img), "displacement")
    if ext not in TRANSFORM_EXTS:
        raise TransformIOError(f"{p}: unsupported transform extension '{ext}'; use one of "
                               f"{', '.join(TRANSFORM_EXTS)} or a displacement field image")
    if ext in (".txt", ".tfm"):
        first = _sniff_text(p)
        if first in ("point", "index"):
            raise TransformIOError(f"{p} is an elastix point file (landmarks), not a transform")
        if first.startswith("("):
            raise TransformIOError(f"{p} looks like an elastix parameter file; convert it to an ITK "
                                   f"transform (e.g. with itk-elastix) first")
    try:
        raw = _read_itk_transform(p)
    except RuntimeError as e:
        raise TransformIOError(f"{p} is not a readable ITK transform ({_itk_reason(e)})") from e
    if raw.GetDimension() != 3:
        raise TransformIOError(f"{p} holds a {raw.GetDimension()}D transform; a 3D transform is expected")
    parts = [t for t in _flatten_itk(raw) if t.GetName() != "IdentityTransform"]
    if not parts:
        return Transform.identity()
    if len(parts) == 1:
        return Transform(parts[0])
    return Transform(sitk.CompositeTransform(parts), "composite")


def write_transform(t: Transform, path) -> None:
    """Write a transform (atomically) in ITK format, chosen by extension.

    Parameters
    ----------
    t : Transform or SimpleITK.Transform
        Fixed physical points -> moving physical points.
    path : str or PathLike
        ``.h5``/``.hdf5`` (recommended for deformable and composite transforms), ``.tfm``/``.txt``
        (text; deformable transforms become very large), or ``.mat`` (linear transforms only).
    """
    itk = t.itk if isinstance(t, Transform) else t
    p = Path(path)
    ext = _ext(p)
    if ext not in TRANSFORM_EXTS:
        raise TransformIOError(f"cannot write {p}: unsupported transform extension '{ext}'; use one of "
                               f"{', '.join(TRANSFORM_EXTS)}")
    kind = t.kind if isinstance(t, Transform) else Transform(itk).kind
    if ext == ".mat" and kind not in ("identity", "rigid", "affine"):
        raise TransformIOError(f"cannot write {p}: .mat holds linear transforms only, this one is "
                               f"'{kind}'; use .h5")
    with atomic_path(p) as tmp:
        try:
            sitk.WriteTransform(itk, str(tmp))
        except RuntimeError as e:
            raise TransformIOError(f"could not write {p}: {_itk_reason(e)}") from e


# --------------------------------------------------------------------------- landmarks
_SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _num(v: str, p: Path, where: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise LandmarkError(f"{p}: {where}: '{v}' is not a number") from None
    if not math.isfinite(x):
        raise LandmarkError(f"{p}: {where}: coordinate '{v}' is not finite")
    return x


def _fmt(x) -> str:
    """Shortest string that reads back as the same float64 (round trip exact)."""
    return repr(float(x))


def _read_markups_json(p: Path) -> Landmarks:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LandmarkError(f"{p} is not valid JSON ({e})") from e
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise LandmarkError(f"{p} is not a Slicer markups file (no 'markups' list)")
    pts, names = [], []
    for m in markups:
        system = str(m.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise LandmarkError(f"{p}: unsupported coordinateSystem '{system}' (LPS or RAS expected)")
        units = m.get("coordinateUnits", "mm")
        if isinstance(units, list):  # schema allows one unit per axis
            units = units[0] if len(set(units)) == 1 else units
        if units != "mm":
            raise LandmarkError(f"{p}: coordinateUnits {units!r}; millimetres ('mm') are expected")
        for i, cp in enumerate(m.get("controlPoints") or []):
            pos = cp.get("position")
            if not isinstance(pos, list) or len(pos) != 3:
                raise LandmarkError(f"{p}: control point {i + 1} has no 3D position")
            xyz = np.array([_num(v, p, f"control point {i + 1}") for v in pos])
            pts.append(xyz * _RAS_TO_LPS if system == "RAS" else xyz)
            names.append(str(cp.get("label") or cp.get("id") or len(names) + 1))
    return Landmarks(np.array(pts).reshape(-1, 3), names)


def _write_markups_json(lm: Landmarks, tmp: Path) -> None:
    cps = [{"id": str(i + 1), "label": str(n), "position": [float(v) for v in xyz], "positionStatus": "defined"}
           for i, (n, xyz) in enumerate(zip(lm.names, lm.points))]
    doc = {"@schema": _SLICER_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                        "controlPoints": cps}]}
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")  # json writes floats with repr


_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"


def _read_fcsv(p: Path) -> Landmarks:
    system = "RAS"  # Slicer before 4.11 wrote RAS and sometimes no CoordinateSystem line
    columns = _FCSV_COLUMNS.split(",")
    rows = []
    with open(p, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip():
                continue
            if row[0].lstrip().startswith("#"):
                line = ",".join(row)
                m = re.match(r"#\s*CoordinateSystem\s*=\s*(\S+)", line, re.I)
                if m:
                    code = m.group(1).upper()
                    system = {"0": "RAS", "1": "LPS"}.get(code, code)
                    if system not in ("RAS", "LPS"):
                        raise LandmarkError(f"{p}: unsupported CoordinateSystem '{m.group(1)}' (LPS or RAS expected)")
                m = re.match(r"#\s*columns\s*=\s*(.*)", line, re.I)
                if m:
                    columns = [c.strip().lower() for c in m.group(1).split(",")]
                continue
            rows.append((lineno, row))
    try:
        ix, iy, iz = (columns.index(c) for c in ("x", "y", "z"))
    except ValueError:
        raise LandmarkError(f"{p}: the '# columns =' line has no x, y, z columns") from None
    il = columns.index("label") if "label" in columns else None
    pts, names = [], []
    for lineno, row in rows:
        if len(row) <= max(ix, iy, iz):
            raise LandmarkError(f"{p}: line {lineno} has {len(row)} fields; x, y, z expected in columns "
                                f"{ix + 1}, {iy + 1}, {iz + 1}")
        xyz = np.array([_num(row[i], p, f"line {lineno}") for i in (ix, iy, iz)])
        pts.append(xyz * _RAS_TO_LPS if system == "RAS" else xyz)
        label = row[il].strip() if il is not None and il < len(row) else ""
        names.append(label or row[0].strip() or str(len(names) + 1))
    return Landmarks(np.array(pts).reshape(-1, 3), names)


def _write_fcsv(lm: Landmarks, tmp: Path) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                 f"# columns = {_FCSV_COLUMNS}\n")
        w = csv.writer(fh, lineterminator="\n")
        for i, (n, (x, y, z)) in enumerate(zip(lm.names, lm.points)):
            w.writerow([str(i + 1), _fmt(x), _fmt(y), _fmt(z), 0, 0, 0, 1, 1, 1, 0, str(n), "", ""])


def _read_points_csv(p: Path) -> Landmarks:
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise LandmarkError(f"{p} is empty")
        cols = [c.strip().lower() for c in header]
        if not {"x", "y", "z"} <= set(cols):
            raise LandmarkError(f"{p}: the first line must be a header naming columns x,y,z (LPS mm) "
                                f"and optionally name; got {header}")
        ix, iy, iz = (cols.index(c) for c in ("x", "y", "z"))
        iname = next((cols.index(c) for c in ("name", "label") if c in cols), None)
        pts, names = [], []
        for lineno, row in enumerate(reader, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < len(cols):
                raise LandmarkError(f"{p}: line {lineno} has {len(row)} fields, the header {len(cols)}")
            pts.append([_num(row[i], p, f"line {lineno}") for i in (ix, iy, iz)])
            names.append(row[iname].strip() if iname is not None and row[iname].strip() else str(len(names) + 1))
    return Landmarks(np.array(pts, float).reshape(-1, 3), names)


def _write_points_csv(lm: Landmarks, tmp: Path) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["name", "x", "y", "z"])
        for n, (x, y, z) in zip(lm.names, lm.points):
            w.writerow([str(n), _fmt(x), _fmt(y), _fmt(z)])


def _parse_elastix(p: Path) -> tuple[str, np.ndarray]:
    """Elastix point file -> ('point' | 'index', (N, 3) array as written)."""
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise LandmarkError(f"{p} is not a text file") from None
    if not lines:
        raise LandmarkError(f"{p} is empty")
    kind = lines[0].lower()
    if kind not in ("point", "index"):
        raise LandmarkError(f"{p} is not an elastix point file: the first line must be 'point' or "
                            f"'index', got '{lines[0][:40]}'")
    if len(lines) < 2 or not re.fullmatch(r"\d+", lines[1]):
        raise LandmarkError(f"{p}: the second line must be the number of points")
    n = int(lines[1])
    body = lines[2:]
    if len(body) != n:
        raise LandmarkError(f"{p} declares {n} points but holds {len(body)}")
    pts = []
    for i, ln in enumerate(body):
        vals = ln.split()
        if len(vals) != 3:
            raise LandmarkError(f"{p}: point {i + 1} has {len(vals)} coordinates; 3 (x y z) expected")
        pts.append([_num(v, p, f"point {i + 1}") for v in vals])
    return kind, np.array(pts, float).reshape(-1, 3)


def _read_elastix(p: Path, reference: Optional[Volume]) -> Landmarks:
    kind, pts = _parse_elastix(p)
    if kind == "index":
        if reference is None:
            raise LandmarkError(f"{p} holds voxel indices ('index'); pass the image they refer to as "
                                f"reference= to convert them to LPS mm")
        pts = reference.index_to_physical(pts)
    return Landmarks(pts)


def _write_elastix(lm: Landmarks, tmp: Path) -> None:
    lines = ["point", str(len(lm))] + [" ".join(_fmt(v) for v in xyz) for xyz in lm.points]
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_landmarks(path, reference: Optional[Volume] = None) -> Landmarks:
    """Read landmarks as LPS millimetres.

    Parameters
    ----------
    path : str or PathLike
        ``.mrk.json``/``.json`` (Slicer markups, coordinateSystem LPS or RAS), ``.fcsv`` (Slicer
        fiducial CSV, ``# CoordinateSystem = LPS``/``RAS``/``1``/``0``; RAS when absent), ``.csv``
        with a header ``x,y,z`` (LPS mm; optional ``name`` column), or an elastix point file
        ``.txt``/``.pts`` (``point`` or ``index``, the count, then ``x y z`` lines).
    reference : Volume, optional
        Needed for elastix ``index`` files: indices (xyz, continuous) are mapped through its grid.

    Returns
    -------
    Landmarks
        ``points`` ``(N, 3)`` LPS mm, ``names`` from the file when it has them.

    Raises
    ------
    LandmarkError
        Missing, empty or malformed file, unsupported coordinate system, ``index`` without reference.
    """
    p = Path(path)
    if not p.is_file():
        raise LandmarkError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise LandmarkError(f"{p} is empty (0 bytes)")
    ext = _ext(p)
    try:
        if ext in (".mrk.json", ".json"):
            return _read_markups_json(p)
        if ext == ".fcsv":
            return _read_fcsv(p)
        if ext == ".csv":
            return _read_points_csv(p)
        if ext in (".txt", ".pts"):
            return _read_elastix(p, reference)
    except UnicodeDecodeError:
        raise LandmarkError(f"{p} is not a text file") from None
    except ValueError as e:
        if isinstance(e, LandmarkError):
            raise
        raise LandmarkError(f"{p}: {e}") from e
    raise LandmarkError(f"{p}: unsupported landmark extension '{ext}'; use .mrk.json, .fcsv, .csv, .txt or .pts")


def write_landmarks(lm: Landmarks, path) -> None:
    """Write landmarks (atomically), always in LPS millimetres, coordinates exact to float64.

    Parameters
    ----------
    lm : Landmarks
        ``(N, 3)`` LPS mm.
    path : str or PathLike
        ``.mrk.json``/``.json`` (Slicer markups, coordinateSystem LPS), ``.fcsv`` (Slicer 4.11+,
        LPS), ``.csv`` (``name,x,y,z``) or ``.txt``/``.pts`` (elastix ``point`` file; names dropped).
    """
    p = Path(path)
    writer = {".mrk.json": _write_markups_json, ".json": _write_markups_json, ".fcsv": _write_fcsv,
              ".csv": _write_points_csv, ".txt": _write_elastix, ".pts": _write_elastix}.get(_ext(p))
    if writer is None:
        raise LandmarkError(f"cannot write {p}: unsupported landmark extension '{_ext(p)}'; use .mrk.json, "
                            f".fcsv, .csv, .txt or .pts")
    with atomic_path(p) as tmp:
        writer(lm, tmp)


# --------------------------------------------------------------------------- pair manifests
def read_pairs_csv(path) -> list[dict]:
    """Read a PAIRS.csv manifest.

    Parameters
    ----------
    path : str or PathLike
        CSV with a header holding ``fixed`` and ``moving`` and optionally ``fixed_labels``,
        ``moving_labels``, ``fixed_landmarks``, ``moving_landmarks`` (other columns are kept as
        strings). Relative paths are resolved against the CSV's folder.

    Returns
    -------
    list of dict
        One dict per non-empty row with all six keys; absent or empty optional entries are None,
        paths are absolute strings.

    Raises
    ------
    ValueError
        Missing file or columns, a row without fixed/moving, or paths that do not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such pairs file")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("fixed", "moving") if c not in header]
        if missing:
            raise ValueError(f"{p} lacks column(s) {', '.join(missing)}: the header must hold fixed,moving"
                             f"[,fixed_labels,moving_labels,fixed_landmarks,moving_landmarks]; got {header}")
        reader.fieldnames = header
        raw_rows = [(i, r) for i, r in enumerate(reader, 2)]
    base = p.parent
    rows, absent = [], []
    for lineno, r in raw_rows:
        vals = {k: (v.strip() if isinstance(v, str) else "") for k, v in r.items() if k is not None}
        if not any(vals.values()):
            continue
        row = {k: v for k, v in vals.items() if k not in _PAIR_COLUMNS}
        for col in _PAIR_COLUMNS:
            v = vals.get(col) or None
            if v is None and col in ("fixed", "moving"):
                raise ValueError(f"{p}: line {lineno} has no '{col}' path")
            if v is not None:
                v = os.path.normpath(base / Path(v).expanduser())
                if not os.path.exists(v):
                    absent.append(f"line {lineno} {col}: {v}")
            row[col] = v
        rows.append(row)
    if absent:
        more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
        raise ValueError(f"{p} names files that do not exist: {'; '.join(absent[:5])}{more}")
    return rows


# --------------------------------------------------------------------------- describe
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
