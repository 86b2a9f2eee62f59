"""The VTK scene of a :class:`~app.widgets.slice_view.SliceView`: its renderer and parallel camera,
and every actor it ever shows, built once and hidden until used.

Bottom to top: the composed slice image, the deformation grid, label contours (fixed, warped),
landmark circles (fixed, moving, selected), guide squares (fixed, moving), the crosshair; the
orientation letters at the edges and three colour bars (Jacobian ``det J``, estimated error in mm,
dsm disagreement ``1 - P``). The colours and the landmark glyph size live here too.

:class:`SliceSceneMixin` is combined into :class:`~app.widgets.slice_view.SliceView`; what goes
into these actors for the current plane is in :mod:`app.widgets.slice_drawing`.
"""
from __future__ import annotations

from vtkmodules.vtkCommonCore import vtkLookupTable
from vtkmodules.vtkCommonDataModel import vtkPolyData
from vtkmodules.vtkFiltersCore import vtkAppendPolyData
from vtkmodules.vtkRenderingAnnotation import vtkScalarBarActor
from vtkmodules.vtkRenderingCore import vtkActor, vtkImageActor, vtkPolyDataMapper, vtkRenderer, vtkTextActor

from app.viewer import compositing as comp
from app.viewer.slice_geometry import EDGE_LETTERS
from . import vtk_adapter

BACKGROUND = (0.09, 0.09, 0.11)
CROSSHAIR_RGB = (0.55, 0.8, 1.0)
CONTOUR_FIXED_RGB = (0.2, 0.95, 0.2)
CONTOUR_WARPED_RGB = (1.0, 0.3, 0.9)
LANDMARK_FIXED_RGB = (0.2, 0.6, 1.0)
LANDMARK_MOVING_RGB = (1.0, 0.55, 0.1)
LANDMARK_RADIUS_MM = 3.0
GUIDE_FIXED_RGB = (0.3, 1.0, 0.85)       # guide pairs (landmark-guided correction): squares
GUIDE_MOVING_RGB = (1.0, 0.95, 0.2)


class SliceSceneMixin:
    """Builds the view's renderer, camera, actors and colour bars (see the module docstring)."""

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
        self.scalar_bar = _colour_bar(self.renderer, self.jacobian_lut, "det J", 5, "%.2g", below="fold")

        # the estimated error map's colour bar (mm); its range follows ViewerState.error_scale_mm
        self.error_lut = vtkLookupTable()
        vtk_adapter.table_to_lut(self.error_lut, comp.error_table())
        self.error_lut.SetRange(0.0, 1.0)
        self.error_bar = _colour_bar(self.renderer, self.error_lut, "error\n(mm)", 5, "%.3g")

        # the dsm disagreement map's colour bar: 1 - P(correspond), 0 (agree) to 1
        self.agreement_lut = vtkLookupTable()
        vtk_adapter.table_to_lut(self.agreement_lut, comp.disagreement_table())
        self.agreement_lut.SetRange(0.0, 1.0)
        self.agreement_bar = _colour_bar(self.renderer, self.agreement_lut, "dsm\n1-P", 3, "%.2g")


def _colour_bar(renderer: vtkRenderer, lut: vtkLookupTable, title: str, labels: int, fmt: str,
                below: str | None = None) -> vtkScalarBarActor:
    """A hidden colour bar at the view's right edge (one look for every map), added to ``renderer``;
    ``below``: an annotated swatch for values under the lookup table's range."""
    bar = vtkScalarBarActor()
    bar.SetLookupTable(lut)
    bar.SetTitle(title)
    bar.SetNumberOfLabels(labels)
    bar.SetLabelFormat(fmt)
    if below is not None:
        bar.DrawBelowRangeSwatchOn()
        bar.SetBelowRangeAnnotation(below)
    bar.SetMaximumWidthInPixels(56)
    bar.SetBarRatio(0.3)
    bar.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    bar.SetPosition(0.89, 0.1)
    bar.SetWidth(0.11)
    bar.SetHeight(0.75)
    for tp in (bar.GetLabelTextProperty(), bar.GetTitleTextProperty(), bar.GetAnnotationTextProperty()):
        tp.SetFontSize(11)
        tp.ShadowOff()
        tp.ItalicOff()
    bar.UnconstrainedFontSizeOn()
    bar.VisibilityOff()
    renderer.AddViewProp(bar)
    return bar
