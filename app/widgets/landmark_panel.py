"""Landmark tool: numbered fixed/moving point pairs with TRE before and after registration.

Points are LPS millimetres (xyz). A pair is complete when it has both a fixed and a moving
point; only complete pairs are returned by :meth:`LandmarkPanel.fixed_landmarks` /
:meth:`LandmarkPanel.moving_landmarks` (same order, same names), the form the engine's TRE uses.

TRE before = ``|fixed - moving|`` (the images as they lie in world space); TRE after =
``|T(fixed) - moving|`` with the run's transform ``T`` mapping fixed physical points to moving
physical points (:class:`app.engine.types.Transform`), so no inversion is involved.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.engine.types import Landmarks

COLUMNS = ["#", "Fixed\nx", "Fixed\ny", "Fixed\nz", "Moving\nx", "Moving\ny", "Moving\nz",
           "TRE\nbefore", "TRE\nafter"]
_FIXED_COLS = (1, 2, 3)
_MOVING_COLS = (4, 5, 6)
_TRE_BEFORE, _TRE_AFTER = 7, 8
_DASH = "–"
FILE_FILTER = "Landmarks (*.mrk.json *.fcsv *.csv *.json *.txt *.pts);;All files (*)"
EXPORT_FILTER = "Slicer markups (*.mrk.json);;Slicer fiducials (*.fcsv);;CSV (*.csv)"
FORMAT = "regstation-landmark-pairs"


def _fmt(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return _DASH if v is None or not np.isfinite(v) else fmt.format(v)


class LandmarkPanel(QWidget):
    """Place, edit, import and export corresponding landmark pairs.

    Signals
    -------
    landmarks_changed()
        Any point was added, moved, deleted or imported.
    point_selected(object)
        ``(3,)`` LPS mm of the point of the selected row (the fixed one, or the moving one when a
        moving cell is selected or the fixed one is missing).
    pick_target_changed(object)
        'fixed', 'moving' or None, when the pick mode changes (buttons or the property).
    """

    landmarks_changed = Signal()
    point_selected = Signal(object)
    pick_target_changed = Signal(object)

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._pairs: list[dict] = []          # {"name": str, "fixed": (3,) or None, "moving": (3,) or None}
        self._transform = None
        self._pick_target: Optional[str] = None
        self._autosave_path: Optional[Path] = None
        self._filling = False
        self.autosave_error: Optional[str] = None
        self.data_dir = lambda: ""     # where file dialogs start (the window points it next to the data)

        self.pick_fixed_button = QPushButton("Place in Fixed")
        self.pick_moving_button = QPushButton("Place in Moving")
        self.pick_off_button = QPushButton("Off")
        self._pick_group = QButtonGroup(self)
        self._pick_group.setExclusive(True)
        for b, tip in ((self.pick_fixed_button, "Click in the views to add the fixed point of the next pair"),
                       (self.pick_moving_button, "Click in the views to add the moving point of the next pair"),
                       (self.pick_off_button, "Stop placing points")):
            b.setCheckable(True)
            b.setToolTip(tip)
            self._pick_group.addButton(b)
        self.pick_off_button.setChecked(True)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed
                                   | QAbstractItemView.AnyKeyPressed)
        self.table.setAlternatingRowColors(True)
        hh = self.table.horizontalHeader()
        # columns share the width; a dock narrower than the minimum sizes scrolls sideways
        hh.setSectionResizeMode(QHeaderView.Stretch)
        hh.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        hh.setMinimumSectionSize(38)
        hh.setHighlightSections(False)
        font = hh.font()
        font.setPointSizeF(font.pointSizeF() * 0.9)
        hh.setFont(font)
        for c in _FIXED_COLS + _MOVING_COLS:
            self.table.horizontalHeaderItem(c).setToolTip("LPS mm; double-click to edit")
        self.table.horizontalHeaderItem(_TRE_BEFORE).setToolTip("|fixed - moving| in mm")
        self.table.horizontalHeaderItem(_TRE_AFTER).setToolTip("|T(fixed) - moving| in mm, T = the shown result")

        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("Delete the selected pairs (Del)")
        self.import_button = QToolButton()
        self.import_button.setText("Import")
        self.import_button.setPopupMode(QToolButton.InstantPopup)
        imenu = QMenu(self.import_button)
        imenu.addAction("Fixed landmarks…", lambda: self._on_import("fixed"))
        imenu.addAction("Moving landmarks…", lambda: self._on_import("moving"))
        self.import_button.setMenu(imenu)
        self.export_button = QToolButton()
        self.export_button.setText("Export")
        self.export_button.setPopupMode(QToolButton.InstantPopup)
        emenu = QMenu(self.export_button)
        emenu.addAction("Fixed landmarks…", lambda: self._on_export("fixed"))
        emenu.addAction("Moving landmarks…", lambda: self._on_export("moving"))
        self.export_button.setMenu(emenu)
        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)

        pick = QHBoxLayout()
        pick.addWidget(QLabel("Pick"))
        pick.addWidget(self.pick_fixed_button)
        pick.addWidget(self.pick_moving_button)
        pick.addWidget(self.pick_off_button)
        pick.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.delete_button)
        buttons.addStretch(1)
        buttons.addWidget(self.import_button)
        buttons.addWidget(self.export_button)
        lay = QVBoxLayout(self)
        lay.addLayout(pick)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.summary_label)
        lay.addLayout(buttons)

        self._pick_group.buttonToggled.connect(self._on_pick_button)
        self.table.itemChanged.connect(self._on_item_change)
        self.table.itemSelectionChanged.connect(self._on_selection_change)
        self.delete_button.clicked.connect(self.delete_selected)
        sc = QShortcut(QKeySequence.Delete, self.table)
        sc.setContext(Qt.WidgetShortcut)
        sc.activated.connect(self.delete_selected)
        self._refresh()

    # ================================================================ pick mode
    @property
    def pick_target(self) -> Optional[str]:
        """'fixed', 'moving' or None: where a click in the views adds a point."""
        return self._pick_target

    @pick_target.setter
    def pick_target(self, which: Optional[str]) -> None:
        which = which or None
        if which not in (None, "fixed", "moving"):
            raise ValueError(f"pick_target must be 'fixed', 'moving' or None, got {which!r}")
        if which == self._pick_target:
            return
        self._pick_target = which
        button = {"fixed": self.pick_fixed_button, "moving": self.pick_moving_button}.get(which, self.pick_off_button)
        was = self._pick_group.blockSignals(True)
        button.setChecked(True)
        self._pick_group.blockSignals(was)
        self.pick_target_changed.emit(which)

    @Slot(object, bool)
    def _on_pick_button(self, button, checked: bool) -> None:
        if not checked:
            return
        self.pick_target = {self.pick_fixed_button: "fixed", self.pick_moving_button: "moving"}.get(button)

    # ================================================================ model
    def add_point(self, which: str, xyz) -> int:
        """Add a ``which`` ('fixed' / 'moving') point at ``xyz`` (LPS mm).

        It completes the first pair that lacks a ``which`` point (so clicking fixed, then
        moving completes pair N), or starts a new pair. Returns the pair's row index.
        """
        if which not in ("fixed", "moving"):
            raise ValueError(f"which must be 'fixed' or 'moving', got {which!r}")
        p = np.asarray(xyz, dtype=float).reshape(-1)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise ValueError(f"a landmark is 3 finite LPS mm coordinates (x, y, z), got {xyz!r}")
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
        p = np.asarray(xyz, dtype=float).reshape(3)
        if not np.all(np.isfinite(p)):
            raise ValueError(f"non-finite landmark coordinates {xyz!r}")
        self._pairs[row][which] = p
        self._changed()

    def delete_rows(self, rows) -> None:
        rows = sorted({int(r) for r in rows if 0 <= int(r) < len(self._pairs)}, reverse=True)
        if not rows:
            return
        for r in rows:
            del self._pairs[r]
        self._changed()

    @Slot()
    def delete_selected(self) -> None:
        self.delete_rows(i.row() for i in self.table.selectionModel().selectedRows())

    def clear(self) -> None:
        if self._pairs:
            self._pairs.clear()
            self._changed()

    def clear_side(self, which: str) -> int:
        """Remove every ``which`` ('fixed' / 'moving') point (pairs left empty are dropped);
        returns how many points were removed."""
        if which not in ("fixed", "moving"):
            raise ValueError(f"which must be 'fixed' or 'moving', got {which!r}")
        n = sum(1 for p in self._pairs if p[which] is not None)
        if n:
            for p in self._pairs:
                p[which] = None
            self._pairs = [p for p in self._pairs if p["fixed"] is not None or p["moving"] is not None]
            self._changed()
        return n

    def point_count(self, which: str) -> int:
        """Number of ``which`` ('fixed' / 'moving') points, complete pairs or not."""
        return sum(1 for p in self._pairs if p[which] is not None)

    def pair_count(self, complete_only: bool = False) -> int:
        if complete_only:
            return sum(1 for p in self._pairs if p["fixed"] is not None and p["moving"] is not None)
        return len(self._pairs)

    def pairs(self) -> list[dict]:
        """Copies of the pairs: ``{"name", "fixed": (3,) or None, "moving": (3,) or None}``."""
        return [{"name": p["name"], "fixed": None if p["fixed"] is None else p["fixed"].copy(),
                 "moving": None if p["moving"] is None else p["moving"].copy()} for p in self._pairs]

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

    def set_transform(self, transform) -> None:
        """The current result's transform (fixed points -> moving points), or None: TRE after."""
        self._transform = transform
        self._refresh()

    def tre(self) -> tuple[np.ndarray, np.ndarray]:
        """(before, after) TRE in mm per row (NaN where a pair is incomplete / no transform)."""
        n = len(self._pairs)
        before, after = np.full(n, np.nan), np.full(n, np.nan)
        rows = [i for i, p in enumerate(self._pairs) if p["fixed"] is not None and p["moving"] is not None]
        if not rows:
            return before, after
        f = np.array([self._pairs[i]["fixed"] for i in rows])
        m = np.array([self._pairs[i]["moving"] for i in rows])
        before[rows] = np.linalg.norm(f - m, axis=1)
        if self._transform is not None:
            try:
                after[rows] = np.linalg.norm(self._transform.transform_points(f) - m, axis=1)
            except Exception:  # noqa: BLE001 - a transform that fails on a point leaves NaN
                pass
        return before, after

    # ================================================================ persistence
    def to_dict(self) -> dict:
        """JSON-safe: ``{"format", "version", "space": "LPS", "pairs": [{"name", "fixed", "moving"}]}``."""
        return {"format": FORMAT, "version": 1, "space": "LPS", "units": "mm",
                "pairs": [{"name": p["name"],
                           "fixed": None if p["fixed"] is None else [float(v) for v in p["fixed"]],
                           "moving": None if p["moving"] is None else [float(v) for v in p["moving"]]}
                          for p in self._pairs]}

    def from_dict(self, d: dict) -> None:
        """Replace every pair by those of :meth:`to_dict` output."""
        if not isinstance(d, dict) or not isinstance(d.get("pairs", []), list):
            raise ValueError("not a landmark-pairs dictionary (expected a 'pairs' list)")
        if d.get("space", "LPS") != "LPS":
            raise ValueError(f"landmark pairs in space {d.get('space')!r}; LPS is expected")
        pairs = []
        for i, p in enumerate(d.get("pairs", [])):
            entry = {"name": str(p.get("name", i + 1))}
            for which in ("fixed", "moving"):
                v = p.get(which)
                if v is None:
                    entry[which] = None
                else:
                    a = np.asarray(v, dtype=float).reshape(-1)
                    if a.shape != (3,) or not np.all(np.isfinite(a)):
                        raise ValueError(f"pair {entry['name']}: {which} point must be 3 finite numbers, got {v!r}")
                    entry[which] = a
            pairs.append(entry)
        self._pairs = pairs
        self._changed()

    def import_file(self, path, which: str) -> int:
        """Read a landmark file (``.mrk.json``, ``.fcsv``, ``.csv``, ...) into the ``which`` side:
        point i goes to pair i (replacing that side's points), new pairs are added as needed.
        Returns the number of points read. Raises ``app.engine.io.LandmarkError``."""
        from app.engine import io
        if which not in ("fixed", "moving"):
            raise ValueError(f"which must be 'fixed' or 'moving', got {which!r}")
        lm = io.read_landmarks(str(path))
        for p in self._pairs:
            p[which] = None
        for i, xyz in enumerate(lm.points):
            if i < len(self._pairs):
                self._pairs[i][which] = np.asarray(xyz, float)
            else:
                name = str(lm.names[i]) if i < len(lm.names) and str(lm.names[i]) else self._next_name()
                if any(q["name"] == name for q in self._pairs):
                    name = self._next_name()
                self._pairs.append({"name": name, "fixed": None, "moving": None, which: np.asarray(xyz, float)})
        self._pairs = [p for p in self._pairs if p["fixed"] is not None or p["moving"] is not None]
        self._changed()
        return len(lm)

    def export_file(self, path, which: str) -> int:
        """Write the ``which`` points of the complete pairs (LPS); the format follows the extension
        (``.mrk.json``, ``.fcsv``, ``.csv``). Returns the number written."""
        from app.engine import io
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

    # ================================================================ view
    def _changed(self, select: Optional[int] = None) -> None:
        self._refresh()
        if select is not None and 0 <= select < self.table.rowCount():
            was = self.table.blockSignals(True)
            self.table.selectRow(select)
            self.table.blockSignals(was)
            self.table.scrollToItem(self.table.item(select, 0))
        self._autosave()
        self.landmarks_changed.emit()

    def _refresh(self) -> None:
        before, after = self.tre()
        self._filling = True
        try:
            t = self.table
            t.setRowCount(len(self._pairs))
            for r, p in enumerate(self._pairs):
                self._set(r, 0, p["name"], editable=False, align=Qt.AlignCenter)
                for cols, which in ((_FIXED_COLS, "fixed"), (_MOVING_COLS, "moving")):
                    pt = p[which]
                    tip = "" if pt is None else f"{which} LPS mm: " + ", ".join(f"{v:.4f}" for v in pt)
                    for k, c in enumerate(cols):
                        # 0.1 mm on screen; the point keeps full precision (an edit changes one axis)
                        self._set(r, c, _DASH if pt is None else f"{pt[k]:.1f}", editable=pt is not None, tip=tip)
                self._set(r, _TRE_BEFORE, _fmt(before[r]), editable=False)
                self._set(r, _TRE_AFTER, _fmt(after[r]), editable=False)
        finally:
            self._filling = False
        n, c = len(self._pairs), self.pair_count(complete_only=True)
        text = f"{c} pair{'s' if c != 1 else ''}"
        if n > c:
            text += f" ({n - c} incomplete)"
        if c:
            ok = np.isfinite(before)
            text += f" · mean TRE before {np.nanmean(before[ok]):.2f} mm"
            if np.isfinite(after).any():
                text += f" → after {np.nanmean(after[np.isfinite(after)]):.2f} mm"
        if self._pick_target is None and n == 0:
            text += " · choose Place in Fixed, then click in the views"
        self.summary_label.setText(text)
        self.delete_button.setEnabled(n > 0)
        self.export_button.setEnabled(c > 0)

    def _set(self, r: int, c: int, text: str, editable: bool, align=Qt.AlignRight | Qt.AlignVCenter,
             tip: str = "") -> None:
        it = self.table.item(r, c)
        if it is None:
            it = QTableWidgetItem()
            self.table.setItem(r, c, it)
        it.setText(text)
        it.setToolTip(tip)
        it.setTextAlignment(align)
        flags = Qt.ItemIsSelectable | Qt.ItemIsEnabled
        if editable:
            flags |= Qt.ItemIsEditable
        it.setFlags(flags)

    @Slot(QTableWidgetItem)
    def _on_item_change(self, item: QTableWidgetItem) -> None:
        if self._filling:
            return
        r, c = item.row(), item.column()
        which = "fixed" if c in _FIXED_COLS else "moving" if c in _MOVING_COLS else None
        if which is None or not (0 <= r < len(self._pairs)) or self._pairs[r][which] is None:
            self._refresh()
            return
        try:
            v = float(item.text().replace(",", ".").strip())
            if not np.isfinite(v):
                raise ValueError
        except ValueError:
            self._refresh()      # not a number: show the old value again
            return
        cols = _FIXED_COLS if which == "fixed" else _MOVING_COLS
        p = self._pairs[r][which].copy()
        p[cols.index(c)] = v
        self._pairs[r][which] = p
        self._changed()

    @Slot()
    def _on_selection_change(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if len(rows) != 1:
            return
        r = rows[0].row()
        if not 0 <= r < len(self._pairs):
            return
        pair = self._pairs[r]
        prefer_moving = self.table.currentColumn() in _MOVING_COLS
        pt = pair["moving"] if (prefer_moving or pair["fixed"] is None) else pair["fixed"]
        if pt is None:
            pt = pair["fixed"]
        if pt is not None:
            self.point_selected.emit(np.asarray(pt, float).copy())

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
        path, _ = QFileDialog.getSaveFileName(self, f"Export {which} landmarks",
                                              str(Path(self.data_dir()) / f"{which}.mrk.json"), EXPORT_FILTER)
        if not path:
            return
        try:
            n = self.export_file(path, which)
            self.summary_label.setText(f"Wrote {n} {which} landmarks to {Path(path).name}")
        except Exception as e:  # noqa: BLE001
            self.summary_label.setText(f"Could not write {Path(path).name}: {e}")
