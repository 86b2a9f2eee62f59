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
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import numpy as np
import SimpleITK as sitk

from .. import modality
from ..spatial import resample, transform_to_field
from ..types import (Cancelled, LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult,
                     Transform, Volume, check_cancel, params_to_dict)
from .base import param, parse_number_list, validate_params

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


# --------------------------------------------------------------------------- settings
MULTIMODAL_RIGID_STARTS = 13
MULTIMODAL_BSPLINE_MESH = 6   # finest B-spline mesh of deformable='auto' on a multimodal pair (at most)
_DEMONS_KEYS = ("demons", "symmetric_demons", "fast_symmetric_demons", "diffeomorphic_demons")


def choose_settings(p: IterativeParams, decision: "modality.ModalityDecision", has_labels: bool) -> dict:
    """The settings a run uses for its pair, from the parameters and the modality decision.

    One modality: the parameters as given (``deformable='auto'`` -> diffeomorphic demons). A
    multimodal pair: Mattes MI for the rigid/affine/B-spline stages, no histogram matching, no Otsu
    fixed mask (measured: it lets the affine stage inflate the scale, and it narrows the capture
    range; a labels mask is kept), B-spline for ``deformable='auto'``. An explicit demons choice is
    kept with a warning (demons compare raw intensities).

    Returns
    -------
    dict with ``multimodal``, ``source``, ``reason``, ``evidence`` (the decision), ``metric``,
    ``histogram_match``, ``mask`` ('otsu', 'labels' or 'none'), ``deformable``, ``early_stop`` (the
    affine / B-spline stages stop after their coarsest level when it does not improve: see
    ``IterativeParams.early_stop``), ``notes`` (lines for people) and ``guards`` (filled by the run: one
    record per guarded stage).
    """
    multi = bool(decision.multimodal)
    notes: list[str] = []
    metric = p.metric
    if multi and metric != "mattes":
        notes.append(f"metric {metric} compares intensities directly: Mattes MI used for the multimodal pair")
        metric = "mattes"
    if not p.use_mask:
        mask = "none"
    elif p.mask_from_labels and has_labels:
        mask = "labels"
    elif multi:
        mask = "none"
    else:
        mask = "otsu"
    deformable = p.deformable
    dlevels = p.deformable_levels
    mesh = p.bspline_mesh
    if deformable == "auto":
        deformable = "bspline" if multi else "diffeomorphic_demons"
        coarse = [f for f in _parse_levels(dlevels, "deformable_levels") if f > 1]
        if multi and coarse:
            # measured (2 mm T2 -> T1, bench_multimodal): the full-resolution level of an 8-node mesh
            # took 5x the time of the coarser two together for no gain (0.77 vs 1.14 mm)
            dlevels = ",".join(str(f) for f in coarse)
        if multi:
            # measured (2 mm, brats flair -> t1, the one bench case whose B-spline is kept): 6 nodes gained more
            # over all voxels than 8 (12.2 vs 11.7 %), ended closer to the truth (1.16-1.34 vs 1.40-1.75 mm) and
            # cost 0.6x (Mattes MI with a B-spline costs samples x control points per evaluation)
            mesh = min(mesh, MULTIMODAL_BSPLINE_MESH)
    elif multi and deformable in _DEMONS_KEYS and "deformable" in p.stages:
        notes.append(f"warning: {deformable} compares raw intensities and does not suit a multimodal pair "
                     "(deformable=bspline or auto does)")
    # measured (2 mm, bench_multimodal, training subjects): one start from the centres of mass fails
    # beyond ~20 degrees on multimodal pairs (5-18 mm at 30 degrees); 13 starts aligned all 9 cases
    starts = p.rigid_starts or (MULTIMODAL_RIGID_STARTS if multi else 1)
    # measured (bench_multimodal, 2 mm): on same-subject pairs the affine and B-spline stages ended worse than
    # their start over all voxels in 13 of 14 runs and were dropped after their finest level; their coarsest
    # level already said so. One modality: unchanged (off) unless asked
    early = p.early_stop == "on" or (p.early_stop == "auto" and multi)
    return {**decision.to_dict(), "metric": metric, "histogram_match": bool(p.histogram_match and not multi),
            "mask": mask, "deformable": deformable, "deformable_levels": dlevels, "rigid_starts": int(starts),
            "bspline_mesh": int(mesh), "early_stop": bool(early), "notes": notes, "guards": []}


def _run_params(p: IterativeParams, chosen: dict) -> IterativeParams:
    """The parameters a run works with: ``p`` with the chosen settings filled in."""
    return dataclasses.replace(p, metric=chosen["metric"], deformable=chosen["deformable"],
                               rigid_starts=chosen["rigid_starts"],
                               early_stop="on" if chosen.get("early_stop") else "off",
                               bspline_mesh=chosen.get("bspline_mesh", p.bspline_mesh),
                               deformable_levels=chosen["deformable_levels"],
                               histogram_match=chosen["histogram_match"], use_mask=chosen["mask"] != "none",
                               mask_from_labels=chosen["mask"] == "labels")


def describe_settings(chosen: dict) -> str:
    """One line for progress messages and the GUI: the decision and what it chose."""
    kind = "multimodal pair" if chosen["multimodal"] else "one modality"
    parts = [f"metric {chosen['metric']}", "histogram matching" if chosen["histogram_match"] else
             "no histogram matching", {"none": "no fixed mask", "otsu": "Otsu fixed mask",
                                       "labels": "fixed labels mask"}[chosen["mask"]],
             f"deformable {chosen['deformable']} (levels {chosen['deformable_levels']}"
             + (f", mesh {chosen['bspline_mesh']})" if chosen["deformable"] == "bspline" and "bspline_mesh" in chosen
                else ")")]
    if chosen.get("rigid_starts", 1) > 1:
        parts.insert(0, f"{chosen['rigid_starts']} rigid starts")
    if chosen.get("early_stop"):
        parts.append("early stop of affine / B-spline stages that do not improve")
    text = f"{kind} ({chosen['reason']}): " + ", ".join(parts)
    return "; ".join([text] + list(chosen["notes"]))


# --------------------------------------------------------------------------- bookkeeping
class _Run:
    """Progress, history and cancellation shared by the stages of one run."""

    def __init__(self, p, stages, levels, dlevels, progress, cancel):
        self.p, self.progress, self.cancel = p, progress, cancel
        self.levels, self.dlevels = levels, dlevels
        # work units ~ iterations weighted by the cost of one iteration at each stage
        self.plan = {s: (p.linear_iterations * len(levels) if s in ("rigid", "affine")
                         else p.deformable_iterations * len(dlevels)) for s in stages}
        self.weight = {s: (1.0 if s in ("rigid", "affine") else 3.0) for s in stages}
        self.total = sum(self.plan.values())
        self._wtotal = sum(self.plan[s] * self.weight[s] for s in stages)
        self._done_before = {}
        acc = 0.0
        for s in stages:
            self._done_before[s] = acc
            acc += self.plan[s] * self.weight[s]
        self.history: list[dict] = []
        self.cancelled = False
        self.last_loss = float("nan")
        self.last_start: Optional[Transform] = None   # the last linear stage's initialisation
        self.last_fraction = 0.0
        self.search: Optional[dict] = None   # the multi-start rigid search, when it ran
        # (chain, shrink, metric value) of the chain the last guard kept, so the next stage need not evaluate it
        self.value: Optional[tuple] = None
        self.kept_value: Optional[float] = None   # set by a guard, turned into ``value`` once the chain is built
        self.early: Optional[dict] = None   # an early-stopped linear stage: {"stage", "start", "coarse"}

    def report(self, stage: str, iteration: int, loss: float, level: int) -> None:
        """Record one iteration (``iteration`` counts from 1 over all levels of ``stage``)."""
        loss = float(loss)
        self.last_loss = loss
        self.history.append({"stage": stage, "iteration": iteration, "loss": loss, "level": level})
        if self.progress:
            done = self._done_before[stage] + min(iteration, self.plan[stage]) * self.weight[stage]
            self.last_fraction = min(1.0, done / self._wtotal)
            self.progress(Progress(stage, iteration, self.plan[stage], loss, self.last_fraction,
                                   f"{stage} level {level + 1}"))

    def message(self, stage: str, text: str) -> None:
        """Tell the caller something about the run (no iteration, no loss)."""
        if self.progress:
            self.progress(Progress(stage, 0, self.plan.get(stage, 0), float("nan"), self.last_fraction, text))

    def should_stop(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
        return self.cancelled


def _parse_levels(text: str, name: str) -> list[int]:
    if not str(text).strip(" ,()[]"):
        raise ValueError(f"{name} must hold shrink factors between 1 and 32, got {text!r}")
    try:
        out = parse_number_list(text, int, name)
    except ValueError:
        raise ValueError(f"{name} must be comma-separated shrink factors like '4,2,1', got {text!r}") from None
    if any(f < 1 or f > 32 for f in out):
        raise ValueError(f"{name} must hold shrink factors between 1 and 32, got {text!r}")
    return list(out)


def _sigmas(levels: list[int]) -> list[float]:
    """Gaussian smoothing (voxels) that goes with each shrink factor."""
    return [0.5 * f if f > 1 else 0.0 for f in levels]


def _normalise(img: sitk.Image) -> sitk.Image:
    """Scale intensities so that the 0.5th..99.5th percentiles map to 0..1 (clipped)."""
    a = sitk.GetArrayViewFromImage(img)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    out = sitk.Clamp(sitk.ShiftScale(img, -float(lo), 1.0 / float(hi - lo)), sitk.sitkFloat32, 0.0, 1.0)
    return out


def _fixed_mask(f_img: sitk.Image, fixed_labels: Optional[LabelMap], fixed: Volume) -> sitk.Image:
    """Fixed-image metric mask: labels > 0 (dilated 2 voxels) if given, else an Otsu head mask."""
    if fixed_labels is not None:
        lab = fixed_labels if fixed_labels.same_grid(fixed) else resample(fixed_labels, fixed, None, "nearest")
        m = sitk.GetImageFromArray((lab.array > 0).astype(np.uint8))
        m.CopyInformation(f_img)
        m = sitk.BinaryDilate(m, [2, 2, 2])
    else:
        m = sitk.OtsuThreshold(f_img, 0, 1)
        m = sitk.BinaryMorphologicalClosing(m, [2, 2, 2])
        m = sitk.BinaryFillhole(m)
    if not np.any(sitk.GetArrayViewFromImage(m)):
        raise ValueError("the fixed foreground mask is empty; register without use_mask")
    return sitk.Cast(m, sitk.sitkUInt8)


def _set_metric(reg: sitk.ImageRegistrationMethod, p: IterativeParams, bins: int = 32) -> None:
    """The stage metric of ``p`` on ``reg`` (Mattes MI with ``bins`` histogram bins), with its sampling."""
    if p.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    elif p.metric == "ncc":
        reg.SetMetricAsCorrelation()
    else:
        reg.SetMetricAsMeanSquares()
    if p.sampling_percentage < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(p.sampling_percentage, p.seed)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)


def _execute(run: _Run, reg: sitk.ImageRegistrationMethod, stage: str, f_img, m_img, first_iteration: int = 0,
             first_level: int = 0) -> int:
    """Run ``reg`` reporting every iteration; raise Cancelled when stopped by ``run.cancel``.

    ``first_iteration`` / ``first_level`` offset the reported counts (a stage run one level per call).
    Returns the iteration count reached (``first_iteration`` + this call's iterations)."""
    count = {"it": first_iteration, "level": first_level}

    def on_iteration():
        count["it"] += 1
        run.report(stage, count["it"], reg.GetMetricValue(), count["level"])
        if run.should_stop():
            reg.StopRegistration()

    def on_level():
        count["level"] = first_level + reg.GetCurrentLevel()
        if run.should_stop():
            reg.StopRegistration()

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    try:
        reg.Execute(f_img, m_img)
    except RuntimeError:
        if run.cancelled:
            raise Cancelled("registration cancelled by the user") from None
        raise
    if run.should_stop():
        raise Cancelled("registration cancelled by the user")
    return count["it"]


# --------------------------------------------------------------------------- stages
def _linear_stage(run: _Run, stage: str, f_img, m_img, mask, previous: Transform) -> Transform:
    """Rigid (Euler) or affine refinement of ``previous``: returns the new stage only."""
    p = run.p
    if stage == "rigid":
        tx = sitk.Euler3DTransform()
    else:
        tx = sitk.AffineTransform(3)
    if previous.kind == "identity":
        mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if p.initializer == "moments"
                else sitk.CenteredTransformInitializerFilter.GEOMETRY)
        tx = sitk.CenteredTransformInitializer(f_img, m_img, tx, mode)
        if stage == "rigid" and p.rigid_starts > 1:   # _run_params resolved 0 (auto)
            tx = _rigid_search(run, f_img, m_img, mask, tx)
    else:
        tx.SetCenter(_centre(f_img, mask))

    def method(levels) -> sitk.ImageRegistrationMethod:
        """The linear stage's registration method over the pyramid ``levels``, starting at ``tx``."""
        reg = _linear_method(p, mask, levels, p.linear_iterations)
        if previous.kind != "identity":
            reg.SetMovingInitialTransform(previous.itk)
        reg.SetInitialTransform(tx, inPlace=True)
        return reg

    kind = "rigid" if stage == "rigid" else "affine"
    run.last_start = Transform(tx.__class__(tx), kind)   # a copy: the optimiser changes tx in place
    if not (stage == "affine" and p.early_stop == "on" and p.linear_guard and len(run.levels) > 1):
        _execute(run, method(run.levels), stage, f_img, m_img)
        return Transform(tx, kind)
    # early stop: the coarsest level alone first; the finer levels only when it improved the metric over all
    # voxels of the finest level (the guard's test); else the start is returned (the guard keeps it)
    iteration = _execute(run, method(run.levels[:1]), stage, f_img, m_img)
    v0 = _cached_value(run, f_img, m_img, mask, previous)
    v1 = _metric_value(run, f_img, m_img, mask, previous, tx)
    if not v1 < v0 - 1e-6 * max(1.0, abs(v0)):
        run.early = {"stage": stage, "start": v0, "coarse": v1}
        run.message(stage, f"{stage}: the coarsest level does not improve the metric over all voxels ({v0:.4f} -> "
                    f"{v1:.4f}): the finer levels are skipped")
        return run.last_start
    for level in range(1, len(run.levels)):
        iteration = _execute(run, method([run.levels[level]]), stage, f_img, m_img, iteration, level)
    return Transform(tx, kind)


def _linear_method(p, mask, levels, iterations: int, min_step: float = 1e-4) -> sitk.ImageRegistrationMethod:
    """A rigid / affine registration method over the pyramid ``levels`` (shrink factors) with the
    paradigm's metric and fixed mask; the caller sets the transforms."""
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, p)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    # regular-step descent: measured far more reliable here than plain gradient descent
    # with an estimated learning rate, which stalled after a few iterations per level
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=min_step, numberOfIterations=iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-10)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel(_sigmas(list(levels)))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _cached_value(run: _Run, f_img, m_img, mask, previous: Transform) -> float:
    """The metric of ``previous`` unchanged at the linear stages' finest level: the last guard's value of
    the chain it kept when ``previous`` is that chain, else evaluated (and remembered)."""
    if run.value is not None and run.value[0] is previous and run.value[1] == run.levels[-1]:
        return run.value[2]
    v = _metric_value(run, f_img, m_img, mask, previous, sitk.Transform(3, sitk.sitkIdentity))
    run.value = (previous, run.levels[-1], v)
    return v


def _start_rotations(n: int, angle_deg: float) -> list[np.ndarray]:
    """``n`` start rotations (3x3): the identity, then +-angle about x, y, z, then +-angle about the
    four body diagonals, then +-2*angle about x, y, z (in that order, cut at ``n``)."""
    def rot(axis, deg):
        axis = np.asarray(axis, float) / np.linalg.norm(axis)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        a = np.deg2rad(deg)
        return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    out = [np.eye(3)]
    axes = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    diagonals = [(1, 1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1)]
    for group, deg in ((axes, angle_deg), (diagonals, angle_deg), (axes, 2 * angle_deg)):
        for ax in group:
            out += [rot(ax, deg), rot(ax, -deg)]
    return out[:n]


def _rigid_search(run: _Run, f_img, m_img, mask, init: sitk.Euler3DTransform) -> sitk.Euler3DTransform:
    """Multi-start rigid initialisation: the best of ``rigid_starts`` rotated starts.

    Each start rotates ``init`` (centres of mass aligned) about its centre, is refined by a short
    regular-step descent at the coarsest pyramid level, and is scored by the stage's metric there;
    the best refined start (lowest metric) starts the full stage. One start from the centres of mass
    converges only within ~15-20 degrees on multimodal pairs (bench/results/multimodal.md).
    """
    p = run.p
    shrink = run.levels[0]
    best, best_v = init, float("inf")
    base = np.array(init.GetMatrix()).reshape(3, 3)
    run.message("rigid", f"rigid: trying {p.rigid_starts} rotated starts (+-{p.rigid_start_angle:g} degrees)")
    for r in _start_rotations(p.rigid_starts, p.rigid_start_angle):
        tx = sitk.Euler3DTransform(init)
        tx.SetMatrix(tuple((base @ r).ravel()))
        reg = _linear_method(p, mask, [shrink], p.rigid_start_iterations, min_step=1e-2)
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(f_img, m_img)
            v = float(reg.GetMetricValue())
        except RuntimeError:   # the start left too few samples inside the moving image
            v = float("inf")
        if run.should_stop():
            raise Cancelled("registration cancelled by the user")
        if v < best_v:
            best, best_v = tx, v
    run.search = {"starts": int(p.rigid_starts), "best_metric": best_v}
    return sitk.Euler3DTransform(best)


def _metric_value(run: _Run, f_img, m_img, mask, previous: Transform, step: sitk.Transform,
                  shrink: Optional[int] = None) -> float:
    """The stage's own metric (lower is better) for ``previous.then(step)``, at the stage's finest level
    (``shrink``, default the linear stages' finest), over all its voxels (MetricEvaluate does not sample)."""
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, run.p)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    shrink = run.levels[-1] if shrink is None else int(shrink)
    reg.SetShrinkFactorsPerLevel([shrink])
    reg.SetSmoothingSigmasPerLevel(_sigmas([shrink]))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if previous.kind != "identity":
        reg.SetMovingInitialTransform(previous.itk)
    reg.SetInitialTransform(sitk.Transform(step), inPlace=False)
    try:
        return float(reg.MetricEvaluate(f_img, m_img))
    except RuntimeError:   # e.g. too few samples inside the moving image: as bad as it gets
        return float("inf")


def _guard(run: _Run, stage: str, f_img, m_img, mask, previous: Transform, step: Transform,
           chosen: dict) -> Transform:
    """Keep the stage's start when its result is worse by the stage's own metric.

    The start is the better of ``previous`` unchanged and the stage's initialisation (centres of
    mass for a first stage; not evaluated again when it is the identity). Records ``{"stage",
    "start", "end", "kept"}`` in ``chosen["guards"]`` (and ``"stopped": True`` when the stage's
    early stop ended it after its coarsest level: ``end`` is then the coarse level's value). The
    value of the chain kept is left in ``run.kept_value`` for the next stage's guard.
    """
    early = run.early if run.early is not None and run.early["stage"] == stage else None
    run.early = None
    starts = [(Transform.identity(), _cached_value(run, f_img, m_img, mask, previous))]
    if run.last_start is not None and not _is_identity(run.last_start):
        starts.append((run.last_start, _metric_value(run, f_img, m_img, mask, previous, run.last_start.itk)))
    start, v0 = min(starts, key=lambda sv: sv[1])
    if early is not None:
        chosen["guards"].append({"stage": stage, "start": v0, "end": early["coarse"], "kept": "start",
                                 "stopped": True})
        run.kept_value = v0
        return start
    v1 = _metric_value(run, f_img, m_img, mask, previous, step.itk)
    keep_start = v1 > v0 + 1e-6 * max(1.0, abs(v0))
    chosen["guards"].append({"stage": stage, "start": v0, "end": v1, "kept": "start" if keep_start else "result"})
    run.kept_value = v0 if keep_start else v1
    if keep_start:
        run.message(stage, f"{stage}: the result (metric {v1:.4f}) is worse than its start ({v0:.4f}): "
                    "the start is kept")
        return start
    return step


def _is_identity(t: Transform) -> bool:
    """True for a linear transform whose matrix is exactly the identity and whose translation is zero."""
    itk = t.itk
    if not hasattr(itk, "GetMatrix") or not hasattr(itk, "GetTranslation"):
        return t.kind == "identity"
    return (np.array_equal(np.array(itk.GetMatrix()), np.eye(3).ravel())
            and not np.any(np.array(itk.GetTranslation())))


def _deformable_gain(run: _Run, f_img, m_img, mask, previous: Transform, step: Transform) -> tuple[float, float, float]:
    """``(start, end, gain)``: the stage's metric (lower is better) over all voxels of the deformable stage's
    finest level at ``previous`` and at ``previous.then(step)``, and ``gain = (start - end) / |start|``."""
    shrink = run.dlevels[-1]
    if run.value is not None and run.value[0] is previous and run.value[1] == shrink:
        v0 = run.value[2]   # the last linear guard's value of the chain it kept, at the same level
    else:
        v0 = _metric_value(run, f_img, m_img, mask, previous, sitk.Transform(3, sitk.sitkIdentity), shrink)
    v1 = _metric_value(run, f_img, m_img, mask, previous, step.itk, shrink)
    return v0, v1, (v0 - v1) / max(abs(v0), 1e-12)


def _guard_deformable(run: _Run, f_img, m_img, mask, previous: Transform, step: Transform,
                      chosen: dict, info: Optional[dict] = None) -> Transform:
    """Keep a B-spline stage only when it improves its metric beyond the samples it was fitted to.

    The optimiser sees a random ``sampling_percentage`` of the voxels; the guard evaluates the
    metric (lower is better) on all voxels of the stage's finest level (``MetricEvaluate`` ignores
    the sampling), at the start (``previous``) and at the result. The stage is dropped (identity
    step) unless ``start - end >= deformable_min_gain * |start|``. Measured at 2 mm: on a
    same-subject T2 -> T1 pair that the rigid stage had aligned (0.26 mm), the B-spline lowered its
    sampled metric but raised the dense one (-0.587 -> -0.572) and added 0.5 mm of error; on an
    inter-subject T2 -> T1 pair it gained 9.5 %. ``info`` is :func:`_bspline_stage`'s: when its early
    stop ended the stage, its two values are the verdict (nothing is evaluated again), and its start
    value is reused otherwise. Records ``{"stage": "deformable", "start", "end", "gain", "kept",
    "levels", "stopped"}`` in ``chosen["guards"]``.
    """
    p = run.p
    info = info or {}
    if info.get("stopped"):
        v0, v1 = info["start"], info["end"]
    elif "start" in info:
        v0 = info["start"]
        v1 = _metric_value(run, f_img, m_img, mask, previous, step.itk, run.dlevels[-1])
    else:
        v0, v1, _ = _deformable_gain(run, f_img, m_img, mask, previous, step)
    gain = (v0 - v1) / max(abs(v0), 1e-12)
    keep = gain >= p.deformable_min_gain and not info.get("stopped")
    chosen["guards"].append({"stage": "deformable", "start": v0, "end": v1, "gain": gain,
                             "kept": "result" if keep else "start", "levels": int(info.get("levels", 0)),
                             "stopped": bool(info.get("stopped", False))})
    if not keep:
        run.message("deformable", f"deformable: the B-spline improves its metric over all voxels by {gain:+.1%} "
                    f"(needs {p.deformable_min_gain:.1%}): the linear result is kept")
        return Transform.identity()
    return step


def _linear_stage_torch(run: _Run, stage: str, f_img, m_img, mask, previous: Transform,
                        device: str) -> tuple[Transform, str]:
    """Rigid or affine stage with :func:`app.engine.optimise.optimise` (L-BFGS, torch similarity).

    Same inputs as :func:`_linear_stage` (normalised, histogram-matched images, mask, pyramid
    ``levels``, ``linear_iterations`` per level). The moments / geometry initialiser starts a first
    stage; a linear ``previous`` is folded into the model when it can hold it. Returns the whole
    chain (fixed -> moving points) and the device used.
    """
    from ..optimise import optimise
    p = run.p
    init = previous
    if previous.kind == "identity":
        mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if p.initializer == "moments"
                else sitk.CenteredTransformInitializerFilter.GEOMETRY)
        init = Transform(sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(), mode), "rigid")
    centre = _centre(f_img, mask)

    def relay(pr: Progress) -> None:
        run.report(stage, pr.iteration, pr.loss, int(pr.message.split()[1].split("/")[0]) - 1
                   if pr.message.startswith("level ") else 0)

    r = optimise(Volume.from_sitk(f_img), Volume.from_sitk(m_img), stage, initial=init,
                 similarity=p.torch_similarity, levels=run.levels, iterations=p.linear_iterations,
                 optimizer="lbfgs", mask=Volume.from_sitk(mask) if mask is not None else None, percentile=None,
                 model_options={"centre_mm": centre}, progress=relay, cancel=run.cancel, device=device,
                 stage=stage)
    return r.transform, r.device


def _centre(f_img: sitk.Image, mask) -> tuple:
    """Centre of a later linear stage: the mask's centroid, else the fixed grid's centre (LPS mm)."""
    if mask is not None:
        idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0).mean(0)[::-1]  # zyx -> xyz
    else:
        idx = (np.array(f_img.GetSize(), float) - 1) / 2
    return f_img.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in idx))


def _bspline_stage(run: _Run, f_img, m_img, mask, previous: Transform) -> tuple[Transform, dict]:
    """Coarse-to-fine B-spline on top of ``previous``: one optimisation per level of ``run.dlevels``.

    The coarsest mesh is ``bspline_mesh / 2**(levels-1)`` nodes along the longest axis; each finer
    level doubles it and starts from the previous level's result on the finer mesh
    (:func:`refine_bspline`, exact). Level 0 is optimised on ``sampling_percentage`` of the voxels,
    the finer levels on ``bspline_fine_sampling`` (Mattes MI with a B-spline costs samples x control
    points per evaluation: the fine level took ~80 % of a multimodal run's CPU time).

    Early stop (``early_stop`` with ``linear_guard``): after the coarsest level, when finer
    levels remain, the stage's metric over all voxels of its finest level is compared at the start
    (``previous``) and at the coarse result; unless the coarse level gains more than
    ``deformable_min_gain`` (a fraction of the start's value; 0: any gain) the finer levels are skipped
    (``info['stopped']``), and the guard (:func:`_guard_deformable`, which gets the two values) drops
    the stage. Measured on same-subject multimodal pairs (2 mm, bench_multimodal): the full stage lost
    1-3 % over all voxels and was dropped after ~25 CPU s; its coarse level already lost.

    Returns
    -------
    (step, info): the B-spline (fixed -> moving points, on top of ``previous``) and ``{"levels": levels
    run, "start", "end": dense metric values when the early stop evaluated them, "stopped": bool}``.
    """
    p = run.p
    n = len(run.dlevels)
    coarse = max(1, int(round(p.bspline_mesh / 2 ** (n - 1))))
    extent = np.array(f_img.GetSize(), float) * np.array(f_img.GetSpacing())
    mesh = [max(1, int(round(coarse * e / extent.max()))) for e in extent]
    tx = sitk.BSplineTransformInitializer(f_img, mesh, order=3)
    info: dict = {"levels": 0, "stopped": False}
    iteration = 0
    for level, shrink in enumerate(run.dlevels):
        if level > 0:
            tx = refine_bspline(tx)
        reg = sitk.ImageRegistrationMethod()
        if level == 0:
            _set_metric(reg, p)
        else:
            _set_metric(reg, dataclasses.replace(p, sampling_percentage=p.bspline_fine_sampling), p.bspline_fine_bins)
        if mask is not None:
            reg.SetMetricFixedMask(mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=p.deformable_iterations,
                                 deltaConvergenceTolerance=1e-4)
        reg.SetShrinkFactorsPerLevel([shrink])
        reg.SetSmoothingSigmasPerLevel(_sigmas([shrink]))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        if previous.kind != "identity":
            reg.SetMovingInitialTransform(previous.itk)
        reg.SetInitialTransform(tx, inPlace=True)
        iteration = _execute(run, reg, "deformable", f_img, m_img, iteration, level)
        info["levels"] = level + 1
        if level == 0 and n > 1 and p.linear_guard and p.early_stop == "on":
            v0, v1, gain = _deformable_gain(run, f_img, m_img, mask, previous, Transform(tx, "bspline"))
            info.update(start=v0, end=v1)
            if not gain > p.deformable_min_gain:   # no gain at all (0) stops too: nothing to refine
                info["stopped"] = True
                run.message("deformable", f"deformable: the coarsest B-spline level changes the metric over all "
                            f"voxels by {-gain:+.1%} of its start: the finer levels are skipped")
                break
    return Transform(tx, "bspline"), info


_SUBDIVISION = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 8.0   # cubic B-spline two-scale relation


def refine_bspline(tx: sitk.BSplineTransform) -> sitk.BSplineTransform:
    """The same cubic B-spline transform on a control mesh twice as fine along every axis.

    Exact (up to rounding): with the cubic B-spline's two-scale relation
    ``beta(t) = sum_j w_j beta(2t - j)``, ``w = (1, 4, 6, 4, 1) / 8``, every coarse coefficient spreads
    onto the five fine nodes around it, separably per axis. The fine grid is ITK's for the same
    transform domain (origin, physical size, direction) and twice the mesh size, as the registration
    method's own mesh adaptor makes it.

    Parameters
    ----------
    tx : sitk.BSplineTransform
        Order 3, 3D.

    Returns
    -------
    sitk.BSplineTransform mapping every point of the domain (LPS mm) where ``tx`` maps it.
    """
    if tx.GetOrder() != 3 or tx.GetDimension() != 3:
        raise ValueError(f"refine_bspline needs a 3D cubic B-spline, got order {tx.GetOrder()}, "
                         f"dimension {tx.GetDimension()}")
    fine = sitk.BSplineTransform(3, 3)
    fine.SetTransformDomainOrigin(tx.GetTransformDomainOrigin())
    fine.SetTransformDomainDirection(tx.GetTransformDomainDirection())
    fine.SetTransformDomainPhysicalDimensions(tx.GetTransformDomainPhysicalDimensions())
    fine.SetTransformDomainMeshSize([2 * m for m in tx.GetTransformDomainMeshSize()])
    c_imgs, f_imgs = tx.GetCoefficientImages(), fine.GetCoefficientImages()
    ops = []   # per axis x, y, z: fine x coarse matrix
    start = c_imgs[0].TransformPhysicalPointToContinuousIndex(f_imgs[0].GetOrigin())
    for a in range(3):
        off = int(round(2 * start[a]))   # fine node i sits at half-coarse-spacing position i + off
        nf, nc = f_imgs[0].GetSize()[a], c_imgs[0].GetSize()[a]
        r = np.zeros((nf, nc))
        for i in range(nf):
            for k in range(nc):
                j = i + off - 2 * k
                if -2 <= j <= 2:
                    r[i, k] = _SUBDIVISION[j + 2]
        ops.append(r)
    rx, ry, rz = ops
    params = [np.einsum("az,by,cx,zyx->abc", rz, ry, rx, sitk.GetArrayFromImage(c)).ravel() for c in c_imgs]
    fine.SetParameters(tuple(float(v) for v in np.concatenate(params)))
    return fine


_DEMONS: dict[str, Callable[[], sitk.ImageFilter]] = {
    "demons": sitk.DemonsRegistrationFilter,
    "symmetric_demons": sitk.SymmetricForcesDemonsRegistrationFilter,
    "fast_symmetric_demons": sitk.FastSymmetricForcesDemonsRegistrationFilter,
    "diffeomorphic_demons": sitk.DiffeomorphicDemonsRegistrationFilter,
}


def _demons_stage(run: _Run, f_img, m_img, previous: Transform) -> Transform:
    """Demons on the fixed grid (moving pre-warped by ``previous``), coarse to fine.

    The displacement field is in physical mm on the fixed grid, so a coarse level's field is
    resampled (not rescaled) to initialise the next level.
    """
    p = run.p
    m_on_f = sitk.Resample(m_img, f_img, previous.itk, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    field = None
    count = 0
    for level, shrink in enumerate(run.dlevels):
        if shrink > 1:
            sig = [0.5 * shrink * s for s in f_img.GetSpacing()]
            fl = sitk.BinShrink(sitk.SmoothingRecursiveGaussian(f_img, sig), [shrink] * 3)
            ml = sitk.BinShrink(sitk.SmoothingRecursiveGaussian(m_on_f, sig), [shrink] * 3)
        else:
            fl, ml = f_img, m_on_f
        init = (sitk.Image(fl.GetSize(), sitk.sitkVectorFloat64) if field is None
                else sitk.Resample(field, fl, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64))
        init.CopyInformation(fl)
        filt = _DEMONS[p.deformable]()
        filt.SetNumberOfIterations(p.deformable_iterations)
        filt.SetSmoothDisplacementField(p.demons_sigma > 0)
        if p.demons_sigma > 0:
            filt.SetStandardDeviations(p.demons_sigma)
        filt.SetSmoothUpdateField(p.demons_update_sigma > 0)
        if p.demons_update_sigma > 0:
            filt.SetUpdateFieldStandardDeviations(p.demons_update_sigma)
        if hasattr(filt, "SetMaximumUpdateStepLength"):
            filt.SetMaximumUpdateStepLength(p.demons_step)
        filt.SetIntensityDifferenceThreshold(1e-3)
        base = count

        def on_iteration(filt=filt, base=base, level=level):
            run.report("deformable", base + filt.GetElapsedIterations(), filt.GetMetric(), level)
            if run.should_stop():
                filt.StopRegistration()

        filt.AddCommand(sitk.sitkIterationEvent, on_iteration)
        try:
            field = filt.Execute(fl, ml, init)
        except RuntimeError:
            if run.cancelled:
                raise Cancelled("registration cancelled by the user") from None
            raise
        if run.should_stop():
            raise Cancelled("registration cancelled by the user")
        count = base + filt.GetElapsedIterations()
    if run.dlevels[-1] > 1:
        field = sitk.Resample(field, f_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    return Transform(sitk.DisplacementFieldTransform(field), "displacement")
