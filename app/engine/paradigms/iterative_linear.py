"""The linear stages of the ``iterative`` paradigm: rigid (Euler) and affine.

:func:`_linear_stage` refines the chain so far with SimpleITK's regular-step descent over the
pyramid ``levels`` (the method built by :func:`_linear_method`, shared with the rigid search); a
first stage starts from ``CenteredTransformInitializer`` (centres of mass or image centres) and, with
``rigid_starts > 1``, from the best of rotated starts (:func:`_start_rotations`,
:func:`_rigid_search`). An affine stage with the early stop runs its coarsest level alone first and
stops when that level does not improve its metric over all voxels (:mod:`.iterative_guards`).
:func:`_linear_stage_torch` is the same stage with :func:`app.engine.optimise.optimise` (L-BFGS on a
torch similarity).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..types import Cancelled, Progress, Transform, Volume
from .iterative_guards import _cached_value, _metric_value
from .iterative_run import _execute, _Run, _set_metric, _sigmas


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
