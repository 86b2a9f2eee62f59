"""The only place where numpy arrays / Volumes become VTK data objects and back.

* :func:`volume_to_vtk` / :func:`vtk_to_volume`: a :class:`~app.engine.types.Volume` (array
  ``(z, y, x)``, geometry xyz LPS mm) <-> ``vtkImageData`` with the same spacing, origin and
  direction matrix (``vtkImageData.SetDirectionMatrix``, VTK >= 9). VTK's point order (x fastest)
  is numpy's C order of a ``(z, y, x)`` array, so no axis is swapped.
* :func:`rgba_image` fills a 2D RGBA ``vtkImageData`` for the slice views.
* :func:`index_to_world_matrix` gives the 4x4 prop matrix for mappers that ignore the
  direction matrix (put an image with identity direction under it).
* :func:`segments_polydata`, :func:`polylines_polydata`, :func:`points_polydata`,
  :func:`contour_lines`, :func:`cell_array`, :func:`set_cell_scalars`: numpy <-> ``vtkPolyData``.
* :func:`render_window_pixels`: what a render window shows, as an ``(h, w, 3)`` uint8 array
  (row 0 = top, like a PNG).
"""
from __future__ import annotations

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkImageData, vtkPolyData
from vtkmodules.vtkCommonMath import vtkMatrix3x3, vtkMatrix4x4
from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

from app.engine.types import LabelMap, Volume


def volume_to_vtk(volume: Volume, *, with_direction: bool = True, name: str = "scalars") -> vtkImageData:
    """Volume -> vtkImageData (deep copy).

    Parameters
    ----------
    volume : Volume
        ``(z, y, x)`` scalars or ``(z, y, x, C)`` vectors; spacing/origin/direction xyz LPS mm.
    with_direction : bool
        Keep origin and direction in the image (True), or give it origin 0 and the identity
        direction, for use under :func:`index_to_world_matrix` as a prop matrix (False).
    """
    arr = np.ascontiguousarray(volume.array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    ncomp = arr.shape[3] if arr.ndim == 4 else 1
    flat = arr.reshape(-1, ncomp) if ncomp > 1 else arr.reshape(-1)
    vtk_arr = numpy_support.numpy_to_vtk(flat, deep=True)
    vtk_arr.SetName(name)
    img = vtkImageData()
    x, y, z = volume.size_xyz
    img.SetDimensions(x, y, z)
    img.SetSpacing(volume.spacing)
    if with_direction:
        img.SetOrigin(volume.origin)
        m = vtkMatrix3x3()
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, float(volume.direction[r, c]))
        img.SetDirectionMatrix(m)
    else:
        img.SetOrigin(0.0, 0.0, 0.0)
    img.GetPointData().SetScalars(vtk_arr)
    return img


def vtk_to_volume(img: vtkImageData, name: str = "") -> Volume:
    """vtkImageData -> Volume (copy), keeping spacing, origin and direction."""
    x, y, z = img.GetDimensions()
    scalars = img.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError("vtkImageData has no point scalars")
    arr = numpy_support.vtk_to_numpy(scalars).copy()
    ncomp = scalars.GetNumberOfComponents()
    arr = arr.reshape((z, y, x, ncomp) if ncomp > 1 else (z, y, x))
    dm = img.GetDirectionMatrix()
    direction = np.array([[dm.GetElement(r, c) for c in range(3)] for r in range(3)])
    return Volume(arr, img.GetSpacing(), img.GetOrigin(), direction, name)


def labels_to_vtk(labels: LabelMap, *, with_direction: bool = True) -> vtkImageData:
    """LabelMap -> vtkImageData with an integer type VTK's discrete filters accept."""
    lab = labels.with_array(labels.array.astype(np.int32 if labels.array.max() > 32767 else np.int16))
    return volume_to_vtk(lab, with_direction=with_direction, name="labels")


def index_to_world_matrix(volume: Volume) -> vtkMatrix4x4:
    """4x4 matrix mapping (index * spacing) -> LPS mm: ``[direction | origin]``.

    Use it as ``prop.SetUserMatrix`` for an image made with ``with_direction=False``.
    """
    m = vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(volume.direction[r, c]))
        m.SetElement(r, 3, float(volume.origin[r]))
    return m


def matrix4(a: np.ndarray) -> vtkMatrix4x4:
    """(4, 4) numpy -> vtkMatrix4x4."""
    a = np.asarray(a, float)
    if a.shape != (4, 4):
        raise ValueError(f"a 4x4 matrix is expected, got shape {a.shape}")
    m = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def rgba_image(rgba: np.ndarray, origin_uv, spacing_uv, image: vtkImageData | None = None) -> vtkImageData:
    """Put a 2D RGBA picture into a vtkImageData (reusing ``image`` when given).

    Parameters
    ----------
    rgba : (nv, nu, 4) uint8
        Row 0 is the bottom row (VTK's y axis points up).
    origin_uv : (2,) float
        World (u, v) of the centre of pixel (0, 0).
    spacing_uv : (2,) float
        Pixel size in world units.
    """
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"expected an (nv, nu, 4) uint8 array, got {rgba.shape} {rgba.dtype}")
    nv, nu = rgba.shape[:2]
    img = image if image is not None else vtkImageData()
    img.SetDimensions(nu, nv, 1)
    img.SetSpacing(float(spacing_uv[0]), float(spacing_uv[1]), 1.0)
    img.SetOrigin(float(origin_uv[0]), float(origin_uv[1]), 0.0)
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(rgba).reshape(-1, 4), deep=True)
    arr.SetName("rgba")
    img.GetPointData().SetScalars(arr)
    img.Modified()
    return img


def contour_lines(values: np.ndarray, origin_uv, spacing_uv, levels, poly: vtkPolyData | None = None) -> vtkPolyData:
    """Iso-lines of a 2D scalar image at ``levels`` (marching squares), in plane mm at z = 0.

    Parameters
    ----------
    values : (nv, nu) float
        Row 0 is the bottom row.
    origin_uv, spacing_uv : (2,) float
        Plane position of pixel (0, 0)'s centre and the pixel size (mm).
    levels : sequence of float
    """
    from vtkmodules.vtkFiltersCore import vtkContourFilter
    v = np.ascontiguousarray(values, np.float32)
    nv, nu = v.shape
    img = vtkImageData()
    img.SetDimensions(nu, nv, 1)
    img.SetSpacing(float(spacing_uv[0]), float(spacing_uv[1]), 1.0)
    img.SetOrigin(float(origin_uv[0]), float(origin_uv[1]), 0.0)
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(v.reshape(-1), deep=True))
    cf = vtkContourFilter()
    cf.SetInputData(img)
    for i, lev in enumerate(levels):
        cf.SetValue(i, float(lev))
    cf.ComputeScalarsOff()
    cf.Update()
    out = poly if poly is not None else vtkPolyData()
    out.DeepCopy(cf.GetOutput())
    return out


def segments_polydata(segments: np.ndarray, z: float = 0.0, poly: vtkPolyData | None = None) -> vtkPolyData:
    """Line segments ``(M, 2, 2|3)`` -> vtkPolyData of M lines (2D points get ``z``)."""
    seg = np.asarray(segments, float)
    if seg.size == 0:
        seg = np.zeros((0, 2, 3))
    if seg.ndim != 3 or seg.shape[1] != 2 or seg.shape[2] not in (2, 3):
        raise ValueError(f"segments must have shape (M, 2, 2) or (M, 2, 3), got {seg.shape}")
    if seg.shape[2] == 2:
        seg = np.concatenate([seg, np.full(seg.shape[:2] + (1,), z)], 2)
    m = len(seg)
    pts = vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(seg.reshape(-1, 3)), deep=True))
    conn = np.arange(2 * m, dtype=np.int64)
    offsets = np.arange(0, 2 * m + 1, 2, dtype=np.int64)
    cells = vtkCellArray()
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(conn, deep=True))
    out = poly if poly is not None else vtkPolyData()
    out.Initialize()
    out.SetPoints(pts)
    out.SetLines(cells)
    out.Modified()
    return out


def polylines_polydata(lines: list[np.ndarray], poly: vtkPolyData | None = None) -> vtkPolyData:
    """A list of polylines, each ``(K, 3)`` points, -> vtkPolyData."""
    lines = [np.asarray(line, float).reshape(-1, 3) for line in lines if len(line) > 1]
    pts = np.concatenate(lines, 0) if lines else np.zeros((0, 3))
    counts = np.array([len(line) for line in lines], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    conn = np.arange(len(pts), dtype=np.int64)
    vp = vtkPoints()
    vp.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(pts), deep=True))
    cells = vtkCellArray()
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(conn, deep=True))
    out = poly if poly is not None else vtkPolyData()
    out.Initialize()
    out.SetPoints(vp)
    out.SetLines(cells)
    out.Modified()
    return out


def points_polydata(points: np.ndarray, poly: vtkPolyData | None = None) -> vtkPolyData:
    """Points ``(N, 3)`` -> vtkPolyData with one vertex per point."""
    p = np.asarray(points, float).reshape(-1, 3)
    vp = vtkPoints()
    vp.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(p), deep=True))
    cells = vtkCellArray()
    n = len(p)
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(np.arange(n + 1, dtype=np.int64), deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(np.arange(n, dtype=np.int64), deep=True))
    out = poly if poly is not None else vtkPolyData()
    out.Initialize()
    out.SetPoints(vp)
    out.SetVerts(cells)
    out.Modified()
    return out


def cell_array(poly: vtkPolyData, name: str) -> np.ndarray:
    """A named cell-data array of a vtkPolyData as numpy (copy), ``(n_cells[, n_components])``."""
    arr = poly.GetCellData().GetArray(name)
    if arr is None:
        raise ValueError(f"polydata has no cell array '{name}'")
    return numpy_support.vtk_to_numpy(arr).copy()


def set_cell_scalars(poly: vtkPolyData, values: np.ndarray, name: str) -> None:
    """Attach ``values`` ``(n_cells,)`` as the active cell scalars of ``poly``."""
    v = np.ascontiguousarray(values)
    if v.shape[0] != poly.GetNumberOfCells():
        raise ValueError(f"{v.shape[0]} values for {poly.GetNumberOfCells()} cells")
    arr = numpy_support.numpy_to_vtk(v, deep=True)
    arr.SetName(name)
    poly.GetCellData().SetScalars(arr)


def table_to_lut(lut, rgb: np.ndarray, alpha: float = 1.0) -> None:
    """Fill a vtkLookupTable from an ``(n, 3)`` RGB table in [0, 1]."""
    rgba = np.concatenate([np.asarray(rgb, float), np.full((len(rgb), 1), alpha)], 1)
    lut.SetNumberOfTableValues(len(rgba))
    for i, c in enumerate(rgba):
        lut.SetTableValue(i, *map(float, c))
    lut.Build()


def render_window_pixels(render_window) -> np.ndarray:
    """The current picture of a vtkRenderWindow as ``(h, w, 3)`` uint8, row 0 = top."""
    f = vtkWindowToImageFilter()
    f.SetInput(render_window)
    f.SetInputBufferTypeToRGB()
    f.ReadFrontBufferOff()
    f.ShouldRerenderOn()
    f.Update()
    out = f.GetOutput()
    w, h, _ = out.GetDimensions()
    arr = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, -1)
    return np.ascontiguousarray(arr[::-1, :, :3])
