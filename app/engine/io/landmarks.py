"""Landmark files (Slicer markups JSON, ``.fcsv``, CSV, elastix point files) as ``(N, 3)`` LPS mm.

RAS files (Slicer markups, old ``.fcsv``) are flipped to LPS here on read; everything is written in LPS."""
from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..types import Landmarks, Volume
from .files import LandmarkError, _ext, atomic_path

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


def _read_markups_json(p: Path) -> tuple[np.ndarray, list[str]]:
    """Points ``(N, 3)`` LPS mm and names of every control point, in file order; a point Slicer marks
    ``"positionStatus": "undefined"`` (placed in the list but never put down), or one without a
    position, is a row of NaN so that callers can drop it and still match the others by index."""
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
            names.append(str(cp.get("label") or cp.get("id") or len(names) + 1))
            pos = cp.get("position")
            if str(cp.get("positionStatus", "defined")).lower() == "undefined" or pos is None:
                pts.append(np.full(3, np.nan))
                continue
            if not isinstance(pos, list) or len(pos) != 3:
                raise LandmarkError(f"{p}: control point {i + 1} has no 3D position")
            xyz = np.array([_num(v, p, f"control point {i + 1}") for v in pos])
            pts.append(xyz * _RAS_TO_LPS if system == "RAS" else xyz)
    return np.array(pts, float).reshape(-1, 3), names


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


def _read_raw(path, reference: Optional[Volume]) -> tuple[np.ndarray, list[str]]:
    """All points of a landmark file in file order, ``(N, 3)`` LPS mm; undefined points are NaN rows."""
    p = Path(path)
    if not p.is_file():
        raise LandmarkError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise LandmarkError(f"{p} is empty (0 bytes)")
    ext = _ext(p)
    try:
        if ext in (".mrk.json", ".json"):
            return _read_markups_json(p)
        lm = None
        if ext == ".fcsv":
            lm = _read_fcsv(p)
        elif ext == ".csv":
            lm = _read_points_csv(p)
        elif ext in (".txt", ".pts"):
            lm = _read_elastix(p, reference)
        if lm is not None:
            return lm.points, list(lm.names)
    except UnicodeDecodeError:
        raise LandmarkError(f"{p} is not a text file") from None
    except ValueError as e:
        if isinstance(e, LandmarkError):
            raise
        raise LandmarkError(f"{p}: {e}") from e
    raise LandmarkError(f"{p}: unsupported landmark extension '{ext}'; use .mrk.json, .fcsv, .csv, .txt or .pts")


def _undefined(pts: np.ndarray) -> np.ndarray:
    return ~np.all(np.isfinite(pts), axis=1)


def _describe_points(idx, names: list[str]) -> str:
    shown = [f"#{i + 1} '{names[i]}'" for i in idx[:10]]
    return ", ".join(shown) + (f" and {len(idx) - 10} more" if len(idx) > 10 else "")


def read_landmarks(path, reference: Optional[Volume] = None) -> Landmarks:
    """Read landmarks as LPS millimetres.

    Slicer control points whose ``positionStatus`` is ``"undefined"`` (or that have no position)
    are skipped with a :class:`UserWarning` naming them (index in the file, from 1, and label):
    Slicer stores them at (0, 0, 0), which is not a landmark. To keep two files' points matched
    when either has such points, read them together with :func:`read_landmark_pair`.

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
    pts, names = _read_raw(path, reference)
    bad = np.flatnonzero(_undefined(pts))
    if bad.size:
        warnings.warn(f"{Path(path)}: skipped {bad.size} control point(s) with an undefined position "
                      f"(positionStatus 'undefined'): {_describe_points(bad, names)}", stacklevel=2)
    keep = ~_undefined(pts)
    return Landmarks(pts[keep], [n for n, k in zip(names, keep) if k])


def match_landmarks(fixed_points: np.ndarray, fixed_names: list[str], moving_points: np.ndarray,
                    moving_names: list[str], *, fixed_source: str = "fixed",
                    moving_source: str = "moving") -> tuple[Landmarks, Landmarks]:
    """Pair fixed and moving landmarks and drop every pair with an undefined point on either side.

    Points are matched by label when each side's labels are unique and both sides hold the same
    set of labels (the fixed file's order is kept), otherwise by index (the counts must be equal).
    A pair is dropped, with one :class:`UserWarning` naming the dropped points, when either of its
    points is undefined (a NaN row, see :func:`read_landmark_pair`).

    Parameters
    ----------
    fixed_points, moving_points : (N, 3), (M, 3) float arrays
        LPS mm; NaN rows mark undefined points.
    fixed_names, moving_names : list of str
        One label per point.
    fixed_source, moving_source : str
        How to name the two sides in messages (e.g. their file paths).

    Returns
    -------
    (Landmarks, Landmarks)
        Matched fixed and moving landmarks of equal length; point ``i`` of one corresponds to
        point ``i`` of the other.

    Raises
    ------
    LandmarkError
        The points can be matched neither by label nor by index (different counts).
    """
    fp = np.asarray(fixed_points, float).reshape(-1, 3)
    mp = np.asarray(moving_points, float).reshape(-1, 3)
    fn, mn = [str(n) for n in fixed_names], [str(n) for n in moving_names]
    if len(fn) != len(fp) or len(mn) != len(mp):
        raise ValueError(f"{len(fn)} names for {len(fp)} fixed points or {len(mn)} for {len(mp)} moving points")
    if len(set(fn)) == len(fn) and len(set(mn)) == len(mn) and set(fn) == set(mn):
        where = {n: i for i, n in enumerate(mn)}
        mi = np.array([where[n] for n in fn], dtype=int)
        how = "label"
    elif len(fp) == len(mp):
        mi = np.arange(len(mp))
        how = "index"
    else:
        raise LandmarkError(f"{fixed_source} and {moving_source} hold {len(fp)} and {len(mp)} points whose labels do not "
                            f"match one to one; corresponding landmarks need equal counts or the same labels")
    mp, mn = mp[mi].reshape(-1, 3), [mn[i] for i in mi]
    bad_f, bad_m = _undefined(fp), _undefined(mp)
    drop = bad_f | bad_m
    if drop.any():
        parts = []
        if bad_f.any():
            parts.append(f"undefined in {fixed_source}: {_describe_points(np.flatnonzero(bad_f), fn)}")
        if bad_m.any():
            parts.append(f"undefined in {moving_source}: {_describe_points(np.flatnonzero(bad_m), mn)}")
        warnings.warn(f"dropped {int(drop.sum())} landmark pair(s) (matched by {how}) with an undefined point: "
                      f"{'; '.join(parts)}", stacklevel=2)
    keep = ~drop
    return (Landmarks(fp[keep], [n for n, k in zip(fn, keep) if k]),
            Landmarks(mp[keep], [n for n, k in zip(mn, keep) if k]))


def read_landmark_pair(fixed_path, moving_path, fixed_reference: Optional[Volume] = None,
                       moving_reference: Optional[Volume] = None) -> tuple[Landmarks, Landmarks]:
    """Read corresponding fixed and moving landmark files, matched (:func:`match_landmarks`).

    A point that is undefined in either file (Slicer ``"positionStatus": "undefined"``) drops its
    pair on both sides, with a warning naming it, so the remaining points stay matched.

    Parameters
    ----------
    fixed_path, moving_path : str or PathLike
        Any format :func:`read_landmarks` reads.
    fixed_reference, moving_reference : Volume, optional
        The images that elastix ``index`` files refer to.

    Returns
    -------
    (Landmarks, Landmarks)
        Equal-length fixed and moving landmarks, LPS mm; point ``i`` corresponds to point ``i``.

    Raises
    ------
    LandmarkError
        A bad file (as :func:`read_landmarks`), or points that cannot be matched.
    """
    fp, fn = _read_raw(fixed_path, fixed_reference)
    mp, mn = _read_raw(moving_path, moving_reference)
    return match_landmarks(fp, fn, mp, mn, fixed_source=str(fixed_path), moving_source=str(moving_path))


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
