"""3D view: the three slice planes (with their overlays) in physical space, optional label
surfaces and CPU ray-cast volume rendering of the fixed image.

World coordinates are LPS mm. The default camera looks at the patient's face (from anterior,
superior up), turned a little to the patient's left, like the slice views' radiological
convention. An orientation cube (L/R, A/P, S/I) sits in the corner.
"""
from __future__ import annotations

import time

import numpy as np
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QHBoxLayout, QToolButton, QVBoxLayout, QWidget
from vtkmodules.vtkCommonCore import vtkLookupTable
from vtkmodules.vtkCommonDataModel import vtkPiecewiseFunction
from vtkmodules.vtkFiltersCore import vtkSurfaceNets3D
from vtkmodules.vtkInteractionStyle import vtkInteractorStyleTrackballCamera
from vtkmodules.vtkInteractionWidgets import vtkOrientationMarkerWidget
from vtkmodules.vtkRenderingAnnotation import vtkAnnotatedCubeActor
from vtkmodules.vtkRenderingCore import (
    vtkActor,
    vtkColorTransferFunction,
    vtkImageActor,
    vtkPolyDataMapper,
    vtkRenderer,
    vtkVolume,
    vtkVolumeProperty,
)
from vtkmodules.vtkRenderingVolumeOpenGL2 import vtkSmartVolumeMapper

from . import vtk_adapter
from ._vtkqt import QVTKRenderWindowInteractor
from app.viewer.slice_geometry import PlaneGrid
from app.viewer.viewer_state import ViewerState

BACKGROUND = (0.09, 0.09, 0.11)
BACKGROUND_TOP = (0.22, 0.24, 0.30)


def label_colours(max_label: int, seed: int = 7) -> np.ndarray:
    """Distinct, reproducible RGB colours for label ids 0..max_label (golden-ratio hues)."""
    import colorsys
    rng = np.random.default_rng(seed)
    out = np.zeros((max_label + 1, 3))
    for i in range(1, max_label + 1):
        h = (i * 0.618033988749895) % 1.0
        out[i] = colorsys.hsv_to_rgb(h, 0.55 + 0.35 * rng.random(), 0.75 + 0.25 * rng.random())
    return out


class View3D(QWidget):
    """3D view of the state: slice planes, label surfaces (fixed labels), volume rendering."""

    def __init__(self, state: ViewerState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._vtk = QVTKRenderWindowInteractor(self)
        bar = QHBoxLayout()
        bar.setContentsMargins(4, 1, 4, 1)
        bar.setSpacing(2)

        def toggle(text, tip, on=False):
            b = QToolButton()
            b.setText(text)
            b.setToolTip(tip)
            b.setCheckable(True)
            b.setChecked(on)
            bar.addWidget(b)
            return b
        self.planes_box = toggle("Planes", "the three slice planes, with their overlays", True)
        self.labels_box = toggle("Labels", "surfaces of the fixed label map")
        self.volume_box = toggle("Volume", "volume rendering of the fixed image (CPU ray casting)")
        bar.addStretch(1)
        self.reset_button = QToolButton()
        self.reset_button.setText("Reset")
        self.reset_button.setToolTip("camera back to the front view")
        bar.addWidget(self.reset_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(bar)
        lay.addWidget(self._vtk, 1)

        self.renderer = vtkRenderer()
        self.renderer.SetBackground(*BACKGROUND)
        self.renderer.SetBackground2(*BACKGROUND_TOP)
        self.renderer.GradientBackgroundOn()
        self.render_window = self._vtk.GetRenderWindow()
        self.render_window.AddRenderer(self.renderer)
        iren = self.render_window.GetInteractor()
        iren.SetInteractorStyle(vtkInteractorStyleTrackballCamera())
        self._plane_actors: dict[str, vtkImageActor] = {}
        self._label_actor: vtkActor | None = None
        self._label_source = None
        self._volume: vtkVolume | None = None
        self._volume_source = None
        self._camera_set = False
        self._marker = None

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(30)
        self._timer.timeout.connect(self.render)

        self.planes_box.toggled.connect(self._on_planes_toggled)
        self.labels_box.toggled.connect(lambda on: self._update_labels())
        self.volume_box.toggled.connect(lambda on: self._update_volume())
        self.reset_button.clicked.connect(self.reset_camera)
        self.setMinimumSize(120, 120)
        state.events.layers.connect(self._on_layers_change)
        state.events.window.connect(self._on_window_change)

    # ------------------------------------------------------------------ planes
    def set_slice_image(self, orientation: str, image, plane: PlaneGrid | None) -> None:
        """Show a slice view's composed picture (2D RGBA vtkImageData in plane mm) in 3D."""
        actor = self._plane_actors.get(orientation)
        if actor is None:
            actor = vtkImageActor()
            actor.GetProperty().SetInterpolationTypeToNearest()
            actor.GetProperty().SetColorWindow(255.0)
            actor.GetProperty().SetColorLevel(127.5)
            self._plane_actors[orientation] = actor
            self.renderer.AddActor(actor)
        if plane is None:
            actor.VisibilityOff()
        else:
            actor.GetMapper().SetInputData(image)
            m = np.eye(4)
            m[:3, 0], m[:3, 1], m[:3, 2] = plane.u, plane.v, plane.n
            m[:3, 3] = plane.offset * plane.n
            actor.SetUserMatrix(vtk_adapter.matrix4(m))
            actor.SetVisibility(self.planes_box.isChecked())
        if not self._camera_set and plane is not None:
            self.reset_camera()
        self.schedule_render()

    def _on_planes_toggled(self, on: bool) -> None:
        for a in self._plane_actors.values():
            a.SetVisibility(on)
        self.schedule_render()

    # ------------------------------------------------------------------ layers
    def _on_layers_change(self, name: str) -> None:
        if name in ("fixed_labels",):
            self._update_labels()
        if name == "fixed":
            self._camera_set = False
            self._update_volume()
            self._update_labels()

    def _on_window_change(self, layer: str) -> None:
        if layer == "fixed" and self._volume is not None:
            self._update_transfer_functions()
            self.schedule_render()

    def _update_labels(self) -> None:
        labels = self.state.fixed_labels
        if not self.labels_box.isChecked() or labels is None:
            if self._label_actor is not None:
                self._label_actor.VisibilityOff()
            self.schedule_render()
            return
        if self._label_source is not labels:
            ids = labels.labels
            if ids.size == 0:
                return
            nets = vtkSurfaceNets3D()
            nets.SetInputData(vtk_adapter.labels_to_vtk(labels, with_direction=False))
            for i, lab in enumerate(ids):
                nets.SetValue(i, float(lab))
            nets.SetOutputMeshTypeToTriangles()
            nets.SmoothingOn()
            nets.Update()
            poly = nets.GetOutput()
            both = vtk_adapter.cell_array(poly, "BoundaryLabels")   # the labels on both sides
            vtk_adapter.set_cell_scalars(poly, np.where(both[:, 0] > 0, both[:, 0], both[:, 1]).astype(np.float32),
                                         "label")
            lut = vtkLookupTable()
            maxl = int(ids.max())
            vtk_adapter.table_to_lut(lut, label_colours(maxl))
            lut.SetRange(0, maxl)
            mapper = vtkPolyDataMapper()
            mapper.SetInputData(poly)
            mapper.SetLookupTable(lut)
            mapper.SetScalarRange(0, maxl)
            mapper.SetScalarModeToUseCellData()
            if self._label_actor is None:
                self._label_actor = vtkActor()
                self.renderer.AddActor(self._label_actor)
            self._label_actor.SetMapper(mapper)
            self._label_actor.SetUserMatrix(vtk_adapter.index_to_world_matrix(labels))
            self._label_source = labels
        self._label_actor.VisibilityOn()
        self.schedule_render()

    def _update_volume(self) -> None:
        fixed = self.state.fixed
        if not self.volume_box.isChecked() or fixed is None:
            if self._volume is not None:
                self._volume.VisibilityOff()
            self.schedule_render()
            return
        if self._volume_source is not fixed:
            mapper = vtkSmartVolumeMapper()
            img = vtk_adapter.volume_to_vtk(fixed.with_array(fixed.array.astype(np.float32)), with_direction=False)
            mapper.SetInputData(img)
            if self._is_software_gl():
                mapper.SetRequestedRenderModeToRayCast()  # the 'GPU' path on llvmpipe is 10x slower
            if self._volume is None:
                self._volume = vtkVolume()
                prop = vtkVolumeProperty()
                prop.SetInterpolationTypeToLinear()
                prop.ShadeOff()
                self._volume.SetProperty(prop)
                self.renderer.AddVolume(self._volume)
            self._volume.SetMapper(mapper)
            self._volume.SetUserMatrix(vtk_adapter.index_to_world_matrix(fixed))
            self._volume_source = fixed
            self._update_transfer_functions()
        self._volume.VisibilityOn()
        self.schedule_render()

    def _update_transfer_functions(self) -> None:
        win, lev = self.state.window_of("fixed")
        lo, hi = lev - win / 2, lev + win / 2
        ctf = vtkColorTransferFunction()
        ctf.AddRGBPoint(lo, 0, 0, 0)
        ctf.AddRGBPoint(hi, 1, 1, 1)
        otf = vtkPiecewiseFunction()
        otf.AddPoint(lo + 0.15 * win, 0.0)
        otf.AddPoint(hi, 0.25)
        p = self._volume.GetProperty()
        p.SetColor(ctf)
        p.SetScalarOpacity(otf)

    def _is_software_gl(self) -> bool:
        try:
            caps = self.render_window.ReportCapabilities() or ""
        except Exception:  # noqa: BLE001 - capabilities are optional information
            caps = ""
        return "llvmpipe" in caps.lower() or "softpipe" in caps.lower() or "swrast" in caps.lower()

    # ------------------------------------------------------------------ camera / render
    def reset_camera(self) -> None:
        ref = self.state.reference
        cam = self.renderer.GetActiveCamera()
        if ref is None:
            return
        lo, hi = ref.physical_bounds()
        c = (lo + hi) / 2
        radius = float(np.linalg.norm(hi - lo)) / 2
        direction = np.array([0.45, -1.0, 0.35])   # from the front, a little left and above
        direction /= np.linalg.norm(direction)
        cam.SetFocalPoint(*c)
        cam.SetPosition(*(c + direction * radius * 3.2))
        cam.SetViewUp(0, 0, 1)
        cam.SetViewAngle(30)
        self.renderer.ResetCameraClippingRange()
        self._camera_set = True
        self.schedule_render()

    def schedule_render(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def render(self) -> None:
        self._timer.stop()
        self.renderer.ResetCameraClippingRange()
        t0 = time.perf_counter()
        self.render_window.Render()
        # a slow frame (volume rendering on a software GL) must not stall slice scrolling:
        # coalesce requests for about twice the last frame time
        self._timer.setInterval(int(min(1000, max(30, 2000 * (time.perf_counter() - t0)))))

    def grab_pixels(self) -> np.ndarray:
        self.render()
        return vtk_adapter.render_window_pixels(self.render_window)

    def view_state(self) -> dict:
        cam = self.renderer.GetActiveCamera()
        return {"position": list(cam.GetPosition()), "focal": list(cam.GetFocalPoint()),
                "up": list(cam.GetViewUp()), "planes": self.planes_box.isChecked(),
                "labels": self.labels_box.isChecked(), "volume": self.volume_box.isChecked()}

    def set_view_state(self, d: dict) -> None:
        self.planes_box.setChecked(bool(d.get("planes", True)))
        self.labels_box.setChecked(bool(d.get("labels", False)))
        self.volume_box.setChecked(bool(d.get("volume", False)))
        if "position" in d:
            cam = self.renderer.GetActiveCamera()
            cam.SetPosition(*d["position"])
            cam.SetFocalPoint(*d["focal"])
            cam.SetViewUp(*d["up"])
            self._camera_set = True
        self.schedule_render()

    @property
    def vtk_widget(self) -> QVTKRenderWindowInteractor:
        return self._vtk

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._vtk.Initialize()
        if self._marker is None:
            cube = vtkAnnotatedCubeActor()
            # LPS: +x = patient left, +y = posterior, +z = superior
            cube.SetXPlusFaceText("L")
            cube.SetXMinusFaceText("R")
            cube.SetYPlusFaceText("P")
            cube.SetYMinusFaceText("A")
            cube.SetZPlusFaceText("S")
            cube.SetZMinusFaceText("I")
            cube.SetFaceTextScale(0.65)
            cube.GetCubeProperty().SetColor(0.35, 0.4, 0.5)
            self._marker = vtkOrientationMarkerWidget()
            self._marker.SetOrientationMarker(cube)
            self._marker.SetInteractor(self.render_window.GetInteractor())
            self._marker.SetViewport(0.0, 0.0, 0.2, 0.2)
            self._marker.SetEnabled(1)
            self._marker.InteractiveOff()
        self.schedule_render()

    def close_vtk(self) -> None:
        self._timer.stop()
        if self._marker is not None:
            self._marker.SetEnabled(0)
        self._vtk.Finalize()
