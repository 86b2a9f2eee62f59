"""Networks of the supervised paradigm: one-shot regression of a rigid / affine transform and of a
dense field, trained on pairs whose transform is known (:mod:`app.engine.synthetic`).

* :class:`PoseRegressor` - a strided CNN on the (fixed, moving) working images that regresses 6
  (rigid) or 12 (affine) parameters, a residual around the identity in physical units about the
  working grid's centre (the *theta frame* of :mod:`app.engine.nn.geometry`: mm along the grid's
  index axes, zyx, centred):

      rigid:  theta = [ exp([w]x) | t ]                 w: rotation vector (rad), t: mm
      affine: theta = [ exp([w]x) (I + sym(s)) | t ]    s: 6 stretch/shear numbers (polar form)

  The polar form keeps the rotation a rotation at any angle (``I + M`` would have to learn
  ``cos``/``sin`` in 9 entries) and makes the rigid model the affine model with ``s = 0``.
* :class:`SupervisedNet` - the shipped model: a :class:`PoseRegressor` (applied ``iterations``
  times, each time to the moving image warped by the result so far) and optionally a
  :class:`~app.engine.nn.networks.DeformableNet` that regresses the remaining displacement.

The training loss (:func:`point_loss`) is the distance in mm between where the predicted and the
true transforms send the fixed image's brain points. Raw parameter MSE is the wrong loss: a
rotation of 1 degree moves points ~1.2 mm at 70 mm from the centre while a 1 mm translation moves
them 1 mm, so any fixed weighting between angle and millimetre errors is arbitrary and depends on
the head's size; scale and shear have yet other units. The point distance is the quantity the
evaluation reports (mean point error), weighs every parameter by its actual effect on the anatomy,
and is invariant to how the transform is parameterised.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .networks import AffineNet, DeformableNet, FlowAffineNet, _check_pair, _conv


def skew(w: torch.Tensor) -> torch.Tensor:
    """(B, 3) -> (B, 3, 3) cross-product matrices ``[w]x``."""
    z = torch.zeros_like(w[:, 0])
    return torch.stack([torch.stack([z, -w[:, 2], w[:, 1]], -1),
                        torch.stack([w[:, 2], z, -w[:, 0]], -1),
                        torch.stack([-w[:, 1], w[:, 0], z], -1)], 1)


def params_to_theta(p: torch.Tensor, rot_scale: float, trans_scale_mm: float, stretch_scale: float) -> torch.Tensor:
    """Network outputs (B, 6) or (B, 12) -> theta (B, 3, 4) (see the module docstring).

    Outputs of 0 give the identity. Order: rotation vector (3), translation (3), stretch (6:
    diagonal zz, yy, xx then off-diagonal zy, zx, yx).
    """
    if p.dim() != 2 or p.shape[1] not in (6, 12):
        raise ValueError(f"expected (B, 6) or (B, 12) parameters, got {tuple(p.shape)}")
    w = p[:, :3] * rot_scale
    t = p[:, 3:6] * trans_scale_mm
    lin = torch.linalg.matrix_exp(skew(w))
    if p.shape[1] == 12:
        s = p[:, 6:] * stretch_scale
        sym = torch.diag_embed(s[:, :3])
        off = torch.zeros_like(sym)
        off[:, 0, 1], off[:, 0, 2], off[:, 1, 2] = s[:, 3], s[:, 4], s[:, 5]
        sym = sym + off + off.transpose(1, 2)
        lin = lin @ (torch.eye(3, dtype=p.dtype, device=p.device) + sym)
    return torch.cat([lin, t[:, :, None]], 2)


class PoseRegressor(nn.Module):
    """Strided CNN (fixed, moving) -> theta (B, 3, 4), the identity at initialisation.

    ``theta`` maps fixed points to moving points in the centred mm frame of the input grid, axes
    (z, y, x) (same convention as :class:`~app.engine.nn.networks.AffineNet`;
    :func:`app.engine.nn.geometry.theta_to_physical` turns it into an LPS transform).

    Parameters
    ----------
    dof : 6 (rigid) or 12 (affine).
    channels : channels of the stride-2 conv levels (one extra stride-1 conv at levels >= 1).
    rot_scale : radians per unit output (0.35 ~ 20 degrees).
    trans_scale_mm : mm per unit output.
    stretch_scale : per unit output of the symmetric stretch.
    """

    def __init__(self, dof: int = 12, channels=(8, 16, 32, 64, 64), rot_scale: float = 0.35,
                 trans_scale_mm: float = 20.0, stretch_scale: float = 0.1, hidden: int = 128):
        super().__init__()
        if dof not in (6, 12):
            raise ValueError(f"dof must be 6 (rigid) or 12 (affine), got {dof}")
        channels = tuple(int(c) for c in channels)
        self.config = {"kind": "pose_regressor", "dof": int(dof), "channels": list(channels),
                       "rot_scale": float(rot_scale), "trans_scale_mm": float(trans_scale_mm),
                       "stretch_scale": float(stretch_scale), "hidden": int(hidden)}
        self.dof = int(dof)
        layers, cin = [], 2
        for k, c in enumerate(channels):
            layers.append(_conv(cin, c, stride=2))
            if 1 <= k <= 2:
                layers.append(_conv(c, c))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(2)          # keeps coarse position (translation)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * 8, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, dof))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    def parameters_out(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """fixed, moving (B, 1, D, H, W) -> raw outputs (B, dof)."""
        _check_pair(fixed, moving)
        return self.fc(self.pool(self.features(torch.cat([fixed, moving], 1))))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """fixed, moving (B, 1, D, H, W) on the same grid -> theta (B, 3, 4), float32 (centred mm, zyx)."""
        c = self.config
        return params_to_theta(self.parameters_out(fixed, moving), c["rot_scale"], c["trans_scale_mm"],
                               c["stretch_scale"])


class SupervisedNet(nn.Module):
    """The supervised paradigm's model: a :class:`PoseRegressor` (``iterations`` applications) and an
    optional :class:`DeformableNet`; one state dict, one config.

    ``stages`` says what it was trained to do: 'rigid' (dof 6), 'affine' (dof 12) or
    'affine+deformable' (dof 12 and a deformable net).
    """

    def __init__(self, pose: dict | None = None, deformable: dict | None = None, iterations: int = 1):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        pose = dict(pose or {"kind": "pose_regressor"})
        kind = pose.pop("kind", "pose_regressor")
        if kind == "pose_regressor":
            self.pose = PoseRegressor(**pose)
        elif kind == "affine_flow":
            self.pose = FlowAffineNet(**pose)
        elif kind == "affine":
            self.pose = AffineNet(**pose)
        else:
            raise ValueError(f"SupervisedNet: the pose net must be 'pose_regressor', 'affine' or 'affine_flow', "
                             f"got {kind!r}")
        self.deformable = None
        if deformable:
            d = dict(deformable)
            d.pop("kind", None)
            self.deformable = DeformableNet(**d)
        self.iterations = int(iterations)
        self.config = {"kind": "supervised", "pose": dict(self.pose.config),
                       "deformable": dict(self.deformable.config) if self.deformable is not None else None,
                       "iterations": self.iterations}

    @property
    def dof(self) -> int:
        """6 (rigid) or 12 (affine) parameters."""
        return getattr(self.pose, "dof", 12)

    @property
    def stages(self) -> str:
        if self.deformable is not None:
            return "affine+deformable"
        return "rigid" if self.dof == 6 else "affine"


def point_loss(predicted: torch.Tensor, truth: torch.Tensor, points: torch.Tensor,
               weights: torch.Tensor | None = None, eps_mm: float = 0.1) -> torch.Tensor:
    """Mean distance (mm) between ``predicted(x)`` and ``truth(x)`` over points ``x``.

    Parameters
    ----------
    predicted, truth : (B, 4, 4) physical transforms (fixed -> moving points, LPS mm).
    points : (B, P, 3) fixed physical points (LPS mm), e.g. brain voxels.
    weights : (B, P) or None; 0 marks padding points.
    eps_mm : ``sqrt(d^2 + eps^2)``: smooth at zero, ~``d`` beyond a few tenths of a mm.

    Returns
    -------
    Scalar: the (weighted) mean over batch and points.
    """
    if predicted.shape != truth.shape or predicted.shape[1:] != (4, 4):
        raise ValueError(f"predicted and truth must be (B, 4, 4), got {tuple(predicted.shape)} and {tuple(truth.shape)}")
    if points.dim() != 3 or points.shape[0] != predicted.shape[0] or points.shape[2] != 3:
        raise ValueError(f"points must be (B, P, 3), got {tuple(points.shape)}")
    diff = predicted - truth
    d = points @ diff[:, :3, :3].transpose(1, 2) + diff[:, None, :3, 3]
    dist = torch.sqrt((d ** 2).sum(-1) + eps_mm ** 2)
    if weights is None:
        return dist.mean()
    return (dist * weights).sum() / weights.sum().clamp_min(1e-12)


def endpoint_error(predicted_mm: torch.Tensor, truth_mm: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean end-point error (mm) of displacement fields (B, 3, D, H, W), optionally over a mask (B, 1, D, H, W)."""
    if predicted_mm.shape != truth_mm.shape or predicted_mm.dim() != 5 or predicted_mm.shape[1] != 3:
        raise ValueError(f"fields must both be (B, 3, D, H, W), got {tuple(predicted_mm.shape)} and {tuple(truth_mm.shape)}")
    epe = torch.sqrt(((predicted_mm - truth_mm) ** 2).sum(1, keepdim=True) + 1e-6)
    if mask is None:
        return epe.mean()
    return (epe * mask).sum() / mask.sum().clamp_min(1e-12)


def run_supervised(model: SupervisedNet, pair, deformable: bool = True, pre_iterations: int | None = None) -> dict:
    """The forward pass shared by training and inference.

        start   = pair.init (centre-of-mass prealignment), then ``pre_iterations`` applications of
                  the pose net without gradients, each on the moving image warped so far
        theta   = pose(fixed, moving o start)                 (theta frame of the fixed grid)
        A       = start o C theta C^-1                        (physical, fixed -> moving points)
        u       = deformable(fixed, moving o A)               (fixed-grid voxels, zyx), when asked

    so ``T(x) = A(x + u(x))``. ``pair`` is a :class:`~app.engine.nn.twostage.PairTensors`.

    Returns {"theta" (B, 3, 4), "affine" (B, 4, 4) float64, "index_affine" (B, 4, 4),
    "moving_affine" (B, 1, D, H, W), "field": FieldPrediction or None, "moving_warped" or None}.
    """
    from . import geometry as G
    shape = tuple(pair.fixed.shape[2:])
    n_pre = model.iterations - 1 if pre_iterations is None else int(pre_iterations)
    start = pair.init
    if n_pre > 0:
        with torch.no_grad():
            for _ in range(n_pre):
                mk = G.sample_through(pair.moving, G.index_map(pair.fixed_grid, pair.moving_grid, start), shape)
                start = start @ G.theta_to_physical(model.pose(pair.fixed, mk).double(), pair.frame)
    moving0 = G.sample_through(pair.moving, G.index_map(pair.fixed_grid, pair.moving_grid, start), shape)
    pose_flow = None
    if hasattr(model.pose, "forward_with_flow"):
        theta, pose_flow = model.pose.forward_with_flow(pair.fixed, moving0)
    else:
        theta = model.pose(pair.fixed, moving0)
    theta = theta.double()
    affine = start @ G.theta_to_physical(theta, pair.frame)
    k = G.index_map(pair.fixed_grid, pair.moving_grid, affine)
    out = {"theta": theta, "affine": affine, "index_affine": k, "field": None, "moving_warped": None,
           "moving_affine": None, "start": start, "pose_flow": pose_flow}
    if deformable and model.deformable is not None:
        moving_affine = G.sample_through(pair.moving, k.detach(), shape)
        pred = model.deformable(pair.fixed, moving_affine)
        out.update(moving_affine=moving_affine, field=pred,
                   moving_warped=G.sample_through(pair.moving, k.detach(), shape, disp_vox=pred.disp_vox))
    return out


def flow_target_loss(model: SupervisedNet, out: dict, pair, truth: torch.Tensor) -> torch.Tensor:
    """End-point error (mm) of a flow pose net's dense correspondences against the known transform.

    The flow ``u`` of :class:`~app.engine.nn.networks.FlowAffineNet` (pooled voxels, zyx) maps the
    fixed image's cell centres ``q`` (theta frame: centred mm along the grid axes, zyx) to
    ``q + u(q)`` in the moving image as prealigned by ``start``; the truth is ``R q`` with
    ``R = C^-1 start^-1 T C``. Weighted by the fixed foreground (the weights of the affine fit).
    """
    from . import geometry as G  # noqa: F401
    pose = model.pose
    flow = out["pose_flow"].disp_vox.double()                                  # (B, 3, d, h, w)
    b = flow.shape[0]
    full = tuple(pair.fixed.shape[2:])
    st, sp = pose.input_pool, pose.spacing_mm
    axes = []
    for n_full, n in zip(full, flow.shape[2:]):
        i = torch.arange(n, dtype=torch.float64, device=flow.device)
        hi = torch.clamp(i * st + st, max=n_full) - 1
        axes.append(((i * st + hi) / 2 - (n_full - 1) / 2) * sp)
    q = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(3, -1)   # (3, N)
    c = pair.frame.double()
    r = torch.linalg.inv(c) @ torch.linalg.inv(out["start"]) @ truth @ c       # theta frame, (B, 4, 4)
    target = r[:, :3, :3] @ q + r[:, :3, 3:] - q                               # (B, 3, N) mm
    u = flow.reshape(b, 3, -1) * (st * sp)
    w = torch.clamp(pose.pooled(pair.fixed) / 0.1, 0, 1).double().reshape(b, -1)
    epe = torch.sqrt(((u - target) ** 2).sum(1) + 1e-6)
    return (epe * w).sum() / w.sum().clamp_min(1e-12)
