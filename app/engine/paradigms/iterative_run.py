"""One run of the ``iterative`` paradigm: its bookkeeping and the SimpleITK pieces every stage shares.

* :class:`_Run`: progress (work units weighted per stage), history, cancellation, and the values the
  guards pass from one stage to the next (``value``, ``kept_value``, ``early``, ``last_start``).
* :func:`_parse_levels`, :func:`_sigmas`: pyramid shrink factors and their Gaussian smoothing (voxels).
* :func:`_normalise`, :func:`_fixed_mask`: the images as the stages see them (0..1 intensities, an
  Otsu head mask or the dilated fixed labels).
* :func:`_set_metric`: the stage metric (Mattes MI / NCC / MSE) with its random sampling.
* :func:`_execute`: runs an ``ImageRegistrationMethod``, reporting every iteration and honouring cancel.

Imported by :mod:`.iterative` (which re-exports every name) and by its stage modules
(:mod:`.iterative_linear`, :mod:`.iterative_deformable`, :mod:`.iterative_guards`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import SimpleITK as sitk

from ..spatial import resample
from ..types import Cancelled, LabelMap, Progress, Transform, Volume
from .base import parse_number_list

if TYPE_CHECKING:
    from .iterative import IterativeParams


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

    def execute(self, call):
        """``call()`` (a SimpleITK filter's or registration's ``Execute``) stopped by a cancel: its
        RuntimeError then, or a cancel seen after it returned, becomes :class:`Cancelled`."""
        try:
            out = call()
        except RuntimeError:
            if self.cancelled:
                raise Cancelled("registration cancelled by the user") from None
            raise
        if self.should_stop():
            raise Cancelled("registration cancelled by the user")
        return out


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
    run.execute(lambda: reg.Execute(f_img, m_img))
    return count["it"]
