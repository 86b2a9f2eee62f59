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
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget
from vtkmodules.vtkCommonCore import vtkLookupTable
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkAppendPolyData
from vtkmodules.vtkRenderingAnnotation import vtkScalarBarActor
from vtkmodules.vtkRenderingCore import vtkActor, vtkImageActor, vtkPolyDataMapper, vtkRenderer, vtkTextActor

from app.viewer import compositing as comp
from . import vtk_adapter
from ._vtkqt import QVTKRenderWindowInteractor
from app.viewer.slice_geometry import EDGE_LETTERS, PlaneGrid, make_plane, sample
from .slice_interaction import SliceInteraction
from app.viewer.viewer_state import ViewerState

BACKGROUND = (0.09, 0.09, 0.11)
TITLE_COLOURS = {"axial": "#c0392b", "coronal": "#27ae60", "sagittal": "#d4ac0d"}  # Slicer's red/green/yellow
CROSSHAIR_RGB = (0.55, 0.8, 1.0)
CONTOUR_FIXED_RGB = (0.2, 0.95, 0.2)
CONTOUR_WARPED_RGB = (1.0, 0.3, 0.9)
LANDMARK_FIXED_RGB = (0.2, 0.6, 1.0)
LANDMARK_MOVING_RGB = (1.0, 0.55, 0.1)
LANDMARK_RADIUS_MM = 3.0
GUIDE_FIXED_RGB = (0.3, 1.0, 0.85)       # guide pairs (landmark-guided correction): squares
GUIDE_MOVING_RGB = (1.0, 0.95, 0.2)


class SliceView(QWidget):
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

    # ------------------------------------------------------------------ scene
    def _build_scene(self) -> None:
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(*BACKGROUND)
        self.render_window = self._vtk.GetRenderWindow()
        self.render_window.SetMultiSamples(0)   # 2D: no need for MSAA, ~30 % faster on software GL
        self.render_window.AddRenderer(self.renderer)
        cam = self.renderer.GetActiveCamera()
        cam.ParallelProjectionOn()
        cam.SetPosition(0, 0, 1000)
        cam.SetFocalPoint(0, 0, 0)
        cam.SetViewUp(0, 1, 0)

        self.image_actor = vtkImageActor()
        self.image_actor.GetMapper().SetInputData(self.vtk_image)
        prop = self.image_actor.GetProperty()
        prop.SetInterpolationTypeToNearest()
        prop.SetColorWindow(255.0)
        prop.SetColorLevel(127.5)
        self.image_actor.VisibilityOff()
        self.renderer.AddActor(self.image_actor)

        def line_actor(rgb, width, z, opacity=1.0):
            poly = vtkPolyData()
            mapper = vtkPolyDataMapper()
            mapper.SetInputData(poly)
            actor = vtkActor()
            actor.SetMapper(mapper)
            p = actor.GetProperty()
            p.SetColor(*rgb)
            p.SetLineWidth(width)
            p.SetOpacity(opacity)
            p.LightingOff()
            actor.SetPosition(0, 0, z)
            actor.VisibilityOff()
            self.renderer.AddActor(actor)
            return poly, actor

        self._grid = line_actor(comp.GRID_RGB, 1.5, 0.5, 0.9)
        self._grid_u, self._grid_v = vtkPolyData(), vtkPolyData()
        self._grid_append = vtkAppendPolyData()
        self._grid_append.AddInputData(self._grid_u)
        self._grid_append.AddInputData(self._grid_v)
        self._contour_fixed = line_actor(CONTOUR_FIXED_RGB, 1.5, 1.0)
        self._contour_warped = line_actor(CONTOUR_WARPED_RGB, 1.5, 1.1)
        self._lm_fixed = line_actor(LANDMARK_FIXED_RGB, 2.0, 2.0)
        self._lm_moving = line_actor(LANDMARK_MOVING_RGB, 2.0, 2.1)
        self._lm_selected = line_actor((1.0, 1.0, 1.0), 2.5, 2.2)
        self._guide_fixed = line_actor(GUIDE_FIXED_RGB, 2.0, 2.3)
        self._guide_moving = line_actor(GUIDE_MOVING_RGB, 2.0, 2.4)
        self._crosshair = line_actor(CROSSHAIR_RGB, 1.0, 3.0, 0.75)

        self._letters = []
        for pos, (x, y, just_h, just_v) in zip(
                EDGE_LETTERS[self.orientation],
                [(0.01, 0.5, 0, 1), (0.99, 0.5, 2, 1), (0.5, 0.01, 1, 0), (0.5, 0.99, 1, 2)]):
            t = vtkTextActor()
            t.SetInput(pos)
            t.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
            t.SetPosition(x, y)
            tp = t.GetTextProperty()
            tp.SetFontSize(13)
            tp.SetColor(0.85, 0.85, 0.6)
            tp.SetJustification(just_h)
            tp.SetVerticalJustification(just_v)
            tp.BoldOn()
            self.renderer.AddViewProp(t)
            self._letters.append(t)

        self.jacobian_lut = vtkLookupTable()
        vtk_adapter.table_to_lut(self.jacobian_lut, comp.jacobian_table())
        self.jacobian_lut.SetScaleToLog10()
        self.jacobian_lut.SetRange(*comp.JACOBIAN_RANGE)
        self.jacobian_lut.SetBelowRangeColor(*comp.FOLDING_RGB, 1.0)
        self.jacobian_lut.UseBelowRangeColorOn()
        self.scalar_bar = vtkScalarBarActor()
        self.scalar_bar.SetLookupTable(self.jacobian_lut)
        self.scalar_bar.SetTitle("det J")
        self.scalar_bar.SetNumberOfLabels(5)
        self.scalar_bar.SetLabelFormat("%.2g")
        self.scalar_bar.DrawBelowRangeSwatchOn()
        self.scalar_bar.SetBelowRangeAnnotation("fold")
        self.scalar_bar.SetMaximumWidthInPixels(56)
        self.scalar_bar.SetBarRatio(0.3)
        self.scalar_bar.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        self.scalar_bar.SetPosition(0.89, 0.1)
        self.scalar_bar.SetWidth(0.11)
        self.scalar_bar.SetHeight(0.75)
        for tp in (self.scalar_bar.GetLabelTextProperty(), self.scalar_bar.GetTitleTextProperty(),
                   self.scalar_bar.GetAnnotationTextProperty()):
            tp.SetFontSize(11)
            tp.ShadowOff()
            tp.ItalicOff()
        self.scalar_bar.UnconstrainedFontSizeOn()
        self.scalar_bar.VisibilityOff()
        self.renderer.AddViewProp(self.scalar_bar)

        # the estimated error map's colour bar (mm); its range follows ViewerState.error_scale_mm
        self.error_lut = vtkLookupTable()
        vtk_adapter.table_to_lut(self.error_lut, comp.error_table())
        self.error_lut.SetRange(0.0, 1.0)
        self.error_bar = vtkScalarBarActor()
        self.error_bar.SetLookupTable(self.error_lut)
        self.error_bar.SetTitle("error\n(mm)")
        self.error_bar.SetNumberOfLabels(5)
        self.error_bar.SetLabelFormat("%.3g")
        self.error_bar.SetMaximumWidthInPixels(56)
        self.error_bar.SetBarRatio(0.3)
        self.error_bar.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        self.error_bar.SetPosition(0.89, 0.1)
        self.error_bar.SetWidth(0.11)
        self.error_bar.SetHeight(0.75)
        for tp in (self.error_bar.GetLabelTextProperty(), self.error_bar.GetTitleTextProperty()):
            tp.SetFontSize(11)
            tp.ShadowOff()
            tp.ItalicOff()
        self.error_bar.UnconstrainedFontSizeOn()
        self.error_bar.VisibilityOff()
        self.renderer.AddViewProp(self.error_bar)

        # the dsm disagreement map's colour bar: 1 - P(correspond), 0 (agree) to 1
        self.agreement_lut = vtkLookupTable()
        vtk_adapter.table_to_lut(self.agreement_lut, comp.disagreement_table())
        self.agreement_lut.SetRange(0.0, 1.0)
        self.agreement_bar = vtkScalarBarActor()
        self.agreement_bar.SetLookupTable(self.agreement_lut)
        self.agreement_bar.SetTitle("dsm\n1-P")
        self.agreement_bar.SetNumberOfLabels(3)
        self.agreement_bar.SetLabelFormat("%.2g")
        self.agreement_bar.SetMaximumWidthInPixels(56)
        self.agreement_bar.SetBarRatio(0.3)
        self.agreement_bar.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        self.agreement_bar.SetPosition(0.89, 0.1)
        self.agreement_bar.SetWidth(0.11)
        self.agreement_bar.SetHeight(0.75)
        for tp in (self.agreement_bar.GetLabelTextProperty(), self.agreement_bar.GetTitleTextProperty()):
            tp.SetFontSize(11)
            tp.ShadowOff()
            tp.ItalicOff()
        self.agreement_bar.UnconstrainedFontSizeOn()
        self.agreement_bar.VisibilityOff()
        self.renderer.AddViewProp(self.agreement_bar)

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

    def _sampled(self, key: str, volume, order: int):
        """Cached sample of ``volume`` on the current plane."""
        tag = (id(volume), self.plane.offset, self.plane.orientation, order)
        hit = self._samples.get(key)
        if hit is not None and hit[0] == tag:
            return hit[1], hit[2]
        vals, inside = sample(volume, self.plane, order)
        self._samples[key] = (tag, vals, inside)
        return vals, inside

    def _derived(self, key: str, compute):
        """Cached per-plane result-derived array (displacement, Jacobian) for the current slice."""
        tag = (id(self.state.result), self.plane.offset, self.plane.orientation)
        hit = self._samples.get(key)
        if hit is None or hit[0] != tag:
            hit = (tag, compute(self.plane), None)
            self._samples[key] = hit
        return hit[1]

    def _update_image(self) -> None:
        st, ov = self.state, self.state.overlay
        plane = self.plane
        base, base_inside = None, None
        if st.fixed is not None:
            vals, base_inside = self._sampled("fixed", st.fixed, 1)
            base = comp.window_level(vals, *st.window_of("fixed"))
        overlay = overlay_inside = None
        over_vol, over_name = st.overlay_volume()
        if st.fixed is None and st.moving is not None:
            vals, base_inside = self._sampled("moving", st.moving, 1)
            base = comp.window_level(vals, *st.window_of("moving"))
        elif over_vol is not None and ov.mode != "none":
            vals, overlay_inside = self._sampled(over_name, over_vol, 1)
            overlay = comp.window_level(vals, *st.window_of(over_name))
        checker = None
        if ov.mode == "checkerboard":
            (u0, v0), (du, dv), (nu, nv) = plane.origin_uv, plane.spacing_uv, plane.size_uv
            checker = comp.checker_mask(u0 + du * np.arange(nu), v0 + dv * np.arange(nv), ov.checker_mm)
        jac = jac_inside = None
        show_bar = False
        if ov.jacobian and st.result is not None:
            jac = self._derived("jacobian", st.plane_jacobian)
            if jac is not None:
                jac_inside = base_inside
                show_bar = True
        err = err_inside = None
        err_max = 1.0
        if ov.error_map and st.error_map is not None:
            err, err_inside = self._sampled("error_map", st.error_map, 1)
            err_max = st.error_scale_mm()
        agree = agree_inside = None
        if ov.similarity_map and st.similarity_map is not None:
            # nearest: the map is blocky (one value per scored patch) and NaN where none was scored
            agree, agree_inside = self._sampled("similarity_map", st.similarity_map, 0)
        lab_rgb = lab_mask = None
        fill = st.fixed_labels if ov.label_fill == "fixed" else st.warped_labels() if ov.label_fill == "warped" else None
        if fill is not None:
            from app.viewer.colour_table import label_rgb_image
            lab, lab_inside = self._sampled(f"fill_{ov.label_fill}", fill, 0)
            lab_rgb, lab_mask = label_rgb_image(lab, st.label_table)
            lab_mask &= lab_inside
        self.rgba = comp.compose(base, base_inside, overlay=overlay, overlay_inside=overlay_inside,
                                 mode=ov.mode, opacity=ov.opacity, checker=checker,
                                 false_colour=ov.false_colour, flicker_phase=st.flicker_phase,
                                 jacobian=jac, jacobian_inside=jac_inside, labels_rgb=lab_rgb,
                                 labels_mask=lab_mask, labels_opacity=ov.label_opacity,
                                 error=err, error_inside=err_inside, error_max_mm=err_max,
                                 agreement=agree, agreement_inside=agree_inside)
        vtk_adapter.rgba_image(self.rgba, plane.origin_uv, plane.spacing_uv, self.vtk_image)
        self.image_actor.GetMapper().SetInputData(self.vtk_image)
        self.image_actor.VisibilityOn()
        self.scalar_bar.SetVisibility(show_bar)
        self.error_bar.SetVisibility(err is not None)
        if err is not None:
            self.error_lut.SetRange(0.0, err_max)
            # beside the Jacobian bar when both are shown
            self.error_bar.SetPosition(0.78 if show_bar else 0.89, 0.1)
        self.agreement_bar.SetVisibility(agree is not None)
        if agree is not None:   # left of the other bars shown
            self.agreement_bar.SetPosition(0.89 - 0.11 * (int(show_bar) + int(err is not None)), 0.1)

    def _update_contours(self) -> None:
        st, ov = self.state, self.state.overlay
        for key, on, labels, (poly, actor) in (
                ("lab_fixed", ov.contours_fixed, st.fixed_labels, self._contour_fixed),
                ("lab_warped", ov.contours_warped, st.warped_labels() if ov.contours_warped else None,
                 self._contour_warped)):
            if not on or labels is None:
                actor.VisibilityOff()
                continue
            lab, _ = self._sampled(key, labels, 0)
            segs = comp.label_edges(lab, self.plane.origin_uv, self.plane.spacing_uv)
            vtk_adapter.segments_polydata(segs, 0.0, poly)
            actor.VisibilityOn()

    def _update_grid(self) -> None:
        """The deformed grid: lines where the moving-space coordinate ``T(x) . u`` (or ``. v``) is a
        multiple of the grid spacing, i.e. a regular grid in the moving image pulled back onto the
        fixed image through ``T(x) = x + field(x)``."""
        st, plane = self.state, self.plane
        poly, actor = self._grid
        if not st.overlay.grid or st.result is None:
            actor.VisibilityOff()
            return
        disp = self._derived("displacement", st.plane_displacement)
        if disp is None:
            actor.VisibilityOff()
            return
        moved = plane.pixel_points() + disp[0]
        spacing_mm = st.overlay.grid_every_vox * float(min(st.fixed.spacing))
        lines = []
        for axis in (plane.u, plane.v):
            phi = moved @ axis
            k0, k1 = np.ceil(phi.min() / spacing_mm), np.floor(phi.max() / spacing_mm)
            lines.append((phi, np.arange(k0, k1 + 1) * spacing_mm))
        vtk_adapter.contour_lines(lines[0][0], plane.origin_uv, plane.spacing_uv, lines[0][1], self._grid_u)
        vtk_adapter.contour_lines(lines[1][0], plane.origin_uv, plane.spacing_uv, lines[1][1], self._grid_v)
        self._grid_append.Update()
        poly.DeepCopy(self._grid_append.GetOutput())
        actor.VisibilityOn()

    def _update_landmarks(self) -> None:
        st, plane = self.state, self.plane
        tol = max(plane.step / 2, 1.0) + 1e-6

        def circles(points, radius):
            if len(points) == 0:
                return []
            uvs = plane.from_lps(points)
            near = np.abs(uvs[:, 2] - plane.offset) <= tol
            t = np.linspace(0, 2 * np.pi, 25)
            ring = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1) * radius
            return [np.array([c[0], c[1], 0.0]) + ring for c in uvs[near]]

        for pts, (poly, actor), r in ((st.fixed_points, self._lm_fixed, LANDMARK_RADIUS_MM),
                                      (st.moving_points, self._lm_moving, LANDMARK_RADIUS_MM),
                                      (np.zeros((0, 3)) if st.selected_point is None else st.selected_point[None],
                                       self._lm_selected, LANDMARK_RADIUS_MM * 1.7)):
            lines = circles(pts, r)
            if lines:
                # a cross in the middle of each circle marks the exact spot
                lines += [np.array([[c[0, 0] - 2 * r, c[0, 1], 0], [c[0, 0] - r, c[0, 1], 0]]) for c in lines]
                vtk_adapter.polylines_polydata(lines, poly)
                actor.VisibilityOn()
            else:
                actor.VisibilityOff()
        # guide pairs: squares (landmarks are circles), so the two kinds of points never mix up
        for pts, (poly, actor) in ((st.guide_fixed_points, self._guide_fixed),
                                   (st.guide_moving_points, self._guide_moving)):
            if len(pts) == 0:
                actor.VisibilityOff()
                continue
            uvs = plane.from_lps(pts)
            near = np.abs(uvs[:, 2] - plane.offset) <= tol
            r = LANDMARK_RADIUS_MM
            sq = np.array([[-r, -r, 0], [r, -r, 0], [r, r, 0], [-r, r, 0], [-r, -r, 0]])
            lines = [np.array([c[0], c[1], 0.0]) + sq for c in uvs[near]]
            lines += [np.array([[c[0] - r, c[1], 0], [c[0] + r, c[1], 0]]) for c in uvs[near]]
            if lines:
                vtk_adapter.polylines_polydata(lines, poly)
                actor.VisibilityOn()
            else:
                actor.VisibilityOff()

    def _update_crosshair(self) -> None:
        u, v, _ = self.plane.from_lps(self.state.cursor)
        u_min, u_max, v_min, v_max = self.plane.extent_uv
        pad = 0.5 * max(u_max - u_min, v_max - v_min)
        segs = np.array([[[u_min - pad, v], [u_max + pad, v]], [[u, v_min - pad], [u, v_max + pad]]])
        vtk_adapter.segments_polydata(segs, 0.0, self._crosshair[0])
        self._crosshair[1].VisibilityOn()

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

    # ------------------------------------------------------------------ camera
    def fit(self) -> None:
        """Fit the whole slice in the view (keeps the physical aspect ratio)."""
        if self.plane is None:
            return
        u_min, u_max, v_min, v_max = self.plane.extent_uv
        cu, cv = (u_min + u_max) / 2, (v_min + v_max) / 2
        w, h = self.render_window.GetSize()
        aspect = w / h if h > 0 else 1.0
        scale = max((v_max - v_min) / 2, (u_max - u_min) / 2 / max(aspect, 1e-6)) * 1.04
        cam = self.renderer.GetActiveCamera()
        cam.SetFocalPoint(cu, cv, 0)
        cam.SetPosition(cu, cv, 1000)
        cam.SetViewUp(0, 1, 0)
        cam.SetParallelScale(scale)
        self.renderer.ResetCameraClippingRange(u_min, u_max, v_min, v_max, -10, 10)
        self._auto_fit = True

    def zoom(self, factor: float, about_display=None) -> None:
        """Magnify by ``factor`` (> 1 zooms in), keeping ``about_display`` (x, y) fixed if given."""
        cam = self.renderer.GetActiveCamera()
        if about_display is not None:
            before = self._display_to_world(*about_display)
        cam.SetParallelScale(cam.GetParallelScale() / factor)
        if about_display is not None:
            after = self._display_to_world(*about_display)
            self.pan(before[0] - after[0], before[1] - after[1])
        self._auto_fit = False
        self.render()

    def pan(self, du: float, dv: float) -> None:
        """Move the view by (du, dv) mm (the picture moves the other way)."""
        cam = self.renderer.GetActiveCamera()
        fx, fy, fz = cam.GetFocalPoint()
        cam.SetFocalPoint(fx + du, fy + dv, fz)
        px, py, pz = cam.GetPosition()
        cam.SetPosition(px + du, py + dv, pz)
        self._auto_fit = False
        self.render()

    def scroll(self, steps: int) -> None:
        """Move the cursor ``steps`` slices along this view's normal (positive = S / A / R)."""
        if self.plane is None:
            return
        new = self.plane.with_offset(self.plane.offset + steps * self.plane.step)
        p = np.asarray(self.state.cursor, float)
        p = p + (new.offset - p @ self.plane.n) * self.plane.n
        self.state.set_cursor(p)
        self.cursor_moved.emit(p)

    def view_state(self) -> dict:
        cam = self.renderer.GetActiveCamera()
        return {"focal": list(cam.GetFocalPoint()[:2]), "scale": cam.GetParallelScale(),
                "auto_fit": self._auto_fit}

    def set_view_state(self, d: dict) -> None:
        if d.get("auto_fit", True):
            self.fit()
        else:
            cam = self.renderer.GetActiveCamera()
            fx, fy = d["focal"]
            cam.SetFocalPoint(fx, fy, 0)
            cam.SetPosition(fx, fy, 1000)
            cam.SetParallelScale(float(d["scale"]))
            self._auto_fit = False
        self.render()

    # ------------------------------------------------------------------ coordinates
    def display_to_plane(self, x: float, y: float) -> tuple[float, float]:
        """VTK display pixel -> plane coordinates (u, v) in mm."""
        return self._display_to_world(x, y)

    def set_zoom_scale(self, scale: float) -> None:
        """Half the visible height in mm (smaller = more zoom)."""
        self.renderer.GetActiveCamera().SetParallelScale(max(float(scale), 1e-3))
        self._auto_fit = False
        self.render()

    def _display_to_world(self, x: float, y: float) -> tuple[float, float]:
        r = self.renderer
        r.SetDisplayPoint(float(x), float(y), 0.0)
        r.DisplayToWorld()
        wx, wy, _, ww = r.GetWorldPoint()
        return wx / ww, wy / ww

    def display_to_lps(self, x: float, y: float) -> np.ndarray:
        """VTK display pixel (x right, y up from the bottom) -> LPS mm on the current plane."""
        u, v = self._display_to_world(x, y)
        return self.plane.to_lps(u, v)

    def lps_to_display(self, xyz) -> tuple[float, float]:
        """LPS mm -> VTK display pixel (x, y from the bottom left) of its projection on the plane."""
        u, v, _ = self.plane.from_lps(xyz)
        r = self.renderer
        r.SetWorldPoint(float(u), float(v), 0.0, 1.0)
        r.WorldToDisplay()
        x, y, _ = r.GetDisplayPoint()
        return x, y

    def lps_to_widget(self, xyz) -> tuple[int, int]:
        """LPS mm -> pixel of the VTK widget in Qt coordinates (y down), for mouse events."""
        x, y = self.lps_to_display(xyz)
        ratio = self._vtk.devicePixelRatioF()
        h = self.render_window.GetSize()[1]
        return int(round(x / ratio)), int(round((h - 1 - y) / ratio))

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
