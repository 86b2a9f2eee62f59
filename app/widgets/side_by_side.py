"""Two slice views side by side, each a view of its own mirror of the workspace's state.

* ``"runs"``: run A | run B on the fixed image, same overlays, linked cursors (a click or a
  scroll in either view moves both, and the four-up views too);
* ``"landmarks"``: the fixed image | the moving image, each in its own physical space with its
  own cursor; a click in the left view places the fixed point of the next pair, a click in the
  right view its moving point (Slicer's habit: no switching one view between the images).

The mirrors are :class:`ViewerState` objects kept in step with the workspace's state through
its events; nothing here owns data.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QGridLayout, QHBoxLayout, QLabel, QSizePolicy, QWidget

from app.viewer.viewer_state import LAYERS, ViewerState
from app.viewer.workspace import Workspace

from .slice_view import SliceView

MODES = ("runs", "landmarks")
_HEAD_STYLE = "font-weight: bold; padding: 1px 4px;"


class SideBySideView(QWidget):
    """A | B (two runs) or fixed | moving (landmark picking).

    Signals
    -------
    mode_changed(str)
    """

    mode_changed = Signal(str)

    def __init__(self, workspace: Workspace, parent: Optional[QWidget] = None, orientation: str = "axial"):
        super().__init__(parent)
        self.ws = workspace
        self.main = workspace.state
        self.left_state, self.right_state = ViewerState(), ViewerState()
        self.mode = "runs"
        self.run_b: Optional[int] = None
        self.pick_guides = False        # 'landmarks' mode places guide pairs (guided correction) instead
        self._syncing = False

        self.orientation_combo = QComboBox()
        for o in ("axial", "coronal", "sagittal"):
            self.orientation_combo.addItem(o, o)
        self.run_a_combo, self.run_b_combo = QComboBox(), QComboBox()
        for c in (self.run_a_combo, self.run_b_combo):
            c.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            c.setMinimumContentsLength(10)
        self.left_head, self.right_head = QLabel(), QLabel()
        for h in (self.left_head, self.right_head):
            h.setStyleSheet(_HEAD_STYLE)
        self.hint = QLabel()
        self.hint.setStyleSheet("color: #555;")
        # long run names and hints must not widen the window (the stack takes its pages' minimum)
        for lab in (self.left_head, self.right_head, self.hint):
            lab.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)

        bar = QHBoxLayout()
        bar.addWidget(QLabel("View"))
        bar.addWidget(self.orientation_combo)
        self._run_widgets = [QLabel("A"), self.run_a_combo, QLabel("B"), self.run_b_combo]
        for w in self._run_widgets:
            bar.addWidget(w)
        bar.addWidget(self.hint, 1)
        self.grid = QGridLayout(self)
        self.grid.setContentsMargins(2, 2, 2, 2)
        self.grid.setSpacing(3)
        self.grid.addLayout(bar, 0, 0, 1, 2)
        self.grid.addWidget(self.left_head, 1, 0)
        self.grid.addWidget(self.right_head, 1, 1)
        self.grid.setRowStretch(2, 1)
        self.left = self.right = None
        self._make_views(orientation)

        ev = self.main.events
        for e in (ev.layers, ev.overlay, ev.window, ev.landmarks, ev.flicker, ev.interaction):
            e.connect(self._on_main_change)
        ev.cursor.connect(self._on_main_cursor)
        self.left_state.events.cursor.connect(self._on_left_cursor)
        self.right_state.events.cursor.connect(self._on_right_cursor)
        r = self.ws.runs.events
        for e in (r.added, r.removed, r.renamed, r.cleared, r.current):
            e.connect(self._on_runs_change)
        self.orientation_combo.currentIndexChanged.connect(lambda *_: self._make_views(self.orientation_combo.currentData()))
        self.run_a_combo.activated.connect(self._on_run_a)
        self.run_b_combo.activated.connect(self._on_run_b)
        self._on_runs_change()

    # ------------------------------------------------------------------ construction
    def _make_views(self, orientation: str) -> None:
        for v in (self.left, self.right):
            if v is not None:
                v.close_vtk()
                v.setParent(None)
                v.deleteLater()
        self.left = SliceView(self.left_state, orientation)
        self.right = SliceView(self.right_state, orientation)
        self.grid.addWidget(self.left, 2, 0)
        self.grid.addWidget(self.right, 2, 1)
        self.left.clicked.connect(lambda p: self._on_click("fixed", p))
        self.right.clicked.connect(lambda p: self._on_click("moving", p))
        self.sync()

    def close_vtk(self) -> None:
        for v in (self.left, self.right):
            if v is not None:
                v.close_vtk()

    # ------------------------------------------------------------------ mode
    def set_mode(self, mode: str) -> None:
        """'runs' (A | B) or 'landmarks' (fixed | moving)."""
        if mode not in MODES:
            raise ValueError(f"side-by-side mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != self.mode:
            self.mode = mode
            for w in self._run_widgets:
                w.setVisible(mode == "runs")
            if mode == "landmarks" and self.main.moving is not None:
                self.right_state.set_layer("fixed", None)      # the moving grid: its own centre
            self.sync()
            self.mode_changed.emit(mode)

    # ------------------------------------------------------------------ runs A | B
    def _on_runs_change(self, *_) -> None:
        runs = self.ws.runs
        if self.run_b is not None and self.run_b >= len(runs):
            self.run_b = None
        if len(runs) >= 2 and (self.run_b is None or self.run_b == runs.current):
            cur = runs.current if runs.current is not None else len(runs) - 1
            self.run_b = cur - 1 if cur > 0 else 1        # B: the run before A
        for c in (self.run_a_combo, self.run_b_combo):
            c.blockSignals(True)
            c.clear()
            c.addItem("(no run)", None)
            for i, r in enumerate(runs.runs):
                c.addItem(f"{i + 1}: {r.name}", i)
        self.run_a_combo.setCurrentIndex(self.run_a_combo.findData(runs.current) if runs.current is not None else 0)
        self.run_b_combo.setCurrentIndex(self.run_b_combo.findData(self.run_b) if self.run_b is not None else 0)
        for c in (self.run_a_combo, self.run_b_combo):
            c.blockSignals(False)
        self.sync()

    def _on_run_a(self, *_) -> None:
        i = self.run_a_combo.currentData()
        self.ws.runs.set_current(i)

    def _on_run_b(self, *_) -> None:
        self.set_run_b(self.run_b_combo.currentData())

    def set_run_b(self, index: Optional[int]) -> None:
        """The run shown on the right in 'runs' mode (A is the workspace's current run)."""
        if index is not None and not 0 <= index < len(self.ws.runs):
            raise ValueError(f"no run {index} (there are {len(self.ws.runs)})")
        self.run_b = index
        self.run_b_combo.setCurrentIndex(self.run_b_combo.findData(index) if index is not None else 0)
        self.sync()

    # ------------------------------------------------------------------ mirroring
    def _on_main_change(self, *args) -> None:
        self.sync()
        if args and args[0] == "error_map":          # a run's error map was computed or dropped
            for dst in (self.left_state, self.right_state):
                dst.error_map_changed()

    def sync(self) -> None:
        """Bring both mirrors in step with the workspace."""
        if self._syncing or self.left is None:
            return
        self._syncing = True
        try:
            if self.mode == "runs":
                self._sync_runs()
            else:
                self._sync_landmarks()
        finally:
            self._syncing = False

    def _copy_layers(self, dst: ViewerState, mapping: dict) -> None:
        for role in LAYERS:
            vol = mapping.get(role)
            if getattr(dst, role) is not vol:
                dst.set_layer(role, vol)

    def _sync_runs(self) -> None:
        m = self.main
        runs = self.ws.runs
        b = runs[self.run_b].result if self.run_b is not None and self.run_b < len(runs) else None
        for dst, result in ((self.left_state, m.result), (self.right_state, b)):
            self._copy_layers(dst, {r: getattr(m, r) for r in LAYERS})
            for layer, wl in m.windows.items():
                dst.set_window(layer, *wl)
            dst.set_overlay(**dataclasses.asdict(m.overlay))
            if dst.label_table is not m.label_table:
                dst.set_label_table(m.label_table)
            dst.set_result(result)
            dst.set_landmarks(m.fixed_points, m.moving_points, m.selected_point)
            dst.set_guides(m.guide_fixed_points, m.guide_moving_points)
            dst.set_flicker_phase(m.flicker_phase)
            dst.set_interaction(m.interaction if m.interaction != "pick" else "cursor")
            dst.set_cursor(m.cursor)
        if m.overlay.error_map and m.overlay.error_max_mm == 0:
            # A and B's error maps on one colour scale (each map's own would mislead the comparison)
            tops = [dst.error_scale_mm() for dst in (self.left_state, self.right_state) if dst.error_map is not None]
            for dst in (self.left_state, self.right_state):
                dst.set_overlay(error_max_mm=max(tops) if len(tops) == 2 else 0.0)
        a = runs.current_run
        b_run = runs[self.run_b] if self.run_b is not None and self.run_b < len(runs) else None
        self.left_head.setText(f"A: {a.name}" if a is not None else "A: no run (the moving image as it lies)")
        self.right_head.setText(f"B: {b_run.name}" if b_run is not None else "B: choose a second run")
        self.hint.setText("linked cursors: click or scroll in either view")

    def _sync_landmarks(self) -> None:
        m = self.main
        lm = self._pairs()
        plain = {"mode": "none", "grid": False, "jacobian": False}
        self._copy_layers(self.left_state, {"fixed": m.fixed, "fixed_labels": m.fixed_labels})
        self._copy_layers(self.right_state, {"fixed": m.moving, "fixed_labels": m.moving_labels})
        for dst, src_layer, fill in ((self.left_state, "fixed", "fixed"), (self.right_state, "moving", "warped")):
            if src_layer in m.windows:
                dst.set_window("fixed", *m.windows[src_layer])
            contours = m.overlay.contours_fixed if src_layer == "fixed" else m.overlay.contours_warped
            dst.set_overlay(**plain, contours_fixed=contours, contours_warped=False,
                            label_fill="fixed" if m.overlay.label_fill in (fill,) else "none",
                            label_opacity=m.overlay.label_opacity)
            if dst.label_table is not m.label_table:
                dst.set_label_table(m.label_table)
            dst.set_result(None)
            dst.set_interaction("pick")
        self.left_state.set_landmarks(lm.all_points("fixed"), np.zeros((0, 3)), None)
        self.right_state.set_landmarks(np.zeros((0, 3)), lm.all_points("moving"), None)
        self.left_state.set_cursor(m.cursor)
        nf, nm = lm.point_count("fixed"), lm.point_count("moving")
        kind = "guide point" if self.pick_guides else "point"
        self.left_head.setText(f"Fixed image · {nf} {kind}{'s' if nf != 1 else ''}")
        self.right_head.setText(f"Moving image · {nm} {kind}{'s' if nm != 1 else ''}")
        nxt = "fixed (left)" if nf <= nm else "moving (right)"
        self.hint.setText(f"click to place points; next: {nxt} · wheel = slice · Ctrl+Z undoes")

    def _on_main_cursor(self, xyz) -> None:
        if self._syncing:
            return
        self.left_state.set_cursor(xyz)
        if self.mode == "runs":
            self.right_state.set_cursor(xyz)

    def _on_left_cursor(self, xyz) -> None:
        if not self._syncing:
            self.main.set_cursor(xyz)

    def _on_right_cursor(self, xyz) -> None:
        if not self._syncing and self.mode == "runs":
            self.main.set_cursor(xyz)

    # ------------------------------------------------------------------ picking
    def _pairs(self):
        """The pair list clicks add to: the guide pairs while guides are picked, else the landmarks."""
        return self.ws.guides if self.pick_guides else self.ws.landmarks

    def set_pick_guides(self, on: bool) -> None:
        """Clicks in 'landmarks' mode place guide pairs (True) or evaluation landmarks (False)."""
        if bool(on) != self.pick_guides:
            self.pick_guides = bool(on)
            self.sync()

    def _on_click(self, which: str, xyz) -> None:
        if self.mode != "landmarks":
            return
        p = np.asarray(xyz, float).reshape(3)
        self._pairs().add_point(which, p)
        (self.left_state if which == "fixed" else self.right_state).set_cursor(p)

    def views(self) -> tuple[SliceView, SliceView]:
        return self.left, self.right

    def flush(self) -> None:
        for v in (self.left, self.right):
            v.flush()

