"""Corresponding landmark pairs (Qt-free model with undo).

Points are LPS millimetres (xyz). A pair is complete when it has both a fixed and a moving
point; only complete pairs are returned by :meth:`LandmarkPairs.fixed_landmarks` /
:meth:`LandmarkPairs.moving_landmarks` (same order, same names), the form the engine's TRE uses.

TRE before = ``|fixed - moving|`` (the images as they lie in world space); TRE after =
``|T(fixed) - moving|`` with a run's transform ``T`` mapping fixed physical points to moving
physical points (:class:`app.engine.types.Transform`), so no inversion is involved. Both come
from :func:`app.engine.metrics.tre`, the function the engine's evaluation uses.

Events: ``changed(select)`` after every change (``select``: the row to select or None).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from app.engine.types import Landmarks

from .events import EventGroup

FORMAT = "regstation-landmark-pairs"
SIDES = ("fixed", "moving")
MAX_UNDO = 200


def _point(xyz) -> np.ndarray:
    p = np.asarray(xyz, dtype=float).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ValueError(f"a landmark is 3 finite LPS mm coordinates (x, y, z), got {xyz!r}")
    return p


def _side(which: str) -> str:
    if which not in SIDES:
        raise ValueError(f"which must be 'fixed' or 'moving', got {which!r}")
    return which


class LandmarkPairs:
    """Numbered fixed/moving point pairs.

    Each pair is ``{"name": str, "fixed": (3,) float or None, "moving": (3,) float or None}``.
    Every change can be undone (:meth:`undo`).
    """

    def __init__(self):
        self.events = EventGroup("changed")
        self._pairs: list[dict] = []
        self._undo: list[list[dict]] = []

    # ------------------------------------------------------------------ edits
    def _snapshot(self) -> None:
        self._undo.append(self._copy())
        del self._undo[:-MAX_UNDO]

    def _copy(self) -> list[dict]:
        return [{"name": p["name"], "fixed": None if p["fixed"] is None else p["fixed"].copy(),
                 "moving": None if p["moving"] is None else p["moving"].copy()} for p in self._pairs]

    def _changed(self, select: Optional[int] = None) -> None:
        self.events.changed.emit(select)

    def add_point(self, which: str, xyz) -> int:
        """Add a ``which`` ('fixed' / 'moving') point at ``xyz`` (LPS mm).

        It completes the first pair that lacks a ``which`` point (so clicking fixed, then
        moving completes pair N), or starts a new pair. Returns the pair's row index.
        """
        which, p = _side(which), _point(xyz)
        self._snapshot()
        for i, pair in enumerate(self._pairs):
            if pair[which] is None:
                pair[which] = p
                self._changed(select=i)
                return i
        self._pairs.append({"name": self._next_name(), "fixed": None, "moving": None, which: p})
        self._changed(select=len(self._pairs) - 1)
        return len(self._pairs) - 1

    def _next_name(self) -> str:
        nums = [int(p["name"]) for p in self._pairs if str(p["name"]).isdigit()]
        return str(max(nums, default=0) + 1)

    def set_point(self, row: int, which: str, xyz) -> None:
        """Move the ``which`` point of pair ``row`` to ``xyz`` (LPS mm)."""
        which, p = _side(which), _point(xyz)
        if not 0 <= row < len(self._pairs):
            raise ValueError(f"no pair at row {row} (there are {len(self._pairs)})")
        self._snapshot()
        self._pairs[row][which] = p
        self._changed()

    def delete_rows(self, rows) -> None:
        rows = sorted({int(r) for r in rows if 0 <= int(r) < len(self._pairs)}, reverse=True)
        if not rows:
            return
        self._snapshot()
        for r in rows:
            del self._pairs[r]
        self._changed()

    def clear(self) -> None:
        if self._pairs:
            self._snapshot()
            self._pairs.clear()
            self._changed()

    def clear_side(self, which: str) -> int:
        """Remove every ``which`` point (pairs left empty are dropped); returns how many."""
        which = _side(which)
        n = self.point_count(which)
        if n:
            self._snapshot()
            for p in self._pairs:
                p[which] = None
            self._pairs = [p for p in self._pairs if p["fixed"] is not None or p["moving"] is not None]
            self._changed()
        return n

    def set_side(self, which: str, landmarks: Landmarks) -> int:
        """Replace the ``which`` points by ``landmarks`` (point i goes to pair i; new pairs are
        added as needed, named after the file's labels when they are free). Returns the count."""
        which = _side(which)
        self._snapshot()
        for p in self._pairs:
            p[which] = None
        for i, xyz in enumerate(landmarks.points):
            if i < len(self._pairs):
                self._pairs[i][which] = _point(xyz)
            else:
                name = str(landmarks.names[i]) if i < len(landmarks.names) and str(landmarks.names[i]) else ""
                if not name or any(q["name"] == name for q in self._pairs):
                    name = self._next_name()
                self._pairs.append({"name": name, "fixed": None, "moving": None, which: _point(xyz)})
        self._pairs = [p for p in self._pairs if p["fixed"] is not None or p["moving"] is not None]
        self._changed()
        return len(landmarks)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def undo(self) -> bool:
        """Go back one change; False when there is nothing to undo."""
        if not self._undo:
            return False
        self._pairs = self._undo.pop()
        self._changed()
        return True

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._pairs)

    def point_count(self, which: str) -> int:
        which = _side(which)
        return sum(1 for p in self._pairs if p[which] is not None)

    def pair_count(self, complete_only: bool = False) -> int:
        if complete_only:
            return sum(1 for p in self._pairs if p["fixed"] is not None and p["moving"] is not None)
        return len(self._pairs)

    def pairs(self) -> list[dict]:
        """Copies of the pairs."""
        return self._copy()

    def pair(self, row: int) -> dict:
        return self._pairs[row]

    def _complete(self) -> list[dict]:
        return [p for p in self._pairs if p["fixed"] is not None and p["moving"] is not None]

    def fixed_landmarks(self) -> Landmarks:
        """Fixed points of the complete pairs, ``(N, 3)`` LPS mm."""
        c = self._complete()
        return Landmarks(np.array([p["fixed"] for p in c]).reshape(-1, 3), [p["name"] for p in c])

    def moving_landmarks(self) -> Landmarks:
        """Moving points of the complete pairs, ``(N, 3)`` LPS mm (same order as the fixed)."""
        c = self._complete()
        return Landmarks(np.array([p["moving"] for p in c]).reshape(-1, 3), [p["name"] for p in c])

    def all_points(self, which: str) -> np.ndarray:
        """Every ``which`` point, complete pair or not, ``(N, 3)`` LPS mm (for drawing)."""
        which = _side(which)
        return np.array([p[which] for p in self._pairs if p[which] is not None]).reshape(-1, 3)

    def tre(self, transform=None) -> tuple[np.ndarray, np.ndarray]:
        """(before, after) TRE in mm per row (NaN where a pair is incomplete or, for after,
        without a transform). ``transform`` maps fixed points to moving points."""
        from app.engine.metrics import tre
        n = len(self._pairs)
        before, after = np.full(n, np.nan), np.full(n, np.nan)
        rows = [i for i, p in enumerate(self._pairs) if p["fixed"] is not None and p["moving"] is not None]
        if not rows:
            return before, after
        f = np.array([self._pairs[i]["fixed"] for i in rows])
        m = np.array([self._pairs[i]["moving"] for i in rows])
        before[rows] = tre(f, m)["per_point"]
        if transform is not None:
            try:
                after[rows] = tre(transform.transform_points(f), m)["per_point"]
            except Exception:  # noqa: BLE001 - a transform that fails on a point leaves NaN
                pass
        return before, after

    def tre_summary(self, transform=None) -> dict:
        """``{"tre_mean_mm", "tre_median_mm", "tre_max_mm", "tre_per_point_mm"}`` of the complete
        pairs after ``transform`` (identity: before); empty without complete pairs."""
        from app.engine.metrics import tre
        f, m = self.fixed_landmarks().points, self.moving_landmarks().points
        if not len(f):
            return {}
        mapped = transform.transform_points(f) if transform is not None else f
        t = tre(mapped, m)
        return {"tre_mean_mm": t["mean"], "tre_median_mm": t["median"], "tre_max_mm": t["max"],
                "tre_per_point_mm": t["per_point"]}

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """JSON-safe: ``{"format", "version", "space": "LPS", "pairs": [{"name", "fixed", "moving"}]}``."""
        return {"format": FORMAT, "version": 1, "space": "LPS", "units": "mm",
                "pairs": [{"name": p["name"],
                           "fixed": None if p["fixed"] is None else [float(v) for v in p["fixed"]],
                           "moving": None if p["moving"] is None else [float(v) for v in p["moving"]]}
                          for p in self._pairs]}

    def from_dict(self, d: dict) -> None:
        """Replace every pair by those of :meth:`to_dict` output (ValueError when malformed)."""
        if not isinstance(d, dict) or not isinstance(d.get("pairs", []), list):
            raise ValueError("not a landmark-pairs dictionary (expected a 'pairs' list)")
        if d.get("space", "LPS") != "LPS":
            raise ValueError(f"landmark pairs in space {d.get('space')!r}; LPS is expected")
        pairs = []
        for i, p in enumerate(d.get("pairs", [])):
            entry = {"name": str(p.get("name", i + 1))}
            for which in SIDES:
                v = p.get(which)
                if v is None:
                    entry[which] = None
                else:
                    a = np.asarray(v, dtype=float).reshape(-1)
                    if a.shape != (3,) or not np.all(np.isfinite(a)):
                        raise ValueError(f"pair {entry['name']}: {which} point must be 3 finite numbers, got {v!r}")
                    entry[which] = a
            pairs.append(entry)
        self._snapshot()
        self._pairs = pairs
        self._changed()
