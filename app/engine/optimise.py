"""One torch optimiser over transform models: rigid, affine, dense displacement, stationary velocity.

Direction (ITK convention, as everywhere in RegStation)::

    warped(x) = moving(T(x)),   T(x) = T0(M(x))

for every fixed physical point ``x`` (LPS mm, xyz): ``T0`` is the initial transform (identity, a
previous stage, any kind) and ``M`` the optimised model, which maps fixed points to moving points:

* :class:`RigidModel`: ``M(x) = R (x - c) + c + t`` (rotation vector and translation, 6 parameters)
* :class:`AffineModel`: ``M(x) = A (x - c) + c + t`` (12 parameters)
* :class:`DisplacementModel`: ``M(x) = x + u(x)``, ``u`` a dense field on a coarse grid of the fixed image
* :class:`VelocityModel`: ``M(x) = x + exp(v)(x)``, ``v`` a stationary velocity integrated by scaling and squaring

How the moving image is sampled:

* linear models sample the moving image *on its own grid* at ``Gm^-1 T0 M Gf i`` (one interpolation;
  grids may differ in shape, spacing, origin and direction; :mod:`app.engine.nn.geometry`). A
  linear ``T0`` is folded into the model's parameters when the model can represent it (any linear
  ``T0`` for the affine model, a rigid one for the rigid model), otherwise it stays a fixed matrix
  in front of ``M``. A non-linear ``T0`` is applied by resampling the moving image once onto the
  fixed grid (the *working image*).
* field models always optimise on the working image (the moving image resampled once through
  ``T0`` onto the fixed grid, as ``instance`` always did); the field lives in voxels of its own
  coarse grid, channels (z, y, x), and leaves this module through
  :func:`app.engine.spatial.voxel_to_physical_field` (xyz LPS mm).

Optimisation runs coarse to fine over a pyramid of the *fixed grid* (box-averaged, corners
aligned), with Adam or L-BFGS, for any similarity of :mod:`app.engine.nn.similarity` plus a
smoothness regulariser (fields), a Dice term on label maps and a landmark term (mean squared
distance in mm between ``T(fixed landmark)`` and the moving landmark). The result exports itself as
an ITK :class:`~app.engine.types.Transform`: Euler3D / Affine transforms with their centre, or a
displacement-field transform, composed after ``T0``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import spatial
from .nn import layers, losses, resolve_device
from .nn.geometry import grid_centre, grid_matrix, sample_through
from .nn.similarity import get_similarity, uses_labels
from .types import (LabelMap, Progress, ProgressFn, RegistrationResult, Transform, Volume, check_cancel)

MODELS = ("rigid", "affine", "displacement", "velocity")
OPTIMIZERS = ("adam", "lbfgs")
REGULARISERS = ("diffusion", "bending")

# Adam step sizes that work without tuning: field models in voxels of the field grid, linear models
# in mm (their rotation / linear parameters are scaled to mm at the image radius)
_DEFAULT_LR = {"rigid": 1.0, "affine": 1.0, "displacement": 0.1, "velocity": 0.1}


# --------------------------------------------------------------------------- models
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


# --------------------------------------------------------------------------- result
@dataclass
class OptimiseResult:
    """What :func:`optimise` returns.

    Attributes
    ----------
    transform : Transform
        The whole chain, fixed physical points -> moving physical points: ``initial.then(model)``
        (or the model alone when the initial transform was folded into it).
    model_transform : Transform
        The optimised model alone (maps fixed points to the points ``initial`` then maps on).
    model : torch.nn.Module
        The optimised model (parameters on ``device``).
    history : list of dict
        Per iteration: ``stage``, ``iteration`` (from 1), ``loss``, ``similarity``, ``level``
        (and ``landmarks`` mm^2 / ``labels`` when those terms are used).
    timings : dict
        Seconds: ``prepare``, ``level_<shrink>``, ``optimise``, ``export``.
    device : str
    initial : Transform
        The initial transform the optimisation started from.
    iterations_run : dict
        Adam iterations that ran per level, ``{shrink factor: count}`` (fewer than planned under
        ``budget_s``; empty for L-BFGS).
    folded : bool
        True when a linear model absorbed ``initial`` (then ``transform`` is the model alone).
    """

    transform: Transform
    model_transform: Transform
    model: nn.Module
    history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    device: str = "cpu"
    initial: Transform = field(default_factory=Transform.identity)
    folded: bool = False
    iterations_run: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return float(self.history[-1]["loss"]) if self.history else float("nan")


# --------------------------------------------------------------------------- the optimiser
def optimise(fixed: Volume, moving: Volume, model: Union[str, nn.Module] = "velocity", *,
             initial: Union[Transform, RegistrationResult, None] = None,
             similarity: Optional[str] = "lncc", sim_options: Optional[dict] = None,
             regulariser: str = "diffusion", weight: float = 0.5,
             levels: Sequence[int] = (4, 2, 1), iterations: Union[int, Sequence[int]] = (60, 30, 10),
             optimizer: str = "adam", lr: Optional[float] = None,
             landmarks: Optional[tuple] = None,
             labels: Optional[tuple[LabelMap, LabelMap]] = None, label_weight: float = 1.0,
             mask: Optional[Volume] = None, percentile: Optional[float] = 99.0,
             model_options: Optional[dict] = None, budget_s: Optional[float] = None,
             progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
             device="auto", stage: str = "optimise", fraction: tuple[float, float] = (0.0, 1.0)
             ) -> OptimiseResult:
    """Optimise a transform model so that ``moving(T(x))`` matches ``fixed(x)``.

    Parameters
    ----------
    fixed, moving : Volume
        Scalar 3D images ``(z, y, x)``, each on its own grid (spacing, origin, direction; LPS).
    model : 'rigid', 'affine', 'displacement', 'velocity' or a model from :func:`make_model`
    initial : Transform or RegistrationResult, optional
        Fixed points -> moving points to start from (see the module docstring); None = identity.
    similarity : str or None
        A name of :mod:`app.engine.nn.similarity` ('mse', 'ncc', 'lncc', 'mi', 'dice' or a registered
        one), or None for no image term (e.g. landmarks alone). 'dice' compares ``labels``.
    sim_options : dict, optional
        Options of the similarity (``window`` for lncc, ``bins`` for mi, ...).
    regulariser : 'diffusion' or 'bending'
        Smoothness of field models (ignored by linear models), weighted by ``weight``.
    levels : shrink factors of the fixed grid, coarse to fine (each level's grid is the fixed grid
        box-averaged by that factor); a sequence or ``"4,2,1"``
    iterations : one number per level, or one number for every level (sequence or ``"60,30,10"``)
    optimizer : 'adam' or 'lbfgs' (L-BFGS with a strong-Wolfe line search, at most ``iterations``
        iterations per level; every function evaluation is reported)
    lr : step size; None = 0.1 voxels for fields, 1 mm for linear models
    landmarks : (fixed_points, moving_points, weight), optional
        ``(N, 3)`` LPS mm arrays (or :class:`~app.engine.types.Landmarks`) matched by row; adds
        ``weight * mean ||T(fixed_i) - moving_i||^2`` (mm^2).
    labels : (fixed_labels, moving_labels), optional
        Label maps (each on its image's grid); the labels present in both are compared with soft
        Dice: as the similarity when ``similarity='dice'``, else added with ``label_weight``.
    mask : Volume, optional
        Fixed-space weights (non-zero = inside), any grid (resampled nearest onto the fixed grid).
    percentile : float or None
        Intensities are clipped to ``[min, percentile]`` and scaled to [0, 1] (None: unchanged).
    model_options : dict, optional
        Passed to :func:`make_model` when ``model`` is a name.
    budget_s : float, optional
        Wall-clock seconds for the whole optimisation (from the call to the end of the last level;
        the export of the transform comes on top), Adam only. Each level gets a share of the budget
        in proportion to its planned work (voxels x iterations) and stops early, after at least one
        iteration, when the cumulative share up to it is spent, so time a level leaves unused goes
        to the next one. None or 0: no cap (every planned iteration runs). The result then depends on
        the machine's speed and load; :attr:`OptimiseResult.iterations_run` says how many ran.
    progress, cancel
        ``progress(Progress)`` once per iteration (stage ``stage``); ``cancel`` is checked every
        iteration (:class:`~app.engine.types.Cancelled`).
    device : 'auto', 'cpu', 'cuda', 'cuda:N' (:func:`app.engine.nn.resolve_device`)
    fraction : (start, end) of the progress fraction this optimisation covers.

    Returns
    -------
    OptimiseResult
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    levels_t, iters_t = _check_schedule(levels, iterations)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    if regulariser not in REGULARISERS:
        raise ValueError(f"unknown regulariser {regulariser!r}; available: {', '.join(REGULARISERS)}")
    if not weight >= 0:
        raise ValueError(f"regulariser weight must be >= 0, got {weight!r}")
    if isinstance(model, str):
        kind = model
        model = make_model(model, fixed, **(model_options or {}))
    elif isinstance(model, (LinearModel, FieldModel)):
        kind = model.kind
    else:
        raise ValueError(f"model must be one of {', '.join(MODELS)} or a model from make_model, got {model!r}")
    if lr is None:
        lr = _DEFAULT_LR[kind]
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if budget_s is not None and not budget_s >= 0:
        raise ValueError(f"budget_s must be >= 0 seconds (0 or None: no cap), got {budget_s!r}")
    if budget_s and optimizer != "adam":
        raise ValueError(f"budget_s caps Adam's iterations; optimizer {optimizer!r} runs without a budget")
    sim_fn = None
    if similarity is not None:
        sim_fn = get_similarity(similarity, **(sim_options or {}))
    label_sim = uses_labels(sim_fn) if sim_fn is not None else False
    if label_sim and labels is None:
        raise ValueError(f"similarity {similarity!r} compares label maps: give labels=(fixed_labels, moving_labels)")
    lm = _check_landmarks(landmarks)
    if sim_fn is None and lm is None and labels is None:
        raise ValueError("nothing to optimise: give a similarity, landmarks or labels")
    init_t = initial.transform if isinstance(initial, RegistrationResult) else (initial or Transform.identity())
    check_cancel(cancel)

    # ---- working images (float32 on the device) and grids (float64 4x4 matrices)
    model = model.to(dev)
    linear = _is_linear(model)
    folded = init_t.kind == "identity"
    if linear and init_t.is_linear and not folded:
        folded = model.fold(_linear_matrix(init_t))
    from .datasets import normalize_intensity
    norm = (lambda a: normalize_intensity(a, percentile)) if percentile is not None else (lambda a: a)
    fixed_n = norm(fixed.array)
    work, mgrid, pre = _working(linear, fixed, moving.with_array(norm(moving.array)), init_t, folded)
    f_t = _tensor(fixed_n, dev)
    m_t = _tensor(work.array, dev)
    gf = grid_matrix(fixed)
    gm = grid_matrix(mgrid)
    label_t = _label_tensors(labels, fixed, mgrid, None if linear and init_t.is_linear else init_t, dev)
    mask_t = _mask_tensor(mask, fixed, dev)
    if sim_fn is not None and not label_sim and hasattr(sim_fn, "bind"):
        sim_fn = sim_fn.bind(f_t, m_t)
    lm_t = None
    if lm is not None:
        lm_t = (torch.as_tensor(lm[0], dtype=torch.float64, device=dev),
                torch.as_tensor(lm[1], dtype=torch.float64, device=dev), float(lm[2]),
                _initial_points(init_t, fixed, dev) if not (linear and init_t.is_linear) else None)
    pre_t = torch.as_tensor(pre, dtype=torch.float64, device=dev)
    timings = {"prepare": time.perf_counter() - t_start}

    # ---- coarse to fine
    t0 = time.perf_counter()
    full = tuple(f_t.shape[2:])
    reporter = _Reporter(progress, stage, levels_t, iters_t, full, fraction)
    # cumulative deadline of every level (the budget shared in proportion to the planned work)
    deadlines = (t_start + float(budget_s) * np.cumsum(reporter.cost) / reporter.wtotal) if budget_s else None
    ran: dict[int, int] = {}
    min_size = 3 if regulariser == "bending" else 2
    for li, (shrink, n_it) in enumerate(zip(levels_t, iters_t)):
        t_level = time.perf_counter()
        lshape = tuple(max(4, int(round(s / shrink))) for s in full)
        f_l = _downsample(f_t, lshape)
        mshape = tuple(max(4, int(round(s / shrink))) for s in m_t.shape[2:]) if linear else lshape
        m_l = _downsample(m_t, mshape)
        gf_l = torch.as_tensor(gf @ _level_scale(full, lshape), dtype=torch.float64, device=dev)
        gm_l_inv = torch.as_tensor(np.linalg.inv(gm @ _level_scale(m_t.shape[2:], mshape)),
                                   dtype=torch.float64, device=dev)
        mask_l = None if mask_t is None else _downsample(mask_t, lshape)
        lab_l = None if label_t is None else (_downsample(label_t[0], lshape), _downsample(label_t[1], mshape))
        model.set_level(lshape, min_size)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam" else
               torch.optim.LBFGS(params, lr=lr, max_iter=max(n_it, 1), max_eval=max(n_it, 1) * 2,
                                 tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20,
                                 line_search_fn="strong_wolfe"))
        last: dict = {}

        def evaluate():
            warp, disp_l = _sampler(model, lshape, gm_l_inv, pre_t, gf_l, "zeros")
            terms = {}
            warped = warp(m_l) if (sim_fn is not None and not label_sim) or progress else None
            if sim_fn is not None and not label_sim:
                terms["similarity"] = sim_fn(f_l, warped, mask_l) if mask_l is not None else sim_fn(f_l, warped)
            if lab_l is not None:
                dice = losses.dice_loss(lab_l[0], warp(lab_l[1]), mask=mask_l)
                if label_sim:
                    terms["similarity"] = dice
                terms["labels"] = dice
            loss = terms.get("similarity", torch.zeros((), device=dev))
            if lab_l is not None and not label_sim and label_weight > 0:
                loss = loss + label_weight * terms["labels"]
            if weight > 0:
                reg = model.regularisation(regulariser)
                if reg is not None:
                    loss = loss + weight * reg
            if lm_t is not None:
                d2 = _landmark_sq_distance(model, lm_t, disp_l, gf_l, pre_t)
                terms["landmarks"] = d2
                loss = loss + lm_t[2] * d2
            last.update(loss=loss, terms=terms, warped=warped)
            return loss

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = evaluate()
            loss.backward()
            return loss

        if optimizer == "adam":
            for it in range(n_it):
                if deadlines is not None and it > 0 and time.perf_counter() > deadlines[li]:
                    break
                check_cancel(cancel)
                closure()
                opt.step()
                reporter.report(li, shrink, it, float(last["loss"].detach()),
                                {k: float(v.detach()) for k, v in last["terms"].items()}, last["warped"])
                ran[shrink] = ran.get(shrink, 0) + 1
        elif n_it > 0:
            # one L-BFGS run per level (its curvature memory needs consecutive iterations); every
            # function evaluation (line-search trials included) is reported and may cancel
            evals = {"n": 0}

            def lbfgs_closure():
                check_cancel(cancel)
                loss = closure()
                reporter.report(li, shrink, min(evals["n"], n_it - 1), float(loss.detach()),
                                {k: float(v.detach()) for k, v in last["terms"].items()}, last["warped"])
                evals["n"] += 1
                return loss

            opt.step(lbfgs_closure)
        timings[f"level_{shrink}"] = timings.get(f"level_{shrink}", 0.0) + time.perf_counter() - t_level
    timings["optimise"] = time.perf_counter() - t0
    check_cancel(cancel)

    t0 = time.perf_counter()
    if not linear and model.param is None:          # no level ran: the identity field
        model.set_level(full, min_size)
    model_tf = model.to_transform(fixed)
    # T = T0 . M: ITK composes the chain; a folded T0 is inside the model already
    transform = model_tf if linear and folded else init_t.then(model_tf)
    timings["export"] = time.perf_counter() - t0
    return OptimiseResult(transform=transform, model_transform=model_tf, model=model,
                          history=reporter.history, timings=timings, device=str(dev), initial=init_t,
                          folded=bool(linear and folded), iterations_run=ran)


def similarity_profile(fixed: Volume, moving: Volume, matrices, *, similarity: str,
                       sim_options: Optional[dict] = None, level: int = 1, percentile: Optional[float] = 99.0,
                       device="cpu") -> np.ndarray:
    """The similarity loss :func:`optimise` would see at each of the given linear transforms.

    The landscape of a similarity (e.g. a 1D sweep of rotation) evaluated through the optimiser's own
    pipeline: intensities clipped to ``[min, percentile]`` and scaled to [0, 1], the fixed grid
    box-averaged by the shrink factor ``level`` (the moving image by the same factor on its own
    grid), the moving image sampled once through each transform (zeros outside). A stochastic
    similarity is rebuilt for every transform from the same ``sim_options`` (``dsm``: the same seed,
    so the same patch centres at every transform: the profile compares like with like).

    Parameters
    ----------
    fixed, moving : Volume (z, y, x), each on its own grid (LPS)
    matrices : (N, 4, 4) array-like
        Homogeneous physical maps (xyz LPS mm), fixed points -> moving points.
    similarity : a name of :mod:`app.engine.nn.similarity` (``'mi'``, ``'dsm'``, ...)
    level : shrink factor of the fixed grid (one pyramid level of :func:`optimise`)

    Returns
    -------
    (N,) float64 losses (lower is better).
    """
    mats = np.asarray(matrices, float).reshape(-1, 4, 4)
    if not np.all(np.isfinite(mats)):
        raise ValueError("similarity_profile: the matrices contain NaN or infinite values")
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    if int(level) < 1:
        raise ValueError(f"level must be a shrink factor >= 1, got {level!r}")
    dev = resolve_device(device)
    from .datasets import normalize_intensity
    norm = (lambda a: normalize_intensity(a, percentile)) if percentile is not None else (lambda a: a)
    f_t = _tensor(norm(fixed.array), dev)
    m_t = _tensor(norm(moving.array), dev)
    full, mfull = tuple(f_t.shape[2:]), tuple(m_t.shape[2:])
    lshape = tuple(max(4, int(round(s / level))) for s in full)
    mshape = tuple(max(4, int(round(s / level))) for s in mfull)
    f_l, m_l = _downsample(f_t, lshape), _downsample(m_t, mshape)
    gf_l = grid_matrix(fixed) @ _level_scale(full, lshape)
    gm_l_inv = np.linalg.inv(grid_matrix(moving) @ _level_scale(mfull, mshape))
    out = np.empty(len(mats))
    with torch.no_grad():
        for i, m in enumerate(mats):
            sim = get_similarity(similarity, **(sim_options or {}))
            if hasattr(sim, "bind"):
                sim = sim.bind(f_t, m_t)
            k = torch.as_tensor(gm_l_inv @ m @ gf_l, dtype=torch.float64, device=dev)
            warped = sample_through(m_l, k[None], lshape, padding_mode="zeros")
            out[i] = float(sim(f_l, warped))
    return out


def warp_moving(result: OptimiseResult, fixed: Volume, moving: Volume, padding_mode: str = "itk") -> Volume:
    """``moving`` warped onto ``fixed``'s grid by ``result``'s model with the optimiser's torch sampler.

    The same sampling path as the optimisation at full resolution (intensities unchanged), for
    checking the exported :attr:`OptimiseResult.transform` against ``SimpleITK.Resample``. Field
    models sample the working image (``moving`` resampled through the initial transform), so with a
    non-identity initial transform or a moving grid other than the fixed one this interpolates twice.

    Returns
    -------
    Volume on ``fixed``'s grid, ``(z, y, x)`` float32.
    """
    model = result.model
    linear = _is_linear(model)
    dev = next(iter(model.buffers())).device
    work, mgrid, pre = _working(linear, fixed, moving, result.initial, result.folded)
    with torch.no_grad():
        gf = torch.as_tensor(grid_matrix(fixed), dtype=torch.float64, device=dev)
        gm_inv = torch.as_tensor(np.linalg.inv(grid_matrix(mgrid)), dtype=torch.float64, device=dev)
        warp, _ = _sampler(model, fixed.shape, gm_inv, torch.as_tensor(pre, device=dev), gf, padding_mode)
        out = warp(_tensor(work.array, dev))
    return fixed.with_array(out[0, 0].float().cpu().numpy(), name=moving.name)


def _working(linear: bool, fixed: Volume, moving: Volume, init_t: Transform, folded: bool):
    """(image to sample, its grid, 4x4 matrix in front of the model) for the model kind and initial.

    Linear models with a linear initial transform sample the moving image on its own grid (the
    initial is folded into the model, or kept as the matrix in front of it); everything else
    samples the working image: ``moving`` resampled once through ``init_t`` onto the fixed grid.
    """
    if linear and init_t.is_linear:
        return moving, moving, (np.eye(4) if folded or init_t.kind == "identity" else _linear_matrix(init_t))
    if init_t.kind == "identity" and moving.same_grid(fixed):
        return moving, fixed, np.eye(4)
    return spatial.resample(moving, fixed, init_t, "linear"), fixed, np.eye(4)


def _sampler(model, shape_zyx, gm_inv: torch.Tensor, pre: torch.Tensor, gf: torch.Tensor, padding_mode: str):
    """(warp(image) -> image on the fixed-level grid, level displacement or None) for the current parameters.

    ``gf`` maps the fixed level grid's indices to physical points, ``gm_inv`` physical points to the
    sampled image's indices (4x4, float64); ``pre`` is the matrix in front of a linear model.
    """
    if _is_linear(model):
        k = gm_inv @ pre @ model.matrix() @ gf
        return (lambda img: sample_through(img, k[None], shape_zyx, padding_mode=padding_mode)), None
    disp = model.displacement(shape_zyx)
    return (lambda img: spatial.warp_torch(img, disp, padding_mode=padding_mode)), disp


# --------------------------------------------------------------------------- helpers
def _check_image(v: Volume, name: str) -> None:
    if not isinstance(v, Volume):
        raise ValueError(f"{name} must be a Volume, got {type(v).__name__}")
    if v.is_vector:
        raise ValueError(f"{name} must be a scalar volume (z, y, x), got shape {v.array.shape}")
    if min(v.shape) < 4:
        raise ValueError(f"{name} is too small to register: shape {v.shape} (z, y, x)")


def _check_schedule(levels, iterations) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shrink factors and iterations per level (``"4,2,1"``, a number or a sequence each)."""
    from .paradigms.base import parse_number_list
    lv = parse_number_list(levels, int, "levels")
    it = parse_number_list(iterations, int, "iterations")
    if any(v < 1 or v > 64 for v in lv):
        raise ValueError(f"levels must be shrink factors between 1 and 64, got {levels!r}")
    if any(v < 0 for v in it):
        raise ValueError(f"iterations must be integers >= 0, got {iterations!r}")
    if len(it) == 1:
        it = it * len(lv)
    if len(it) != len(lv):
        raise ValueError(f"iterations gives {len(it)} numbers for {len(lv)} levels ({iterations!r} vs {levels!r})")
    return lv, it


def _check_landmarks(landmarks):
    if landmarks is None:
        return None
    if not isinstance(landmarks, (tuple, list)) or len(landmarks) != 3:
        raise ValueError("landmarks must be (fixed_points, moving_points, weight)")
    fp, mp, w = landmarks
    fp = np.asarray(getattr(fp, "points", fp), float)
    mp = np.asarray(getattr(mp, "points", mp), float)
    if fp.ndim != 2 or fp.shape[1] != 3 or fp.shape != mp.shape or len(fp) == 0:
        raise ValueError(f"landmarks must be two (N, 3) arrays of LPS mm with N >= 1 matched by row, "
                         f"got {fp.shape} and {mp.shape}")
    if not np.all(np.isfinite(fp)) or not np.all(np.isfinite(mp)):
        raise ValueError("landmarks contain NaN or infinite coordinates")
    if not float(w) >= 0:
        raise ValueError(f"landmark weight must be >= 0, got {w!r}")
    return fp, mp, float(w)


def _tensor(a: np.ndarray, dev) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=dev)[None, None]


def _downsample(img: torch.Tensor, shape) -> torch.Tensor:
    """Area (box) downsampling of (B, C, D, H, W) to ``shape``; the full grid is returned as is.

    Box averaging keeps the grids related as a strided grid and its parent (corners aligned), as
    :func:`app.engine.nn.layers.resize_field` and :func:`_level_scale` assume.
    """
    if tuple(img.shape[2:]) == tuple(shape):
        return img
    return F.adaptive_avg_pool3d(img, tuple(shape))


def _level_scale(full_shape, level_shape) -> np.ndarray:
    """4x4: level-grid index (z, y, x) -> full-grid index of the same point (corners aligned)."""
    s = np.eye(4)
    for ax, (n_full, n_level) in enumerate(zip(full_shape, level_shape)):
        r = n_full / n_level
        s[ax, ax] = r
        s[ax, 3] = 0.5 * r - 0.5
    return s


def _linear_matrix(t: Transform) -> np.ndarray:
    """4x4 homogeneous matrix (xyz mm) of a linear Transform, from the images of 4 points."""
    pts = np.vstack([np.zeros(3), np.eye(3)])
    img = t.transform_points(pts)
    m = np.eye(4)
    m[:3, 3] = img[0]
    m[:3, :3] = (img[1:] - img[0]).T
    return m


def _label_tensors(labels, fixed: Volume, mgrid: Volume, through: Optional[Transform], dev):
    """One-hot (1, K, ...) float32 maps of the labels present in both: fixed on its grid, moving on ``mgrid``."""
    if labels is None:
        return None
    if not isinstance(labels, (tuple, list)) or len(labels) != 2:
        raise ValueError("labels must be (fixed_labels, moving_labels)")
    fl, ml = labels
    for name, v in (("fixed_labels", fl), ("moving_labels", ml)):
        if not isinstance(v, Volume) or v.is_vector:
            raise ValueError(f"{name} must be a scalar label map (LabelMap), got {type(v).__name__}")
    fl = fl if fl.same_grid(fixed) else spatial.resample(LabelMap.from_volume(fl), fixed, None, "nearest")
    if through is not None and through.kind != "identity" or not ml.same_grid(mgrid):
        ml = spatial.resample(LabelMap.from_volume(ml), mgrid, through, "nearest")
    fa, ma = np.asarray(fl.array), np.asarray(ml.array)
    common = np.intersect1d(np.unique(fa), np.unique(ma))
    common = common[common != 0]
    if common.size == 0:
        raise ValueError("the fixed and moving label maps share no non-zero label")
    f1 = np.stack([(fa == k) for k in common]).astype(np.float32)
    m1 = np.stack([(ma == k) for k in common]).astype(np.float32)
    return (torch.as_tensor(f1, device=dev)[None], torch.as_tensor(m1, device=dev)[None])


def _mask_tensor(mask: Optional[Volume], fixed: Volume, dev):
    if mask is None:
        return None
    if not isinstance(mask, Volume) or mask.is_vector:
        raise ValueError(f"mask must be a scalar Volume, got {type(mask).__name__}")
    m = mask if mask.same_grid(fixed) else spatial.resample(LabelMap.from_volume(
        mask.with_array((np.asarray(mask.array) != 0).astype(np.int32))), fixed, None, "nearest")
    a = (np.asarray(m.array) != 0).astype(np.float32)
    if not a.any():
        raise ValueError("the mask is empty on the fixed grid")
    return _tensor(a, dev)


def _initial_points(t: Transform, fixed: Volume, dev) -> Optional[Callable]:
    """``y -> T0(y)`` for (N, 3) torch points (xyz mm), differentiable in ``y``.

    A non-linear ``T0`` is sampled as a dense displacement on the fixed grid and interpolated
    trilinearly (edge values outside).
    """
    if t.kind == "identity":
        return None
    if t.is_linear:
        m = torch.as_tensor(_linear_matrix(t), dtype=torch.float64, device=dev)
        return lambda y: y @ m[:3, :3].T + m[:3, 3]
    d0 = spatial.transform_to_field(t, fixed).array                             # (z, y, x, 3) xyz mm
    d0_t = torch.as_tensor(np.moveaxis(d0, -1, 0)[None].copy(), dtype=torch.float64, device=dev)
    g_inv = torch.as_tensor(np.linalg.inv(grid_matrix(fixed)), dtype=torch.float64, device=dev)

    def apply(y):
        idx = y @ g_inv[:3, :3].T + g_inv[:3, 3]                               # (N, 3) zyx index
        d = spatial.sample_at_indices(d0_t, idx.T.reshape(1, 3, -1, 1, 1), "bilinear", "border")
        return y + d.reshape(3, -1).T
    return apply


def _landmark_sq_distance(model, lm_t, disp_l, gf_l: torch.Tensor, pre_t: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (mm^2) between ``T(fixed landmark)`` and the moving landmark."""
    fp, mp, _, t0 = lm_t
    if _is_linear(model):
        m = pre_t @ model.matrix()
        y = fp @ m[:3, :3].T + m[:3, 3]
    else:
        g_inv = torch.linalg.inv(gf_l)
        idx = fp @ g_inv[:3, :3].T + g_inv[:3, 3]                               # (N, 3) level index zyx
        u = spatial.sample_at_indices(disp_l.double(), idx.T.reshape(1, 3, -1, 1, 1), "bilinear", "border")
        u_vox = u.reshape(3, -1).T                                              # (N, 3) zyx voxels
        y = fp + u_vox @ gf_l[:3, :3].T                                         # level index vector -> mm
    if t0 is not None:
        y = t0(y)
    return torch.mean(torch.sum((y - mp) ** 2, dim=1))


class _Reporter:
    """History, progress (fraction weighted by the voxels of each level) and previews."""

    def __init__(self, progress: Optional[ProgressFn], stage: str, levels, iters, full_shape,
                 fraction: tuple[float, float]):
        self.progress = progress
        self.stage = stage
        self.levels, self.iters = levels, iters
        self.total = int(sum(iters))
        self.cost = [max(1.0, np.prod(full_shape) / s ** 3) * n for s, n in zip(levels, iters)]
        self.wtotal = max(sum(self.cost), 1e-9)
        self.start, self.end = float(fraction[0]), float(fraction[1])
        self.history: list[dict] = []
        self.count = 0
        self.last_loss = float("nan")

    def report(self, level: int, shrink: int, it: int, loss: float, terms: dict, warped) -> None:
        self.count += 1
        self.last_loss = loss
        rec = {"stage": self.stage, "iteration": self.count, "loss": loss, "level": level}
        rec.update(terms)
        rec.setdefault("similarity", float("nan"))
        self.history.append(rec)
        if not self.progress:
            return
        done = sum(self.cost[:level]) + self.cost[level] * (it + 1) / max(self.iters[level], 1)
        frac = self.start + (self.end - self.start) * min(1.0, done / self.wtotal)
        last = it + 1 == self.iters[level]
        preview = None
        if warped is not None and (last or it % 10 == 0):
            w = warped.detach()
            preview = w[0, 0, w.shape[2] // 2].float().cpu().numpy()
        self.progress(Progress(self.stage, self.count, self.total, loss, frac,
                               f"level {level + 1}/{len(self.levels)} (1/{shrink})", preview))
