"""Core data types of the RegStation engine.

Conventions (see DESIGN.md):

* Image arrays are indexed ``(z, y, x)`` exactly as ``SimpleITK.GetArrayFromImage`` returns
  them. Vector images (displacement fields) carry the components last: ``(z, y, x, 3)``.
* Geometry (``spacing``, ``origin``, ``direction``) is in ITK order ``(x, y, z)``, millimetres,
  **LPS** world coordinates. ``direction`` is a 3x3 matrix whose *columns* are the directions of
  the index axes i, j, k (x, y, z) in world space.
* Points (landmarks) are ``(N, 3)`` arrays of LPS millimetres, xyz.
* A :class:`Transform` maps **fixed physical points to moving physical points** (the ITK
  resampling convention): ``warped(x) = moving(T(x))``. Landmarks placed on the moving image
  are therefore brought onto the fixed image with ``T``'s inverse, and fixed landmarks are
  mapped into the moving image with ``T`` itself.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk


def _vec3(v, name: str) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=float).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be 3 finite numbers (x, y, z), got {v!r}")
    return (float(a[0]), float(a[1]), float(a[2]))


@dataclass
class Volume:
    """A 3D image on a physical grid.

    Parameters
    ----------
    array : np.ndarray
        ``(z, y, x)`` scalar voxels, or ``(z, y, x, C)`` for vector images (fields).
    spacing : (3,) float
        Voxel size in mm, xyz order.
    origin : (3,) float
        Physical position (LPS mm) of voxel index (0, 0, 0), xyz order.
    direction : (3, 3) float
        Columns are the world (LPS) directions of the index axes x, y, z.
    name : str
        Display name (usually the file name).
    """

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    name: str = ""

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Volume '{self.name}' must be 3D (z, y, x) or a 3D vector image "
                             f"(z, y, x, C); got an array of shape {self.array.shape}")
        self.spacing = _vec3(self.spacing, "spacing")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        self.origin = _vec3(self.origin, "origin")
        d = np.asarray(self.direction, dtype=float)
        if d.size != 9:
            raise ValueError(f"direction must be a 3x3 matrix, got shape {d.shape}")
        self.direction = d.reshape(3, 3)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(z, y, x)`` (without components)."""
        return tuple(int(s) for s in self.array.shape[:3])

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Grid size in ITK order ``(x, y, z)``."""
        z, y, x = self.shape
        return (x, y, z)

    @property
    def is_vector(self) -> bool:
        return self.array.ndim == 4

    @property
    def index_to_world(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous continuous index ``(i, j, k, 1)`` (xyz) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, ijk) -> np.ndarray:
        """Continuous indices ``(N, 3)`` in xyz order -> LPS mm ``(N, 3)``."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, pts) -> np.ndarray:
        """LPS mm ``(N, 3)`` -> continuous indices ``(N, 3)`` in xyz order."""
        pts = np.atleast_2d(np.asarray(pts, dtype=float))
        a = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (pts - np.asarray(self.origin)) @ a.T

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when ``other`` has the same shape, spacing, origin and direction."""
        return (self.shape == other.shape
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol * 10)
                and np.allclose(self.direction, other.direction, atol=tol))

    def physical_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres."""
        x, y, z = self.size_xyz
        corners = np.array([[i, j, k] for i in (0, x - 1) for j in (0, y - 1) for k in (0, z - 1)], float)
        p = self.index_to_physical(corners)
        return p.min(0), p.max(0)

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """A new Volume on the same grid holding ``array`` (same leading (z, y, x) shape)."""
        array = np.asarray(array)
        if array.shape[:3] != self.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(),
                      self.name if name is None else name)

    def copy_geometry_from(self, img: sitk.Image) -> None:
        self.spacing = tuple(img.GetSpacing())
        self.origin = tuple(img.GetOrigin())
        self.direction = np.asarray(img.GetDirection(), float).reshape(3, 3)

    # ------------------------------------------------------------------ SimpleITK
    def to_sitk(self, pixel_type: int | None = None) -> sitk.Image:
        """Convert to a SimpleITK image with the same geometry (no copy of meaning lost)."""
        img = sitk.GetImageFromArray(self.array, isVector=self.is_vector)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.reshape(-1)))
        if pixel_type is not None:
            img = sitk.Cast(img, pixel_type)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, name: str = "") -> "Volume":
        if img.GetDimension() != 3:
            raise ValueError(f"'{name or 'image'}' is {img.GetDimension()}D; a 3D volume is expected")
        arr = sitk.GetArrayFromImage(img)
        return cls(arr, img.GetSpacing(), img.GetOrigin(),
                   np.asarray(img.GetDirection(), float).reshape(3, 3), name)

    def describe(self) -> str:
        d = np.round(self.direction, 4).tolist()
        return (f"{self.name or 'volume'}: size (x,y,z) {self.size_xyz}, spacing {tuple(round(s, 4) for s in self.spacing)} mm, "
                f"origin {tuple(round(o, 3) for o in self.origin)} mm (LPS), direction {d}, dtype {self.array.dtype}")


@dataclass
class LabelMap(Volume):
    """An integer label image (0 = background) on a physical grid."""

    def __post_init__(self):
        super().__post_init__()
        if self.is_vector:
            raise ValueError(f"label map '{self.name}' must be scalar, got shape {self.array.shape}")
        if not np.issubdtype(self.array.dtype, np.integer):
            a = self.array
            if not np.all(np.isfinite(a)) or not np.allclose(a, np.round(a)):
                raise ValueError(f"label map '{self.name}' holds non-integer values")
            self.array = np.round(a).astype(np.int32)

    @property
    def labels(self) -> np.ndarray:
        """Sorted non-zero label ids present."""
        u = np.unique(self.array)
        return u[u != 0]

    @classmethod
    def from_volume(cls, v: Volume) -> "LabelMap":
        return cls(v.array, v.spacing, v.origin, v.direction, v.name)

    def with_array(self, array: np.ndarray, name: str | None = None) -> "LabelMap":
        return LabelMap.from_volume(super().with_array(array, name))


@dataclass
class Landmarks:
    """Named points in LPS millimetres.

    Parameters
    ----------
    points : (N, 3) float
        LPS mm, xyz order.
    names : list[str]
        One label per point (defaults to "1", "2", ...).
    """

    points: np.ndarray
    names: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        p = np.asarray(self.points, dtype=float)
        if p.size == 0:
            p = p.reshape(0, 3)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"landmarks must be an (N, 3) array of LPS mm, got shape {p.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError("landmarks contain NaN or infinite coordinates")
        self.points = p
        if not self.names:
            self.names = [str(i + 1) for i in range(len(p))]
        if len(self.names) != len(p):
            raise ValueError(f"{len(self.names)} names for {len(p)} landmarks")

    def __len__(self) -> int:
        return len(self.points)


class Transform:
    """A spatial transform that maps **fixed physical points to moving physical points**.

    ``warped(x) = moving(T(x))`` for every fixed-grid point ``x`` (LPS mm): this is ITK's
    resampling convention, so the wrapped :class:`SimpleITK.Transform` can be passed to
    ``SimpleITK.Resample(moving, fixed, T)`` directly and written to ``.tfm``/``.h5`` files that
    ANTs, elastix and 3D Slicer read. Moving landmarks map onto the fixed image with the inverse.

    Parameters
    ----------
    itk : SimpleITK.Transform
        The wrapped transform (rigid, affine, B-spline, displacement field or composite).
    kind : str
        'identity', 'rigid', 'affine', 'bspline', 'displacement' or 'composite'.
    """

    def __init__(self, itk: Optional[sitk.Transform] = None, kind: str | None = None):
        self.itk = itk if itk is not None else sitk.Transform(3, sitk.sitkIdentity)
        if self.itk.GetDimension() != 3:
            raise ValueError(f"a 3D transform is expected, got a {self.itk.GetDimension()}D one")
        self.kind = kind or _infer_kind(self.itk)

    @classmethod
    def identity(cls) -> "Transform":
        return cls(sitk.Transform(3, sitk.sitkIdentity), "identity")

    @property
    def is_linear(self) -> bool:
        return self.kind in ("identity", "rigid", "affine")

    def transform_points(self, points) -> np.ndarray:
        """Map fixed points (N, 3) LPS mm to moving points (N, 3) LPS mm."""
        pts = np.atleast_2d(np.asarray(points, float))
        return np.array([self.itk.TransformPoint(tuple(map(float, p))) for p in pts]).reshape(-1, 3)

    def then(self, other: "Transform") -> "Transform":
        """Composition for stages: ``self`` is the first stage, ``other`` refines it.

        A later (deformable) stage is estimated on the image already warped by ``self``, so the
        full mapping from fixed to moving points is ``x -> self(other(x))``; ITK's composite
        transform applies its transforms in reverse order of addition.
        """
        comp = sitk.CompositeTransform(3)
        for t in (self, other):
            if t.kind == "identity":
                continue
            if isinstance(t.itk, sitk.CompositeTransform):
                for i in range(t.itk.GetNumberOfTransforms()):
                    comp.AddTransform(t.itk.GetNthTransform(i))
            else:
                comp.AddTransform(t.itk)
        if comp.GetNumberOfTransforms() == 0:
            return Transform.identity()
        if comp.GetNumberOfTransforms() == 1:
            return Transform(comp.GetNthTransform(0).Downcast())
        return Transform(comp, "composite")

    def __repr__(self) -> str:
        return f"Transform(kind={self.kind!r})"


def _infer_kind(t: sitk.Transform) -> str:
    name = t.GetName()
    if "Composite" in name:
        return "composite"
    if "Identity" in name:
        return "identity"
    if "BSpline" in name:
        return "bspline"
    if "Displacement" in name:
        return "displacement"
    if any(k in name for k in ("Euler", "Versor", "Translation", "Rigid")):
        return "rigid"
    return "affine"


@dataclass
class Progress:
    """What a running registration reports, once per iteration or so.

    ``fraction`` is the overall progress in [0, 1] when known (None: indeterminate).
    ``preview`` may hold a small 2D array (e.g. the middle slice of the current warp).
    ``pose`` is a rigid pose being stepped (the ``agent`` paradigm): ``(tx, ty, tz)`` mm then
    ``(rx, ry, rz)`` degrees about the fixed image's centre (:mod:`app.engine.rigid_pose`), or None.
    """

    stage: str
    iteration: int = 0
    total: int = 0
    loss: float = math.nan
    fraction: Optional[float] = None
    message: str = ""
    preview: Optional[np.ndarray] = None
    pose: Optional[tuple] = None


ProgressFn = Callable[[Progress], None]


class Cancelled(RuntimeError):
    """Raised when a run is cancelled through its cancel event; nothing is written."""


def check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("registration cancelled by the user")


@dataclass
class RegistrationResult:
    """Everything a run produces, and enough to reproduce it.

    Attributes
    ----------
    transform : Transform
        Fixed physical points -> moving physical points (ITK convention).
    warped : Volume
        The moving image resampled onto the fixed grid (interpolated once).
    field : Volume or None
        Dense displacement on the fixed grid, ``(z, y, x, 3)``, components xyz in LPS mm, so
        that ``T(x) = x + field(x)``; set for deformable results.
    history : list of dict
        Per-iteration records ``{"stage", "iteration", "loss"}``.
    timings : dict
        Seconds per stage and ``"total"``.
    stages : list of dict
        For a pipeline (``A+B``): one record per stage (paradigm, params, checkpoint, timings).
    error_map : Volume or None
        Estimated registration error (mm) at every fixed voxel (:mod:`app.engine.errormap`), when asked.
    similarity_map : Volume or None
        ``dsm`` runs: the network's probability that the fixed and warped patches around each fixed
        voxel correspond, in [0, 1], ``(z, y, x)`` on the fixed grid (NaN where no patch fits);
        low values show where the learned similarity thinks the images disagree.
    warnings : list of str
        Why the result may not be trusted (shown with the result in the CLI and the GUI).
    checks : dict
        Self-checks of the result, JSON-safe: ``"stage_check"`` (:mod:`app.engine.stagecheck`: the
        similarity of every stage, which one was kept and why), ``"input_check"``
        (:mod:`app.engine.expectations`); a pipeline keys them by stage, ``{"1:weakly": {...}}``.
    """

    transform: Transform
    warped: Volume
    field: Optional[Volume] = None
    history: list = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    paradigm: str = ""
    params: dict = dataclasses.field(default_factory=dict)
    checkpoint_id: Optional[str] = None
    warped_labels: Optional[LabelMap] = None
    stages: list = dataclasses.field(default_factory=list)
    error_map: Optional[Volume] = None
    similarity_map: Optional[Volume] = None
    warnings: list = dataclasses.field(default_factory=list)     # why the result may not be trusted
    checks: dict = dataclasses.field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """True when a stage check found a stage that made the pair worse (the result carries an
        earlier stage's transform): the run must not be shown as a plain success."""
        return checks_flagged(self.checks)

    def summary(self) -> dict[str, Any]:
        out = {"paradigm": self.paradigm, "params": self.params, "checkpoint": self.checkpoint_id,
               "device": self.device, "timings": self.timings, "transform_kind": self.transform.kind}
        if len(self.stages) > 1:
            out["stages"] = self.stages
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.checks:
            out["checks"] = dict(self.checks)
        return out


def checks_flagged(checks: Optional[dict]) -> bool:
    """Whether :attr:`RegistrationResult.checks` (one paradigm's, or a pipeline's keyed by stage)
    holds a flagged stage check."""
    if not isinstance(checks, dict):
        return False
    sc = checks.get("stage_check")
    if isinstance(sc, dict) and sc.get("flagged"):
        return True
    return any(checks_flagged(v) for k, v in checks.items() if k not in ("stage_check", "input_check"))


def params_to_dict(params) -> dict:
    """A Params dataclass -> plain dict (JSON-safe)."""
    if params is None:
        return {}
    if dataclasses.is_dataclass(params):
        return dataclasses.asdict(params)
    return dict(params)
