"""Import VTK's Qt render-window widget bound to PySide6, with the rendering modules it needs."""
from __future__ import annotations

import vtkmodules.qt

vtkmodules.qt.PyQtImpl = "PySide6"

import vtkmodules.vtkInteractionStyle  # noqa: E402,F401  (registers interactor styles)
import vtkmodules.vtkRenderingFreeType  # noqa: E402,F401  (text actors)
import vtkmodules.vtkRenderingOpenGL2  # noqa: E402,F401  (render window factory)
from vtkmodules.qt.QVTKRenderWindowInteractor import QVTKRenderWindowInteractor  # noqa: E402

__all__ = ["QVTKRenderWindowInteractor"]
