"""Inference of the DLIR-style two-stage models shared by ``unsupervised`` and ``weakly``.

    warped(x) = moving(T(x)),   T(x) = A(x + u(x))

``A`` (fixed physical points -> moving physical points) is the learned affine stage, composed with
the centre-of-mass prealignment; ``u`` is the deformable stage's displacement, estimated on the
working grid (the checkpoint's shape / spacing / orientation, centred on the fixed image) and
interpolated (trilinear, in mm) onto the fixed grid. ``T = A.then(id + u)`` is one composite
transform; the moving image is resampled once through it on the full-resolution fixed grid.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..types import (LabelMap, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)

_CACHE: dict = {}


def load_model(key: str, checkpoint=None, variant: str = "", kinds: tuple[str, ...] = ("two_stage",)) -> dict:
    """Load (and cache by path + modification time) the checkpoint for paradigm ``key``.

    ``checkpoint`` None -> :func:`app.engine.checkpoints.default_checkpoint` (``key``, ``variant``);
    a checkpoint of another paradigm, or whose network kind is not in ``kinds``, is refused.
    """
    from .. import checkpoints
    path = Path(checkpoint) if checkpoint else checkpoints.default_checkpoint(key, variant)
    try:
        stamp = (str(path.resolve()), path.stat().st_mtime_ns, key)
    except OSError:
        raise ValueError(f"checkpoint file not found: {path}") from None
    if stamp not in _CACHE:
        ckpt = checkpoints.load_checkpoint(path, expected_paradigm=key, kinds=kinds)
        _CACHE.clear()      # keep one model in memory
        _CACHE[stamp] = ckpt
    return _CACHE[stamp]


def affine_to_transform(matrix: np.ndarray) -> Transform:
    """4x4 physical affine (fixed -> moving points, LPS mm) -> affine :class:`Transform`."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in np.asarray(matrix)[:3, :3].reshape(-1)))
    t.SetTranslation(tuple(float(v) for v in np.asarray(matrix)[:3, 3]))
    return Transform(t, "affine")


def run_pair(ckpt: dict, fixed: Volume, moving: Volume, device, deformable: bool = True) -> dict:
    """Preprocess a pair and run the network on its working grid.

    Returns {"affine": (4, 4) physical fixed -> moving, "disp_mm": (1, 3, D, H, W) xyz mm on the
    working grid (the fine grid when the model has a refinement net) or None, "grid": that grid of
    the fixed image, "init": (4, 4) the centre-of-mass prealignment the affine net started from,
    "disp_coarse_mm" / "coarse_grid": with a refinement net, the working-grid field before the
    refinement (xyz mm) and its grid (else None), "timings": {...}}.
    """
    import torch
    from .. import datasets as D
    from ..nn import geometry as G
    from ..nn.twostage import PairTensors, coarse_from_fine, run_refine, run_two_stage
    from ..spatial import voxel_to_physical_field
    t0 = time.perf_counter()
    prep = D.Preprocessing.from_dict(ckpt["preprocessing"])
    model = ckpt["model"].to(device)
    refine = model.refine if getattr(model, "refine", None) is not None else None
    # A model with a refinement net is fed at the fine grid only (its working-grid inputs are pooled
    # from there, as in its training); an older model sees the working grid directly.
    wprep = D.fine_preprocessing(prep, refine.factor) if refine is not None else prep
    fixed_w = D.preprocess(fixed, wprep)
    moving_w = D.preprocess(moving, wprep)
    init = G.translation(D.prealign_offset(fixed_w, moving_w, prep))
    pair = PairTensors.from_numpy([fixed_w.array], [moving_w.array], [G.grid_matrix(fixed_w)],
                                  [G.grid_matrix(moving_w)], [G.theta_frame(fixed_w)], [init], device=device)
    fine = None
    if refine is not None:
        fine, pair = pair, coarse_from_fine(pair, refine.factor)
    t1 = time.perf_counter()
    with torch.no_grad():
        out = run_two_stage(model, pair, deformable=deformable, train_affine=False)
        disp_mm = coarse_mm = coarse_grid = None
        if out.field is not None and fine is not None:
            disp_mm = voxel_to_physical_field(run_refine(model, out, fine, warp=False).disp_vox, fixed_w)
            # the working-grid field before the refinement: a stage of its own for the stage check
            coarse_grid = D.working_grid(fixed, prep)
            coarse_mm = voxel_to_physical_field(out.field.disp_vox, coarse_grid)
        elif out.field is not None:
            disp_mm = voxel_to_physical_field(out.field.disp_vox, fixed_w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    return {"affine": out.affine[0].cpu().numpy(), "disp_mm": disp_mm, "grid": fixed_w, "init": np.asarray(init, float).reshape(4, 4),
            "disp_coarse_mm": coarse_mm, "coarse_grid": coarse_grid, "timings": {"preprocess": t1 - t0, "network": t2 - t1}}


def field_on_fixed_grid(disp_mm, working: Volume, fixed: Volume):
    """Interpolate a working-grid displacement (1, 3, D, H, W) xyz mm onto ``fixed``'s grid.

    Returns a torch tensor (1, 3, Z, Y, X), xyz mm (trilinear in physical space, edge values
    continued beyond the working grid).
    """
    import torch
    import torch.nn.functional as F
    from ..nn import geometry as G
    k_np = np.linalg.inv(G.grid_matrix(working)) @ G.grid_matrix(fixed)
    # Fast path: when the working grid is the fixed grid strided and centred (same orientation),
    # the index map is exactly F.interpolate's (align_corners=False, edges clamped like 'border').
    ratio = np.array(working.shape, float) / np.array(fixed.shape, float)
    if np.allclose(k_np[:3, :3], np.diag(ratio), atol=1e-6) and np.allclose(k_np[:3, 3], 0.5 * ratio - 0.5, atol=1e-4):
        return F.interpolate(disp_mm, size=fixed.shape, mode="trilinear", align_corners=False)
    k = torch.as_tensor(k_np, dtype=torch.float64, device=disp_mm.device)[None]
    return G.sample_through(disp_mm, k, fixed.shape, padding_mode="border")


def register_two_stage(key: str, fixed: Volume, moving: Volume, params, *, checkpoint=None, variant: str = "",
                       deformable: bool = True, moving_labels: Optional[LabelMap] = None,
                       initial: Optional[Transform] = None, kinds: tuple[str, ...] = ("two_stage",),
                       progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                       device: str = "auto") -> RegistrationResult:
    """The whole inference pipeline of a two-stage learned paradigm (see the module docstring).

    With ``initial`` (fixed -> moving points, e.g. the previous stage of a pipeline) the network sees
    the moving image resampled once through it onto the fixed grid, and the result's transform is
    ``initial.then(T_net)``: still one composite, and the moving image is resampled once through it.
    """
    import torch
    from ..nn import geometry as G
    from ..nn import resolve_device
    from ..spatial import field_to_transform, resample, transform_to_field
    from ..stagecheck import guard_learned
    from .. import checkpoints
    t_start = time.perf_counter()
    dev = resolve_device(device)
    check_cancel(cancel)
    if progress:
        progress(Progress("load", message="loading the model", fraction=0.05))
    ckpt = load_model(key, checkpoint, variant, kinds)
    check_cancel(cancel)
    start = initial if initial is not None and initial.kind != "identity" else None
    seen = resample(moving, fixed, start, "linear") if start is not None else moving
    if progress:
        progress(Progress("network", message=f"affine + deformable network on {dev.type}", fraction=0.3))
    res = run_pair(ckpt, fixed, seen, dev, deformable)
    check_cancel(cancel)
    t0 = time.perf_counter()
    affine = res["affine"]
    t_aff = affine_to_transform(affine)
    # Full displacement T(x) - x = A (x + u(x)) - x on the fixed grid, in mm (float32 is ample:
    # 1e-5 mm on positions of a few hundred mm).
    gm = torch.as_tensor(G.grid_matrix(fixed), dtype=torch.float32, device=dev)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=dev) for n in fixed.shape],
                                      indexing="ij"), 0).reshape(3, -1)
    pts = gm[:3, :3] @ grid + gm[:3, 3:]                                    # (3, N) xyz mm
    a = torch.as_tensor(affine, dtype=torch.float32, device=dev)
    full = (a[:3, :3] - torch.eye(3, device=dev)) @ pts + a[:3, 3:]
    transform = t_aff
    if res["disp_mm"] is not None:
        u = field_on_fixed_grid(res["disp_mm"].float(), res["grid"], fixed)[0]      # (3, Z, Y, X)
        full = full + a[:3, :3] @ u.reshape(3, -1)
        u_vol = Volume(u.permute(1, 2, 3, 0).cpu().numpy(), fixed.spacing, fixed.origin,
                       fixed.direction.copy(), "deformable")
        transform = t_aff.then(field_to_transform(u_vol))
    field = Volume(full.T.reshape(*fixed.shape, 3).cpu().numpy(), fixed.spacing, fixed.origin,
                   fixed.direction.copy(), "field")
    if start is not None:
        transform = start.then(transform)
        field = transform_to_field(transform, fixed)
    # never silently worse than the input: every stage measured on the fixed grid, the better kept
    s0 = start or Transform.identity()
    stages = [("start", s0), ("prealigned", s0.then(affine_to_transform(res["init"]))), ("affine", s0.then(t_aff))]
    if res.get("disp_coarse_mm") is not None:      # a refinement net: deformable (working grid), then refined
        g, uc = res["coarse_grid"], res["disp_coarse_mm"][0].permute(1, 2, 3, 0).float().cpu().numpy()
        u_c = field_to_transform(Volume(uc, g.spacing, g.origin, g.direction.copy(), "deformable"))
        stages += [("deformable", s0.then(t_aff.then(u_c))), ("refined", transform)]
    elif res["disp_mm"] is not None:
        stages += [("deformable", transform)]
    kept, checks, warnings = guard_learned(fixed, moving, stages, ckpt, checkpoints.checkpoint_id(ckpt).split("@")[0])
    if kept != stages[-1][0]:
        transform = dict(stages)[kept]
        field = None if transform.kind == "identity" else transform_to_field(transform, fixed)
    t1 = time.perf_counter()
    check_cancel(cancel)
    if progress:
        progress(Progress("resample", message="resampling the moving image once", fraction=0.8))
    warped = resample(moving, fixed, transform, "linear")
    warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
    t2 = time.perf_counter()
    timings = {**{k: round(v, 4) for k, v in res["timings"].items()}, "compose": round(t1 - t0, 4),
               "resample": round(t2 - t1, 4), "total": round(t2 - t_start, 4)}
    timings["checks"] = checks["seconds"]
    if progress:
        msg = f"{timings['total']:.2f} s on {dev.type}" + (f"; WARNING: {warnings[-1]}" if warnings else "")
        progress(Progress("done", message=msg, fraction=1.0))
    return RegistrationResult(transform=transform, warped=warped, field=field,
                              history=[], timings=timings, device=str(dev), paradigm=key,
                              params=params_to_dict(params), checkpoint_id=checkpoints.checkpoint_id(ckpt),
                              warped_labels=warped_labels, warnings=warnings, checks=checks)


def affine_prealign(fixed: Volume, moving: Volume, checkpoint=None, device: str = "auto",
                    key: str = "unsupervised") -> Transform:
    """The learned affine stage alone (centre of mass + affine net): an affine :class:`Transform`
    mapping fixed physical points to moving physical points, to prealign a pair for another method.

    Uses ``checkpoint`` or the bundled checkpoint of paradigm ``key``.
    """
    from ..nn import resolve_device
    ckpt = load_model(key, checkpoint)
    res = run_pair(ckpt, fixed, moving, resolve_device(device), deformable=False)
    return affine_to_transform(res["affine"])
