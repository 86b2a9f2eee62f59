"""Errors, file extensions and atomic writes shared by every format in :mod:`app.engine.io`."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator




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
