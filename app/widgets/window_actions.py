"""The main window's commands: its actions (with shortcuts), the menu bar, the toolbar and the
Help menu's texts.

:class:`ActionsMixin` is combined into :class:`app.widgets.main_window.MainWindow`; its builders run
once, while the window assembles (after the docks, so that View > Panels lists them). The
actions only call the window's own methods or the :class:`ViewerState` setters; keeping the
checked state in step with the state is done by the window's event handlers
(:mod:`app.widgets.window_interaction`).

Attributes it creates on the window: ``act_*``, ``unload_actions``, ``layout_actions``,
``load_actions`` (disabled while a run goes), ``mode_actions``, ``toggle_actions`` and the
action groups.
"""
from __future__ import annotations

from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import QDockWidget, QMessageBox

from .overlay_panel import MODES
from .window_layers import ROLE_TITLES


class ActionsMixin:
    """Actions, menus and toolbar of the main window (see the module docstring)."""

    def _build_actions(self) -> None:
        def act(text, slot, shortcut=None, checkable=False, tip=None):
            a = QAction(text, self)
            if shortcut:
                a.setShortcut(QKeySequence(shortcut))
            a.setCheckable(checkable)
            if tip:
                a.setStatusTip(tip)
            a.triggered.connect(slot)
            return a

        self.act_open_fixed = act("Open &fixed image…", lambda: self._ask_open("fixed"), "Ctrl+O")
        self.act_open_moving = act("Open &moving image…", lambda: self._ask_open("moving"), "Ctrl+Shift+O")
        self.act_open_fixed_labels = act("Open fixed &labels…", lambda: self._ask_open("fixed_labels"))
        self.act_open_moving_labels = act("Open moving l&abels…", lambda: self._ask_open("moving_labels"))
        self.act_open_session = act("Open &session…", self._ask_open_session)
        self.act_open_colour_table = act("Open label &colour table…", self._ask_open_colour_table,
                                         tip="label names and colours: Slicer .ctbl/.txt, ITK-SNAP, FreeSurfer LUT")
        self.act_save_session = act("&Save session", self._ask_save_session, "Ctrl+S")
        self.act_save_session_as = act("Save session &as…", lambda: self._ask_save_session(force_ask=True))
        self.act_save_results = act("Save &results…", self._ask_save_results, "Ctrl+E",
                                    tip="warped image, transform, displacement field, landmarks, metrics")
        self.act_quit = act("&Quit", self.close, "Ctrl+Q")
        self.unload_actions = {role: act(f"Close {title}", lambda checked=False, r=role: self.unload_layer(r))
                               for role, title in ROLE_TITLES.items()}
        self.act_unload_all = act("Close all", lambda: self.unload_all(), tip="every layer, landmark and run")
        self.act_reset_views = act("&Reset views", self.reset_views, "Ctrl+R")
        self.layout_group = QActionGroup(self)
        self.layout_actions = {}
        for key, text, sc in (("four_up", "Four-up views", "Ctrl+Shift+1"),
                              ("runs", "Compare two runs side by side (A | B)", "Ctrl+Shift+2"),
                              ("landmarks", "Place landmarks side by side (fixed | moving)", "Ctrl+Shift+3")):
            a = act(text, lambda checked=False, k=key: self.set_view_layout(k), sc, True)
            self.layout_group.addAction(a)
            self.layout_actions[key] = a
        self.layout_actions["four_up"].setChecked(True)
        self.load_actions = [self.act_open_fixed, self.act_open_moving, self.act_open_fixed_labels,
                             self.act_open_moving_labels, self.act_open_session, self.act_unload_all,
                             *self.unload_actions.values()]

        self.interaction_group = QActionGroup(self)
        self.act_cursor = act("Cursor", lambda: self.set_interaction("cursor"), "C", True,
                              "left click / drag moves the linked cursor")
        self.act_window = act("Window/level", lambda: self.set_interaction("window"), "W", True,
                              "left drag: horizontal = window, vertical = level")
        self.act_pick_fixed = act("Pick fixed landmark", lambda: self.set_interaction("pick", "fixed"), "F", True)
        self.act_pick_moving = act("Pick moving landmark", lambda: self.set_interaction("pick", "moving"), "M", True)
        for a in (self.act_cursor, self.act_window, self.act_pick_fixed, self.act_pick_moving):
            self.interaction_group.addAction(a)
        self.act_cursor.setChecked(True)
        if self.landmark_panel is None:
            self.act_pick_fixed.setEnabled(False)
            self.act_pick_moving.setEnabled(False)

        self.mode_group = QActionGroup(self)
        self.mode_actions = {}
        for i, (key, text) in enumerate(MODES):
            a = act(text, lambda checked=False, k=key: self.state.set_overlay(mode=k), f"Ctrl+{i + 1}", True)
            self.mode_group.addAction(a)
            self.mode_actions[key] = a
        self.mode_actions[self.state.overlay.mode].setChecked(True)

        def toggle(text, key):
            a = act(text, lambda on: self.state.set_overlay(**{key: on}), checkable=True)
            a.setChecked(getattr(self.state.overlay, key))
            return a
        self.toggle_actions = {k: toggle(t, k) for k, t in (
            ("contours_fixed", "Fixed label contours"), ("contours_warped", "Warped label contours"),
            ("grid", "Deformation grid"), ("jacobian", "Jacobian map"), ("error_map", "Error map"),
            ("similarity_map", "dsm disagreement map"))}

    def _build_menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")
        for a in (self.act_open_fixed, self.act_open_moving, self.act_open_fixed_labels, self.act_open_moving_labels,
                  self.act_open_colour_table):
            f.addAction(a)
        close = f.addMenu("&Close layer")
        for a in self.unload_actions.values():
            close.addAction(a)
        close.addSeparator()
        close.addAction(self.act_unload_all)
        f.addSeparator()
        f.addAction(self.act_open_session)
        f.addAction(self.act_save_session)
        f.addAction(self.act_save_session_as)
        f.addSeparator()
        f.addAction(self.act_save_results)
        f.addSeparator()
        f.addAction(self.act_quit)
        v = mb.addMenu("&View")
        m = v.addMenu("Overlay mode")
        for a in self.mode_actions.values():
            m.addAction(a)
        for a in self.toggle_actions.values():
            v.addAction(a)
        v.addSeparator()
        for a in (self.act_cursor, self.act_window, self.act_pick_fixed, self.act_pick_moving):
            v.addAction(a)
        v.addSeparator()
        lay = v.addMenu("Layout")
        for a in self.layout_actions.values():
            lay.addAction(a)
        v.addAction(self.act_reset_views)
        docks = v.addMenu("Panels")
        for d in self.findChildren(QDockWidget):
            docks.addAction(d.toggleViewAction())
        h = mb.addMenu("&Help")
        h.addAction("Mouse and keys", self._show_help)
        h.addAction("About RegStation", self._show_about)

    def _build_toolbar(self) -> None:
        tb = self.addToolBar("Main")
        tb.setObjectName("main_toolbar")
        tb.addAction(self.act_open_fixed)
        tb.addAction(self.act_open_moving)
        tb.addSeparator()
        for a in (self.act_cursor, self.act_window, self.act_pick_fixed, self.act_pick_moving):
            tb.addAction(a)
        tb.addSeparator()
        for key in ("blend", "checkerboard", "difference", "flicker"):
            tb.addAction(self.mode_actions[key])
        tb.addSeparator()
        for key in ("four_up", "runs", "landmarks"):
            a = self.layout_actions[key]
            tb.addAction(a)
        # short toolbar texts so that it fits a 1366-pixel screen (menus keep the long ones)
        for a, t in ((self.act_open_fixed, "Open fixed"), (self.act_open_moving, "Open moving"),
                     (self.act_pick_fixed, "Pick fixed"), (self.act_pick_moving, "Pick moving"),
                     (self.act_window, "W/L")):
            a.setIconText(t)
        self.layout_actions["four_up"].setIconText("Four-up")
        self.layout_actions["runs"].setIconText("A | B")
        self.layout_actions["landmarks"].setIconText("Fixed | moving")
        tb.addSeparator()
        tb.addAction(self.act_reset_views)
        tb.addAction(self.act_save_results)

    def _show_help(self) -> None:
        QMessageBox.information(self, "Mouse and keys", (
            "Slice views (radiological: patient right on the screen left; anterior up in axial):\n"
            "  wheel / Up, Down / PageUp, PageDown: change slice\n"
            "  left click or drag: move the linked cursor (Cursor mode)\n"
            "  left drag in Window/level mode: horizontal = window, vertical = level\n"
            "  right drag or Ctrl+left drag: zoom; Ctrl+wheel: zoom at the mouse\n"
            "  middle drag or Shift+left drag: pan;  R: fit the slice\n"
            "3D view: left drag rotates, right drag zooms, middle drag pans.\n"
            "Overlay modes: Ctrl+1 … Ctrl+5.  Drop files on the window to open them."))

    def _show_about(self) -> None:
        QMessageBox.about(self, "About RegStation",
                          "RegStation: a workstation for medical image registration "
                          "(conventional and deep-learning paradigms, in physical space).")
