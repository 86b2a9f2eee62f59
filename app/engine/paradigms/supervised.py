"""Supervised end-to-end regression: the transform in one network pass, learned from known transforms.

    warped(x) = moving(T(x)),   T(x) = A(x + u(x))   (fixed physical points -> moving points)

Both images are brought onto the checkpoint's 4 mm working grid (:func:`app.engine.datasets.preprocess`);
the moving image is prealigned by its centre of mass (or by ``initial``, the previous stage of a
pipeline); a strided CNN (:class:`app.engine.nn.regression.PoseRegressor`) regresses the rigid (6) or
affine (12) correction ``A`` (applied ``iterations`` times, each time to the moving image warped so
far), and, with ``stages=affine+deformable``, a U-Net regresses the remaining displacement ``u`` (mm).
The moving image is resampled once, through the composite transform, on the fixed grid.

The networks were trained on real IXI subjects paired with themselves under random known transforms
(:mod:`app.engine.synthetic`): they never saw two different brains. The bundled checkpoint's card
(``resources/checkpoints/supervised.md``) gives the training ranges and the measured numbers on
known-transform cases and on real inter-subject pairs. A misalignment beyond the trained range, or
a prediction that makes the images less similar than where it started, is reported in
``result.warnings`` (and as a progress message) instead of passing silently.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from ..training.config import LoopConfig
from ..types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)
from .base import param

log = logging.getLogger(__name__)
STAGES = ("rigid", "affine", "affine+deformable")


@dataclass
class SupervisedParams:
    stages: str = param("affine", "rigid (the rigid part of the regressed pose), affine, or affine then the regressed "
                                  "dense field (needs a checkpoint trained with the deformable stage; the bundled one "
                                  "has none)", choices=STAGES)
    iterations: int = param(0, "applications of the pose net, each on the moving image warped so far "
                               "(0: the checkpoint's own)", range=(0, 8))


@dataclass
class SupervisedTrainConfig(LoopConfig):
    """Training options of ``supervised`` (``main.py train --paradigm supervised --param NAME=VALUE``);
    the trainer is :class:`app.engine.training.supervised.SupervisedTrainer`."""

    init: str = param("", "checkpoint to start from: a supervised one (its pose net; with stage=deformable its "
                          "frozen pose net), or an unsupervised / weakly one (its affine stage: network, weights and "
                          "working grid)")
    stage: str = param("affine", "what to train: the rigid (6) or affine (12) pose net, or the deformable net "
                                 "(pose net frozen, from init)", choices=("rigid", "affine", "deformable"))
    steps: int = param(2500, "total optimisation steps", range=(1, 10_000_000))
    batch_size: int = param(8, "pairs per step (per process)", range=(1, 256))
    val_every: int = param(100, "validate every N steps (0: only at the end)", range=(0, 10_000_000))
    ckpt_every: int = param(100, "write the checkpoint every N steps (0: only at the end)", range=(0, 10_000_000))
    max_val_pairs: int = param(16, "synthetic validation pairs (known transforms of the validation subjects; 0: none)",
                               range=(0, 100_000))
    grid: str = param("23x30x30", "working grid z x y x x (voxels)")
    spacing_mm: float = param(8.0, "working grid spacing (isotropic, mm)", range=(0.25, 32.0))
    iterations: int = param(2, "applications of the pose net (recursive: each on the moving image warped so far; "
                               "training draws how many come before the differentiated one)", range=(1, 8))
    pose_net: str = param("flow", "pose net: 'flow' (a coarse U-Net flow supervised densely by the known "
                                  "correspondences, then a least-squares affine fit) or 'direct' (a strided CNN "
                                  "regressing the 6 / 12 parameters)", choices=("flow", "direct"))
    channels: str = param("8,16,32,64,64", "direct pose net: channels of the stride-2 conv levels")
    pose_enc: str = param("8,16,32,32", "flow pose net: U-Net encoder channels")
    pose_dec: str = param("32,32,16", "flow pose net: decoder channels (coarsest first)")
    pose_pool: int = param(2, "flow pose net: average-pool its inputs by this factor first", range=(1, 4))
    w_flow: float = param(1.0, "flow pose net: weight of the end-point error of its flow against the known "
                               "correspondences (mm)", range=(0.0, 1e4))
    rot_deg: float = param(20.0, "training transforms: max rotation per axis (degrees)", range=(0.0, 90.0))
    trans_mm: float = param(25.0, "training transforms: max translation per axis (mm)", range=(0.0, 100.0))
    scale: float = param(0.15, "training transforms (affine): scales in 1 +- scale", range=(0.0, 0.5))
    shear: float = param(0.1, "training transforms (affine): shears in +- shear", range=(0.0, 0.5))
    aug_intensity: bool = param(True, "random gamma, scale and noise on each image")
    pose_field_mm: float = param(0.0, "pose stages: also deform the fixed image by a random smooth field of up to this "
                                      "many mm (shape variation; the target stays the linear transform); 0: off",
                                 range=(0.0, 50.0))
    points_per_pair: int = param(512, "brain points per pair in the point-distance loss", range=(8, 100_000))
    enc: str = param("8,16,32,32", "deformable net: U-Net encoder channels per level")
    dec: str = param("32,32,32,16", "deformable net: decoder channels (coarsest first, down to out_level)")
    out_level: int = param(0, "deformable net: field resolution level (0 = working grid, 1 = half)", range=(0, 4))
    field_max_mm: float = param(8.0, "deformable stage: max length of the random training fields (mm)",
                                range=(0.0, 50.0))
    field_spacing_mm: float = param(40.0, "deformable stage: control-point spacing of the random fields (mm)",
                                    range=(8.0, 200.0))
    field_bank: int = param(128, "deformable stage: random fields made once and reused (random sign and size)",
                            range=(1, 100_000))
    w_smooth: float = param(0.01, "deformable stage: weight of the gradient-L2 regulariser (voxels^2)",
                            range=(0.0, 1e4))


class SupervisedRegistrar:
    """One-shot regression of the transform (rigid / affine parameters, dense field) by CNNs trained on
    known synthetic transforms of real images."""

    key: ClassVar[str] = "supervised"
    Params: ClassVar[type] = SupervisedParams
    description: ClassVar[str] = ("Supervised end-to-end: CNNs regress the rigid/affine parameters and a dense "
                                  "field in one pass, trained on known synthetic transforms of real images")
    learned: ClassVar[bool] = True
    TrainConfig: ClassVar[type] = SupervisedTrainConfig
    trainer: ClassVar[str] = "app.engine.training.supervised:SupervisedTrainer"
    network_kinds: ClassVar[tuple[str, ...]] = ("supervised",)

    def register(self, fixed: Volume, moving: Volume, params: Optional[SupervisedParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (labels are warped when given; landmarks are not used).

        ``checkpoint`` None: the bundled ``resources/checkpoints/supervised.pt``. ``initial``: a
        Transform (fixed -> moving points) to start from instead of the centre-of-mass prealignment;
        the result's transform is the whole chain.
        """
        params = params or SupervisedParams()
        return register_supervised(fixed, moving, params, checkpoint=checkpoint, initial=initial,
                                   moving_labels=moving_labels, progress=progress, cancel=cancel, device=device)


def load_supervised(checkpoint=None) -> dict:
    """The checkpoint (cached), refused with a clear message when it is not a supervised model."""
    from ._learned import _CACHE
    from .. import checkpoints
    from pathlib import Path
    path = Path(checkpoint) if checkpoint else checkpoints.default_checkpoint("supervised")
    try:
        stamp = (str(path.resolve()), path.stat().st_mtime_ns, "supervised")
    except OSError:
        raise ValueError(f"checkpoint file not found: {path}") from None
    if stamp not in _CACHE:
        ckpt = checkpoints.load_checkpoint(path, expected_paradigm="supervised",
                                           kinds=SupervisedRegistrar.network_kinds)
        _CACHE.clear()
        _CACHE[stamp] = ckpt
    return _CACHE[stamp]


def nearest_rigid(matrix: np.ndarray, centre_xyz) -> np.ndarray:
    """The rigid transform closest to an affine one about ``centre_xyz``: the rotation factor of the
    linear part's polar decomposition, and the affine's own image of the centre."""
    m = np.asarray(matrix, float)
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    c = np.asarray(centre_xyz, float)
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = m[:3, :3] @ c + m[:3, 3] - r @ c
    return out


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    d = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / d) if d > 0 else 0.0


def register_supervised(fixed: Volume, moving: Volume, params: SupervisedParams, *, checkpoint=None,
                        initial: Optional[Transform] = None, moving_labels: Optional[LabelMap] = None,
                        progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                        device: str = "auto") -> RegistrationResult:
    """The inference pipeline (see the module docstring)."""
    import torch
    from .. import checkpoints
    from .. import datasets as D
    from .. import synthetic as S
    from ..nn import geometry as G
    from ..nn import resolve_device
    from ..nn.regression import run_supervised
    from ..nn.twostage import PairTensors
    from ..spatial import field_to_transform, resample, voxel_to_physical_field
    from ._learned import affine_to_transform, field_on_fixed_grid
    if params.stages not in STAGES:
        raise ValueError(f"stages must be one of {', '.join(STAGES)}, got {params.stages!r}")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    check_cancel(cancel)
    if progress:
        progress(Progress("load", message="loading the model", fraction=0.05))
    ckpt = load_supervised(checkpoint)
    model = ckpt["model"]
    name = checkpoints.checkpoint_id(ckpt)
    if params.stages == "affine+deformable" and model.deformable is None:
        raise ValueError(f"{name.split('@')[0]} has no deformable net (it was trained for '{model.stages}'); "
                         f"use --param stages={'rigid' if model.dof == 6 else 'affine'} or a checkpoint "
                         f"trained with the deformable stage")
    if params.stages != "rigid" and model.dof == 6:
        raise ValueError(f"{name.split('@')[0]} regresses rigid transforms only (6 parameters); use "
                         f"--param stages=rigid or an affine checkpoint")
    warnings: list[str] = []
    prep = D.Preprocessing.from_dict(ckpt["preprocessing"])
    # a deformable previous stage: warp the moving image through it first, then chain
    pre_chain, moving_orig = None, moving
    if initial is not None and not initial.is_linear:
        pre_chain = initial
        moving = resample(moving_orig, fixed, initial, "linear")
        initial = None
    fixed_w = D.preprocess(fixed, prep)
    moving_w = D.preprocess(moving, prep)
    if initial is not None:
        start = S.transform_to_matrix(initial)
    else:
        start = G.translation(D.prealign_offset(fixed_w, moving_w, prep))
    pair = PairTensors.from_numpy([fixed_w.array], [moving_w.array], [G.grid_matrix(fixed_w)],
                                  [G.grid_matrix(moving_w)], [G.theta_frame(fixed_w)], [start], device=dev)
    t1 = time.perf_counter()
    check_cancel(cancel)
    if progress:
        progress(Progress("network", message=f"pose regression ({params.stages}) on {dev.type}", fraction=0.3))
    n_iter = params.iterations or model.iterations
    model = model.to(dev)
    with torch.no_grad():
        out = run_supervised(model, pair, deformable=params.stages == "affine+deformable",
                             pre_iterations=n_iter - 1)
        disp_mm = None if out["field"] is None else voxel_to_physical_field(out["field"].disp_vox, fixed_w)
        # similarity before / after on the working grid (the trust check)
        k0 = G.index_map(pair.fixed_grid, pair.moving_grid, pair.init)
        m_start = G.sample_through(pair.moving, k0, fixed_w.shape)[0, 0].cpu().numpy()
    affine = out["affine"][0].cpu().numpy()
    fixed_com = D.center_of_mass(fixed_w)
    if params.stages == "rigid":
        affine = nearest_rigid(affine, fixed_com)
    with torch.no_grad():
        k = G.index_map(pair.fixed_grid, pair.moving_grid, torch.as_tensor(affine, dtype=torch.float64, device=dev)[None])
        m_end = G.sample_through(pair.moving, k, fixed_w.shape)[0, 0].cpu().numpy()
    t2 = time.perf_counter()
    # --- trust checks: trained range and similarity
    ranges = (ckpt.get("training") or {}).get("ranges") or {}
    rot_lim = float(ranges.get("rot_deg_per_axis") or 0)
    trans_lim = float(ranges.get("trans_mm_per_axis") or 0)
    corr = np.linalg.inv(start) @ affine
    angle = S.rotation_angle_deg(corr)
    shift = float(np.linalg.norm(corr[:3, :3] @ fixed_com + corr[:3, 3] - fixed_com))
    if rot_lim and angle > 0.9 * rot_lim * np.sqrt(3):
        warnings.append(f"the predicted rotation ({angle:.0f} degrees) is at the edge of the trained range "
                        f"(+-{rot_lim:g} degrees per axis): the misalignment may be larger than the model can correct")
    if trans_lim and shift > 0.9 * trans_lim * np.sqrt(3):
        warnings.append(f"the predicted translation ({shift:.0f} mm after the prealignment) is at the edge of the trained "
                        f"range (+-{trans_lim:g} mm per axis)")
    mask = fixed_w.array > 0.05
    ncc_start, ncc_end = _ncc(fixed_w.array, m_start, mask), _ncc(fixed_w.array, m_end, mask)
    if ncc_end < ncc_start - 0.01:
        if initial is not None:
            # a previous stage's result is the start: never hand back something worse than it
            warnings.append(f"similarity check: the predicted {params.stages.split('+')[0]} made the images less similar "
                            f"than the given initial transform (NCC {ncc_start:.3f} -> {ncc_end:.3f}); kept the initial "
                            f"transform")
            affine = start
            if disp_mm is not None:
                disp_mm = disp_mm * 0
        else:
            warnings.append(f"similarity check failed: the predicted {params.stages.split('+')[0]} makes the images less "
                            f"similar than the start (NCC {ncc_start:.3f} -> {ncc_end:.3f}); the result is probably wrong")
    for w in warnings:
        log.warning("supervised: %s", w)
    check_cancel(cancel)
    # --- compose: one transform, one resampling
    transform = affine_to_transform(affine)
    if params.stages == "rigid":
        transform = Transform(transform.itk, "affine")
    field = None
    if disp_mm is not None:
        u = field_on_fixed_grid(disp_mm.float(), fixed_w, fixed)[0]                      # (3, Z, Y, X) xyz mm
        u_vol = Volume(u.permute(1, 2, 3, 0).cpu().numpy(), fixed.spacing, fixed.origin, fixed.direction.copy(),
                       "deformable")
        transform = transform.then(field_to_transform(u_vol))
    if pre_chain is not None:
        transform = pre_chain.then(transform)
    if disp_mm is not None or pre_chain is not None:
        from ..spatial import transform_to_field
        field = transform_to_field(transform, fixed)
    # the stage check of every learned result on the fixed grid (app.engine.stagecheck): the better stage kept
    from ..spatial import transform_to_field
    from ..stagecheck import guard_learned
    pre = pre_chain or Transform.identity()
    stages = [("start", pre.then(affine_to_transform(start)) if initial is not None else pre)]
    stages += [("prealigned", pre.then(affine_to_transform(start)))] if initial is None else []
    stages += [(params.stages.split("+")[0], pre.then(Transform(affine_to_transform(affine).itk, "affine")))]
    stages += [("deformable", transform)] if disp_mm is not None else []
    kept, checks, more = guard_learned(fixed, moving_orig, stages, ckpt, name.split("@")[0])
    warnings += more
    if kept != stages[-1][0]:
        transform = dict(stages)[kept]
        field = None if transform.is_linear else transform_to_field(transform, fixed)
    t3 = time.perf_counter()
    if progress:
        progress(Progress("resample", message="resampling the moving image once", fraction=0.8))
    warped = resample(moving_orig, fixed, transform, "linear")     # the original image, once, through the chain
    warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
    t4 = time.perf_counter()
    timings = {"preprocess": round(t1 - t_start, 4), "network": round(t2 - t1, 4), "compose": round(t3 - t2, 4),
               "resample": round(t4 - t3, 4), "total": round(t4 - t_start, 4)}
    if progress:
        msg = f"{timings['total']:.2f} s on {dev.type}" + (f"; WARNING: {warnings[0]}" if warnings else "")
        progress(Progress("done", message=msg, fraction=1.0))
    res = RegistrationResult(transform=transform, warped=warped, field=field, history=[], timings=timings,
                             device=str(dev), paradigm="supervised", params=params_to_dict(params),
                             checkpoint_id=name, warped_labels=warped_labels, warnings=warnings, checks=checks)
    return res
