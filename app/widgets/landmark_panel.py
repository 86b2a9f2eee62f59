"""Landmark tool: numbered fixed/moving point pairs with TRE before and after registration.

Points are LPS millimetres (xyz). A pair is complete when it has both a fixed and a moving
point; only complete pairs are returned by :meth:`LandmarkPanel.fixed_landmarks` /
:meth:`LandmarkPanel.moving_landmarks` (same order, same names), the form the engine's TRE uses.

TRE before = ``|fixed - moving|`` (the images as they lie in world space); TRE after =
``|T(fixed) - moving|`` with the run's transform ``T`` mapping fixed physical points to moving
physical points (:class:`app.engine.types.Transform`), so no inversion is involved.

This module holds the panel: pick mode, the model's operations, and the table of pairs with
their TRE. Import, export, the session state and the autosave are in
:mod:`app.widgets.landmark_files`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.engine.types import Landmarks
from app.viewer.landmarks import FORMAT, LandmarkPairs  # noqa: F401 - FORMAT kept for importers

from .landmark_files import EXPORT_FILTER, FILE_FILTER, LandmarkFilesMixin, export_pairs  # noqa: F401 - re-exported

COLUMNS = ["#", "Fixed\nx", "Fixed\ny", "Fixed\nz", "Moving\nx", "Moving\ny", "Moving\nz",
           "TRE\nbefore", "TRE\nafter"]
_FIXED_COLS = (1, 2, 3)
_MOVING_COLS = (4, 5, 6)
_TRE_BEFORE, _TRE_AFTER = 7, 8
_DASH = "–"


def _fmt(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return _DASH if v is None or not np.isfinite(v) else fmt.format(v)


class LandmarkPanel(LandmarkFilesMixin, QWidget):
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

    def __init__(self, parent: Optional[QWidget] = None, model: Optional[LandmarkPairs] = None):
        super().__init__(parent)
        self.model = model if model is not None else LandmarkPairs()
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
        self.delete_all_button = QPushButton("Delete all…")
        self.delete_all_button.setToolTip("Delete every pair (asks first; Undo brings them back)")
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Undo the last landmark change (Ctrl+Z)")
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
        emenu.addAction("Both sides in one file…", lambda: self._on_export("both"))
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
        buttons.addWidget(self.delete_all_button)
        buttons.addWidget(self.undo_button)
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
        self.delete_all_button.clicked.connect(self.ask_delete_all)
        self.undo_button.clicked.connect(self.undo)
        undo = QShortcut(QKeySequence.Undo, self)
        undo.setContext(Qt.WindowShortcut)      # the only undo in the window: Ctrl+Z anywhere
        undo.activated.connect(self.undo)
        sc = QShortcut(QKeySequence.Delete, self.table)
        sc.setContext(Qt.WidgetShortcut)
        sc.activated.connect(self.delete_selected)
        self.model.events.changed.connect(self._on_model_change)
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

    # ================================================================ model (delegated)
    def add_point(self, which: str, xyz) -> int:
        """Add a ``which`` point at ``xyz`` (LPS mm); see :meth:`LandmarkPairs.add_point`."""
        return self.model.add_point(which, xyz)

    def set_point(self, row: int, which: str, xyz) -> None:
        self.model.set_point(row, which, xyz)

    def delete_rows(self, rows) -> None:
        self.model.delete_rows(rows)

    @Slot()
    def delete_selected(self) -> None:
        self.delete_rows(i.row() for i in self.table.selectionModel().selectedRows())

    def clear(self) -> None:
        self.model.clear()

    @Slot()
    def ask_delete_all(self) -> bool:
        """Delete every pair after the user confirms (True when deleted)."""
        n = len(self.model)
        if not n:
            return False
        ans = QMessageBox.question(self, "Delete all landmarks",
                                   f"Delete all {n} landmark pair{'s' if n != 1 else ''}? (Undo brings them back.)",
                                   QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
        if ans != QMessageBox.Yes:
            return False
        self.model.clear()
        return True

    def clear_side(self, which: str) -> int:
        return self.model.clear_side(which)

    def point_count(self, which: str) -> int:
        return self.model.point_count(which)

    def pair_count(self, complete_only: bool = False) -> int:
        return self.model.pair_count(complete_only)

    def pairs(self) -> list[dict]:
        return self.model.pairs()

    def fixed_landmarks(self) -> Landmarks:
        return self.model.fixed_landmarks()

    def moving_landmarks(self) -> Landmarks:
        return self.model.moving_landmarks()

    def undo(self) -> bool:
        return self.model.undo()

    def set_transform(self, transform) -> None:
        """The current result's transform (fixed points -> moving points), or None: TRE after."""
        self._transform = transform
        self._refresh()

    def tre(self) -> tuple[np.ndarray, np.ndarray]:
        """(before, after) TRE in mm per row (NaN where a pair is incomplete / no transform)."""
        return self.model.tre(self._transform)

    # ================================================================ view
    @property
    def _pairs(self) -> list[dict]:
        return self.model._pairs

    def _on_model_change(self, select: Optional[int] = None) -> None:
        import shiboken6
        if not shiboken6.isValid(self):       # a model outlives the panels that showed it
            self.model.events.changed.disconnect(self._on_model_change)
            return
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
        self.delete_all_button.setEnabled(n > 0)
        self.undo_button.setEnabled(self.model.can_undo)
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
        self.model.set_point(r, which, p)

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
