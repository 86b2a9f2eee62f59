"""The landmark panel's files: import one side from a landmark file, export one side or both,
the JSON state a session stores, and the autosave written on every change.

Points are LPS millimetres; the formats (``.mrk.json``, ``.fcsv``, ``.csv``, ...) are read and
written by :mod:`app.engine.io`. :class:`LandmarkFilesMixin` is combined into
:class:`app.widgets.landmark_panel.LandmarkPanel`; :func:`export_pairs` writes both sides of a
:class:`~app.viewer.landmarks.LandmarkPairs` into one file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtWidgets import QFileDialog

from app.engine.types import Landmarks
from app.viewer.landmarks import LandmarkPairs

FILE_FILTER = "Landmarks (*.mrk.json *.fcsv *.csv *.json *.txt *.pts);;All files (*)"
EXPORT_FILTER = "Slicer markups (*.mrk.json);;Slicer fiducials (*.fcsv);;CSV (*.csv)"


class LandmarkFilesMixin:
    """Import, export, session state and autosave of the landmark pairs (see the module docstring)."""

    # ================================================================ persistence
    def to_dict(self) -> dict:
        return self.model.to_dict()

    def from_dict(self, d: dict) -> None:
        self.model.from_dict(d)

    def import_file(self, path, which: str) -> int:
        """Read a landmark file (``.mrk.json``, ``.fcsv``, ``.csv``, ...) into the ``which`` side:
        point i goes to pair i (replacing that side's points), new pairs are added as needed.
        Returns the number of points read. Raises ``app.engine.io.LandmarkError``."""
        from app.engine import io
        if which not in ("fixed", "moving"):
            raise ValueError(f"which must be 'fixed' or 'moving', got {which!r}")
        return self.model.set_side(which, io.read_landmarks(str(path)))

    def export_file(self, path, which: str) -> int:
        """Write the points of the complete pairs (LPS); the format follows the extension
        (``.mrk.json``, ``.fcsv``, ``.csv``). ``which``: 'fixed', 'moving' or 'both' (one file:
        CSV with ``name,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z``, or a Slicer markups
        file with the fixed points then the moving ones, labelled ``F-<name>`` / ``M-<name>``).
        Returns the number of pairs written."""
        from app.engine import io
        if which == "both":
            return export_pairs(self.model, path)
        lm = self.fixed_landmarks() if which == "fixed" else self.moving_landmarks()
        io.write_landmarks(lm, str(path))
        return len(lm)

    def set_autosave_path(self, path) -> None:
        """Write :meth:`to_dict` (JSON) atomically to ``path`` on every change (None: off)."""
        self._autosave_path = Path(path) if path else None
        if self._autosave_path is not None:
            self._autosave()

    @property
    def autosave_path(self) -> Optional[Path]:
        return self._autosave_path

    def _autosave(self) -> None:
        if self._autosave_path is None:
            return
        from app.engine.io import atomic_path
        try:
            self._autosave_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._autosave_path) as tmp:
                Path(tmp).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
            self.autosave_error = None
        except Exception as e:  # noqa: BLE001 - autosave must never break the GUI
            self.autosave_error = f"landmark autosave failed: {e}"
            self.summary_label.setText(self.autosave_error)

    # ================================================================ file dialogs
    def _on_import(self, which: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Import {which} landmarks", self.data_dir(), FILE_FILTER)
        if not path:
            return
        try:
            n = self.import_file(path, which)
            self.summary_label.setText(f"Read {n} {which} landmarks from {Path(path).name}")
        except Exception as e:  # noqa: BLE001 - a bad file is a message
            self.summary_label.setText(f"Could not read {Path(path).name}: {e}")

    def _on_export(self, which: str) -> None:
        default = "landmark_pairs.csv" if which == "both" else f"{which}.mrk.json"
        flt = "CSV, one row per pair (*.csv);;" + EXPORT_FILTER if which == "both" else EXPORT_FILTER
        path, _ = QFileDialog.getSaveFileName(self, f"Export {which} landmarks",
                                              str(Path(self.data_dir()) / default), flt)
        if not path:
            return
        try:
            n = self.export_file(path, which)
            self.summary_label.setText(f"Wrote {n} {which} landmarks to {Path(path).name}")
        except Exception as e:  # noqa: BLE001
            self.summary_label.setText(f"Could not write {Path(path).name}: {e}")


def export_pairs(model: LandmarkPairs, path) -> int:
    """Both sides of the complete pairs in one file (LPS mm): ``.csv`` with columns ``name,
    fixed_x, fixed_y, fixed_z, moving_x, moving_y, moving_z``; otherwise a markups file
    (``.mrk.json`` / ``.fcsv``) holding the fixed points then the moving ones, labelled
    ``F-<name>`` and ``M-<name>``. Returns the number of pairs."""
    from app.engine import io
    from app.engine.io import atomic_path
    f, m = model.fixed_landmarks(), model.moving_landmarks()
    path = Path(path)
    if path.name.lower().endswith(".csv"):
        with atomic_path(path) as tmp:
            rows = ["name,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z"]
            for name, a, b in zip(f.names, f.points, m.points):
                rows.append(",".join([str(name)] + [repr(float(v)) for v in (*a, *b)]))
            Path(tmp).write_text("\n".join(rows) + "\n", encoding="utf-8")
    else:
        both = Landmarks(np.vstack([f.points, m.points]).reshape(-1, 3),
                         [f"F-{n}" for n in f.names] + [f"M-{n}" for n in m.names])
        io.write_landmarks(both, str(path))
    return len(f)
