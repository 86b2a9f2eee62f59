"""Camera and coordinates of a :class:`~app.widgets.slice_view.SliceView`: fit, zoom, pan and
slice scrolling, the camera state a session stores, and conversions between VTK display pixels,
Qt widget pixels, plane millimetres (u, v) and LPS millimetres.

:class:`SliceCameraMixin` is combined into :class:`~app.widgets.slice_view.SliceView`; the mouse
and keys that call these live in :mod:`app.widgets.slice_interaction`.
"""
from __future__ import annotations

import numpy as np


class SliceCameraMixin:
    """Camera control and coordinate conversions (see the module docstring)."""

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
