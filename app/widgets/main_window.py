"""The RegStation main window: menus, toolbar, four-up views, docks, status bar.

Layout (3D Slicer's "four-up"): axial top left, 3D top right, sagittal bottom left, coronal
bottom right. The overlay panel docks on the left; the registration, landmark and metrics panels
(part B) dock on the right. All view state lives in one :class:`ViewerState`; the views and
panels listen to it and write back through its setters.

Errors (unreadable files, failed runs) become a message box and leave every loaded layer as it
was; a cancelled run keeps the previous result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtCore import QEvent, QStandardPaths, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QGridLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QScrollArea,
    QStackedWidget,
    QWidget,
)

from app.engine.types import Volume

from . import session as session_io
from .overlay_panel import MODES, OverlayPanel
from app.viewer.runs import run_verdict
from app.viewer.slice_geometry import nearest_voxel
from .slice_view import SliceView
from .view3d import View3D
from app.viewer.viewer_state import ViewerState
from app.viewer.workspace import Workspace

IMAGE_FILTER = ("Images (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd *.dcm *.DCM *.ima *.IMA);;"
                "DICOM (*.dcm *.DCM *.ima *.IMA);;All files (*)")
ROLE_TITLES = {"fixed": "fixed image", "moving": "moving image", "fixed_labels": "fixed labels",
               "moving_labels": "moving labels"}


def read_layer(role: str, path, reference: Optional[Volume] = None) -> Volume:
    """Read an image (or a label map for the '*_labels' roles) through the engine's io module."""
    from app.engine import io
    if role.endswith("labels"):
        return io.read_labels(str(path), reference=reference)
    return io.read_volume(str(path))


class FitScrollArea(QScrollArea):
    """A vertical scroll area that gives its widget the whole viewport and scrolls only when the
    viewport is shorter than the widget's minimum size (QScrollArea's resizable mode sizes a
    widget with word-wrapped labels to its preferred height and scrolls the Run button away)."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWidgetResizable(False)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setFrameShape(QScrollArea.NoFrame)

    def setWidget(self, widget: QWidget) -> None:
        super().setWidget(widget)
        widget.installEventFilter(self)
        self._fit()

    def eventFilter(self, obj, event) -> bool:
        if obj is self.widget() and event.type() == QEvent.LayoutRequest:
            QTimer.singleShot(0, self._fit)
        return super().eventFilter(obj, event)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        w = self.widget()
        if w is None:
            return
        vp = self.viewport().size()
        h = max(vp.height(), w.minimumSizeHint().height())
        if w.size().width() != vp.width() or w.size().height() != h:
            w.resize(vp.width(), h)


class MainWindow(QMainWindow):
    """The workstation window.

    Parameters
    ----------
    state : ViewerState, optional
    confirm_close : bool
        Ask before closing with unsaved results (tests turn it off).
    autosave_dir : path, optional
        Where landmarks are autosaved when no session file is open.
    """

    def __init__(self, state: ViewerState | None = None, *, confirm_close: bool = True,
                 autosave_dir: str | Path | None = None):
        super().__init__()
        self.state = state or ViewerState()
        # the Qt-free model of the session: layers (state), landmark pairs, runs; panels are views
        self.workspace = Workspace(self.state)
        self.confirm_close = confirm_close
        self.autosave_dir = Path(autosave_dir) if autosave_dir else Path(
            QStandardPaths.writableLocation(QStandardPaths.AppDataLocation) or Path.home() / ".regstation") / "autosave"
        self.session_path: Optional[Path] = None
        self.error_boxes: list[QMessageBox] = []
        self.unsaved_results = False
        self.label_table_path: Optional[str] = None
        self.replace_policy = "ask"           # what replacing an image does to its dependents: ask/clear/keep
        self._running = False
        self._pick_restore = None
        from app.workers import Engine
        # one long-lived thread for every engine call of this window; stopped in closeEvent
        self.engine = Engine(self)
        self.setWindowTitle("RegStation")
        self.setAcceptDrops(True)

        self.slice_views = {o: SliceView(self.state, o) for o in ("axial", "coronal", "sagittal")}
        self.view3d = View3D(self.state)
        central = QWidget()
        grid = QGridLayout(central)
        grid.setContentsMargins(2, 2, 2, 2)
        grid.setSpacing(3)
        grid.addWidget(self.slice_views["axial"], 0, 0)
        grid.addWidget(self.view3d, 0, 1)
        grid.addWidget(self.slice_views["sagittal"], 1, 0)
        grid.addWidget(self.slice_views["coronal"], 1, 1)
        for i in (0, 1):
            grid.setColumnStretch(i, 1)
            grid.setRowStretch(i, 1)
        # the central area: the four-up views, or two views side by side (runs A | B, or the
        # fixed | moving images for placing landmarks)
        from .side_by_side import SideBySideView
        self.side_by_side = SideBySideView(self.workspace)
        self.central_stack = QStackedWidget()
        self.central_stack.addWidget(central)
        self.central_stack.addWidget(self.side_by_side)
        self.setCentralWidget(self.central_stack)
        for v in self.slice_views.values():
            v.clicked.connect(self._on_view_clicked)
            v.image_changed.connect(lambda v=v: self.view3d.set_slice_image(v.orientation, v.vtk_image, v.plane))

        self.overlay_panel = OverlayPanel(self.state)
        self._overlay_dock = self._add_dock("Overlays", self.overlay_panel, Qt.LeftDockWidgetArea, scroll=True)
        self._build_part_b_docks()
        self._build_trust_dock()
        self._build_actions()
        self._build_menus()
        self._build_toolbar()

        self.cursor_label = QLabel("no image loaded")
        self.cursor_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.statusBar().addPermanentWidget(self.cursor_label, 1)
        # the run on screen's self-check verdict, kept in view while it is on screen (not a 5 s message)
        self.run_check_label = QLabel("")
        self.run_check_label.hide()
        self.statusBar().insertPermanentWidget(0, self.run_check_label)

        self._flicker = QTimer(self)
        self._flicker.timeout.connect(lambda: self.state.set_flicker_phase(1 - self.state.flicker_phase))

        self.workspace.runs.events.current.connect(self._on_current_run)
        ev = self.state.events
        ev.cursor.connect(self._on_cursor_change)
        ev.layers.connect(self._on_layers_change)
        ev.overlay.connect(self._on_overlay_change)
        ev.interaction.connect(self._on_interaction_change)
        self.fit_to_screen()

    # ------------------------------------------------------------------ construction
    def fit_to_screen(self, width: int = 1400, height: int = 900) -> None:
        """Resize to ``width`` x ``height`` or the screen's available area, whichever is smaller
        (a 1366 x 768 laptop gets the whole screen, never more)."""
        screen = self.screen() or QApplication.primaryScreen()
        if screen is not None:
            avail = screen.availableGeometry()
            # the frame (title bar, borders) comes on top of the client size
            width, height = min(width, avail.width() - 16), min(height, avail.height() - 40)
        self.resize(max(width, 640), max(height, 480))

    def _add_dock(self, title: str, widget: QWidget, area, scroll: bool = False) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title.replace(" ", "_"))
        if scroll:
            sa = FitScrollArea()
            sa.setWidget(widget)
            sa.setMinimumWidth(min(widget.sizeHint().width(), 400) + sa.verticalScrollBar().sizeHint().width() + 4)
            widget = sa
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _build_part_b_docks(self) -> None:
        """Registration, landmark and metrics panels (imported lazily; missing ones get a note)."""
        self.registration_panel = self.landmark_panel = self.metrics_panel = None
        self._landmark_dock = self._metrics_dock = None
        self._part_b_missing: list[str] = []
        right = Qt.RightDockWidgetArea
        docks = []
        try:
            from .registration_panel import RegistrationPanel
            self.registration_panel = RegistrationPanel(engine=self.engine)
            self.registration_panel.set_inputs_provider(self.registration_inputs)
            p = self.registration_panel
            p.run_started.connect(self._on_run_started)
            p.run_finished.connect(self._on_run_finished)
            p.run_failed.connect(self._on_run_failed)
            p.run_cancelled.connect(self._on_run_cancelled)
            docks.append(self._add_dock("Registration", p, right, scroll=True))
        except ImportError as e:
            self._part_b_missing.append(f"registration panel ({e.name or e})")
        lower = []
        try:
            from .landmark_panel import LandmarkPanel
            self.landmark_panel = LandmarkPanel(model=self.workspace.landmarks)
            lp = self.landmark_panel
            lp.point_selected.connect(self._on_point_selected)
            lp.pick_target_changed.connect(self._on_pick_target_change)
            kept = session_io.keep_previous_autosave(session_io.landmarks_autosave_path(self))
            if kept is not None:
                QTimer.singleShot(0, lambda: self.statusBar().showMessage(
                    f"Landmarks autosaved by an earlier session were kept in {kept}", 15000))
            lp.set_autosave_path(session_io.landmarks_autosave_path(self))
            lp.data_dir = self.data_dir
            lower.append(self._add_dock("Landmarks", lp, right))
            self._landmark_dock = lower[-1]
        except ImportError as e:
            self._part_b_missing.append(f"landmark panel ({e.name or e})")
        try:
            from .metrics_panel import MetricsPanel
            self.metrics_panel = MetricsPanel(model=self.workspace.runs)
            self.metrics_panel.data_dir = self.data_dir
            lower.append(self._add_dock("Metrics", self.metrics_panel, right))
            self._metrics_dock = lower[-1]
        except ImportError as e:
            self._part_b_missing.append(f"metrics panel ({e.name or e})")
        # one tab group on the right: each panel gets the full height (tables need room to be
        # read on a 768-pixel screen); a finished run raises Metrics, picking raises Landmarks
        docks += lower
        for d in docks[1:]:
            self.tabifyDockWidget(docks[0], d)
        if docks:
            docks[0].raise_()
        if self._part_b_missing:
            note = QLabel("Not available in this build:\n" + "\n".join(self._part_b_missing))
            note.setWordWrap(True)
            note.setAlignment(Qt.AlignTop | Qt.AlignLeft)
            docks.append(self._add_dock("Unavailable", note, right))
        if docks:
            # the views get what the panels leave: overlays ~290 px on the left, panels ~410 on the right
            self.resizeDocks([self._overlay_dock, docks[0]], [290, 410], Qt.Horizontal)

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

    # ------------------------------------------------------------------ loading
    def load_layer(self, role: str, path, wait: bool = True) -> bool:
        """Read ``path`` into layer ``role`` on the engine thread; on failure show why and keep
        everything as it was.

        Replacing a loaded fixed or moving image makes its labels, its landmarks and every run
        stale: they are cleared, or kept when the user says so (:meth:`confirm_stale`).
        ``wait``: keep the event loop running until the layer is in (the GUI stays live) and
        return False when nothing was loaded (unreadable file, or the user cancelled); else
        return at once (True: the read was queued)."""
        if role not in ROLE_TITLES:
            raise ValueError(f"unknown layer '{role}'; use one of {', '.join(ROLE_TITLES)}")
        if not self.engine.alive:       # the window closed while a multi-file load was waiting
            return False
        ref = {"fixed_labels": self.state.fixed, "moving_labels": self.state.moving}.get(role)
        outcome: dict = {}

        def done(vol):
            QApplication.restoreOverrideCursor()
            vol.name = vol.name or Path(path).name
            outcome["ok"] = self._apply_layer(role, path, vol)

        def failed(message):
            QApplication.restoreOverrideCursor()
            self.show_error(f"Could not open the {ROLE_TITLES[role]}", f"{Path(path).name}:\n{message}")
            outcome["ok"] = False

        QApplication.setOverrideCursor(Qt.BusyCursor)
        self.statusBar().showMessage(f"Reading {Path(path).name}…")
        job = self.engine.submit(read_layer, role, path, ref, name=f"read {role}", context=self,
                                 on_done=done, on_error=failed, on_cancelled=lambda: failed("cancelled"))
        if not wait:
            return True
        self.engine.wait(job)
        return bool(outcome.get("ok"))

    def _apply_layer(self, role: str, path, vol) -> bool:
        same_file = self.state.paths.get(role) == str(Path(path).resolve())
        if not same_file and not self._release_dependents(role, f"Loading {Path(path).name} as the {ROLE_TITLES[role]}"):
            self.statusBar().showMessage(f"Kept the {ROLE_TITLES[role]}", 5000)
            return False
        try:
            self.state.set_layer(role, vol, str(Path(path).resolve()))
        except ValueError as e:
            self.show_error(f"Could not open the {ROLE_TITLES[role]}", f"{Path(path).name}:\n{e}")
            return False
        self.statusBar().showMessage(f"Loaded {ROLE_TITLES[role]}: {Path(path).name}", 5000)
        return True

    def load_colour_table(self, path) -> bool:
        """Label names and colours from a Slicer / ITK-SNAP / FreeSurfer table (engine thread)."""
        from app.viewer.colour_table import read_colour_table
        try:
            table = self.engine.call(read_colour_table, str(path), name="read colour table")
        except ValueError as e:
            self.show_error("Could not read the colour table", str(e))
            return False
        self.label_table_path = str(Path(path).resolve())
        self.state.set_label_table(table)
        if self.metrics_panel is not None:
            self.metrics_panel.set_label_names({v: name for v, (name, _) in table.items()})
        self._update_readout()
        self.statusBar().showMessage(f"{len(table)} label names from {Path(path).name}", 5000)
        return True

    def _ask_open_colour_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open label colour table", self.data_dir(),
                                              "Colour tables (*.ctbl *.txt *.lut *.label);;All files (*)")
        if path:
            self.load_colour_table(path)

    # ------------------------------------------------------------------ stale data
    def stale_if_replaced(self, role: str) -> list[str]:
        """What replacing or closing layer ``role`` makes stale (see :class:`Workspace`)."""
        return self.workspace.stale_if_replaced(role)

    def confirm_stale(self, action: str, stale: list[str]) -> str:
        """Ask what to do with data computed on an image that is being replaced:
        'clear' (default button), 'keep' or 'cancel'. ``replace_policy`` other than 'ask'
        answers without a dialog."""
        if self.replace_policy != "ask":
            return self.replace_policy
        box = QMessageBox(QMessageBox.Warning, "Replace image",
                          f"{action} makes these stale:\n  - " + "\n  - ".join(stale) +
                          "\n\nThey belong to the previous image. Clear them, or keep them anyway?", parent=self)
        clear = box.addButton("Clear them", QMessageBox.AcceptRole)
        clear.setObjectName("clear")
        keep = box.addButton("Keep them", QMessageBox.DestructiveRole)
        keep.setObjectName("keep")
        cancel = box.addButton(QMessageBox.Cancel)
        cancel.setObjectName("cancel")
        box.setDefaultButton(clear)
        box.setEscapeButton(cancel)
        box.exec()
        b = box.clickedButton()
        return "clear" if b is clear else "keep" if b is keep else "cancel"

    def _release_dependents(self, role: str, action: str) -> bool:
        """Before ``role`` changes: clear (or keep, if the user says so) what depends on it.
        False when the user cancelled."""
        stale = self.stale_if_replaced(role)
        if not stale:
            return True
        answer = self.confirm_stale(action, stale)
        if answer == "cancel":
            return False
        if answer == "clear":
            self.clear_dependents(role)
        return True

    def clear_dependents(self, role: str) -> None:
        """Drop the label map and landmarks of image ``role`` and every run."""
        self.workspace.clear_dependents(role)

    def clear_runs(self) -> None:
        """Forget every run (history, metrics, the warped layer)."""
        self.workspace.runs.clear()

    @property
    def runs(self) -> list:
        """The run history (:class:`app.viewer.runs.Run`: ``name``, ``result``, ``metrics``)."""
        return self.workspace.runs.runs

    def unload_layer(self, role: str) -> bool:
        """Remove layer ``role`` (and, for an image, what depends on it; see :meth:`load_layer`)."""
        if role not in ROLE_TITLES:
            raise ValueError(f"unknown layer '{role}'; use one of {', '.join(ROLE_TITLES)}")
        if getattr(self.state, role) is None:
            return True
        if self._running:
            self.show_error("Registration running", "Wait for the run to end (or cancel it) before closing layers.")
            return False
        if not self._release_dependents(role, f"Closing the {ROLE_TITLES[role]}"):
            return False
        self.state.set_layer(role, None)
        self.statusBar().showMessage(f"Closed the {ROLE_TITLES[role]}", 5000)
        return True

    def unload_all(self, ask: bool = True) -> bool:
        """Close every layer, landmark and run (a fresh start). ``ask``: confirm first when there
        is anything to lose."""
        has = any(getattr(self.state, r) is not None for r in ROLE_TITLES)
        if ask and has and self.replace_policy == "ask":
            if QMessageBox.question(self, "Close all", "Close every image, label map, landmark and run?",
                                    QMessageBox.Yes | QMessageBox.Cancel) != QMessageBox.Yes:
                return False
        self.workspace.clear()
        return True

    def load_pair(self, fixed, moving, fixed_labels=None, moving_labels=None) -> bool:
        """Load a fixed/moving pair (and labels); True when all given files loaded."""
        ok = True
        for role, p in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                        ("moving_labels", moving_labels)):
            if p is not None:
                ok = self.load_layer(role, p) and ok
        return ok

    def load_files(self, paths: list) -> None:
        """Open dropped files: sessions, landmarks, or images by name and count."""
        paths = [Path(p) for p in paths]
        for p in [p for p in paths if p.name.endswith(".json") and not p.name.endswith(".mrk.json")]:
            self.open_session(p)
            return
        images = [p for p in paths if not p.name.lower().endswith(session_io.LANDMARK_SUFFIXES)]
        # images before label maps: a new image clears its old labels, then the dropped ones come
        for role, p in sorted(self._roles_for(images), key=lambda rp: rp[0].endswith("labels")):
            self.load_layer(role, p)
        marks = [p for p in paths if p.name.lower().endswith(session_io.LANDMARK_SUFFIXES)]
        for i, p in enumerate(marks):
            # two files: fixed then moving; one file: the side that has no points yet
            has_fixed = self.landmark_panel is not None and any(
                q["fixed"] is not None for q in self.landmark_panel.pairs())
            which = ("fixed", "moving")[i] if len(marks) == 2 else ("moving" if has_fixed else "fixed")
            self.import_landmarks(p, which)

    def _roles_for(self, images: list[Path]) -> list[tuple[str, Path]]:
        return session_io.guess_roles(images, self.state)

    def import_landmarks(self, path, which: str) -> bool:
        """Read a landmark file into the fixed or moving side of the landmark panel."""
        if self.landmark_panel is None:
            self.show_error("Landmarks", "The landmark panel is not available.")
            return False
        try:
            n = self.landmark_panel.import_file(str(path), which)
        except Exception as e:  # noqa: BLE001
            self.show_error("Could not read landmarks", f"{Path(path).name}:\n{e}")
            return False
        self.statusBar().showMessage(f"Imported {n} {which} landmarks from {Path(path).name}", 5000)
        return True

    def _ask_open(self, role: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Open {ROLE_TITLES[role]}", self.data_dir(), IMAGE_FILTER)
        if path:
            self.load_layer(role, path, wait=False)

    # ------------------------------------------------------------------ drag and drop
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and not self._running:
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            if len(paths) == 1 and not paths[0].endswith(".json") and \
                    not paths[0].lower().endswith(session_io.LANDMARK_SUFFIXES):
                self._ask_drop_role(Path(paths[0]), event.position().toPoint())
            else:
                self.load_files(paths)

    def _ask_drop_role(self, path: Path, pos) -> None:
        menu = QMenu(self)
        for role, title in ROLE_TITLES.items():
            menu.addAction(f"Open as {title}").setData(role)
        chosen = menu.exec(self.mapToGlobal(pos))
        if chosen is not None:
            self.load_layer(chosen.data(), path)

    # ------------------------------------------------------------------ registration (part B)
    def registration_inputs(self) -> dict:
        """What the registration panel runs on (the current layers and landmarks)."""
        return self.workspace.registration_inputs()

    def _on_run_started(self) -> None:
        self._running = True
        for a in self.load_actions:
            a.setEnabled(False)
        self.statusBar().showMessage("Registration running…")

    def _run_ended(self) -> None:
        self._running = False
        for a in self.load_actions:
            a.setEnabled(True)

    def _on_run_finished(self, result, metrics) -> None:
        self._run_ended()
        self.add_run(result, metrics or {})
        if self._metrics_dock is not None:
            self._metrics_dock.raise_()
        level, head, warnings = run_verdict(metrics or {})
        if level == "ok":
            self.statusBar().showMessage("Registration finished", 5000)
        else:       # stays until the next message: a flagged result is not a plain success
            self.statusBar().showMessage(f"Registration finished: {head}"
                                         + (f" · {warnings[0]}" if level == "warning" and warnings else ""))

    def add_run(self, result, metrics: dict, name: str | None = None) -> None:
        """Record a finished run, show it as the warped layer and list it in the metrics panel."""
        self.workspace.add_run(result, metrics or {}, name)
        self.state.set_overlay(source="warped")
        self.unsaved_results = True

    def _on_run_failed(self, message: str) -> None:
        self._run_ended()
        self.show_error("Registration failed", str(message))

    def _on_run_cancelled(self) -> None:
        self._run_ended()
        self.statusBar().showMessage("Registration cancelled; the previous result is kept", 5000)

    def select_run(self, index: int) -> None:
        """Show run ``index`` of the history as the warped layer."""
        if 0 <= index < len(self.runs):
            self.workspace.runs.set_current(index)

    def _on_current_run(self, index) -> None:
        run = None if index is None else self.runs[index]
        if run is not None and run.result is None:
            self.statusBar().showMessage(f"Run {run.name} has no result to show", 5000)
        if self.landmark_panel is not None:
            self.landmark_panel.set_transform(None if run is None or run.result is None else run.result.transform)
        self._update_titles()
        self._update_run_check(run)

    def _update_run_check(self, run) -> None:
        """Show the run on screen's verdict (:func:`app.viewer.runs.run_verdict`) in the status bar."""
        level, head, warnings = run_verdict(None if run is None else run.metrics)
        lab = self.run_check_label
        if level == "ok":
            lab.hide()
            lab.setText("")
            return
        short = "⚠ FLAGGED: worse than its input" if level == "flagged" else f"⚠ {len(warnings)} warning(s)"
        lab.setText(f"{short} ({run.name})")
        lab.setToolTip("\n".join([head] + warnings))
        lab.setStyleSheet("color: #b00020; font-weight: bold;" if level == "flagged" else "color: #8a5a00;")
        lab.setProperty("level", level)
        lab.show()

    def _update_titles(self) -> None:
        """The run on screen named in the view titles."""
        runs = self.workspace.runs
        run = runs.current_run
        for v in self.slice_views.values():
            v.set_subtitle("" if run is None else f"run {runs.current + 1}")
            v.setToolTip("" if run is None else f"showing run {runs.current + 1}: {run.name}")

    # ------------------------------------------------------------------ trust (error map, guided correction)
    def _build_trust_dock(self) -> None:
        """The trust panel (error map of the current run, landmark-guided correction), tabbed with
        the panels on the right; its jobs run on this window's engine thread."""
        self.trust_panel = self.guide_panel = None
        try:
            from .trust_panel import TrustPanel
        except ImportError as e:
            self._part_b_missing.append(f"trust panel ({e.name or e})")
            return
        rp = self.registration_panel

        def checkpoint_for(key):
            if rp is not None and rp.is_learned and getattr(rp, "paradigm_key", None) == key:
                return rp.checkpoint
            return None
        self.trust_panel = tp = TrustPanel(self.workspace, self.engine, add_run=self.add_run,
                                           checkpoint_for=checkpoint_for,
                                           device=(lambda: rp.device) if rp is not None else None)
        self.guide_panel = tp.guide_panel
        # guides are autosaved like the landmarks (an earlier session's file is kept aside first)
        kept = session_io.keep_previous_autosave(session_io.guides_autosave_path(self))
        if kept is not None:
            QTimer.singleShot(0, lambda: self.statusBar().showMessage(
                f"Guide pairs autosaved by an earlier session were kept in {kept}", 15000))
        self.guide_panel.set_autosave_path(session_io.guides_autosave_path(self))
        self.guide_panel.data_dir = self.data_dir
        tp.goto_requested.connect(self.state.set_cursor)
        self.guide_panel.pick_target_changed.connect(self._on_guide_pick_change)
        if self.metrics_panel is not None and hasattr(self.metrics_panel, "goto_requested"):
            self.metrics_panel.goto_requested.connect(self.state.set_cursor)
        self._trust_dock = self._add_dock("Trust", tp, Qt.RightDockWidgetArea, scroll=True)
        others = [d for d in self.findChildren(QDockWidget)
                  if d is not self._trust_dock and self.dockWidgetArea(d) == Qt.RightDockWidgetArea]
        if others:
            self.tabifyDockWidget(others[-1], self._trust_dock)
            first = [d for d in others if d.windowTitle() == "Registration"] or others
            first[0].raise_()           # the registration panel stays in front

    def _on_guide_pick_change(self, which) -> None:
        """The guide panel's pick buttons: picking guides stops picking landmarks and back (the
        fixed | moving layout then places guide pairs too)."""
        sbs = getattr(self, "side_by_side", None)
        if sbs is not None:
            sbs.set_pick_guides(which in ("fixed", "moving"))
        if which in ("fixed", "moving"):
            lp = self.landmark_panel
            if lp is not None:
                was = lp.blockSignals(True)     # no round trip through 'cursor' (it would end this pick)
                lp.pick_target = None
                lp.blockSignals(was)
            self._apply_interaction("pick", which)
            self._trust_dock.raise_()
        elif self.state.interaction == "pick" and (self.landmark_panel is None or self.landmark_panel.pick_target is None):
            self._apply_interaction("cursor", None)

    # ------------------------------------------------------------------ landmarks (part B)
    def _on_point_selected(self, xyz) -> None:
        p = np.asarray(xyz, float).reshape(3)
        self.state.set_landmarks(selected=p)
        self.state.set_cursor(p)

    def _on_view_clicked(self, xyz) -> None:
        gp = self.guide_panel
        if gp is not None and gp.pick_target in ("fixed", "moving"):
            gp.add_point(gp.pick_target, np.asarray(xyz, float))
            return
        lp = self.landmark_panel
        if lp is not None and lp.pick_target in ("fixed", "moving"):
            lp.add_point(lp.pick_target, np.asarray(xyz, float))

    def set_interaction(self, mode: str, pick_target: str | None = None) -> None:
        """'cursor', 'window' or 'pick' (then ``pick_target`` 'fixed' / 'moving')."""
        if mode == "pick" and pick_target not in ("fixed", "moving"):
            raise ValueError(f"picking needs pick_target 'fixed' or 'moving', got {pick_target!r}")
        target = pick_target if mode == "pick" else None
        if self.landmark_panel is not None and self.landmark_panel.pick_target != target:
            self.landmark_panel.pick_target = target   # emits pick_target_changed -> _apply_interaction
        self._apply_interaction(mode, target)

    def _on_pick_target_change(self, which) -> None:
        """The landmark panel's own pick buttons changed the pick target."""
        if which in ("fixed", "moving"):
            self._apply_interaction("pick", which)
        elif self.state.interaction == "pick":
            self._apply_interaction("cursor", None)

    def _apply_interaction(self, mode: str, target: str | None) -> None:
        gp = getattr(self, "guide_panel", None)
        if gp is not None and gp.pick_target is not None and (mode != "pick" or gp.pick_target != target
                                                             or (self.landmark_panel is not None
                                                                 and self.landmark_panel.pick_target is not None)):
            was = gp.blockSignals(True)
            gp.pick_target = None
            gp.blockSignals(was)
            if getattr(self, "side_by_side", None) is not None:
                self.side_by_side.set_pick_guides(False)
        if mode == "pick" and self._landmark_dock is not None and (gp is None or gp.pick_target is None):
            self._landmark_dock.raise_()
        # picking on the moving image shows the moving image; the overlay comes back afterwards
        if mode == "pick" and target == "moving":
            if self.view_layout == "four_up":
                self.statusBar().showMessage("Placing moving points on the moving image; to see both images at "
                                             "once use View > Layout > Fixed | moving (Ctrl+Shift+3)", 8000)
            if self._pick_restore is None:
                o = self.state.overlay
                self._pick_restore = {"mode": o.mode, "source": o.source, "opacity": o.opacity}
            self.state.set_overlay(mode="blend", source="moving", opacity=1.0)
        elif self._pick_restore is not None:
            self.state.set_overlay(**self._pick_restore)
            self._pick_restore = None
        self.state.set_interaction(mode)
        action = {"cursor": self.act_cursor, "window": self.act_window}.get(mode) or (
            self.act_pick_moving if target == "moving" else self.act_pick_fixed)
        action.setChecked(True)

    def _on_interaction_change(self, mode: str) -> None:
        if mode == "cursor":
            self.act_cursor.setChecked(True)
        elif mode == "window":
            self.act_window.setChecked(True)

    # ------------------------------------------------------------------ state events
    def _on_cursor_change(self, xyz) -> None:
        self._update_readout()

    def _on_layers_change(self, name: str) -> None:
        st = self.state
        if name in ("fixed", "moving") and st.result is not None:
            # a new input invalidates the shown result (kept runs stay listed, none is on screen)
            self.workspace.runs.set_current(None)
        names = [Path(st.paths[k]).name for k in ("fixed", "moving") if k in st.paths]
        self.setWindowTitle("RegStation" + (" — " + " ← ".join(names) if names else ""))
        self._update_readout()

    def _on_overlay_change(self, changed: set) -> None:
        o = self.state.overlay
        if "mode" in changed:
            self.mode_actions[o.mode].setChecked(True)
        for k, a in self.toggle_actions.items():
            a.blockSignals(True)
            a.setChecked(getattr(o, k))
            a.blockSignals(False)
        if o.mode == "flicker":
            self._flicker.setInterval(o.flicker_ms)
            if not self._flicker.isActive():
                self._flicker.start()
        else:
            self._flicker.stop()
            self.state.set_flicker_phase(0)

    def _update_readout(self) -> None:
        st = self.state
        if not st.has_data():
            self.cursor_label.setText("no image loaded")
            return
        p = st.cursor
        vals = st.values_at(p)
        ijk = nearest_voxel(st.reference, p)
        parts = [f"LPS ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) mm",
                 "voxel " + (f"[{ijk[0]}, {ijk[1]}, {ijk[2]}]" if ijk else "outside")]
        for k in ("fixed", "moving", "warped"):
            if getattr(st, k) is not None:
                parts.append(f"{k}: {_fmt(vals[k])}")
        from app.viewer.colour_table import label_name
        labs = self.workspace.label_at(p)
        for k, title in (("fixed", "fixed label"), ("warped", "warped label" if st.result is not None else "moving label")):
            v = labs[k]
            if v is not None:
                name = label_name(v, st.label_table)
                parts.append(f"{title}: {int(v)}" + (f" {name}" if name else ""))
        if st.result is not None and ijk:
            try:
                parts.append(f"det J: {self.workspace.jacobian_at(p):.3f}")
            except Exception:  # noqa: BLE001 - a transform that cannot be evaluated there
                pass
        err = st.error_at(p)
        if err is not None:
            parts.append(f"est. error: {err:.2f} mm")
        agree = st.similarity_at(p)
        if agree is not None:
            parts.append(f"dsm P(match): {agree:.2f}")
        self.cursor_label.setText("   |   ".join(parts))

    @property
    def view_layout(self) -> str:
        if self.central_stack.currentWidget() is not self.side_by_side:
            return "four_up"
        return self.side_by_side.mode

    def set_view_layout(self, layout: str) -> None:
        """'four_up', 'runs' (two runs side by side, linked cursors) or 'landmarks' (fixed |
        moving side by side: a click places the point of the image clicked)."""
        if layout not in ("four_up", "runs", "landmarks"):
            raise ValueError(f"layout must be 'four_up', 'runs' or 'landmarks', got {layout!r}")
        if layout == "four_up":
            self.central_stack.setCurrentIndex(0)
        else:
            self.side_by_side.set_mode(layout)
            self.central_stack.setCurrentWidget(self.side_by_side)
            if layout == "landmarks" and self._landmark_dock is not None:
                self._landmark_dock.raise_()
            if layout == "runs" and self._metrics_dock is not None:
                self._metrics_dock.raise_()
        self.layout_actions[layout].setChecked(True)

    def reset_views(self) -> None:
        for v in self.slice_views.values():
            v.fit()
            v.render()
        self.view3d.reset_camera()

    # ------------------------------------------------------------------ saving
    def data_dir(self) -> str:
        """Where file dialogs start: next to the session, else next to the fixed (or moving)
        image, else the home folder."""
        if self.session_path is not None:
            return str(Path(self.session_path).parent)
        for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
            if role in self.state.paths:
                return str(Path(self.state.paths[role]).parent)
        return str(Path.home())

    def save_results(self, folder) -> list[Path]:
        """Write the current run into ``folder`` on the engine thread (see
        :func:`app.widgets.session.write_results`)."""
        written = self.engine.call(session_io.write_results, session_io.results_snapshot(self), folder,
                                   name="save results")
        self.unsaved_results = False
        return written

    def _ask_save_results(self) -> None:
        if self.state.result is None:
            self.show_error("Nothing to save", "Run a registration first: there is no result to save yet.")
            return
        folder = QFileDialog.getExistingDirectory(self, "Save results into folder", self.data_dir())
        if folder:
            try:
                written = self.save_results(folder)
                self.statusBar().showMessage(f"Saved {len(written)} files to {folder}", 8000)
            except Exception as e:  # noqa: BLE001
                self.show_error("Could not save the results", str(e))

    def save_session(self, path) -> None:
        """Write the session (JSON and the runs' transforms) on the engine thread."""
        self.engine.call(session_io.write_session, session_io.session_snapshot(self, path), path,
                         name="save session")
        self._set_session_path(path)
        self.unsaved_results = False

    def _set_session_path(self, path) -> None:
        self.session_path = Path(path)
        if self.landmark_panel is not None:
            self.landmark_panel.set_autosave_path(session_io.landmarks_autosave_path(self))
        if getattr(self, "guide_panel", None) is not None:
            self.guide_panel.set_autosave_path(session_io.guides_autosave_path(self))

    def open_session(self, path) -> bool:
        """Restore a saved session; on failure show why and keep the current work."""
        lp = self.landmark_panel
        if lp is not None:
            lp.set_autosave_path(None)   # do not overwrite the current autosave while loading
        gp = getattr(self, "guide_panel", None)
        if gp is not None:
            gp.set_autosave_path(None)
        try:
            session_io.load_session(self, path)
        except Exception as e:  # noqa: BLE001
            if lp is not None:
                lp.set_autosave_path(session_io.landmarks_autosave_path(self))
            if gp is not None:
                gp.set_autosave_path(session_io.guides_autosave_path(self))
            self.show_error("Could not open the session", f"{Path(path).name}:\n{e}")
            return False
        self._set_session_path(path)
        return True

    def _ask_open_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open session", self.data_dir(), "RegStation session (*.json)")
        if path:
            self.open_session(path)

    def _ask_save_session(self, force_ask: bool = False) -> None:
        path = self.session_path
        if path is None or force_ask:
            p, _ = QFileDialog.getSaveFileName(self, "Save session", str(Path(self.data_dir()) / "session.json"),
                                               "RegStation session (*.json)")
            if not p:
                return
            path = Path(p)
        try:
            self.save_session(path)
            self.statusBar().showMessage(f"Session saved to {path}", 5000)
        except Exception as e:  # noqa: BLE001
            self.show_error("Could not save the session", str(e))

    # ------------------------------------------------------------------ messages
    def show_error(self, title: str, message: str) -> QMessageBox:
        """A non-blocking, window-modal error box (the event loop keeps running)."""
        box = QMessageBox(QMessageBox.Critical, title, message, QMessageBox.Ok, self)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.finished.connect(lambda _=0, b=box: self.error_boxes.remove(b) if b in self.error_boxes else None)
        self.error_boxes.append(box)
        box.open()
        self.statusBar().showMessage(f"{title}: {message.splitlines()[-1] if message else ''}", 8000)
        return box

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

    # ------------------------------------------------------------------ closing
    def closeEvent(self, event) -> None:
        if self.confirm_close and self._running:
            ans = QMessageBox.question(self, "Registration running",
                                       "A registration is running. Cancel it and quit?",
                                       QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
            if ans != QMessageBox.Yes:
                event.ignore()
                return
        if self.confirm_close and self.unsaved_results:
            ans = QMessageBox.question(self, "Unsaved results",
                                       "The registration results are not saved. Quit anyway?",
                                       QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel)
            if ans == QMessageBox.Cancel:
                event.ignore()
                return
            if ans == QMessageBox.Save:
                self._ask_save_session()
        if self.registration_panel is not None:
            self.registration_panel.shutdown()
        self.engine.shutdown()
        self._flicker.stop()
        for v in self.slice_views.values():
            v.close_vtk()
        self.side_by_side.close_vtk()
        self.view3d.close_vtk()
        super().closeEvent(event)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.4g}"
