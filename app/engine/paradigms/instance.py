"""One-shot instance optimisation (Li & Fan 2018): optimise a dense field on the single pair.

No training data: a displacement (or a stationary velocity, ``diffeomorphic``) is optimised with
Adam on the pair itself, coarse to fine over an image pyramid of the *fixed grid*, for an image
similarity (local NCC, MSE or mutual information) plus a smoothness penalty.

Direction of the transform (ITK convention, as everywhere in RegStation)::

    warped(x) = moving(T(x)),   T(x) = T0(x + u(x))

for every fixed physical point ``x`` (LPS mm): ``T0`` is the initial (prealignment or any other
paradigm's) transform and ``u`` the optimised residual displacement on the fixed grid. The
optimisation sees ``moving`` resampled once through ``T0`` (the *working image*); the final
warped image resamples the original moving image once through the composed ``T0.then(u)``.

Inside the optimiser the field lives in voxels of its own (coarse) grid, channels (z, y, x); it
leaves this module only through :func:`app.engine.spatial.voxel_to_physical_field` (mm, xyz LPS).

:func:`refine` runs the same optimisation after any paradigm's result ("instance optimisation"
as a refinement step). Defaults were chosen by measurement on IXI test pairs
(``bench/bench_instance.py``, ``bench/results/instance.md``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import numpy as np

from ..spatial import field_to_transform, resample, transform_to_field, voxel_to_physical_field, warp_torch
from ..types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)
from .base import make_params, param, validate_params

SIMILARITIES = ("lncc", "mse", "mi")
REGULARISERS = ("diffusion", "bending")


@dataclass
class InstanceParams:
    """Parameters of :class:`InstanceRegistrar` (metadata: help, range, choices)."""

    prealign: str = param("affine", "initial alignment before the field is optimised: rigid+affine with the "
                          "iterative paradigm, a learned paradigm's full result (instance optimisation after "
                          "unsupervised / weakly, with its bundled or given checkpoint), or none",
                          choices=("affine", "unsupervised", "weakly", "none"))
    similarity: str = param("lncc", "image similarity: local NCC (same modality), normalised MSE, or mutual "
                            "information (multimodal)", choices=SIMILARITIES)
    lncc_window: int = param(5, "local NCC window (voxels of each pyramid level, odd)", range=(3, 21))
    diffeomorphic: bool = param(True, "optimise a stationary velocity field integrated by scaling and squaring "
                                "(no folding) instead of a displacement")
    integration_steps: int = param(7, "scaling-and-squaring steps (diffeomorphic)", range=(1, 12))
    regulariser: str = param("diffusion", "smoothness penalty on the field: diffusion (squared gradient) or "
                             "bending energy", choices=REGULARISERS)
    smoothness: float = param(0.5, "weight of the smoothness penalty (larger is smoother)", range=(0.0, 1000.0))
    levels: str = param("4,2,1", "pyramid shrink factors of the fixed grid, coarse to fine")
    iterations: str = param("60,30,10", "Adam iterations per level (one number for every level, or one per level)")
    field_downsample: int = param(2, "the field is parameterised this many times coarser than each level's "
                                  "grid and upsampled (trilinear)", range=(1, 8))
    learning_rate: float = param(0.1, "Adam step size (voxels of the field grid)", range=(1e-4, 10.0))
    percentile: float = param(99.0, "intensities are clipped to [min, this percentile] and scaled to [0, 1]",
                              range=(50.0, 100.0))


class InstanceRegistrar:
    """Instance optimisation of a dense field on one pair (no training).

    ``register(fixed, moving)`` returns a :class:`~app.engine.types.RegistrationResult` whose
    transform maps fixed physical points (LPS mm) to moving physical points:
    ``warped(x) = moving(T(x))`` with ``T = prealign.then(displacement field)``.
    """

    key: ClassVar[str] = "instance"
    learned: ClassVar[bool] = False
    description: ClassVar[str] = ("One-shot instance optimisation: Adam on a dense (diffeomorphic) field for this "
                                  "pair only, coarse to fine; also refines any other paradigm's result")
    Params: ClassVar[type] = InstanceParams

    def register(self, fixed: Volume, moving: Volume, params: Optional[InstanceParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (prealignment, then the field).

        Parameters
        ----------
        fixed, moving : Volume
            Scalar 3D images ``(z, y, x)``, each on its own physical grid (LPS mm).
        params : InstanceParams, optional
            Defaults when None; validated (ValueError when out of range).
        moving_labels : LabelMap, optional
            Resampled (nearest) through the final transform into ``warped_labels``.
        checkpoint : path, optional
            For ``prealign`` 'unsupervised' / 'weakly': the learned model (default: the bundled one).
        fixed_labels, fixed_points, moving_points
            Unused (accepted for the common interface).
        progress : callable, optional
            Called with :class:`Progress` once per iteration (stage 'rigid'/'affine' for the
            prealignment, 'instance' for the field).
        cancel : threading.Event, optional
            Checked every iteration; when set, :class:`~app.engine.types.Cancelled` is raised.
        device : str
            'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...

        Returns
        -------
        RegistrationResult with ``field`` = dense displacement of the full transform, ``(z, y, x, 3)``
        xyz LPS mm on the fixed grid.
        """
        p = params if params is not None else InstanceParams()
        validate_params(p)
        _check_inputs(fixed, moving)
        t_start = time.perf_counter()
        check_cancel(cancel)
        if p.prealign == "affine":
            initial = _prealign(fixed, moving, progress, cancel)
        elif p.prealign in ("unsupervised", "weakly"):
            from . import get
            initial = get(p.prealign).register(fixed, moving, None, checkpoint=checkpoint, progress=progress,
                                               cancel=cancel, device=device).transform
        else:
            initial = Transform.identity()
        pre_s = time.perf_counter() - t_start
        result = refine(fixed, moving, initial, p, moving_labels=moving_labels, progress=progress,
                        cancel=cancel, device=device, _fraction_start=0.0 if p.prealign == "none" else 0.1)
        result.timings = {"prealign": pre_s, **{k: v for k, v in result.timings.items() if k != "initial"},
                          "total": time.perf_counter() - t_start}
        return result

    def refine(self, fixed: Volume, moving: Volume, initial, params: Optional[InstanceParams] = None,
               **kwargs) -> RegistrationResult:
        """See :func:`refine`."""
        return refine(fixed, moving, initial, params, **kwargs)


# --------------------------------------------------------------------------- refinement
def refine(fixed: Volume, moving: Volume, initial: Union[RegistrationResult, Transform, None],
           params: Optional[InstanceParams] = None, *, moving_labels: Optional[LabelMap] = None,
           progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
           device: str = "auto", _fraction_start: float = 0.0) -> RegistrationResult:
    """Instance optimisation on top of any transform: ``T = initial.then(u)``.

    ``moving`` is resampled once through ``initial`` onto the fixed grid (the working image), a
    residual field ``u`` is optimised on it, and the original moving image is resampled once
    through the composed transform. ``params.prealign`` is ignored here (``initial`` is the
    prealignment).

    Parameters
    ----------
    fixed, moving : Volume
        Scalar 3D images ``(z, y, x)``, LPS geometry.
    initial : RegistrationResult, Transform or None
        Fixed physical points -> moving physical points (any kind: linear, field, composite).
        None means the identity.
    params : InstanceParams or dict of overrides, optional
    moving_labels : LabelMap, optional
        Resampled with nearest neighbour through the final transform into ``warped_labels``.
    progress, cancel, device
        As in :meth:`InstanceRegistrar.register`.

    Returns
    -------
    RegistrationResult (paradigm 'instance'); ``history`` starts with the initial result's history,
    ``timings['initial']`` holds its total time when known.
    """
    import torch

    if params is None or isinstance(params, dict):
        p = make_params(InstanceParams, params or {})
    else:
        p = params
        validate_params(p)
    _check_inputs(fixed, moving)
    levels = _parse_ints(p.levels, "levels", 1, 32)
    iters = _parse_ints(p.iterations, "iterations", 0, 100000)
    if len(iters) == 1:
        iters = iters * len(levels)
    if len(iters) != len(levels):
        raise ValueError(f"iterations gives {len(iters)} numbers for {len(levels)} levels ({p.iterations!r} vs "
                         f"{p.levels!r})")
    if p.similarity == "lncc" and p.lncc_window % 2 == 0:
        raise ValueError(f"lncc_window must be odd, got {p.lncc_window}")
    if isinstance(initial, RegistrationResult):
        init_t, init_hist = initial.transform, list(initial.history)
        init_s = initial.timings.get("total")
    else:
        init_t, init_hist, init_s = (initial or Transform.identity()), [], None
    dev = _resolve_device(device)
    t_start = time.perf_counter()
    check_cancel(cancel)

    # Working images on the fixed grid, intensities in [0, 1]; moving interpolated once through T0.
    from ..datasets import normalize_intensity
    fixed_n = normalize_intensity(fixed.array, p.percentile)
    moving_n = moving.with_array(normalize_intensity(moving.array, p.percentile))
    work = resample(moving_n, fixed, init_t, "linear").array
    f_t = torch.as_tensor(np.ascontiguousarray(fixed_n), dtype=torch.float32, device=dev)[None, None]
    m_t = torch.as_tensor(np.ascontiguousarray(work), dtype=torch.float32, device=dev)[None, None]
    timings = {"prepare": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    reporter = _Reporter(progress, levels, iters, fixed.shape, _fraction_start)
    disp_vox = _optimise(f_t, m_t, p, levels, iters, reporter, cancel, timings)   # (1, 3, D, H, W) zyx voxels
    timings["optimise"] = time.perf_counter() - t0
    check_cancel(cancel)

    t0 = time.perf_counter()
    field_res = voxel_to_physical_field(disp_vox.detach().double(), fixed)[0]          # (3 xyz, D, H, W) mm
    residual = field_to_transform(fixed.with_array(field_res.permute(1, 2, 3, 0).cpu().numpy(), name="field"))
    transform = init_t.then(residual)
    warped = resample(moving, fixed, transform, "linear")
    field = transform_to_field(transform, fixed)
    warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
    timings["resample"] = time.perf_counter() - t0
    if init_s is not None:
        timings["initial"] = float(init_s)
    timings["total"] = time.perf_counter() - t_start
    check_cancel(cancel)
    if progress:
        progress(Progress("done", reporter.count, reporter.total, reporter.last_loss, 1.0,
                          "instance optimisation finished"))
    return RegistrationResult(transform=transform, warped=warped, field=field,
                              history=init_hist + reporter.history, timings=timings, device=str(dev),
                              paradigm=InstanceRegistrar.key, params=params_to_dict(p),
                              warped_labels=warped_labels)


# --------------------------------------------------------------------------- optimisation
def _optimise(f_t, m_t, p: InstanceParams, levels: list[int], iters: list[int], reporter: "_Reporter",
              cancel: Optional[threading.Event], timings: dict):
    """Coarse-to-fine Adam on a field; returns the displacement on the full grid (1, 3, D, H, W), zyx voxels.

    Seconds per level are added to ``timings`` as ``level_<shrink>``.
    """
    import torch
    from ..nn import layers, losses

    full = tuple(f_t.shape[2:])
    sim_fn = _similarity(p, f_t, m_t)
    reg_fn = losses.gradient_l2 if p.regulariser == "diffusion" else losses.bending_energy
    min_reg = 3 if p.regulariser == "bending" else 2
    param_t = None

    def displacement(v):
        return layers.integrate_velocity(v, p.integration_steps) if p.diffeomorphic else v

    for li, (shrink, n_it) in enumerate(zip(levels, iters)):
        t_level = time.perf_counter()
        lshape = tuple(max(4, int(round(s / shrink))) for s in full)
        pshape = tuple(max(min_reg, int(round(s / p.field_downsample))) for s in lshape)
        f_l, m_l = _downsample(f_t, lshape), _downsample(m_t, lshape)
        if param_t is None:
            param_t = torch.zeros((1, 3, *pshape), dtype=f_t.dtype, device=f_t.device)
        else:
            param_t = layers.resize_field(param_t.detach(), pshape)
        param_t = param_t.clone().requires_grad_(True)
        opt = torch.optim.Adam([param_t], lr=p.learning_rate)
        for it in range(n_it):
            check_cancel(cancel)
            opt.zero_grad(set_to_none=True)
            disp_l = layers.resize_field(displacement(param_t), lshape)
            warped = warp_torch(m_l, disp_l, padding_mode="zeros")
            sim = sim_fn(f_l, warped)
            loss = sim + p.smoothness * reg_fn(param_t) if p.smoothness > 0 else sim
            loss.backward()
            opt.step()
            reporter.report(li, shrink, it, float(loss.detach()), float(sim.detach()), warped)
        timings[f"level_{shrink}"] = timings.get(f"level_{shrink}", 0.0) + time.perf_counter() - t_level
    check_cancel(cancel)
    with torch.no_grad():
        if param_t is None:
            return torch.zeros((1, 3, *full), dtype=f_t.dtype, device=f_t.device)
        return layers.resize_field(displacement(param_t.detach()), full)


def _similarity(p: InstanceParams, f_t, m_t):
    """Similarity *loss* (lower is better) on (1, 1, D, H, W) images in [0, 1]."""
    from ..nn import losses
    if p.similarity == "lncc":
        return lambda a, b: losses.lncc(a, b, window=p.lncc_window)
    if p.similarity == "mi":
        return lambda a, b: losses.mutual_information(a, b)
    # MSE relative to the images' variances: about 1 - correlation, so that one smoothness weight
    # means roughly the same for every similarity and every intensity scale.
    scale = 1.0 / max(float(f_t.var() + m_t.var()), 1e-8)
    return lambda a, b: losses.mse(a, b) * scale


def _downsample(img, shape):
    """Area (box) downsampling of (B, C, D, H, W) to ``shape``; the full grid is returned as is.

    Box averaging keeps the grids related as a strided grid and its parent (corners aligned), as
    :func:`app.engine.nn.layers.resize_field` assumes.
    """
    import torch.nn.functional as F
    if tuple(img.shape[2:]) == tuple(shape):
        return img
    return F.adaptive_avg_pool3d(img, shape)


class _Reporter:
    """History, progress (fraction weighted by the voxels of each level) and previews."""

    def __init__(self, progress: Optional[ProgressFn], levels, iters, full_shape, start: float):
        self.progress = progress
        self.levels, self.iters = levels, iters
        self.total = int(sum(iters))
        cost = [max(1.0, np.prod(full_shape) / s ** 3) * n for s, n in zip(levels, iters)]
        self.cost = cost
        self.wtotal = max(sum(cost), 1e-9)
        self.start = start
        self.history: list[dict] = []
        self.count = 0
        self.last_loss = float("nan")

    def report(self, level: int, shrink: int, it: int, loss: float, sim: float, warped) -> None:
        self.count += 1
        self.last_loss = loss
        self.history.append({"stage": "instance", "iteration": self.count, "loss": loss, "similarity": sim,
                             "level": level})
        if not self.progress:
            return
        done = sum(self.cost[:level]) + self.cost[level] * (it + 1) / max(self.iters[level], 1)
        frac = self.start + (1.0 - self.start) * min(1.0, done / self.wtotal)
        last = it + 1 == self.iters[level]
        preview = None
        if last or it % 10 == 0:
            w = warped.detach()
            preview = w[0, 0, w.shape[2] // 2].float().cpu().numpy()
        self.progress(Progress("instance", self.count, self.total, loss, frac,
                               f"level {level + 1}/{len(self.levels)} (1/{shrink})", preview))


# --------------------------------------------------------------------------- helpers
def _prealign(fixed: Volume, moving: Volume, progress, cancel) -> RegistrationResult:
    """Rigid + affine with the iterative paradigm; its progress is mapped to the first 10 %."""
    from . import get
    it = get("iterative")
    p = make_params(it.Params, {"stages": "rigid+affine"})

    def relay(pr: Progress) -> None:
        if progress and pr.stage != "done":
            frac = None if pr.fraction is None else 0.1 * pr.fraction
            progress(Progress(pr.stage, pr.iteration, pr.total, pr.loss, frac, "prealignment: " + pr.message))

    return it.register(fixed, moving, p, progress=relay, cancel=cancel)


def _check_inputs(fixed: Volume, moving: Volume) -> None:
    for name, v in (("fixed", fixed), ("moving", moving)):
        if v.is_vector:
            raise ValueError(f"{name} must be a scalar volume (z, y, x), got shape {v.array.shape}")
        if min(v.shape) < 4:
            raise ValueError(f"{name} is too small to register: shape {v.shape} (z, y, x)")


def _parse_ints(text: str, name: str, lo: int, hi: int) -> list[int]:
    try:
        out = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers like '4,2,1', got {text!r}") from None
    if not out or any(v < lo or v > hi for v in out):
        raise ValueError(f"{name} must hold integers between {lo} and {hi}, got {text!r}")
    return out


def _resolve_device(device: str):
    import torch
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was requested but CUDA is not available; use 'auto' or 'cpu'")
    return dev
