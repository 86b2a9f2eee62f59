"""Compact storage of a run's transform for sessions (``.npz``).

A session keeps every run so that it can be shown again; its transform is the only thing that
cannot be recomputed cheaply. ITK's ``.h5`` writes a dense displacement field as float64 (31 MB
per run for a 256 x 256 x 150 brain); here each displacement field is quantised to a step of
at most ``max_error_mm`` * 2 (so every vector component is within ``max_error_mm`` of the
original), delta-coded along x (smooth fields give small integers) and zlib-compressed. Linear
and B-spline components keep their exact parameters as ITK transform text.

The composite order is kept: component ``i`` of the file is ``GetNthTransform(i)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app.engine.types import Transform

FORMAT = "regstation-transform"
VERSION = 1


def _components(t: sitk.Transform) -> list[sitk.Transform]:
    if t.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(t)
        out = []
        for i in range(comp.GetNumberOfTransforms()):
            out += _components(comp.GetNthTransform(i))
        return out
    return [t.Downcast() if hasattr(t, "Downcast") else t]


def _tfm_text(t: sitk.Transform) -> str:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.tfm")
        sitk.WriteTransform(t, p)
        return Path(p).read_text()


def _from_tfm_text(text: str) -> sitk.Transform:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.tfm")
        Path(p).write_text(text)
        t = sitk.ReadTransform(p)
    if t.GetName() == "CompositeTransform":          # ITK wraps a single read transform
        comp = sitk.CompositeTransform(t)
        if comp.GetNumberOfTransforms() == 1:
            t = comp.GetNthTransform(0)
    return t.Downcast() if hasattr(t, "Downcast") else t


def write_transform_compact(transform: Transform, path, max_error_mm: float = 0.005) -> Path:
    """Write ``transform`` to ``path`` (.npz). Displacement fields are stored to within
    ``max_error_mm`` per component (mm, LPS); everything else exactly.

    Raises ValueError when ``max_error_mm`` is not positive.
    """
    if not max_error_mm > 0:
        raise ValueError(f"max_error_mm must be positive, got {max_error_mm}")
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    comps = []
    for i, c in enumerate(_components(transform.itk)):
        if c.GetName() == "DisplacementFieldTransform":
            img = sitk.DisplacementFieldTransform(c).GetDisplacementField()
            a = sitk.GetArrayFromImage(img)                       # (z, y, x, 3) mm
            peak = float(np.abs(a).max()) if a.size else 0.0
            step = max(2.0 * max_error_mm, peak / 30000.0)        # int16 with headroom for deltas
            q = np.rint(a / step).astype(np.int32)
            d = np.diff(q, axis=2, prepend=0)
            d = d.astype(np.int16) if np.abs(d).max(initial=0) < 32767 else d
            arrays[f"field{i}"] = d
            comps.append({"type": "displacement", "step_mm": step, "spacing": list(img.GetSpacing()),
                          "origin": list(img.GetOrigin()), "direction": list(img.GetDirection())})
        else:
            comps.append({"type": "itk", "text": _tfm_text(c)})
    meta = {"format": FORMAT, "version": VERSION, "kind": transform.kind, "components": comps}
    tmp = path.with_name(path.name + ".tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    os.replace(tmp, path)
    return path


def read_transform_compact(path) -> Transform:
    """Read a file of :func:`write_transform_compact` (ValueError when it is not one)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            fields = {k: z[k] for k in z.files if k.startswith("field")}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path.name}: not a readable RegStation transform file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name}: not a RegStation transform file (format {meta.get('format')!r})")
    parts = []
    for i, c in enumerate(meta["components"]):
        if c["type"] == "displacement":
            a = np.cumsum(fields[f"field{i}"].astype(np.int32), axis=2).astype(np.float64) * c["step_mm"]
            img = sitk.GetImageFromArray(a, isVector=True)
            img.SetSpacing(c["spacing"])
            img.SetOrigin(c["origin"])
            img.SetDirection(c["direction"])
            parts.append(sitk.DisplacementFieldTransform(img))
        else:
            parts.append(_from_tfm_text(c["text"]))
    if len(parts) == 1:
        return Transform(parts[0], meta.get("kind"))
    comp = sitk.CompositeTransform(3)
    for p in parts:
        comp.AddTransform(p)
    return Transform(comp, meta.get("kind") or "composite")


def nbytes(path) -> int:
    return Path(path).stat().st_size


__all__ = ["write_transform_compact", "read_transform_compact"]
