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

One module per kind of file: :mod:`.images` (scalar images, label maps, NIfTI checks),
:mod:`.fields` (displacement fields), :mod:`.transforms` (ITK transform files), :mod:`.landmarks`
(point files; the only RAS/LPS flips), :mod:`.manifests` (PAIRS.csv), :mod:`.describe`
(``main.py info``) and :mod:`.files` (errors, extensions, atomic writes). Everything public is
re-exported here: ``from app.engine import io; io.read_volume(...)``.
"""
from __future__ import annotations

from .describe import describe_file
from .fields import read_field, write_field
from .files import (IMAGE_EXTS, LANDMARK_EXTS, TRANSFORM_EXTS, ImageReadError, LandmarkError, TransformIOError,
                    atomic_path)
from .images import CONVERT_DTYPES, convert_image, read_labels, read_volume, write_labels, write_volume
from .landmarks import match_landmarks, read_landmark_pair, read_landmarks, write_landmarks
from .manifests import read_pairs_csv
from .transforms import read_transform, write_transform

__all__ = [
    "ImageReadError", "LandmarkError", "TransformIOError", "atomic_path",
    "read_volume", "write_volume", "read_labels", "write_labels", "convert_image", "CONVERT_DTYPES",
    "read_field", "write_field", "read_transform", "write_transform",
    "read_landmarks", "read_landmark_pair", "match_landmarks", "write_landmarks", "read_pairs_csv", "describe_file",
    "IMAGE_EXTS", "TRANSFORM_EXTS", "LANDMARK_EXTS",
]
