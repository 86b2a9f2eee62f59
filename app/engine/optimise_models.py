"""The transform models :func:`app.engine.optimise.optimise` optimises, and :func:`make_model`.

Every model maps fixed physical points to moving physical points (LPS mm, xyz; ITK convention):

* linear models (:class:`LinearModel`): ``M(x) = A (x - c) + c + t`` with float64 parameters scaled
  to mm at a radius (:class:`RigidModel`: rotation vector + translation, exported as
  ``Euler3DTransform``; :class:`AffineModel`: 12 parameters, exported as ``AffineTransform``); they can
  absorb (:meth:`~LinearModel.fold`) a linear initial transform they can represent;
* field models (:class:`FieldModel`): a dense field in voxels of a coarse grid of each pyramid level,
  channels (z, y, x), re-gridded level by level (:class:`DisplacementModel`: ``x + u(x)``;
  :class:`VelocityModel`: ``x + exp(v)(x)`` by scaling and squaring), exported as a displacement-field
  transform on the fixed grid (xyz LPS mm).

Every name is re-exported by :mod:`app.engine.optimise`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn

from . import spatial
from .nn import layers, losses
from .nn.geometry import grid_centre
from .types import Transform, Volume

MODELS = ("rigid", "affine", "displacement", "velocity")


class LinearModel(nn.Module):
    """Base of the linear models: ``M(x) = A (x - c) + c + t`` in LPS mm (float64 parameters).

    Parameters
    ----------
    centre_mm : 3 floats, xyz LPS mm (usually the fixed grid's centre)
    radius_mm : float
        Length that scales the rotation / linear parameters, so that one unit of every parameter
        moves points by about 1 mm (good conditioning for Adam and L-BFGS).
    """

    kind = "affine"

    def __init__(self, centre_mm, radius_mm: float = 50.0):
        super().__init__()
        c = np.asarray(centre_mm, float).reshape(-1)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise ValueError(f"centre_mm must be 3 finite numbers (xyz mm), got {centre_mm!r}")
        if not radius_mm > 0:
            raise ValueError(f"radius_mm must be > 0, got {radius_mm!r}")
        self.register_buffer("centre", torch.as_tensor(c, dtype=torch.float64))
        self.radius = float(radius_mm)
        self.translation = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def linear_part(self) -> torch.Tensor:
        """(3, 3) float64."""
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """(4, 4) float64 homogeneous physical map (xyz mm): fixed points -> moving points."""
        a = self.linear_part()
        c = self.centre
        top = torch.cat([a, (c + self.translation - a @ c)[:, None]], 1)
        last = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=a.dtype, device=a.device)
        return torch.cat([top, last], 0)

    def points(self, x_mm: torch.Tensor) -> torch.Tensor:
        """(N, 3) xyz mm -> (N, 3) xyz mm."""
        m = self.matrix().to(x_mm.dtype)
        return x_mm @ m[:3, :3].T + m[:3, 3]

    def set_level(self, level_shape, min_size: int = 2) -> None:
        """Linear models do not depend on the pyramid level."""

    def regularisation(self, name: str) -> Optional[torch.Tensor]:
        return None

    def fold(self, matrix4: np.ndarray) -> bool:
        """Set the parameters so that ``M`` equals ``matrix4``; False when the model cannot represent it."""
        raise NotImplementedError


def rotation_matrix(r: torch.Tensor) -> torch.Tensor:
    """Rotation vector (3,) (radians, axis * angle, xyz) -> rotation matrix (3, 3): ``exp([r]x)``."""
    z = torch.zeros((), dtype=r.dtype, device=r.device)
    skew = torch.stack([torch.stack([z, -r[2], r[1]]), torch.stack([r[2], z, -r[0]]),
                        torch.stack([-r[1], r[0], z])])
    return torch.linalg.matrix_exp(skew)


class RigidModel(LinearModel):
    """Rotation about ``centre`` + translation: ``M(x) = R (x - c) + c + t``, ``R = exp([r]x)``.

    Six parameters: the rotation vector ``r`` (radians; stored times ``radius_mm`` so that its
    units are mm of arc at that radius) and ``t`` (mm). Exports as ``sitk.Euler3DTransform``.
    """

    kind = "rigid"

    def __init__(self, centre_mm, radius_mm: float = 50.0):
        super().__init__(centre_mm, radius_mm)
        self.rotation = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def rotation_vector(self) -> torch.Tensor:
        return self.rotation / self.radius

    def linear_part(self) -> torch.Tensor:
        return rotation_matrix(self.rotation_vector())

    def fold(self, matrix4: np.ndarray) -> bool:
        a = np.asarray(matrix4, float)[:3, :3]
        if np.abs(a.T @ a - np.eye(3)).max() > 1e-6 or np.linalg.det(a) < 0:
            return False
        from scipy.spatial.transform import Rotation
        c = self.centre.detach().cpu().numpy()
        with torch.no_grad():
            self.rotation.copy_(torch.as_tensor(Rotation.from_matrix(a).as_rotvec() * self.radius))
            self.translation.copy_(torch.as_tensor(a @ c + np.asarray(matrix4, float)[:3, 3] - c))
        return True

    def to_transform(self, fixed: Optional[Volume] = None) -> Transform:
        """The model alone as an ITK ``Euler3DTransform`` (centre ``c``), fixed -> moving points."""
        with torch.no_grad():
            r = self.linear_part().cpu().numpy()
        tx = sitk.Euler3DTransform()
        tx.SetCenter(tuple(float(v) for v in self.centre.cpu().numpy()))
        tx.SetMatrix(tuple(float(v) for v in r.reshape(-1)), 1e-8)
        tx.SetTranslation(tuple(float(v) for v in self.translation.detach().cpu().numpy()))
        return Transform(tx, "rigid")


class AffineModel(LinearModel):
    """General affine about ``centre``: ``M(x) = A (x - c) + c + t`` (12 parameters).

    ``A = I + L / radius_mm`` with ``L`` (``linear_mm``) the stored (mm-scaled) parameters. Exports as
    ``sitk.AffineTransform``.
    """

    kind = "affine"

    def __init__(self, centre_mm, radius_mm: float = 50.0):
        super().__init__(centre_mm, radius_mm)
        self.linear_mm = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))

    def linear_part(self) -> torch.Tensor:
        eye = torch.eye(3, dtype=self.linear_mm.dtype, device=self.linear_mm.device)
        return eye + self.linear_mm / self.radius

    def fold(self, matrix4: np.ndarray) -> bool:
        m = np.asarray(matrix4, float)
        c = self.centre.detach().cpu().numpy()
        with torch.no_grad():
            self.linear_mm.copy_(torch.as_tensor((m[:3, :3] - np.eye(3)) * self.radius))
            self.translation.copy_(torch.as_tensor(m[:3, :3] @ c + m[:3, 3] - c))
        return True

    def to_transform(self, fixed: Optional[Volume] = None) -> Transform:
        """The model alone as an ITK ``AffineTransform`` (centre ``c``), fixed -> moving points."""
        with torch.no_grad():
            a = self.linear_part().cpu().numpy()
        tx = sitk.AffineTransform(tuple(float(v) for v in a.reshape(-1)),
                                  tuple(float(v) for v in self.translation.detach().cpu().numpy()),
                                  tuple(float(v) for v in self.centre.cpu().numpy()))
        return Transform(tx, "affine")


def _is_linear(model: nn.Module) -> bool:
    return isinstance(model, LinearModel)


class FieldModel(nn.Module):
    """Base of the dense models: a field on a coarse grid of each pyramid level of the fixed image.

    The parameter lives in voxels of its own grid, channels (z, y, x); :meth:`displacement`
    resamples the (integrated) field to any grid covering the same extent
    (:func:`app.engine.nn.layers.resize_field`, corners aligned).

    Parameters
    ----------
    field_downsample : int >= 1
        The parameter grid is this many times coarser than each level's grid.
    """

    kind = "displacement"

    def __init__(self, field_downsample: int = 2):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)   # follows .to(device)
        if int(field_downsample) != field_downsample or field_downsample < 1:
            raise ValueError(f"field_downsample must be an integer >= 1, got {field_downsample!r}")
        self.field_downsample = int(field_downsample)
        self.param: Optional[nn.Parameter] = None

    def set_level(self, level_shape, min_size: int = 2) -> None:
        """Re-grid the parameter for a pyramid level (zeros at the first level, resized after)."""
        pshape = tuple(max(min_size, int(round(s / self.field_downsample))) for s in level_shape)
        if self.param is None:
            self.param = nn.Parameter(torch.zeros((1, 3, *pshape), dtype=torch.float32,
                                                  device=self._anchor.device))
        else:
            self.param = nn.Parameter(layers.resize_field(self.param.detach(), pshape).clone())

    def field(self) -> torch.Tensor:
        """The displacement on the parameter grid (1, 3, d, h, w), zyx voxels of that grid."""
        raise NotImplementedError

    def displacement(self, shape_zyx) -> torch.Tensor:
        """(1, 3, *shape_zyx): displacement in zyx voxels of a grid of that shape (same extent)."""
        if self.param is None:
            return torch.zeros((1, 3, *shape_zyx), dtype=torch.float32, device=self._anchor.device)
        return layers.resize_field(self.field(), shape_zyx)

    def regularisation(self, name: str) -> Optional[torch.Tensor]:
        """Smoothness of the parameter field: 'diffusion' (squared gradient) or 'bending'."""
        if self.param is None:
            return None
        fn = losses.gradient_l2 if name == "diffusion" else losses.bending_energy
        return fn(self.param)

    def to_transform(self, fixed: Volume) -> Transform:
        """The model alone as an ITK displacement-field transform on ``fixed``'s grid (xyz LPS mm)."""
        with torch.no_grad():
            disp_vox = self.displacement(fixed.shape)                                   # (1, 3, D, H, W)
            field_mm = spatial.voxel_to_physical_field(disp_vox.detach().double(), fixed)[0]
        arr = field_mm.permute(1, 2, 3, 0).cpu().numpy()
        return spatial.field_to_transform(fixed.with_array(arr, name="field"))


class DisplacementModel(FieldModel):
    """``M(x) = x + u(x)``: a dense displacement field (may fold; see :class:`VelocityModel`)."""

    kind = "displacement"

    def field(self) -> torch.Tensor:
        return self.param


class VelocityModel(FieldModel):
    """``M(x) = x + exp(v)(x)``: a stationary velocity integrated by scaling and squaring.

    Parameters
    ----------
    integration_steps : int >= 0, squarings of :func:`app.engine.nn.layers.integrate_velocity`
    """

    kind = "velocity"

    def __init__(self, field_downsample: int = 2, integration_steps: int = 7):
        super().__init__(field_downsample)
        if int(integration_steps) != integration_steps or integration_steps < 0:
            raise ValueError(f"integration_steps must be an integer >= 0, got {integration_steps!r}")
        self.integration_steps = int(integration_steps)

    def field(self) -> torch.Tensor:
        return layers.integrate_velocity(self.param, self.integration_steps)


def make_model(kind: str, fixed: Volume, **options) -> nn.Module:
    """A transform model for ``fixed``'s grid.

    Parameters
    ----------
    kind : 'rigid', 'affine', 'displacement' or 'velocity'
    fixed : Volume, the fixed grid (linear models centre on it by default)
    **options : ``centre_mm``, ``radius_mm`` (linear); ``field_downsample``, ``integration_steps``
        (fields)
    """
    if kind not in MODELS:
        raise ValueError(f"unknown transform model {kind!r}; available: {', '.join(MODELS)}")
    try:
        if kind in ("rigid", "affine"):
            lo, hi = fixed.physical_bounds()
            centre = options.pop("centre_mm", None)
            centre = grid_centre(fixed) if centre is None else centre
            radius = options.pop("radius_mm", None)
            radius = float(np.mean(np.asarray(hi) - np.asarray(lo))) / 2 if radius is None else radius
            cls = RigidModel if kind == "rigid" else AffineModel
            return cls(centre, max(float(radius), 1e-3), **options)
        cls = DisplacementModel if kind == "displacement" else VelocityModel
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad options for the {kind} model: {e}") from None
