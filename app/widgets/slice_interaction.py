"""Mouse and keyboard of a :class:`~app.widgets.slice_view.SliceView`.

The VTK interactor style is set explicitly (``vtkInteractorStyleUser``) and every handled event
gets an observer on the style, which replaces the style's own handler for that event:

* wheel: previous / next slice (Shift: 5 slices; Ctrl: zoom at the mouse)
* right drag, or Ctrl + left drag: zoom (drag up = in)
* middle drag, or Shift + left drag: pan
* left click / drag: move the linked cursor (interaction 'cursor'); window / level
  (interaction 'window': horizontal = window, vertical = level); place a landmark
  (interaction 'pick': emits ``clicked``)
* keys: Up / Down = slice, PageUp / PageDown = 5 slices, R = fit; VTK's own keys (wireframe,
  quit, ...) are switched off.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vtkmodules.vtkInteractionStyle import vtkInteractorStyleUser

if TYPE_CHECKING:  # pragma: no cover
    from .slice_view import SliceView


class SliceInteraction:
    """Turns VTK interactor events of one slice view into view / state changes."""

    def __init__(self, view: "SliceView"):
        self.view = view
        self._drag: dict | None = None
        self.style = vtkInteractorStyleUser()
        iren = view.render_window.GetInteractor()
        iren.SetInteractorStyle(self.style)
        self._iren = iren
        s = self.style
        s.AddObserver("LeftButtonPressEvent", self._on_left_press)
        s.AddObserver("LeftButtonReleaseEvent", self._on_release)
        s.AddObserver("MiddleButtonPressEvent", self._on_middle_press)
        s.AddObserver("MiddleButtonReleaseEvent", self._on_release)
        s.AddObserver("RightButtonPressEvent", self._on_right_press)
        s.AddObserver("RightButtonReleaseEvent", self._on_release)
        s.AddObserver("MouseMoveEvent", self._on_mouse_move)
        s.AddObserver("MouseWheelForwardEvent", lambda o, e: self._on_wheel(+1))
        s.AddObserver("MouseWheelBackwardEvent", lambda o, e: self._on_wheel(-1))
        s.AddObserver("KeyPressEvent", self._on_key)
        s.AddObserver("CharEvent", lambda o, e: None)

    def _event_pos(self):
        return self._iren.GetEventPosition()

    def _camera_scale(self) -> float:
        return self.view.renderer.GetActiveCamera().GetParallelScale()

    def _on_left_press(self, obj, event) -> None:
        v = self.view
        if v.plane is None:
            return
        x, y = self._event_pos()
        if self._iren.GetControlKey():
            self._drag = {"kind": "zoom", "start": (x, y), "scale": self._camera_scale()}
            return
        if self._iren.GetShiftKey():
            self._drag = {"kind": "pan", "last": (x, y)}
            return
        mode = v.state.interaction
        if mode == "window":
            win, lev = v.state.window_of("fixed")
            self._drag = {"kind": "window", "start": (x, y), "wl": (win, lev)}
        elif mode == "pick":
            p = v.display_to_lps(x, y)
            v.state.set_cursor(p)
            v.clicked.emit(p)
        else:
            self._drag = {"kind": "cursor"}
            self._move_cursor_to(x, y)

    def _on_middle_press(self, obj, event) -> None:
        self._drag = {"kind": "pan", "last": self._event_pos()}

    def _on_right_press(self, obj, event) -> None:
        self._drag = {"kind": "zoom", "start": self._event_pos(), "scale": self._camera_scale()}

    def _on_release(self, obj, event) -> None:
        self._drag = None

    def _on_mouse_move(self, obj, event) -> None:
        d, v = self._drag, self.view
        if d is None or v.plane is None:
            return
        x, y = self._event_pos()
        if d["kind"] == "cursor":
            self._move_cursor_to(x, y)
        elif d["kind"] == "pan":
            a, b = v.display_to_plane(*d["last"]), v.display_to_plane(x, y)
            d["last"] = (x, y)
            v.pan(a[0] - b[0], a[1] - b[1])
        elif d["kind"] == "zoom":
            v.set_zoom_scale(d["scale"] / (2.0 ** ((y - d["start"][1]) / 100.0)))
        elif d["kind"] == "window":
            (x0, y0), (w0, l0) = d["start"], d["wl"]
            v.state.set_window("fixed", w0 * 2.0 ** ((x - x0) / 100.0), l0 - (y - y0) * w0 / 200.0)

    def _move_cursor_to(self, x, y) -> None:
        v = self.view
        p = v.display_to_lps(x, y)
        v.state.set_cursor(p)
        v.cursor_moved.emit(p)

    def _on_wheel(self, direction: int) -> None:
        if self._iren.GetControlKey():
            self.view.zoom(1.15 ** direction, self._event_pos())
        else:
            self.view.scroll(direction * (5 if self._iren.GetShiftKey() else 1))

    def _on_key(self, obj, event) -> None:
        key = self._iren.GetKeySym()
        steps = {"Up": 1, "Down": -1, "Prior": 5, "Next": -5}.get(key)
        if steps is not None:
            self.view.scroll(steps)
        elif key in ("r", "R"):
            self.view.fit()
            self.view.render()
