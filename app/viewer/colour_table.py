"""Label colour tables: names and colours of label values.

Reads the formats users bring:

* 3D Slicer colour tables (``.ctbl``, ``.txt``) and FreeSurfer LUTs (``FreeSurferColorLUT.txt``):
  ``value name R G B [A]`` per line, ``#`` comments;
* ITK-SNAP label descriptions: ``IDX R G B A VIS MSH "LABEL"`` per line (A is 0..1).

A table is ``{value: (name, (r, g, b))}`` with 0..255 integer colours. Labels without a table
get a fixed, well-spread palette (:func:`default_colour`).
"""
from __future__ import annotations

import colorsys
import shlex
from pathlib import Path

import numpy as np

ColourTable = dict  # {int: (str, (int, int, int))}


def _num(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def read_colour_table(path) -> ColourTable:
    """Parse a Slicer / FreeSurfer / ITK-SNAP label table. Raises ValueError naming the first
    line that fits none of them, or when no entry was found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ValueError(f"{p.name}: cannot read the colour table ({e})") from e
    table: ColourTable = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            tok = shlex.split(s)
        except ValueError:
            tok = s.split()
        try:
            if len(tok) >= 8 and all(_num(t) for t in tok[:7]):          # ITK-SNAP
                value, rgb, name = int(tok[0]), tuple(int(float(t)) for t in tok[1:4]), " ".join(tok[7:])
            elif len(tok) >= 5 and _num(tok[0]) and not _num(tok[1]) and all(_num(t) for t in tok[2:5]):
                value, name, rgb = int(tok[0]), tok[1], tuple(int(float(t)) for t in tok[2:5])   # Slicer/FS
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{p.name} line {n}: not a colour-table entry (expected 'value name R G B' or "
                             f"ITK-SNAP 'IDX R G B A VIS MSH \"LABEL\"'): {s[:60]!r}") from None
        if not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"{p.name} line {n}: colours must be 0..255, got {rgb}")
        table[value] = (name, rgb)
    if not table:
        raise ValueError(f"{p.name}: no colour-table entries found")
    return table


def default_colour(value: int) -> tuple[int, int, int]:
    """A stable, saturated colour for label ``value`` (golden-ratio hues)."""
    h = (int(value) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def colour_lut(values, table: ColourTable | None = None) -> dict:
    """``{value: (r, g, b) in [0, 1]}`` for ``values`` (0 is background and gets no colour)."""
    table = table or {}
    out = {}
    for v in values:
        v = int(v)
        if v == 0:
            continue
        rgb = table[v][1] if v in table else default_colour(v)
        out[v] = tuple(c / 255.0 for c in rgb)
    return out


def label_name(value, table: ColourTable | None) -> str:
    if value is None or not table:
        return ""
    entry = table.get(int(value))
    return entry[0] if entry else ""


def label_rgb_image(labels: np.ndarray, table: ColourTable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb (..., 3) float in [0, 1], mask (...) bool)`` colouring a label slice."""
    lab = np.asarray(labels).astype(np.int64)
    rgb = np.zeros(lab.shape + (3,), np.float32)
    vals = np.unique(lab)
    for v, c in colour_lut(vals, table).items():
        rgb[lab == v] = c
    return rgb, lab != 0
