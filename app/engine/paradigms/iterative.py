"""Conventional iterative registration (SimpleITK): rigid -> affine -> deformable.

Every stage is estimated on the moving image as the previous stages leave it, and the stages
are composed into one transform (``Transform.then``) that maps **fixed physical points to
moving physical points**: ``warped(x) = moving(T(x))`` with
``T = rigid(affine(x + D(x)))`` for the full pipeline, where ``D`` is the deformable stage's
displacement (LPS mm). The moving image is resampled once, at the end.

Stages
------
* rigid, affine: ``ImageRegistrationMethod`` with a multi-resolution pyramid (``levels``),
  initialised by ``CenteredTransformInitializer`` (centres of mass by default: the heads of
  native-space scans can lie far apart).
* deformable: B-spline free-form deformation (coarse to fine mesh) or one of the demons
  variants run on a small image pyramid of their own (the field of a coarse level, which is in
  physical mm, is resampled onto the next level's grid as its initial field).

Multimodal pairs
----------------
Before the stages run, :func:`app.engine.modality.detect` decides whether the pair is multimodal
(``modality`` parameter: the user's word, else modality tags in the image names, else the intensity
relation after a centre-of-mass alignment; rechecked after the linear stages when the intensities
decided). A multimodal pair gets Mattes MI, no histogram matching, no Otsu fixed mask (it let the
affine stage inflate the scale and narrowed the capture range), a multi-start rigid stage (13
rotated starts scored at the coarsest level: one start from the centres of mass fails beyond ~20
degrees) and a B-spline deformable stage (``deformable='auto'``); the choice is reported first
through ``progress`` and kept in ``result.params['chosen']``. Every rigid/affine stage is guarded
(``linear_guard``): its own metric is evaluated at its start and at its result, and a result worse
than its start is dropped (``chosen['guards']``). A B-spline stage is guarded the same way over all
voxels of its finest level (the optimiser sees a random 20 %): on a same-subject multimodal pair it
fits noise and is dropped, on an inter-subject pair it is kept. On a multimodal pair the affine and
B-spline stages also stop after their coarsest level when it does not improve that dense metric
(``early_stop``): the guard would drop them after their finest level anyway, which cost ~60 % of a
FLAIR -> T1 run's CPU time. The multimodal B-spline runs one optimisation per level (the mesh refined
exactly between them), mesh 6, with fewer samples and histogram bins after its coarsest level.
Measured on T2 / FLAIR / T1POST -> T1 pairs with known rigid transforms: ``bench/bench_multimodal.py``,
``bench/results/multimodal.md``; per-stage CPU time: ``bench/profile_multimodal_stages.py``.

Defaults were chosen by measurement on IXI test pairs (``bench/tune_iterative.py``,
``bench/results/iterative_tuning.md``): rigid + affine (Mattes MI on an Otsu head mask, shrink
4,2) then diffeomorphic demons on histogram-matched images (pyramid 4,2,1, 30 iterations per level,
field smoothing 1 voxel). On the first 10 IXI test pairs: mean Dice 0.566 vs 0.433 for
rigid+affine alone, no folding, about 14 s per pair on 2 CPU cores.

Modules
-------
This module holds the parameters and the registrar that assembles the stages; the stages and their
helpers live in siblings (every name re-exported here):

* :mod:`.iterative_settings`: the settings chosen for a pair (multimodal or not) and their description;
* :mod:`.iterative_linear`: the rigid / affine stages, the multi-start rigid search, the torch variant;
* :mod:`.iterative_deformable`: the B-spline stage (level by level, :func:`refine_bspline`) and demons;
* :mod:`.iterative_guards`: the dense metric evaluation behind the guards and the early stops;
* :mod:`.iterative_run`: one run's bookkeeping (progress, history, cancel) and the shared SimpleITK pieces.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Optional

import SimpleITK as sitk

from .. import modality
from ..spatial import resample, transform_to_field
from ..types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)
from .base import param, validate_params
# the paradigm's rooms (see the module docstring); every name they hold is re-exported here, private
# ones included (tests and benches import them from app.engine.paradigms.iterative)
from .iterative_deformable import _DEMONS, _SUBDIVISION, _bspline_stage, _demons_stage, refine_bspline  # noqa: F401
from .iterative_guards import (_cached_value, _deformable_gain, _guard, _guard_deformable,  # noqa: F401
                               _is_identity, _metric_value)
from .iterative_linear import (_centre, _linear_method, _linear_stage, _linear_stage_torch,  # noqa: F401
                               _rigid_search, _start_rotations)
from .iterative_run import (_execute, _fixed_mask, _normalise, _parse_levels, _Run, _set_metric,  # noqa: F401
                            _sigmas)
from .iterative_settings import (_DEMONS_KEYS, MULTIMODAL_BSPLINE_MESH, MULTIMODAL_RIGID_STARTS,  # noqa: F401
                                 _run_params, choose_settings, describe_settings)

STAGES = ("rigid", "affine", "rigid+affine", "rigid+affine+deformable", "affine+deformable",
          "rigid+deformable", "deformable")
DEFORMABLE = ("auto", "bspline", "demons", "symmetric_demons", "fast_symmetric_demons", "diffeomorphic_demons")
METRICS = ("mse", "ncc", "mattes")


@dataclass
class IterativeParams:
    """Parameters of :class:`IterativeRegistrar` (metadata: help, range, choices)."""

    stages: str = param("rigid+affine+deformable", "stages run in order and composed into one transform",
                         choices=STAGES)
    metric: str = param("mattes", "similarity for the rigid/affine (and B-spline) stages; demons always "
                        "use intensity differences", choices=METRICS)
    deformable: str = param("auto", "deformable model; auto: diffeomorphic demons for one modality, B-spline "
                            "(with the metric, Mattes MI; levels without the full resolution, mesh at most 6) for a "
                            "multimodal pair", choices=DEFORMABLE)
    initializer: str = param("moments", "initial alignment: centres of mass (moments) or image centres "
                             "(geometry)", choices=("moments", "geometry"))
    levels: str = param("4,2", "pyramid shrink factors of the rigid/affine stages, coarse to fine")
    linear_iterations: int = param(100, "maximum optimiser iterations per level, rigid and affine stages",
                                   range=(1, 5000))
    sampling_percentage: float = param(0.2, "fraction of fixed voxels sampled by the rigid/affine/B-spline "
                                       "metric", range=(0.01, 1.0))
    deformable_levels: str = param("4,2,1", "pyramid shrink factors of the deformable stage, coarse to fine")
    deformable_iterations: int = param(30, "iterations per level of the deformable stage", range=(1, 5000))
    bspline_mesh: int = param(8, "B-spline control mesh per axis at the finest level (coarser levels "
                              "halve it)", range=(2, 64))
    demons_sigma: float = param(1.0, "demons: Gaussian smoothing of the displacement field (voxels); "
                                "larger is smoother", range=(0.0, 10.0))
    demons_update_sigma: float = param(0.0, "demons: Gaussian smoothing of each update field (voxels, "
                                       "0 = off)", range=(0.0, 10.0))
    demons_step: float = param(2.0, "demons: maximum update step length (voxels, diffeomorphic demons)",
                               range=(0.1, 10.0))
    modality: str = param("auto", "same: one modality; multi: different contrasts (T1 vs T2 / FLAIR / PD / "
                          "CT): Mattes MI, no histogram matching, no fixed mask, B-spline deformable; auto: "
                          "decided from the image names, else from the intensities", choices=("auto", "same", "multi"))
    histogram_match: bool = param(True, "match the moving histogram to the fixed one first (one modality only: "
                                  "ignored for a multimodal pair)")
    use_mask: bool = param(True, "restrict the rigid/affine/B-spline metric to the fixed foreground "
                           "(an Otsu head mask, or the labels: see mask_from_labels); not for a multimodal "
                           "pair unless mask_from_labels")
    rigid_starts: int = param(0, "first rigid stage: number of rotated starts tried at the coarsest level, the "
                              "best by the metric starts the stage (1 = the initializer only; 0 = auto: 13 for a "
                              "multimodal pair, 1 for one modality)", range=(0, 21))
    rigid_start_angle: float = param(25.0, "rotation of the rotated starts (degrees, about x/y/z and the "
                                     "diagonals; twice that about x/y/z for starts 16-21)", range=(1.0, 90.0))
    rigid_start_iterations: int = param(40, "optimiser iterations per rotated start", range=(1, 1000))
    linear_guard: bool = param(True, "a rigid/affine stage whose result is worse than its start by its own "
                               "metric keeps the start")
    deformable_min_gain: float = param(0.0, "a B-spline stage is kept only when it lowers its metric over all "
                                       "voxels (not only the sampled ones) by at least this fraction of the start's "
                                       "value", range=(0.0, 1.0))
    early_stop: str = param("auto", "with linear_guard: an affine or B-spline stage whose coarsest level does not "
                            "improve its metric over all voxels stops there (affine: by any amount, B-spline: by "
                            "deformable_min_gain) and keeps its start, as the guard would after all levels; auto: on "
                            "for a multimodal pair only", choices=("auto", "on", "off"))
    bspline_fine_sampling: float = param(0.1, "fraction of fixed voxels sampled by the B-spline metric at the "
                                         "levels after the coarsest (the coarsest uses sampling_percentage)",
                                         range=(0.01, 1.0))
    bspline_fine_bins: int = param(16, "Mattes MI histogram bins of the B-spline levels after the coarsest (the "
                                   "cost of an evaluation grows with bins^2 x control points)", range=(8, 128))
    mask_from_labels: bool = param(False, "with use_mask, use fixed labels > 0 (dilated) as the mask when "
                                   "fixed labels are given")
    linear_optimiser: str = param("sitk", "rigid/affine stages: SimpleITK's regular-step descent on `metric`, or "
                                  "the torch optimiser (app.engine.optimise: L-BFGS on `torch_similarity`, same "
                                  "levels, mask and iterations)", choices=("sitk", "torch"))
    torch_similarity: str = param("mi", "similarity of the torch rigid/affine stages (app.engine.nn.similarity): "
                                  "mutual information, global NCC, local NCC or normalised MSE",
                                  choices=("mi", "ncc", "lncc", "mse"))
    seed: int = param(42, "seed of the metric's random sampling (reproducible runs)", range=(0, 2**31 - 1))


class IterativeRegistrar:
    """Conventional multistage, multi-resolution registration with SimpleITK.

    ``register(fixed, moving)`` returns a :class:`~app.engine.types.RegistrationResult` whose
    transform maps fixed physical points (LPS mm) to moving physical points:
    ``warped(x) = moving(T(x))``.
    """

    key: ClassVar[str] = "iterative"
    learned: ClassVar[bool] = False
    description: ClassVar[str] = ("Conventional: SimpleITK rigid -> affine -> deformable (B-spline or demons) "
                                  "optimisation, multi-resolution, composed into one transform")
    Params: ClassVar[type] = IterativeParams

    def register(self, fixed: Volume, moving: Volume, params: Optional[IterativeParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed``.

        Parameters
        ----------
        fixed, moving : Volume
            Scalar 3D images ``(z, y, x)``, each on its own physical grid (LPS mm).
        params : IterativeParams, optional
            Defaults when None; validated (ValueError when out of range).
        fixed_labels : LabelMap, optional
            Only used as the metric mask (labels > 0, dilated) when ``params.use_mask`` and
            ``params.mask_from_labels``; never for anything else.
        moving_labels : LabelMap, optional
            When given, resampled (nearest) with the final transform into ``warped_labels``.
        initial : Transform, optional
            Fixed -> moving points to start from (a pipeline's previous stage): the stages refine it
            (no centre-of-mass initialiser then) and the result is the whole chain.
        progress : callable, optional
            Called with :class:`Progress` once per optimiser iteration.
        cancel : threading.Event, optional
            Checked every iteration; when set, the run stops and :class:`Cancelled` is raised.
        device : str
            For ``linear_optimiser='torch'`` ('auto', 'cpu', 'cuda', 'cuda:N'); SimpleITK runs on the CPU.

        Returns
        -------
        RegistrationResult with ``field`` (``(z, y, x, 3)`` LPS mm on the fixed grid, of the full
        transform) when a deformable stage ran, else ``field=None``.
        """
        p = params if params is not None else IterativeParams()
        validate_params(p)
        levels = _parse_levels(p.levels, "levels")
        _parse_levels(p.deformable_levels, "deformable_levels")      # validated here, used by the stage
        for name, v in (("fixed", fixed), ("moving", moving)):
            if v.is_vector:
                raise ValueError(f"{name} must be a scalar volume (z, y, x), got shape {v.array.shape}")
            if min(v.shape) < 4:
                raise ValueError(f"{name} is too small to register: shape {v.shape}")
        stages = p.stages.split("+")
        t_start = time.perf_counter()
        check_cancel(cancel)
        decision = modality.detect(fixed, moving, p.modality, initial)
        chosen = choose_settings(p, decision, fixed_labels is not None)
        p_run = _run_params(p, chosen)
        run = _Run(p_run, stages, levels, _parse_levels(p_run.deformable_levels, "deformable_levels"), progress,
                   cancel)
        run.message("setup", describe_settings(chosen))
        timings: dict[str, float] = {"detect": time.perf_counter() - t_start}

        f_img = _normalise(fixed.to_sitk(sitk.sitkFloat32))
        m_img = _normalise(moving.to_sitk(sitk.sitkFloat32))
        if p_run.histogram_match:
            m_img = sitk.HistogramMatching(m_img, f_img, numberOfHistogramLevels=256, numberOfMatchPoints=15,
                                           thresholdAtMeanIntensity=True)
        metric_stages = p_run.stages != "deformable" or p_run.deformable == "bspline"  # demons take no mask
        mask = (_fixed_mask(f_img, fixed_labels if p_run.mask_from_labels else None, fixed)
                if p_run.use_mask and metric_stages else None)

        transform = initial if initial is not None else Transform.identity()
        used = "cpu"
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "deformable" and p.modality == "auto" and chosen["source"] in ("intensity", "default") \
                    and transform.kind != "identity":
                # the linear stages have aligned the pair: the intensity relation is clearer now
                again = modality.detect(fixed, moving, "auto", transform)
                chosen["rechecked"] = again.to_dict()
                if again.source == "intensity" and again.multimodal != chosen["multimodal"]:
                    guards = chosen["guards"]
                    chosen.update(choose_settings(p, again, fixed_labels is not None), guards=guards,
                                  rechecked=again.to_dict())
                    p_run = _run_params(p, chosen)
                    run.p = p_run
                    run.dlevels = _parse_levels(p_run.deformable_levels, "deformable_levels")
                    m_img = _normalise(moving.to_sitk(sitk.sitkFloat32))
                    if p_run.histogram_match:
                        m_img = sitk.HistogramMatching(m_img, f_img, numberOfHistogramLevels=256,
                                                       numberOfMatchPoints=15, thresholdAtMeanIntensity=True)
                    mask = (_fixed_mask(f_img, fixed_labels if p_run.mask_from_labels else None, fixed)
                            if p_run.use_mask and p_run.deformable == "bspline" else None)
                    run.value = None   # metric, mask or images changed: no cached metric value holds
                    run.message(stage, "after the linear stages: " + describe_settings(chosen))
            if stage in ("rigid", "affine") and p.linear_optimiser == "torch":
                transform, used = _linear_stage_torch(run, stage, f_img, m_img, mask, transform, device)
            else:
                if stage in ("rigid", "affine"):
                    step = _linear_stage(run, stage, f_img, m_img, mask, transform)
                    if run.search is not None and "rigid_search" not in chosen:
                        chosen["rigid_search"] = run.search
                    if p_run.linear_guard:
                        step = _guard(run, stage, f_img, m_img, mask, transform, step, chosen)
                elif p_run.deformable == "bspline":
                    step, info = _bspline_stage(run, f_img, m_img, mask, transform)
                    if p_run.linear_guard:
                        step = _guard_deformable(run, f_img, m_img, mask, transform, step, chosen, info)
                else:
                    step = _demons_stage(run, f_img, m_img, transform)
                transform = transform.then(step)
                if run.kept_value is not None:
                    run.value = (transform, run.levels[-1], run.kept_value)
                    run.kept_value = None
            timings[stage] = time.perf_counter() - t0
            check_cancel(cancel)

        t0 = time.perf_counter()
        warped = resample(moving, fixed, transform, "linear")
        field = transform_to_field(transform, fixed) if ("deformable" in stages or (
            initial is not None and not initial.is_linear)) else None
        warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
        timings["resample"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        check_cancel(cancel)
        if progress:
            progress(Progress("done", run.total, run.total, run.last_loss, 1.0, "registration finished"))
        return RegistrationResult(transform=transform, warped=warped, field=field, history=run.history,
                                  timings=timings, device=used, paradigm=self.key,
                                  params={**params_to_dict(p), "chosen": chosen},
                                  warnings=[n for n in chosen["notes"] if n.startswith("warning")]
                                  + [f"the {g['stage']} stage kept its start: its result was worse by its own metric"
                                     for g in chosen["guards"] if g["kept"] == "start"],
                                  warped_labels=warped_labels)
