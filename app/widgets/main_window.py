"""The RegStation main window: its assembly (four-up views, docks, status bar) and run handling.

Layout (3D Slicer's "four-up"): axial top left, 3D top right, sagittal bottom left, coronal
bottom right. The overlay panel docks on the left; the registration, landmark, metrics and trust
panels dock on the right. All view state lives in one :class:`ViewerState`; the views and
panels listen to it and write back through its setters.

This module assembles the window and follows the registration runs (started, finished, failed,
cancelled; the run on screen and its verdict). The window's other rooms are mixins combined into
:class:`MainWindow`:

- :mod:`app.widgets.window_layers`: loading and closing layers, stale dependents, dropped files;
- :mod:`app.widgets.window_actions`: actions, menus, toolbar;
- :mod:`app.widgets.window_session`: saving and opening sessions and results;
- :mod:`app.widgets.window_interaction`: mouse modes, picking, cursor read-out, view layout.

Errors (unreadable files, failed runs) become a message box and leave every loaded layer as it
was; a cancelled run keeps the previous result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import QEvent, QStandardPaths, Qt, QTimer
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QGridLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QStackedWidget,
    QWidget,
)

from . import session as session_io
from .overlay_panel import OverlayPanel
from app.viewer.runs import run_verdict
from .slice_view import SliceView
from .view3d import View3D
from app.viewer.viewer_state import ViewerState
from app.viewer.workspace import Workspace
from .window_actions import ActionsMixin
from .window_interaction import InteractionMixin
from .window_layers import IMAGE_FILTER, ROLE_TITLES, LayersMixin, read_layer
from .window_session import SessionMixin

__all__ = ["MainWindow", "FitScrollArea", "read_layer", "IMAGE_FILTER", "ROLE_TITLES"]


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


class MainWindow(LayersMixin, SessionMixin, InteractionMixin, ActionsMixin, QMainWindow):
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

    # ------------------------------------------------------------------ registration runs
    def clear_runs(self) -> None:
        """Forget every run (history, metrics, the warped layer)."""
        self.workspace.runs.clear()

    @property
    def runs(self) -> list:
        """The run history (:class:`app.viewer.runs.Run`: ``name``, ``result``, ``metrics``)."""
        return self.workspace.runs.runs

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

    # ------------------------------------------------------------------ state events
    def _on_layers_change(self, name: str) -> None:
        st = self.state
        if name in ("fixed", "moving") and st.result is not None:
            # a new input invalidates the shown result (kept runs stay listed, none is on screen)
            self.workspace.runs.set_current(None)
        names = [Path(st.paths[k]).name for k in ("fixed", "moving") if k in st.paths]
        self.setWindowTitle("RegStation" + (" — " + " ← ".join(names) if names else ""))
        self._update_readout()

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
