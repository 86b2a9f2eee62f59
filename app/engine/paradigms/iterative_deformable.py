"""The deformable stages of the ``iterative`` paradigm: B-spline free-form deformation and demons.

* :func:`_bspline_stage`: coarse to fine, one optimisation per level (``deformable_levels``), each finer
  mesh twice the previous one and started from its result exactly (:func:`refine_bspline`); with the
  early stop, the finer levels are skipped when the coarsest does not improve the metric over all
  voxels (:func:`app.engine.paradigms.iterative_guards._deformable_gain`).
* :func:`_demons_stage`: one of SimpleITK's demons filters (:data:`_DEMONS`) on the fixed grid, the
  moving image pre-warped by the linear chain, on a small pyramid of its own; a coarse level's field
  (physical mm) is resampled onto the next level's grid as its initial field.

Both return the stage alone (fixed -> moving points, on top of ``previous``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..types import Transform
from .iterative_guards import _deformable_gain
from .iterative_run import _execute, _Run, _set_metric, _sigmas


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
        field = run.execute(lambda: filt.Execute(fl, ml, init))
        count = base + filt.GetElapsedIterations()
    if run.dlevels[-1] > 1:
        field = sitk.Resample(field, f_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    return Transform(sitk.DisplacementFieldTransform(field), "displacement")
