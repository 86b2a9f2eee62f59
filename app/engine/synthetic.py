"""Pairs with exact answers: known random transforms applied to real images.

The test bench of the learned paradigms that need ground truth (``supervised``, ``agent``,
``dsm``) and of their comparisons with ``iterative``. Everything is numpy / SimpleITK in and
numpy / :class:`~app.engine.types.Transform` out; no torch.

How a pair is made (:func:`make_pair`): a real image is the **moving** image, untouched; the
**fixed** image is the moving image resampled through a known transform ``T`` on the moving
image's own grid,

    fixed(x) = moving(T(x))      for every fixed-grid point x (LPS mm),

so ``T`` maps fixed physical points to moving physical points (the engine's convention) exactly,
by construction, with no inversion. Labels go along (nearest neighbour), and the fixed image's
brain points (label > 0) are where errors are measured (:func:`mean_point_error`).

Transforms
----------
* linear (:func:`random_rigid`, :func:`random_affine`, :func:`band_transform`): 4x4 physical
  matrices ``T(x) = L (x - c) + c + t`` about a centre ``c`` (the head's intensity centroid),
  rotations in degrees, translations in mm, scale factors, shears;
* dense (:func:`random_field`): a smooth random displacement ``u`` (cubic B-spline control grid,
  spacing in mm), capped at ``max_mm``; ``diffeomorphic=True`` treats it as a stationary velocity
  and integrates it by scaling and squaring (no folding);
* both: ``T(x) = A(x + u(x))`` (the affine stage first, the field estimated on its result:
  ``Transform.then``), the composition the two-stage learned models use.

Evaluation cases (:func:`make_cases`, :func:`case_pair`): deterministic, seeded lists of
(subject, known transform) with bands of initial misalignment (rotation angle about a random axis,
translation length), so every method can be run from the same starts.
"""
from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .types import LabelMap, Transform, Volume

# (max rotation angle in degrees, max translation length in mm) of each band; a case of band k has
# its angle in (rot[k-1], rot[k]] and its translation length in (trans[k-1], trans[k]].
BANDS: tuple = ((10.0, 10.0), (20.0, 20.0), (30.0, 30.0), (45.0, 40.0))
SUCCESS_MM = 2.0


# --------------------------------------------------------------------------- linear transforms
def rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` (3x3) from angles about the physical x, y, z axes (degrees)."""
    a = np.deg2rad(np.asarray(angles_deg, float).reshape(3))
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def axis_angle_matrix(axis, angle_deg: float) -> np.ndarray:
    """Rotation (3x3) by ``angle_deg`` about the unit vector ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float).reshape(3)
    n = np.linalg.norm(k)
    if n == 0:
        raise ValueError("rotation axis must be non-zero")
    k = k / n
    a = math.radians(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def rotation_angle_deg(matrix) -> float:
    """Angle (degrees) of the rotation closest to the 3x3 linear part of ``matrix`` (3x3 or 4x4)."""
    m = np.asarray(matrix, float)[:3, :3]
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def about_centre(linear, centre_xyz, translation_xyz=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 ``x -> L (x - c) + c + t`` (LPS mm)."""
    lin = np.asarray(linear, float).reshape(3, 3)
    c = np.asarray(centre_xyz, float).reshape(3)
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = c - lin @ c + np.asarray(translation_xyz, float).reshape(3)
    return m


def random_rigid(rng: np.random.Generator, centre_xyz, rot_deg: float = 20.0, trans_mm: float = 25.0) -> np.ndarray:
    """A random rigid 4x4 about ``centre_xyz``: angles uniform in ``+-rot_deg`` about each axis,
    translations uniform in ``+-trans_mm`` along each axis (LPS mm)."""
    return about_centre(rotation_matrix(rng.uniform(-rot_deg, rot_deg, 3)), centre_xyz,
                        rng.uniform(-trans_mm, trans_mm, 3))


def random_affine(rng: np.random.Generator, centre_xyz, rot_deg: float = 20.0, trans_mm: float = 25.0,
                  scale: tuple = (0.85, 1.15), shear: float = 0.1) -> np.ndarray:
    """A random affine 4x4 about ``centre_xyz``: ``L = R @ Sh @ S`` with rotations uniform in
    ``+-rot_deg`` per axis, an upper-triangular shear uniform in ``+-shear``, scale factors uniform in
    ``scale`` (lo, hi) per axis, and translations uniform in ``+-trans_mm`` per axis (LPS mm)."""
    lo, hi = (1 - scale, 1 + scale) if np.isscalar(scale) else scale
    if not 0 < lo <= hi:
        raise ValueError(f"scale range must satisfy 0 < lo <= hi, got {scale!r}")
    sh = np.eye(3) + np.triu(rng.uniform(-shear, shear, (3, 3)), 1)
    lin = rotation_matrix(rng.uniform(-rot_deg, rot_deg, 3)) @ sh @ np.diag(rng.uniform(lo, hi, 3))
    return about_centre(lin, centre_xyz, rng.uniform(-trans_mm, trans_mm, 3))


def band_transform(rng: np.random.Generator, centre_xyz, rot_range=(0.0, 10.0), trans_range=(0.0, 10.0),
                   scale: float = 0.0, shear: float = 0.0) -> np.ndarray:
    """A random transform of a given *size*: a rotation by an angle uniform in ``rot_range`` (degrees)
    about a random axis and a translation of length uniform in ``trans_range`` (mm) in a random
    direction, about ``centre_xyz``; with ``scale`` / ``shear`` > 0 also per-axis scale factors in
    ``1 +- scale`` and shears in ``+-shear`` (an affine case)."""
    axis = rng.normal(size=3)
    lin = axis_angle_matrix(axis, rng.uniform(*rot_range))
    if shear > 0:
        lin = lin @ (np.eye(3) + np.triu(rng.uniform(-shear, shear, (3, 3)), 1))
    if scale > 0:
        lin = lin @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    d = rng.normal(size=3)
    t = d / np.linalg.norm(d) * rng.uniform(*trans_range)
    return about_centre(lin, centre_xyz, t)


def matrix_to_transform(matrix) -> Transform:
    """4x4 physical matrix (fixed -> moving points, LPS mm) -> affine :class:`Transform`."""
    m = np.asarray(matrix, float)
    if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"expected a homogeneous 4x4 affine matrix, got shape {m.shape}")
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in m[:3, :3].reshape(-1)))
    t.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    return Transform(t, "affine")


def transform_to_matrix(transform: Transform) -> np.ndarray:
    """4x4 matrix of a linear :class:`Transform` (raises ValueError for a deformable one)."""
    if not transform.is_linear:
        raise ValueError(f"a linear transform is expected, got a {transform.kind} one")
    p0 = np.zeros((1, 3))
    basis = np.vstack([p0, np.eye(3)])
    q = transform.transform_points(basis)
    m = np.eye(4)
    m[:3, 3] = q[0]
    m[:3, :3] = (q[1:] - q[0]).T
    return m


# --------------------------------------------------------------------------- dense fields
def _index_matrix(grid: Volume) -> np.ndarray:
    return grid.direction @ np.diag(grid.spacing)        # index xyz -> physical xyz (3x3)


def compose_fields_mm(outer: np.ndarray, inner: np.ndarray, grid: Volume) -> np.ndarray:
    """Displacement of ``x -> x + inner(x) + outer(x + inner(x))`` (z, y, x, 3) xyz mm on ``grid``.

    ``outer`` is sampled (trilinear, edge values continued) at the displaced points.
    """
    from scipy.ndimage import map_coordinates
    shape = grid.shape
    inv = np.linalg.inv(_index_matrix(grid))
    d_idx_xyz = inner.reshape(-1, 3) @ inv.T                                  # (N, 3) index xyz
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = np.stack([zz.ravel() + d_idx_xyz[:, 2], yy.ravel() + d_idx_xyz[:, 1], xx.ravel() + d_idx_xyz[:, 0]])
    sampled = np.stack([map_coordinates(outer[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
    return (inner.reshape(-1, 3) + sampled).reshape(*shape, 3)


def integrate_velocity_mm(velocity: np.ndarray, grid: Volume, steps: int = 7) -> np.ndarray:
    """Scaling and squaring of a stationary velocity (z, y, x, 3) xyz mm -> displacement, same layout.

    ``exp(v)``: ``d = v / 2**steps``, then ``steps`` times ``d <- d + d o (id + d)``.
    """
    d = np.asarray(velocity, np.float64) / (2 ** steps)
    for _ in range(steps):
        d = compose_fields_mm(d, d, grid)
    return d


def random_field(grid: Volume, rng: np.random.Generator, max_mm: float = 10.0, control_spacing_mm: float = 40.0,
                 diffeomorphic: bool = False, steps: int = 7) -> Volume:
    """A smooth random displacement field on ``grid``: Volume (z, y, x, 3), xyz LPS mm.

    Random vectors (normal) on a control lattice of ``control_spacing_mm`` spanning the grid,
    interpolated with cubic B-splines, then scaled so that the largest displacement length is
    ``max_mm``. With ``diffeomorphic`` the field is a stationary velocity integrated by scaling
    and squaring, rescaled so that the integrated displacement's largest length is ``max_mm`` (no
    folding: a diffeomorphism). ``T(x) = x + field(x)`` (use :func:`app.engine.spatial.field_to_transform`).
    """
    from scipy.ndimage import zoom
    if max_mm < 0:
        raise ValueError(f"max_mm must be >= 0, got {max_mm}")
    if control_spacing_mm <= 0:
        raise ValueError(f"control_spacing_mm must be > 0, got {control_spacing_mm}")
    shape = grid.shape
    extent = np.array(shape, float) * np.array(grid.spacing[::-1])          # mm along z, y, x
    n_ctrl = [max(4, int(math.ceil(e / control_spacing_mm)) + 1) for e in extent]
    coarse = rng.normal(size=(3, *n_ctrl))
    # grid_mode: the control lattice and the grid cover the same extent (cell edges aligned).
    comps = [zoom(c, [s / n for s, n in zip(shape, n_ctrl)], order=3, mode="nearest", grid_mode=True)
             for c in coarse]
    comps = [c[:shape[0], :shape[1], :shape[2]] for c in comps]
    v = np.stack(comps, -1).astype(np.float64)
    v -= v.mean(axis=(0, 1, 2))               # no global translation: the field is a local deformation
    if max_mm == 0:
        return Volume(np.zeros((*shape, 3), np.float32), grid.spacing, grid.origin, grid.direction.copy(), "random_field")
    norm = np.linalg.norm(v, axis=-1).max()
    v *= max_mm / max(norm, 1e-12)
    if diffeomorphic:
        scale = 1.0
        for _ in range(3):                   # a few corrections: |exp(s v)| is close to linear in s
            d = integrate_velocity_mm(v * scale, grid, steps)
            got = np.linalg.norm(d, axis=-1).max()
            if abs(got - max_mm) < 1e-3 * max_mm:
                break
            scale *= max_mm / max(got, 1e-12)
        if got > max_mm:                     # never exceed the cap
            scale *= max_mm / got
            d = integrate_velocity_mm(v * scale, grid, steps)
        v = d
    return Volume(v.astype(np.float32), grid.spacing, grid.origin, grid.direction.copy(), "random_field")


def field_transform(field_vol: Volume) -> Transform:
    """A displacement field (z, y, x, 3) xyz mm -> :class:`Transform` ``x -> x + field(x)``."""
    from .spatial import field_to_transform
    return field_to_transform(field_vol)


# --------------------------------------------------------------------------- pairs
@dataclass
class KnownPair:
    """A pair whose transform is known exactly.

    fixed, moving : Volumes; ``fixed(x) = moving(T(x))`` on the moving image's grid.
    fixed_labels, moving_labels : LabelMaps or None.
    transform : T, fixed physical points -> moving physical points.
    matrix : 4x4 linear part (the whole T when there is no field), or None.
    field : the dense part ``u`` (z, y, x, 3) xyz mm on the fixed grid (``T(x) = A(x + u(x))``), or None.
    centre : the centre (LPS mm) the linear part was drawn about.
    """

    fixed: Volume
    moving: Volume
    fixed_labels: Optional[LabelMap]
    moving_labels: Optional[LabelMap]
    transform: Transform
    matrix: Optional[np.ndarray] = None
    field: Optional[Volume] = None
    centre: Optional[np.ndarray] = None
    meta: dict = dataclasses.field(default_factory=dict)

    def displacement_mm(self) -> Volume:
        """The whole ``T(x) - x`` on the fixed grid, (z, y, x, 3) xyz mm."""
        from .spatial import transform_to_field
        return transform_to_field(self.transform, self.fixed)


def make_pair(moving: Volume, moving_labels: Optional[LabelMap] = None, matrix=None,
              field: Optional[Volume] = None, interpolation: str = "linear") -> KnownPair:
    """The fixed image for a known transform ``T = matrix.then(field)`` (see the module docstring).

    Parameters
    ----------
    moving : the real image (any grid), left untouched.
    matrix : 4x4 physical affine (fixed -> moving points) or None.
    field : displacement (z, y, x, 3) xyz mm on the moving image's grid (which is the fixed grid), or None.
    """
    if moving.is_vector:
        raise ValueError(f"'{moving.name}' is a vector image; a scalar 3D image is expected")
    from .spatial import resample
    t = Transform.identity()
    if matrix is not None:
        t = t.then(matrix_to_transform(matrix))
    if field is not None:
        if field.shape != moving.shape or not field.is_vector:
            raise ValueError(f"field must be (z, y, x, 3) on the moving grid {moving.shape}, got {field.array.shape}")
        t = t.then(field_transform(field))
    fixed = resample(moving, moving, t, interpolation)
    fixed.name = f"{moving.name} (known transform)"
    fixed_labels = resample(moving_labels, moving, t, "nearest") if moving_labels is not None else None
    return KnownPair(fixed, moving, fixed_labels, moving_labels, t,
                     None if matrix is None else np.asarray(matrix, float), field)


def brain_points(labels: Volume, max_points: int = 4000, seed: int = 0) -> np.ndarray:
    """Physical coordinates (N, 3) LPS mm of the voxels with label > 0, at most ``max_points``
    (a seeded random subset: the same points every call)."""
    idx = np.argwhere(np.asarray(labels.array) > 0)                 # (N, 3) zyx
    if len(idx) == 0:
        raise ValueError(f"'{labels.name}' has no voxel > 0: no brain points to measure on")
    if len(idx) > max_points:
        idx = idx[np.sort(np.random.default_rng(seed).choice(len(idx), max_points, replace=False))]
    return labels.index_to_physical(idx[:, ::-1].astype(float))


def _map(t, points: np.ndarray) -> np.ndarray:
    if isinstance(t, Transform):
        return t.transform_points(points)
    m = np.asarray(t, float)
    if m.shape != (4, 4):
        raise ValueError(f"expected a Transform or a 4x4 matrix, got shape {m.shape}")
    return points @ m[:3, :3].T + m[:3, 3]


def point_errors(estimate, truth, points) -> np.ndarray:
    """``|estimate(x) - truth(x)|`` (mm) for points (N, 3) LPS mm; Transforms or 4x4 matrices."""
    p = np.atleast_2d(np.asarray(points, float))
    return np.linalg.norm(_map(estimate, p) - _map(truth, p), axis=1)


def mean_point_error(estimate, truth, points) -> float:
    """Mean point error (mm) between two transforms (fixed -> moving) over ``points`` (N, 3) LPS mm."""
    return float(point_errors(estimate, truth, points).mean())


# --------------------------------------------------------------------------- evaluation cases
@dataclass(frozen=True)
class Case:
    """One evaluation case: a subject and a known transform drawn about its centre of mass.

    ``linear`` (3x3) and ``translation`` (mm) define ``T(x) = L (x - c) + c + t`` where ``c`` is the
    subject image's intensity centroid (computed when the pair is made). ``band`` indexes ``bands``.
    """

    subject: str
    band: int
    rot_range: tuple
    trans_range: tuple
    linear: tuple
    translation: tuple
    index: int

    @property
    def label(self) -> str:
        return f"{self.rot_range[1]:g}deg/{self.trans_range[1]:g}mm"

    def matrix(self, centre_xyz) -> np.ndarray:
        return about_centre(np.asarray(self.linear), centre_xyz, self.translation)


def make_cases(subjects: Sequence[str], per_band: int = 5, bands=BANDS, seed: int = 0, scale: float = 0.0,
               shear: float = 0.0) -> list[Case]:
    """Deterministic known-transform cases: ``per_band`` per band, subjects taken in turn.

    Band ``k`` draws rotation angles in ``(rot[k-1], rot[k]]`` degrees (random axis) and translation
    lengths in ``(trans[k-1], trans[k]]`` mm (random direction); ``scale``/``shear`` > 0 add a
    random per-axis scale ``1 +- scale`` and shears ``+-shear`` (affine cases). Same arguments,
    same cases.
    """
    if not subjects:
        raise ValueError("make_cases needs at least one subject")
    rng = np.random.default_rng(seed)
    out, k = [], 0
    prev = (0.0, 0.0)
    for b, (rot, trans) in enumerate(bands):
        for i in range(per_band):
            m = band_transform(rng, np.zeros(3), (prev[0], rot), (prev[1], trans), scale, shear)
            out.append(Case(subjects[k % len(subjects)], b, (prev[0], float(rot)), (prev[1], float(trans)),
                            tuple(map(tuple, m[:3, :3])), tuple(m[:3, 3]), i))
            k += 1
        prev = (float(rot), float(trans))
    return out


def target_cases(subjects: Sequence[str], n: int = 20, seed: int = 1, rot_deg: float = 15.0, trans_mm: float = 20.0,
                 scale: float = 0.1, shear: float = 0.05) -> list[Case]:
    """The issue's affine target cases: per-axis rotations ``+-rot_deg``, translations ``+-trans_mm``,
    scales ``1 +- scale``, shears ``+-shear`` (uniform), about the centre of mass. band = -1."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = random_affine(rng, np.zeros(3), rot_deg, trans_mm, (1 - scale, 1 + scale), shear)
        out.append(Case(subjects[i % len(subjects)], -1, (0.0, rot_deg), (0.0, trans_mm),
                        tuple(map(tuple, m[:3, :3])), tuple(m[:3, 3]), i))
    return out


def case_pair(case: Case, root: str | os.PathLike | None = None) -> KnownPair:
    """Read the case's IXI subject (image + labels) and make its known pair (:func:`make_pair`)."""
    from . import io
    from .datasets import DEFAULT_IXI_ROOT, center_of_mass, ixi_paths
    img_path, seg_path = ixi_paths(case.subject, root or DEFAULT_IXI_ROOT)
    moving = io.read_volume(img_path)
    labels = io.read_labels(seg_path, reference=moving) if Path(seg_path).exists() else None
    centre = center_of_mass(moving)
    pair = make_pair(moving, labels, case.matrix(centre))
    pair.centre = centre
    pair.meta = {"subject": case.subject, "band": case.band, "band_label": case.label, "index": case.index}
    return pair


def success_table(rows: list[dict], error_key: str = "error_mm", band_key: str = "band_label",
                  threshold_mm: float = SUCCESS_MM) -> dict:
    """Per band: n, median / mean error (mm) and success rate (error < ``threshold_mm``)."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[band_key], []).append(float(r[error_key]))
    return {b: {"n": len(v), "median_mm": float(np.median(v)), "mean_mm": float(np.mean(v)),
                "success": float(np.mean(np.asarray(v) < threshold_mm))} for b, v in out.items()}
