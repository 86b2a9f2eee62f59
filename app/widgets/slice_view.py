"""One orthogonal slice view (axial, coronal or sagittal) of the fixed grid, rendered with VTK.

Orientation follows 3D Slicer's default (radiological) convention, see
:mod:`app.viewer.slice_geometry`: axial shows anterior up and the patient's right on the left;
coronal and sagittal show superior up (sagittal: anterior on the left). Scene coordinates are
plane millimetres: world x = u (screen right), world y = v (screen up), so anisotropic voxels
keep their physical aspect and oblique images are resampled in physical space.

Layers, bottom to top: the composed image (fixed with window/level; overlay mode blend /
checkerboard / difference / flicker; Jacobian heat map; estimated registration-error map with its
colour bar in mm; deformation grid; see :mod:`app.viewer.compositing`), label contours (fixed,
warped), landmark glyphs, guide glyphs (squares), crosshair.

Mouse and keys: see :mod:`app.widgets.slice_interaction` (wheel = slice, right drag = zoom,
middle drag = pan, left = cursor / window-level / landmark pick).

This module holds the widget itself: its title bar, the state events it listens to, and
:meth:`SliceView.flush`, which applies the pending changes and renders once. The rest is in
three mixins: :mod:`app.widgets.slice_scene` (the VTK actors and the colours),
:mod:`app.widgets.slice_drawing` (what each layer shows on the current plane) and
:mod:`app.widgets.slice_camera` (fit / zoom / pan / scroll and coordinate conversions).
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget
from vtkmodules.vtkCommonDataModel import vtkImageData

from . import vtk_adapter
from ._vtkqt import QVTKRenderWindowInteractor
from app.viewer.slice_geometry import PlaneGrid, make_plane
from .slice_camera import SliceCameraMixin
from .slice_drawing import SliceDrawingMixin
from .slice_interaction import SliceInteraction
from .slice_scene import (  # noqa: F401  (the colours are re-exported)
    BACKGROUND,
    CONTOUR_FIXED_RGB,
    CONTOUR_WARPED_RGB,
    CROSSHAIR_RGB,
    GUIDE_FIXED_RGB,
    GUIDE_MOVING_RGB,
    LANDMARK_FIXED_RGB,
    LANDMARK_MOVING_RGB,
    LANDMARK_RADIUS_MM,
    SliceSceneMixin,
)
from app.viewer.viewer_state import ViewerState

TITLE_COLOURS = {"axial": "#c0392b", "coronal": "#27ae60", "sagittal": "#d4ac0d"}  # Slicer's red/green/yellow


class SliceView(SliceSceneMixin, SliceDrawingMixin, SliceCameraMixin, QWidget):
    """An orthogonal view of the state's reference (fixed) grid.

    Parameters
    ----------
    state : ViewerState
        The model it shows and writes the cursor / window-level back to.
    orientation : 'axial' | 'coronal' | 'sagittal'

    Signals
    -------
    cursor_moved(np.ndarray)
        The user moved the cursor in this view (LPS mm, (3,)).
    clicked(np.ndarray)
        Left click in 'pick' interaction (LPS mm, (3,)).
    image_changed()
        The composed slice image (``vtk_image``) or its plane changed.
    """

    cursor_moved = Signal(object)
    clicked = Signal(object)
    image_changed = Signal()

    def __init__(self, state: ViewerState, orientation: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.orientation = orientation
        self.plane: PlaneGrid | None = None
        self.rgba: np.ndarray | None = None          # last composed picture (nv, nu, 4)
        self.vtk_image = vtkImageData()
        self._dirty: set[str] = set()
        self._auto_fit = True
        self._samples: dict[str, tuple] = {}

        self._title = QLabel(self)
        self._title.setStyleSheet(f"background:{TITLE_COLOURS[orientation]}; color:white; padding:1px 4px;")
        self._vtk = QVTKRenderWindowInteractor(self)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self._title)
        lay.addWidget(self._vtk, 1)
        self._build_scene()
        self.interaction = SliceInteraction(self)
        self.setMinimumSize(120, 120)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self.flush)

        ev = state.events
        ev.layers.connect(self._on_layers_change)
        ev.cursor.connect(self._on_cursor_change)
        ev.overlay.connect(self._on_overlay_change)
        ev.window.connect(self._on_window_change)
        ev.landmarks.connect(self._on_landmarks_change)
        ev.flicker.connect(self._on_flicker_change)
        self._on_layers_change("fixed")

    # ------------------------------------------------------------------ state events
    def _mark(self, *what: str) -> None:
        self._dirty.update(what)
        if not self._timer.isActive():
            self._timer.start()

    def _on_layers_change(self, name: str) -> None:
        self._samples.clear()
        self._mark("plane", "image", "contours", "grid", "landmarks", "crosshair")

    def _on_cursor_change(self, xyz) -> None:
        if self.plane is not None:
            if abs(self.plane.with_offset(float(np.asarray(xyz) @ self.plane.n)).offset - self.plane.offset) > 1e-6:
                self._mark("offset", "image", "contours", "grid", "landmarks")
        self._mark("crosshair")

    def _on_overlay_change(self, changed: set) -> None:
        if changed & {"contours_fixed", "contours_warped"}:
            self._mark("contours")
        if changed & {"grid", "grid_every_vox"}:
            self._mark("grid")
        if changed - {"contours_fixed", "contours_warped", "grid", "grid_every_vox", "flicker_ms"}:
            self._mark("image")

    def _on_window_change(self, layer: str) -> None:
        self._mark("image")

    def _on_landmarks_change(self) -> None:
        self._mark("landmarks")

    def _on_flicker_change(self, phase: int) -> None:
        if self.state.overlay.mode == "flicker":
            self._mark("image")

    # ------------------------------------------------------------------ updates
    def flush(self) -> None:
        """Apply all pending changes now and render once."""
        self._timer.stop()
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        ref = self.state.reference
        if "plane" in dirty:
            old = self.plane
            self.plane = None if ref is None else make_plane(ref, self.orientation, self.state.cursor)
            if self.plane is None or old is None or old.size_uv != self.plane.size_uv \
                    or not np.allclose(old.origin_uv, self.plane.origin_uv):
                self._auto_fit = True
        elif "offset" in dirty and self.plane is not None:
            self.plane = self.plane.with_offset(float(self.state.cursor @ self.plane.n))
        if self.plane is None:
            for a in (self.image_actor, self._grid[1], self._contour_fixed[1], self._contour_warped[1],
                      self._lm_fixed[1], self._lm_moving[1], self._lm_selected[1], self._crosshair[1],
                      self.scalar_bar, self.error_bar, self.agreement_bar, self._guide_fixed[1],
                      self._guide_moving[1]):
                a.VisibilityOff()
            self._title.setText(self.orientation.capitalize())
            self.rgba = None
            self.render()
            return
        if dirty & {"plane", "offset", "image"}:
            self._update_image()
        if dirty & {"plane", "offset", "contours"}:
            self._update_contours()
        if dirty & {"plane", "offset", "grid"}:
            self._update_grid()
        if dirty & {"plane", "offset", "landmarks"}:
            self._update_landmarks()
        self._update_crosshair()
        self._update_title()
        if self._auto_fit:
            self.fit()
        self.render()
        if dirty & {"plane", "offset", "image"}:
            self.image_changed.emit()

    def render(self) -> None:
        self.render_window.Render()

    # ------------------------------------------------------------------ title
    def set_subtitle(self, text: str) -> None:
        """Extra text at the end of the title bar (the window names the run on screen)."""
        self._subtitle = str(text or "")
        if self.plane is not None:
            self._update_title()

    def _update_title(self) -> None:
        p = self.plane
        axis = {"axial": "S", "coronal": "A", "sagittal": "R"}[self.orientation]
        sub = getattr(self, "_subtitle", "")
        self._title.setText(f"{self.orientation.capitalize()}   {axis} {p.offset:.1f} mm   "
                            f"slice {p.slice_index + 1}/{p.slice_count}" + (f"   ·   {sub}" if sub else ""))

    # ------------------------------------------------------------------ pixels
    @property
    def vtk_widget(self) -> QVTKRenderWindowInteractor:
        return self._vtk

    def grab_pixels(self) -> np.ndarray:
        """What the view shows, ``(h, w, 3)`` uint8, row 0 = top."""
        self.flush()
        self.render()
        return vtk_adapter.render_window_pixels(self.render_window)

    # ------------------------------------------------------------------ Qt
    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._vtk.Initialize()
        self._mark("crosshair")

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self._auto_fit:
            self._mark("crosshair")

    def close_vtk(self) -> None:
        """Release the render window (call before the widget is destroyed)."""
        self._timer.stop()
        self._vtk.Finalize()
