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

The optimisation is :func:`app.engine.optimise.optimise` with a
:class:`~app.engine.optimise.DisplacementModel` (or :class:`~app.engine.optimise.VelocityModel`)
and a similarity of :mod:`app.engine.nn.similarity`; inside it the field lives in voxels of its own
(coarse) grid, channels (z, y, x), and leaves it only through
:func:`app.engine.spatial.voxel_to_physical_field` (mm, xyz LPS).

:func:`refine` runs the same optimisation after any paradigm's result ("instance optimisation"
as a refinement step). Defaults were chosen by measurement on IXI test pairs
(``bench/bench_instance.py``, ``bench/results/instance.md``).

Time. On a 2 mm IXI pair (120x120x90) after a learned pass (``weakly+instance``) the defaults take about
8.5 s of one CPU thread; most of it is the finest level (the image at full resolution: trilinear
sampling of the image and of the velocity during scaling and squaring, forward and backward). Two
ways to spend less, measured on validation pairs of ``resources/splits/ixi_split.json`` (Dice over
148 labels, mean of 3 pairs): ``iterations=30,20,5`` takes ~4.9 s for 0.688 (defaults 0.696);
dropping the finest level (``levels=4,2``) ~3.3 s but only 0.639: the finest level is where instance
gains on the learned result. ``budget_s`` caps the wall-clock seconds instead (each level stops early
when its share of the budget is spent; results then depend on the machine's speed and load). The
comparison with Greedy and ANTs: ``bench/bench_peers.py``, ``bench/results/peers_test20.md``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from ..spatial import resample, transform_to_field
from ..types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)
from .base import make_params, param, validate_params

# image similarities of app.engine.nn.similarity offered here (listed, not imported: importing the
# registry imports torch, and the GUI reads these Params without it)
SIMILARITIES = ("lncc", "ncc", "mse", "mi")
REGULARISERS = ("diffusion", "bending")


@dataclass
class InstanceParams:
    """Parameters of :class:`InstanceRegistrar` (metadata: help, range, choices)."""

    prealign: str = param("affine", "initial alignment before the field is optimised, a shortcut for a pipeline: "
                          "rigid+affine with the iterative paradigm (iterative+instance), a learned paradigm's "
                          "full result (unsupervised+instance / weakly+instance, with its bundled or given "
                          "checkpoint), or none; ignored when a pipeline gives an initial transform",
                          choices=("affine", "unsupervised", "weakly", "none"))
    similarity: str = param("lncc", "image similarity: local NCC (same modality), global NCC, normalised MSE, "
                            "or mutual information (multimodal)", choices=SIMILARITIES)
    lncc_window: int = param(5, "local NCC window (voxels of each pyramid level, odd)", range=(3, 21))
    diffeomorphic: bool = param(True, "optimise a stationary velocity field integrated by scaling and squaring "
                                "(no folding) instead of a displacement")
    integration_steps: int = param(7, "scaling-and-squaring steps (diffeomorphic)", range=(1, 12))
    regulariser: str = param("diffusion", "smoothness penalty on the field: diffusion (squared gradient) or "
                             "bending energy", choices=REGULARISERS)
    smoothness: float = param(0.5, "weight of the smoothness penalty (larger is smoother)", range=(0.0, 1000.0))
    levels: tuple[int, ...] = param((4, 2, 1), "pyramid shrink factors of the fixed grid, coarse to fine",
                                    range=(1, 32))
    iterations: tuple[int, ...] = param((60, 30, 10), "Adam iterations per level (one number for every level, "
                                        "or one per level)", range=(0, 100000))
    field_downsample: int = param(2, "the field is parameterised this many times coarser than each level's "
                                  "grid and upsampled (trilinear)", range=(1, 8))
    learning_rate: float = param(0.1, "Adam step size (voxels of the field grid)", range=(1e-4, 10.0))
    percentile: float = param(99.0, "intensities are clipped to [min, this percentile] and scaled to [0, 1]",
                              range=(50.0, 100.0))
    budget_s: float = param(0.0, "seconds for the field optimisation (0: no cap): every level gets a share in "
                            "proportion to its planned work and stops early when it is spent (results then "
                            "depend on the machine's speed and load)", range=(0.0, 3600.0))


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
                 checkpoint=None, initial: Union[Transform, RegistrationResult, None] = None,
                 progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                 device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (prealignment or ``initial``, then the field).

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
        initial : Transform or RegistrationResult, optional
            Fixed points -> moving points to start from (the previous stage of a pipeline): the
            prealignment is skipped and the result's transform is the whole chain,
            ``initial.then(field)``.
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
        if initial is None and p.prealign != "none":
            return _prealigned(fixed, moving, p, moving_labels=moving_labels, checkpoint=checkpoint,
                               progress=progress, cancel=cancel, device=device)
        result = refine(fixed, moving, initial, p, moving_labels=moving_labels, progress=progress,
                        cancel=cancel, device=device)
        result.timings = {"prealign": 0.0, **{k: v for k, v in result.timings.items() if k != "initial"},
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
    residual field ``u`` is optimised on it (:func:`app.engine.optimise.optimise`), and the original
    moving image is resampled once through the composed transform. ``params.prealign`` is ignored
    here (``initial`` is the prealignment).

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
    from ..optimise import optimise

    if params is None or isinstance(params, dict):
        p = make_params(InstanceParams, params or {})
    else:
        p = params
        validate_params(p)
    _check_inputs(fixed, moving)
    if p.similarity == "lncc" and p.lncc_window % 2 == 0:
        raise ValueError(f"lncc_window must be odd, got {p.lncc_window}")
    if isinstance(initial, RegistrationResult):
        init_t, init_hist = initial.transform, list(initial.history)
        init_s = initial.timings.get("total")
    else:
        init_t, init_hist, init_s = (initial or Transform.identity()), [], None
    t_start = time.perf_counter()
    check_cancel(cancel)

    model_options = {"field_downsample": p.field_downsample}
    if p.diffeomorphic:
        model_options["integration_steps"] = p.integration_steps
    opt = optimise(fixed, moving, "velocity" if p.diffeomorphic else "displacement", initial=init_t,
                   similarity=p.similarity, sim_options={"window": p.lncc_window} if p.similarity == "lncc" else None,
                   regulariser=p.regulariser, weight=p.smoothness, levels=p.levels, iterations=p.iterations,
                   optimizer="adam", lr=p.learning_rate, percentile=p.percentile, model_options=model_options,
                   budget_s=p.budget_s or None,
                   progress=progress, cancel=cancel, device=device, stage="instance",
                   fraction=(_fraction_start, 1.0))
    timings = {k: v for k, v in opt.timings.items() if k != "export"}
    check_cancel(cancel)

    t0 = time.perf_counter()
    transform = opt.transform
    warped = resample(moving, fixed, transform, "linear")
    field = transform_to_field(transform, fixed)
    warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
    timings["resample"] = opt.timings.get("export", 0.0) + time.perf_counter() - t0
    if init_s is not None:
        timings["initial"] = float(init_s)
    timings["total"] = time.perf_counter() - t_start
    check_cancel(cancel)
    if progress:
        last = opt.history[-1]["loss"] if opt.history else float("nan")
        progress(Progress("done", len(opt.history), len(opt.history), last, 1.0,
                          "instance optimisation finished"))
    return RegistrationResult(transform=transform, warped=warped, field=field,
                              history=init_hist + opt.history, timings=timings, device=opt.device,
                              paradigm=InstanceRegistrar.key, params=params_to_dict(p),
                              warped_labels=warped_labels)


# --------------------------------------------------------------------------- helpers
def _prealigned(fixed: Volume, moving: Volume, p: InstanceParams, **kwargs) -> RegistrationResult:
    """``prealign`` is a shortcut for a pipeline: ``iterative`` (rigid+affine) or a learned paradigm, then
    ``instance`` starting from its transform (:func:`app.engine.pipeline.register_pipeline`).

    The result reads as an ``instance`` run (its params say ``prealign=...``, so it reproduces), with
    the pipeline's ``stages`` records and timings ``prealign`` (the first stage), the field
    optimisation's own entries and ``total``.
    """
    import dataclasses

    from ..pipeline import register_pipeline
    first = "iterative" if p.prealign == "affine" else p.prealign
    first_params = {"stages": "rigid+affine"} if first == "iterative" else {}
    t_start = time.perf_counter()
    result = register_pipeline([first, "instance"], fixed, moving,
                               [first_params, dataclasses.replace(p, prealign="none")], **kwargs)
    stage_t = result.stages[-1]["timings"] if result.stages else {}
    timings = {"prealign": float(result.timings.get(f"1:{first}", 0.0)),
               **{k: v for k, v in stage_t.items() if k not in ("prealign", "total")},
               "total": time.perf_counter() - t_start}
    return dataclasses.replace(result, paradigm=InstanceRegistrar.key, params=params_to_dict(p), timings=timings)


def _check_inputs(fixed: Volume, moving: Volume) -> None:
    for name, v in (("fixed", fixed), ("moving", moving)):
        if v.is_vector:
            raise ValueError(f"{name} must be a scalar volume (z, y, x), got shape {v.array.shape}")
        if min(v.shape) < 4:
            raise ValueError(f"{name} is too small to register: shape {v.shape} (z, y, x)")
