"""ITK transform files (``.tfm``/``.txt``, ``.h5``, ``.mat``) and fields read as transforms."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import SimpleITK as sitk

from ..types import Transform
from .fields import read_field
from .files import IMAGE_EXTS, TRANSFORM_EXTS, ImageReadError, TransformIOError, _ext, _itk_reason, atomic_path


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
