"""The forward pass of the DLIR-style two-stage model, shared by training and inference.

    moving_0 = moving sampled through the initial transform P0 (centre-of-mass prealignment,
               plus the random augmentation during training)
    theta    = affine_net(fixed, moving_0)                      (theta frame of the fixed grid)
    A        = P0 o C theta C^-1                                (physical, fixed -> moving points)
    moving_a = moving(A(x))                                     (one interpolation)
    u        = deformable_net(fixed, moving_a)                  (fixed-grid voxels, zyx)
    moving_d = moving(A(x + u(x)))                              (one interpolation)

so the full transform is ``T(x) = A(x + u(x))``: the affine stage first, then the field estimated
on its result (``Transform.then``).

With a refinement net (:class:`~app.engine.nn.networks.RefineNet`, :func:`run_refine`) the pair is
also given on a fine grid (same centre and orientation, ``factor`` times finer: 2 mm for the 4 mm
models), ``u`` is upsampled to it and

    moving_c = moving(A(x + u(x)))                              (fine grid)
    r        = refine_net(fixed, moving_c)                      (fine-grid voxels, zyx)
    d(x)     = r(x) + u(x + r(x))                               (exact composition, u interpolated)
    moving_r = moving(A(x + d(x)))                              (one interpolation)

so ``T(x) = A(x + d(x))`` with ``d`` on the fine grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import geometry as G
from .layers import resize_field
from .networks import FieldPrediction, TwoStageNet


@dataclass
class PairTensors:
    """A batch of (fixed, moving) pairs on their working grids.

    fixed : (B, 1, D, H, W) float, fixed working images.
    moving : (B, 1, D, H, W) float, moving images on *their own* working grids.
    fixed_grid, moving_grid : (B, 4, 4) float64, :func:`geometry.grid_matrix` of each grid.
    frame : (B, 4, 4) float64, :func:`geometry.theta_frame` of the fixed grids.
    init : (B, 4, 4) float64, initial physical transform fixed -> moving points.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_grid: torch.Tensor
    moving_grid: torch.Tensor
    frame: torch.Tensor
    init: torch.Tensor

    def to(self, device) -> "PairTensors":
        return PairTensors(*(getattr(self, f).to(device) for f in
                             ("fixed", "moving", "fixed_grid", "moving_grid", "frame", "init")))

    @classmethod
    def from_numpy(cls, fixed, moving, fixed_grid, moving_grid, frame, init, device="cpu") -> "PairTensors":
        """Stack lists of per-pair numpy arrays ((D, H, W) images, 4x4 matrices)."""
        def img(xs):
            return torch.as_tensor(np.stack(xs)[:, None], dtype=torch.float32, device=device)

        def mat(xs):
            return torch.as_tensor(np.stack(xs), dtype=torch.float64, device=device)
        return cls(img(fixed), img(moving), mat(fixed_grid), mat(moving_grid), mat(frame), mat(init))


@dataclass
class TwoStageOutput:
    """theta (B, 3, 4); affine (B, 4, 4) physical fixed -> moving; index_affine (B, 4, 4) fixed
    index -> moving index; moving_affine (B, 1, D, H, W); field (FieldPrediction) and
    moving_warped (B, 1, D, H, W) when the deformable stage ran; moving_init: the moving image
    through the transform before the last affine application (that application's input); affine_flow: the dense pooled flow of a
    :class:`~app.engine.nn.networks.FlowAffineNet` (None for a regression affine net)."""

    theta: torch.Tensor
    affine: torch.Tensor
    index_affine: torch.Tensor
    moving_affine: torch.Tensor
    field: Optional[FieldPrediction] = None
    moving_warped: Optional[torch.Tensor] = None
    moving_init: Optional[torch.Tensor] = None
    affine_flow: Optional[FieldPrediction] = None


def run_two_stage(model: TwoStageNet, pair: PairTensors, deformable: bool = True,
                  train_affine: bool = True, autocast=None, affine_pre_iterations: int | None = None) -> TwoStageOutput:
    """Run both stages on ``pair``; warps are done in float32 even under mixed precision.

    The affine net is applied ``model.affine_iterations`` times, each time to the moving image
    warped by the affine found so far (a recursive cascade: ``A <- A o C theta C^-1``); only the
    last application is differentiated. ``affine_pre_iterations`` overrides the number of earlier
    applications (training draws it at random so the net learns coarse and fine corrections).
    ``train_affine=False`` runs the affine net without gradients (a frozen first stage).
    ``autocast`` is a context-manager factory for the network forwards (mixed precision on CUDA).
    """
    import contextlib
    ac = autocast or contextlib.nullcontext
    shape = tuple(pair.fixed.shape[2:])
    n_pre = model.affine_iterations - 1 if affine_pre_iterations is None else int(affine_pre_iterations)
    start = pair.init
    if n_pre > 0:
        with torch.no_grad():
            for _ in range(n_pre):
                mk = G.sample_through(pair.moving, G.index_map(pair.fixed_grid, pair.moving_grid, start), shape)
                th = model.affine(pair.fixed, mk)
                start = start @ G.theta_to_physical(th.double(), pair.frame)
    k0 = G.index_map(pair.fixed_grid, pair.moving_grid, start)
    with torch.set_grad_enabled(train_affine and torch.is_grad_enabled()):
        moving0 = G.sample_through(pair.moving, k0, shape)
        affine_flow = None
        # The affine net stays in float32 under mixed precision: 12 numbers regressed in bfloat16
        # would carry ~0.4 % scale errors, and the net is small.
        if hasattr(model.affine, "forward_with_flow"):
            theta, affine_flow = model.affine.forward_with_flow(pair.fixed, moving0)
        else:
            theta = model.affine(pair.fixed, moving0)
        theta = theta.double()
        affine = start @ G.theta_to_physical(theta, pair.frame)
        k = G.index_map(pair.fixed_grid, pair.moving_grid, affine)
        moving_affine = G.sample_through(pair.moving, k, shape)
    out = TwoStageOutput(theta, affine, k, moving_affine, moving_init=moving0, affine_flow=affine_flow)
    if deformable:
        with ac():
            pred = model.deformable(pair.fixed, moving_affine.detach() if not train_affine else moving_affine)
        pred = FieldPrediction(pred.disp_vox.float(), pred.raw_vox.float())
        out.field = pred
        out.moving_warped = G.sample_through(pair.moving, k, shape, disp_vox=pred.disp_vox)
    return out


def warp_labels_onehot(labels: torch.Tensor, ids: torch.Tensor, index_affine: torch.Tensor, shape_zyx,
                       disp_vox: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-warp a label map: one-hot of ``ids`` sampled trilinearly at ``K (i + u(i))``.

    labels : (B, d, h, w) integer, on the moving grids. ids : (K,) label ids.
    Returns (B, K, *shape_zyx) float in [0, 1].
    """
    onehot = (labels[:, None] == ids.view(1, -1, 1, 1, 1)).float()
    return G.sample_through(onehot, index_affine, shape_zyx, disp_vox=disp_vox, padding_mode="zeros")


def warp_labels_nearest(labels: torch.Tensor, index_affine: torch.Tensor, shape_zyx,
                        disp_vox: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map (B, d, h, w) -> (B, *shape_zyx) long."""
    # float32 holds label ids exactly (< 2**24)
    out = G.sample_through(labels[:, None].float(), index_affine, shape_zyx, disp_vox=disp_vox,
                           mode="nearest", padding_mode="zeros")
    return out[:, 0].round().long()


@dataclass
class RefineOutput:
    """Result of :func:`run_refine`, all on the fine fixed grid (or the crop of it).

    fixed : (B, 1, D, H, W) the fine fixed images (cropped). coarse_vox : (B, 3, D, H, W) the coarse
    field ``u`` in fine voxels. moving_coarse : the moving images through ``A(x + u(x))``.
    residual : the refinement net's :class:`FieldPrediction` (``r``). disp_vox : the full field
    ``d = r + u o (id + r)`` (fine voxels, zyx). index_affine : (B, 4, 4) fine (crop) index -> moving
    index through ``A``. moving_warped : the moving images through ``A(x + d(x))``.
    """

    fixed: torch.Tensor
    coarse_vox: torch.Tensor
    moving_coarse: torch.Tensor
    residual: FieldPrediction
    disp_vox: torch.Tensor
    index_affine: torch.Tensor
    moving_warped: torch.Tensor


def coarse_from_fine(fine: PairTensors, factor: int) -> PairTensors:
    """The working-grid pair of a fine pair: images average-pooled by ``factor`` (the mean of each
    ``factor**3`` block is the trilinear value at the coarse voxel's centre), grids strided
    (coarse index ``i`` = fine index ``factor * i + (factor - 1) / 2``), same frames and ``init``.

    Models with a refinement net take their working-grid inputs from here, in training and in
    inference alike (one preprocessing, at the fine grid).
    """
    import torch.nn.functional as F
    s = torch.eye(4, dtype=fine.fixed_grid.dtype, device=fine.fixed_grid.device)
    s[:3, :3] *= factor
    s[:3, 3] = (factor - 1) / 2
    return PairTensors(F.avg_pool3d(fine.fixed, factor), F.avg_pool3d(fine.moving, factor),
                       fine.fixed_grid @ s, fine.moving_grid @ s, fine.frame, fine.init)


def crop_shift(offset_zyx, ref: torch.Tensor) -> torch.Tensor:
    """(1, 4, 4) index translation ``i -> i + offset`` (crop index -> full-grid index)."""
    m = torch.eye(4, dtype=ref.dtype, device=ref.device)[None].clone()
    m[0, :3, 3] = torch.as_tensor([float(o) for o in offset_zyx], dtype=ref.dtype, device=ref.device)
    return m


def run_refine(model: TwoStageNet, coarse: TwoStageOutput, fine: PairTensors, crop=None,
               autocast=None, warp: bool = True) -> RefineOutput:
    """The refinement stage on top of a coarse :func:`run_two_stage` result (see the module docstring).

    Parameters
    ----------
    model : a TwoStageNet with ``model.refine``.
    coarse : the coarse result on the working grid (``coarse.field`` required).
    fine : the same pairs on the fine grids (same centres and orientations as the working grids,
        ``model.refine.factor`` times the shape; same ``init``).
    crop : ``((z0, y0, x0), (d, h, w))`` to run the refinement on a block of the fine fixed grid only
        (training: the net is fully convolutional), or None for the whole grid.
    warp : also resample the moving images through the full transform (``moving_warped``; None
        when False: inference resamples once on the caller's grid).
    """
    import contextlib
    if model.refine is None:
        raise ValueError("run_refine: this model has no refinement net")
    if coarse.field is None:
        raise ValueError("run_refine: the coarse result has no deformable field")
    ac = autocast or contextlib.nullcontext
    shape = tuple(fine.fixed.shape[2:])
    want = tuple(s * model.refine.factor for s in coarse.field.disp_vox.shape[2:])
    if shape != want:
        raise ValueError(f"run_refine: the fine grid {shape} must be {model.refine.factor} x the working grid "
                         f"{tuple(coarse.field.disp_vox.shape[2:])} = {want}")
    u = resize_field(coarse.field.disp_vox.float(), shape)
    k = G.index_map(fine.fixed_grid, fine.moving_grid, coarse.affine)
    fixed = fine.fixed
    if crop is not None:
        (z0, y0, x0), (d, h, w) = crop
        sl = (slice(None), slice(None), slice(z0, z0 + d), slice(y0, y0 + h), slice(x0, x0 + w))
        u, fixed = u[sl], fixed[sl]
        k = k @ crop_shift((z0, y0, x0), k)
        shape = (d, h, w)
    moving_c = G.sample_through(fine.moving, k, shape, disp_vox=u)
    with ac():
        pred = model.refine(fixed, moving_c)
    pred = FieldPrediction(pred.disp_vox.float(), pred.raw_vox.float())
    r = pred.disp_vox
    # d(x) = r(x) + u(x + r(x)); beyond the grid u continues at its edge value (as on the fixed grid)
    from ..spatial import warp_torch
    disp = r + warp_torch(u, r, "bilinear", "border")
    warped = G.sample_through(fine.moving, k, shape, disp_vox=disp) if warp else None
    return RefineOutput(fixed, u, moving_c, pred, disp, k, warped)
