"""Display planes of the slice views and sampling of volumes on them (numpy only).

Display convention (the 3D Slicer default, *radiological*): the screen axes of each view are
fixed patient axes, whatever the image's own orientation, so oblique or anisotropic images are
resampled in physical space rather than shown in their index grid.

============  ==================  ==================  =============================
view          screen right (u)    screen up (v)       slice normal (n, scroll "up")
============  ==================  ==================  =============================
axial         patient left  (+x)  anterior  (-y)      superior (+z)
coronal       patient left  (+x)  superior  (+z)      anterior (-y)
sagittal      posterior     (+y)  superior  (+z)      right    (-x)
============  ==================  ==================  =============================

(vectors in LPS). So the patient's right is on the screen's left in the axial and coronal
views, anterior is up in the axial view and to the left in the sagittal view.

A :class:`PlaneGrid` is the 2D pixel grid of one view: pixel ``(row p_v, column p_u)`` sits at
the LPS point ``u0*u + v0*v + p_u*du*u + p_v*dv*v + offset*n``. Row 0 is the *bottom* of the
screen (VTK image order). For an image whose direction is a signed permutation (the usual case)
the pixels are exactly its voxel centres, with the voxel spacing (anisotropic pixels are shown
rectangular); for an oblique image the pixel size is its smallest spacing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.engine.types import Volume

ORIENTATIONS: dict[str, tuple[tuple, tuple, tuple]] = {
    # name: (u = screen right, v = screen up, n = normal), LPS unit vectors
    "axial": ((1, 0, 0), (0, -1, 0), (0, 0, 1)),
    "coronal": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, 1), (-1, 0, 0)),
}

# letters at the screen edges: (left, right, bottom, top)
EDGE_LETTERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "P", "A"),
    "coronal": ("R", "L", "I", "S"),
    "sagittal": ("A", "P", "I", "S"),
}


def plane_axes(orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``(u, v, n)`` (LPS) of a view orientation."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation '{orientation}'; use one of {', '.join(ORIENTATIONS)}")
    return tuple(np.asarray(a, float) for a in ORIENTATIONS[orientation])


def _is_signed_permutation(m: np.ndarray, tol: float = 1e-4) -> bool:
    a = np.abs(m)
    return bool(np.all((a < tol) | (np.abs(a - 1) < tol)) and np.allclose(a.sum(0), 1, atol=tol)
                and np.allclose(a.sum(1), 1, atol=tol))


@dataclass
class PlaneGrid:
    """The pixel grid of one slice view through a reference volume.

    Attributes
    ----------
    orientation : str
        'axial', 'coronal' or 'sagittal'.
    u, v, n : (3,) float
        Screen-right, screen-up and normal unit vectors, LPS.
    origin_uv : (2,) float
        (u, v) coordinates in mm of the centre of pixel (0, 0) (bottom left).
    spacing_uv : (2,) float
        Pixel size (du, dv) in mm.
    size_uv : (2,) int
        Number of pixels (nu, nv).
    offset : float
        Position of the plane along ``n`` in mm (``p . n`` for the points p of the plane).
    offset_range : (2,) float
        The first and last slice positions inside the reference volume.
    step : float
        Distance between neighbouring slices in mm.
    """

    orientation: str
    u: np.ndarray
    v: np.ndarray
    n: np.ndarray
    origin_uv: np.ndarray
    spacing_uv: np.ndarray
    size_uv: tuple[int, int]
    offset: float
    offset_range: tuple[float, float]
    step: float

    # ------------------------------------------------------------- coordinates
    def to_lps(self, u, v, s: float | None = None) -> np.ndarray:
        """Plane coordinates (mm) -> LPS points; ``s`` defaults to the plane offset."""
        u = np.asarray(u, float)
        v = np.asarray(v, float)
        s = self.offset if s is None else s
        return u[..., None] * self.u + v[..., None] * self.v + s * self.n

    def from_lps(self, xyz) -> np.ndarray:
        """LPS points ``(..., 3)`` -> plane coordinates ``(..., 3)`` = (u, v, s) in mm."""
        p = np.asarray(xyz, float)
        return np.stack([p @ self.u, p @ self.v, p @ self.n], -1)

    def pixel_points(self) -> np.ndarray:
        """LPS positions of all pixel centres, shape ``(nv, nu, 3)``."""
        nu, nv = self.size_uv
        uu = self.origin_uv[0] + np.arange(nu) * self.spacing_uv[0]
        vv = self.origin_uv[1] + np.arange(nv) * self.spacing_uv[1]
        return self.to_lps(uu[None, :].repeat(nv, 0), vv[:, None].repeat(nu, 1))

    @property
    def extent_uv(self) -> tuple[float, float, float, float]:
        """(u_min, u_max, v_min, v_max) in mm of the pixel *edges*."""
        (u0, v0), (du, dv), (nu, nv) = self.origin_uv, self.spacing_uv, self.size_uv
        return (u0 - du / 2, u0 + (nu - 0.5) * du, v0 - dv / 2, v0 + (nv - 0.5) * dv)

    def with_offset(self, s: float) -> "PlaneGrid":
        """The same grid moved to the slice nearest ``s`` (clamped to the volume)."""
        lo, hi = self.offset_range
        k = np.round((np.clip(s, min(lo, hi), max(lo, hi)) - lo) / self.step)
        return PlaneGrid(self.orientation, self.u, self.v, self.n, self.origin_uv, self.spacing_uv,
                         self.size_uv, float(lo + k * self.step), self.offset_range, self.step)

    @property
    def slice_index(self) -> int:
        """Index of the current slice (0 = the one at ``offset_range[0]``)."""
        return int(round((self.offset - self.offset_range[0]) / self.step))

    @property
    def slice_count(self) -> int:
        return int(round((self.offset_range[1] - self.offset_range[0]) / self.step)) + 1


def make_plane(reference: Volume, orientation: str, cursor=None) -> PlaneGrid:
    """The display grid of ``orientation`` through ``reference``, at the slice nearest ``cursor``.

    Parameters
    ----------
    reference : Volume
        The image whose grid is displayed (the fixed image).
    orientation : str
        'axial', 'coronal' or 'sagittal'.
    cursor : (3,) float, optional
        LPS mm point the plane should pass through (centre of the volume if None).
    """
    u, v, n = plane_axes(orientation)
    m = reference.direction @ np.diag(reference.spacing)  # index xyz -> world
    x, y, z = reference.size_xyz
    corners = reference.index_to_physical(
        np.array([[i, j, k] for i in (0, x - 1) for j in (0, y - 1) for k in (0, z - 1)], float))
    cu, cv, cn = corners @ u, corners @ v, corners @ n
    if _is_signed_permutation(reference.direction):
        # pixel size along u / v = spacing of the index axis that lies along it
        du = float(abs(u @ m).max())
        dv = float(abs(v @ m).max())
        step = float(abs(n @ m).max())
    else:
        du = dv = float(min(reference.spacing))
        minv = np.linalg.inv(m)
        step = float(1.0 / np.abs(minv @ n).max())
    nu = int(round((cu.max() - cu.min()) / du)) + 1
    nv = int(round((cv.max() - cv.min()) / dv)) + 1
    lo = float(cn.min())
    hi = lo + round((cn.max() - cn.min()) / step) * step
    plane = PlaneGrid(orientation, u, v, n, np.array([cu.min(), cv.min()]), np.array([du, dv]),
                      (nu, nv), lo, (lo, float(hi)), step)
    s = (corners.mean(0) @ n) if cursor is None else float(np.asarray(cursor, float) @ n)
    return plane.with_offset(s)


def plane_volume(plane: PlaneGrid, offsets) -> Volume:
    """An empty Volume whose voxels are the plane's pixels, stacked at ``offsets`` along ``n``.

    Offsets must be consecutive slices (``plane.step`` apart, increasing). Index axes x, y, z
    run along u, v, n, so ``array[k]`` is the plane at ``offsets[k]`` with row 0 at the bottom.
    """
    offsets = np.asarray(list(offsets), float)
    if offsets.size > 1 and not np.allclose(np.diff(offsets), plane.step, atol=1e-6 * max(1.0, plane.step)):
        raise ValueError(f"offsets must be consecutive slices {plane.step} mm apart, got {offsets.tolist()}")
    nu, nv = plane.size_uv
    return Volume(np.zeros((len(offsets), nv, nu), np.float32),
                  (float(plane.spacing_uv[0]), float(plane.spacing_uv[1]), float(plane.step)),
                  plane.to_lps(plane.origin_uv[0], plane.origin_uv[1], float(offsets[0])),
                  np.stack([plane.u, plane.v, plane.n], 1), "plane")


def sample(volume: Volume, plane: PlaneGrid, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sample a scalar volume on the pixels of ``plane``.

    Parameters
    ----------
    volume : Volume
        Scalar image ``(z, y, x)`` on any grid (geometry in LPS mm).
    plane : PlaneGrid
    order : int
        0 = nearest neighbour (labels), 1 = linear.

    Returns
    -------
    values : (nv, nu) array (float32, or the volume's integer dtype with ``order=0``)
        Row 0 = bottom of the screen; 0 outside the volume.
    inside : (nv, nu) bool
        Which pixels fall inside the volume.
    """
    if volume.is_vector:
        raise ValueError(f"only scalar volumes can be displayed, got shape {volume.array.shape}")
    a_inv = np.linalg.inv(volume.direction @ np.diag(volume.spacing))
    o = np.asarray(volume.origin)
    base = a_inv @ (plane.to_lps(plane.origin_uv[0], plane.origin_uv[1]) - o)
    e_u = a_inv @ (plane.spacing_uv[0] * plane.u)
    e_v = a_inv @ (plane.spacing_uv[1] * plane.v)
    fast = _axis_step(e_u) is not None and _axis_step(e_v) is not None
    if fast:
        au, su = _axis_step(e_u)
        av, sv = _axis_step(e_v)
        fast = au != av and _near_int(base[au]) and _near_int(base[av])
    if fast:
        return _sample_aligned(volume, plane, base, au, su, av, sv, order)
    return _sample_general(volume, plane, base, e_u, e_v, order)


def _axis_step(e: np.ndarray, tol: float = 1e-4):
    """(axis, sign) when ``e`` is a unit step along one index axis, else None."""
    a = np.abs(e)
    i = int(a.argmax())
    if abs(a[i] - 1) < tol and np.all(np.delete(a, i) < tol):
        return i, int(np.sign(e[i]))
    return None


def _near_int(x: float, tol: float = 1e-3) -> bool:
    return abs(x - round(x)) < tol


def _sample_aligned(volume, plane, base, au, su, av, sv, order):
    """Pixels coincide with voxel centres in-plane: gather voxels, interpolate only along n."""
    nu, nv = plane.size_uv
    size = volume.size_xyz
    ac = 3 - au - av
    iu = int(round(base[au])) + su * np.arange(nu)
    iv = int(round(base[av])) + sv * np.arange(nv)
    ok_u = (iu >= 0) & (iu < size[au])
    ok_v = (iv >= 0) & (iv < size[av])
    kc = base[ac]
    inside_c = -0.5 <= kc <= size[ac] - 0.5
    inside = ok_v[:, None] & ok_u[None, :] & inside_c
    arr = volume.array
    dtype = arr.dtype if order == 0 else np.float32
    out = np.zeros((nv, nu), dtype)
    if not inside.any():
        return out, inside

    def gather(k):
        idx = [None, None, None]  # xyz
        idx[au] = np.clip(iu, 0, size[au] - 1)[None, :]
        idx[av] = np.clip(iv, 0, size[av] - 1)[:, None]
        idx[ac] = int(np.clip(k, 0, size[ac] - 1))
        return arr[idx[2], idx[1], idx[0]]  # array order (z, y, x)

    if order == 0 or _near_int(kc):
        vals = gather(int(round(kc)))
    else:
        k0 = int(np.floor(kc))
        w = kc - k0
        vals = (1 - w) * gather(k0).astype(np.float32) + w * gather(k0 + 1).astype(np.float32)
    out[inside] = np.broadcast_to(vals, (nv, nu))[inside]
    return out, inside


def _sample_general(volume, plane, base, e_u, e_v, order):
    from scipy.ndimage import map_coordinates

    nu, nv = plane.size_uv
    pu = np.arange(nu, dtype=float)
    pv = np.arange(nv, dtype=float)
    idx = base[:, None, None] + e_u[:, None, None] * pu[None, None, :] + e_v[:, None, None] * pv[None, :, None]
    size = np.asarray(volume.size_xyz, float)[:, None, None]
    inside = np.all((idx >= -0.5) & (idx <= size - 0.5), axis=0)
    arr = volume.array
    dtype = arr.dtype if order == 0 else np.float32
    out = np.zeros((nv, nu), dtype)
    if inside.any():
        coords = idx[::-1][:, inside]  # (k, j, i) for the (z, y, x) array
        src = arr if order == 0 else arr.astype(np.float32, copy=False)
        out[inside] = map_coordinates(src, coords, order=order, mode="nearest", prefilter=False)
    return out, inside


def sample_point(volume: Volume | None, xyz, order: int = 0):
    """Value of ``volume`` at the LPS point ``xyz`` (nearest voxel by default); None outside."""
    if volume is None or volume.is_vector:
        return None
    idx = volume.physical_to_index(np.asarray(xyz, float))[0]
    size = np.asarray(volume.size_xyz)
    if np.any(idx < -0.5) or np.any(idx > size - 0.5):
        return None
    if order == 0:
        i, j, k = np.clip(np.round(idx).astype(int), 0, size - 1)
        return volume.array[k, j, i].item()
    from scipy.ndimage import map_coordinates
    return float(map_coordinates(volume.array.astype(np.float32, copy=False), idx[::-1, None],
                                 order=1, mode="nearest")[0])


def nearest_voxel(volume: Volume, xyz) -> tuple[int, int, int] | None:
    """Index (i, j, k) xyz of the voxel containing the LPS point, or None outside."""
    idx = volume.physical_to_index(np.asarray(xyz, float))[0]
    size = np.asarray(volume.size_xyz)
    if np.any(idx < -0.5) or np.any(idx > size - 0.5):
        return None
    return tuple(int(i) for i in np.clip(np.round(idx).astype(int), 0, size - 1))
