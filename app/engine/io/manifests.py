"""Pair manifests (PAIRS.csv): which fixed/moving images, labels and landmarks belong together."""
from __future__ import annotations

import csv
import os
from pathlib import Path



_PAIR_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")
# optional path columns resolved like the others, present in a row only when the CSV has them
_GUIDE_COLUMNS = ("guide_fixed_landmarks", "guide_moving_landmarks")


def read_pairs_csv(path) -> list[dict]:
    """Read a PAIRS.csv manifest.

    Parameters
    ----------
    path : str or PathLike
        CSV with a header holding ``fixed`` and ``moving`` and optionally ``fixed_labels``,
        ``moving_labels``, ``fixed_landmarks``, ``moving_landmarks``, ``guide_fixed_landmarks``,
        ``guide_moving_landmarks`` (guide pairs for a guided correction; other columns are kept as
        strings). Relative paths are resolved against the CSV's folder.

    Returns
    -------
    list of dict
        One dict per non-empty row with the six keys (the guide keys only when the CSV has those
        columns); absent or empty optional entries are None, paths are absolute strings.

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
        row = {k: v for k, v in vals.items() if k not in _PAIR_COLUMNS + _GUIDE_COLUMNS}
        for col in _PAIR_COLUMNS + tuple(c for c in _GUIDE_COLUMNS if c in header):
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
