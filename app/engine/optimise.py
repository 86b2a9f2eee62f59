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

Modules
-------
This module holds the optimiser: :func:`optimise` (checks, preparation, the coarse-to-fine loop,
the export), :class:`OptimiseResult` and the progress reporter. Its pieces live in siblings (every
name re-exported here, private ones included):

* :mod:`app.engine.optimise_models`: the transform models (:class:`LinearModel`, :class:`RigidModel`,
  :class:`AffineModel`, :class:`FieldModel`, :class:`DisplacementModel`, :class:`VelocityModel`) and
  :func:`make_model`;
* :mod:`app.engine.optimise_grids`: the working image, the pyramid grids and the sampler (how the
  moving image is sampled through the model on each level), tensors;
* :mod:`app.engine.optimise_inputs`: checks of the inputs and their tensors (schedule, labels, mask,
  landmarks, the landmark term);
* :mod:`app.engine.optimise_probes`: the optimiser's view without optimising: :func:`similarity_profile`
  (the loss at given transforms) and :func:`warp_moving` (the torch warp of a result).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .nn import losses, resolve_device
from .nn.geometry import grid_matrix
from .nn.similarity import get_similarity, uses_labels
# the pieces, private ones included (tests, benches and the paradigms import them from here)
from .optimise_grids import _downsample, _level_scale, _linear_matrix, _sampler, _tensor, _working  # noqa: F401
from .optimise_inputs import (_check_image, _check_landmarks, _check_schedule, _initial_points,  # noqa: F401
                              _label_tensors, _landmark_sq_distance, _mask_tensor)
from .optimise_models import (MODELS, AffineModel, DisplacementModel, FieldModel, LinearModel,  # noqa: F401
                              RigidModel, VelocityModel, _is_linear, make_model, rotation_matrix)
from .optimise_probes import similarity_profile, warp_moving  # noqa: F401
from .types import (LabelMap, Progress, ProgressFn, RegistrationResult, Transform, Volume, check_cancel)

OPTIMIZERS = ("adam", "lbfgs")
REGULARISERS = ("diffusion", "bending")

# Adam step sizes that work without tuning: field models in voxels of the field grid, linear models
# in mm (their rotation / linear parameters are scaled to mm at the image radius)
_DEFAULT_LR = {"rigid": 1.0, "affine": 1.0, "displacement": 0.1, "velocity": 0.1}


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
