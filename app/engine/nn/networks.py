"""Small registration networks that store their constructor config (checkpoints rebuild them).

* :class:`DeformableNet` - a compact 3D U-Net on (fixed, moving) that predicts a displacement or a
  stationary velocity at ``2**out_level`` times coarser than its input, integrates it (when
  diffeomorphic) and upsamples it (trilinear, rescaled) to the input grid.
* :class:`AffineNet` - a strided CNN regressing a 3x4 affine, initialised to the identity.
* :class:`RefineNet` - a light residual-field net at twice the working resolution (2 mm on the 4 mm
  models): its convolutions run on the coarse grid (space-to-depth inputs, depth-to-space head).
* :class:`TwoStageNet` - affine then deformable (then, optionally, the refinement), the DLIR-style
  model the learned paradigms ship.

``build_model(config)`` rebuilds any of them (and any kind of :mod:`.registry`) from ``model.config``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import integrate_velocity, resize_field


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def _check_pair(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    if fixed.dim() != 5 or fixed.shape != moving.shape or fixed.shape[1] != 1:
        raise ValueError(f"fixed and moving must both be (B, 1, D, H, W), got {tuple(fixed.shape)} "
                         f"and {tuple(moving.shape)}")


def _unet_features(x: torch.Tensor, down: nn.ModuleList, bottom: nn.Module, up: nn.ModuleList) -> torch.Tensor:
    """The U-Net body shared by :class:`DeformableNet` and :class:`RefineNet`: the encoder levels
    (kept as skips), the bottom conv, then each decoder conv on the upsampled features concatenated
    with the skip of its level. Returns the last decoder level's features."""
    skips = []
    for layer in down:
        x = layer(x)
        skips.append(x)
    x = bottom(x)
    for i, layer in enumerate(up):
        skip = skips[len(skips) - 2 - i]
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        x = layer(torch.cat([x, skip], 1))
    return x


class FieldPrediction(NamedTuple):
    """Output of :class:`DeformableNet`.

    disp_vox : (B, 3, D, H, W) displacement on the input grid, zyx voxels of that grid.
    raw_vox : (B, 3, d, h, w) what the head predicted at its own resolution (the velocity when
        diffeomorphic, else the coarse displacement), zyx voxels of the *input* grid; regularise it.
    """

    disp_vox: torch.Tensor
    raw_vox: torch.Tensor


class DeformableNet(nn.Module):
    """U-Net (fixed, moving) -> dense displacement, VoxelMorph-style but smaller.

    Parameters
    ----------
    enc : channels of the encoder levels; level ``k`` runs at ``2**k`` coarser than the input
        (level 0 is a stride-1 conv at input resolution).
    dec : channels of the decoder convs, from the coarsest level up to ``out_level``.
    out_level : resolution level of the predicted field (0 = input grid, 1 = half, ...).
    diffeomorphic : predict a stationary velocity and integrate it by scaling and squaring.
    int_steps : number of squarings.
    """

    def __init__(self, enc=(8, 16, 32, 32), dec=(32, 32, 16), out_level: int = 1,
                 diffeomorphic: bool = False, int_steps: int = 7):
        super().__init__()
        enc, dec = tuple(int(c) for c in enc), tuple(int(c) for c in dec)
        n_up = len(enc) - 1 - out_level
        if out_level < 0 or out_level >= len(enc) or len(dec) != n_up + 1:
            raise ValueError(f"DeformableNet: with {len(enc)} encoder levels and out_level={out_level} "
                             f"the decoder needs {max(n_up + 1, 0)} channel counts, got {len(dec)}")
        self.config = {"kind": "deformable", "enc": list(enc), "dec": list(dec), "out_level": int(out_level),
                       "diffeomorphic": bool(diffeomorphic), "int_steps": int(int_steps)}
        self.out_level = out_level
        self.diffeomorphic = diffeomorphic
        self.int_steps = int_steps
        self.down = nn.ModuleList()
        cin = 2
        for k, c in enumerate(enc):
            self.down.append(_conv(cin, c, stride=1 if k == 0 else 2))
            cin = c
        self.bottom = _conv(cin, dec[0])
        self.up = nn.ModuleList()
        cin = dec[0]
        for i in range(n_up):
            skip = enc[len(enc) - 2 - i]
            self.up.append(_conv(cin + skip, dec[i + 1]))
            cin = dec[i + 1]
        self.head = nn.Conv3d(cin, 3, 3, padding=1)
        # Start near the identity: tiny random weights, zero bias.
        nn.init.normal_(self.head.weight, 0.0, 1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> FieldPrediction:
        """fixed, moving (B, 1, D, H, W) on the same grid -> :class:`FieldPrediction`."""
        _check_pair(fixed, moving)
        x = torch.cat([fixed, moving], 1)
        x = _unet_features(x, self.down, self.bottom, self.up)
        raw_own = self.head(x)                                     # voxels of its own grid
        # Express in voxels of the input grid (the head's grid is 2**out_level coarser), then
        # integrate at the coarse resolution (cheap) and upsample.
        raw = raw_own
        if self.diffeomorphic:
            raw_own = integrate_velocity(raw_own, self.int_steps)
        disp = resize_field(raw_own, fixed.shape[2:])
        raw_in = raw * torch.tensor([f / r for f, r in zip(fixed.shape[2:], raw.shape[2:])],
                                    dtype=raw.dtype, device=raw.device).view(1, 3, 1, 1, 1)
        return FieldPrediction(disp, raw_in)


class FieldDiscriminator(nn.Module):
    """Adversarial deformation regulariser (Hu et al. 2018): a strided CNN judging a field.

    Input: a displacement (or velocity) field (B, 3, D, H, W) in voxels; output: one logit per
    field, "real" meaning drawn from the deformation prior the training loop samples
    (:func:`app.engine.training.smooth_random_fields`). Used in training only, never shipped.
    """

    def __init__(self, channels=(8, 16, 32, 32)):
        super().__init__()
        layers, cin = [], 3
        for c in channels:
            layers.append(_conv(cin, int(c), stride=2))
            cin = int(c)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, 1))

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(field))[:, 0]


class AffineNet(nn.Module):
    """Strided CNN (fixed, moving) -> affine ``theta`` (B, 3, 4), the identity at initialisation.

    ``theta`` maps fixed points to moving points in the *centred coordinates of the input grid in
    mm* along its index axes, ordered (z, y, x): ``p_moving = theta[:, :3] @ p_fixed + theta[:, 3]``
    (:func:`app.engine.nn.geometry.theta_to_physical` converts it to an LPS transform).

    Parameters
    ----------
    channels : channels of the stride-2 conv levels.
    translation_scale_mm : the translation head's unit (keeps its outputs of order 1).
    input_pool : average-pool the inputs by this factor first (an affine needs no fine detail; 2
        makes the network ~8x cheaper).
    """

    def __init__(self, channels=(8, 16, 32, 32, 32), translation_scale_mm: float = 20.0, input_pool: int = 1):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.config = {"kind": "affine", "channels": list(channels), "translation_scale_mm": float(translation_scale_mm),
                       "input_pool": int(input_pool)}
        self.input_pool = int(input_pool)
        layers, cin = [], 2
        for c in channels:
            layers.append(_conv(cin, c, stride=2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(2)       # keeps coarse position (needed for translation)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * 8, 64), nn.LeakyReLU(0.2), nn.Linear(64, 12))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)
        self.translation_scale_mm = float(translation_scale_mm)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """fixed, moving (B, 1, D, H, W) -> theta (B, 3, 4) (centred grid mm, zyx)."""
        _check_pair(fixed, moving)
        x = torch.cat([fixed, moving], 1)
        if self.input_pool > 1:
            x = F.avg_pool3d(x, self.input_pool, ceil_mode=True)
        out = self.fc(self.pool(self.features(x)))
        lin = out[:, :9].reshape(-1, 3, 3) + torch.eye(3, dtype=out.dtype, device=out.device)
        trans = out[:, 9:].reshape(-1, 3, 1) * self.translation_scale_mm
        return torch.cat([lin, trans], 2)


class FlowAffineNet(nn.Module):
    """Affine stage by dense correspondence: a coarse U-Net flow, then a weighted least-squares affine.

    The inputs are average-pooled by ``input_pool``; a :class:`DeformableNet` predicts a displacement
    ``u`` on that grid and the affine ``theta`` (same frame and convention as :class:`AffineNet`) is
    fitted in closed form to ``q -> q + u(q)`` over the fixed image's foreground (weights
    ``clamp(fixed / 0.1, 0, 1)``), with a small ridge towards the identity. Dense correspondences
    are much quicker to learn than a direct regression of 12 numbers, and the fit is exactly the
    identity at initialisation (``u`` ~ 0).

    Parameters
    ----------
    enc, dec, out_level : of the inner :class:`DeformableNet` (on the pooled grid).
    input_pool : pooling factor of the inputs.
    spacing_mm : the working grid's (isotropic) spacing, to express ``theta``'s translation in mm.
    """

    def __init__(self, enc=(16, 32, 32, 32), dec=(32, 32, 32, 16), out_level: int = 0, input_pool: int = 2,
                 spacing_mm: float = 4.0, ridge: float = 1e-3):
        super().__init__()
        self.config = {"kind": "affine_flow", "enc": [int(c) for c in enc], "dec": [int(c) for c in dec],
                       "out_level": int(out_level), "input_pool": int(input_pool), "spacing_mm": float(spacing_mm),
                       "ridge": float(ridge)}
        self.flow_net = DeformableNet(enc, dec, out_level, diffeomorphic=False)
        self.input_pool = int(input_pool)
        self.spacing_mm = float(spacing_mm)
        self.ridge = float(ridge)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, self.input_pool, ceil_mode=True) if self.input_pool > 1 else x

    def flow(self, fixed: torch.Tensor, moving: torch.Tensor) -> FieldPrediction:
        """Dense displacement on the pooled grid (pooled voxels, zyx)."""
        _check_pair(fixed, moving)
        return self.flow_net(self.pooled(fixed), self.pooled(moving))

    def fit(self, disp_vox: torch.Tensor, weights: torch.Tensor, full_shape) -> torch.Tensor:
        """Weighted least-squares affine of ``q -> q + u(q)`` in the theta frame (mm): (B, 3, 4).

        disp_vox (B, 3, d, h, w) pooled voxels; weights (B, 1, d, h, w); full_shape: working grid.
        """
        b = disp_vox.shape[0]
        dev = disp_vox.device
        st = self.input_pool
        # Centres of avg_pool's cells (ceil_mode: the last cell may be shorter), in centred mm of the
        # working grid; one pooled voxel of displacement is ``input_pool`` working voxels.
        axes = []
        for n_full, n in zip(full_shape, disp_vox.shape[2:]):
            i = torch.arange(n, dtype=torch.float64, device=dev)
            hi = torch.clamp(i * st + st, max=n_full) - 1
            axes.append(((i * st + hi) / 2 - (n_full - 1) / 2) * self.spacing_mm)
        q = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(3, -1)                   # (3, N)
        u = disp_vox.double().reshape(b, 3, -1) * (st * self.spacing_mm)                           # (B, 3, N)
        w = weights.double().reshape(b, 1, -1)
        x = torch.cat([q.expand(b, 3, -1), torch.ones_like(w)], 1)                                  # (B, 4, N)
        y = q + u                                                                                    # (B, 3, N)
        xtx = (x * w) @ x.transpose(1, 2)                                                            # (B, 4, 4)
        xty = (x * w) @ y.transpose(1, 2)                                                            # (B, 4, 3)
        lam = self.ridge * xtx.diagonal(dim1=1, dim2=2)[:, :3].sum(1).view(b, 1, 1) / 3
        reg = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=disp_vox.device))
        ident = torch.cat([torch.eye(3, dtype=torch.float64, device=disp_vox.device),
                           torch.zeros(3, 1, dtype=torch.float64, device=disp_vox.device)], 1)
        sol = torch.linalg.solve(xtx + lam * reg, xty + lam * (reg @ ident.T))                      # (B, 4, 3)
        return sol.transpose(1, 2)

    def forward_with_flow(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, FieldPrediction]:
        """(theta (B, 3, 4) float64, the pooled flow)."""
        pred = self.flow(fixed, moving)
        weights = torch.clamp(self.pooled(fixed) / 0.1, 0, 1)
        return self.fit(pred.disp_vox, weights, fixed.shape[2:]), pred

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """fixed, moving (B, 1, D, H, W) -> theta (B, 3, 4) (centred grid mm, zyx), float64."""
        return self.forward_with_flow(fixed, moving)[0]


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C * f**3, D / f, H / f, W / f): each f^3 block becomes channels."""
    b, c, d, h, w = x.shape
    if d % factor or h % factor or w % factor:
        raise ValueError(f"space_to_depth: grid {tuple(x.shape[2:])} is not divisible by {factor}")
    f = factor
    x = x.reshape(b, c, d // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * f ** 3, d // f, h // f, w // f)


def depth_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`: (B, C * f**3, d, h, w) -> (B, C, d * f, h * f, w * f)."""
    b, c, d, h, w = x.shape
    f = factor
    if c % f ** 3:
        raise ValueError(f"depth_to_space: {c} channels are not a multiple of {f ** 3}")
    x = x.reshape(b, c // f ** 3, f, f, f, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // f ** 3, d * f, h * f, w * f)


class RefineNet(nn.Module):
    """Residual field at the fine grid from (fixed, moving warped by the coarse stages), LapIRN-style.

    The inputs (fixed grid, ``factor`` times finer than the coarse working grid, e.g. 2 mm) are
    folded into channels (:func:`space_to_depth`), so every convolution runs on the coarse grid.
    A U-Net there (the layout of :class:`DeformableNet` with ``out_level=0``) ends in two heads
    whose sum is the field: a smooth one (3x3x3 conv to 3 channels on the coarse grid, upsampled
    trilinearly) and a detail one (1x1x1 conv to ``3 * factor**3`` channels unfolded by
    :func:`depth_to_space`), so the field has fine-grid degrees of freedom at the cost of a
    coarse-grid U-Net. Both heads start at ~0 (the identity).

    Parameters
    ----------
    enc : channels of the encoder levels (level 0 on the coarse grid, then stride 2 each).
    dec : channels of the decoder convs, coarsest first, down to level 0 (``len(enc)`` counts).
    factor : fine / coarse resolution ratio (2: 2 mm refinement on a 4 mm model).
    diffeomorphic : predict a stationary velocity on the fine grid and integrate it.
    int_steps : number of squarings.
    """

    def __init__(self, enc=(8, 16, 32, 32), dec=(32, 32, 16, 16), factor: int = 2,
                 diffeomorphic: bool = False, int_steps: int = 6):
        super().__init__()
        enc, dec = tuple(int(c) for c in enc), tuple(int(c) for c in dec)
        if len(enc) < 2 or len(dec) != len(enc) or int(factor) < 1:
            raise ValueError(f"RefineNet: needs >= 2 encoder levels, as many decoder channel counts and "
                             f"factor >= 1, got enc={enc}, dec={dec}, factor={factor}")
        self.config = {"kind": "refine", "enc": list(enc), "dec": list(dec), "factor": int(factor),
                       "diffeomorphic": bool(diffeomorphic), "int_steps": int(int_steps)}
        self.factor = int(factor)
        self.diffeomorphic = bool(diffeomorphic)
        self.int_steps = int(int_steps)
        self.down = nn.ModuleList()
        cin = 2 * self.factor ** 3
        for k, c in enumerate(enc):
            self.down.append(_conv(cin, c, stride=1 if k == 0 else 2))
            cin = c
        self.bottom = _conv(cin, dec[0])
        self.up = nn.ModuleList()
        cin = dec[0]
        for i in range(len(enc) - 1):
            self.up.append(_conv(cin + enc[len(enc) - 2 - i], dec[i + 1]))
            cin = dec[i + 1]
        self.head = nn.Conv3d(cin, 3, 3, padding=1)
        self.detail = nn.Conv3d(cin, 3 * self.factor ** 3, 1)
        for h in (self.head, self.detail):
            nn.init.normal_(h.weight, 0.0, 1e-5)
            nn.init.zeros_(h.bias)

    def warm_start(self, coarse: DeformableNet) -> int:
        """Copy the U-Net of a working-grid :class:`DeformableNet` with the same channels (its first
        conv spread over the folded sub-voxels, divided by ``factor**3``: on the folded inputs it
        computes what it computed on the average-pooled ones); the heads stay at ~0. Returns the
        number of tensors copied (0 when the layouts differ)."""
        if (coarse.config["enc"], coarse.config["dec"], coarse.out_level) != (self.config["enc"], self.config["dec"], 0):
            return 0
        f3 = self.factor ** 3
        src = {k: v for k, v in coarse.state_dict().items() if not k.startswith("head.")}
        w = src["down.0.0.weight"]                                        # (C, 2, 3, 3, 3)
        src["down.0.0.weight"] = w.repeat_interleave(f3, dim=1) / f3     # channel c * f3 + j <- image c
        self.load_state_dict(src, strict=False)
        return len(src)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> FieldPrediction:
        """fixed, moving (B, 1, D, H, W) on the fine grid (sizes divisible by ``factor``) ->
        :class:`FieldPrediction` in zyx voxels of that grid (``raw_vox``: the velocity when
        diffeomorphic, else the displacement)."""
        _check_pair(fixed, moving)
        x = torch.cat([space_to_depth(fixed, self.factor), space_to_depth(moving, self.factor)], 1)
        x = _unet_features(x, self.down, self.bottom, self.up)
        # the smooth head predicts in coarse voxels; resize_field converts them to fine voxels
        raw = depth_to_space(self.detail(x), self.factor) + resize_field(self.head(x), fixed.shape[2:])
        disp = integrate_velocity(raw, self.int_steps) if self.diffeomorphic else raw
        return FieldPrediction(disp, raw)


class TwoStageNet(nn.Module):
    """An affine net (applied ``affine_iterations`` times, recursively) followed by a
    :class:`DeformableNet` and, optionally, a :class:`RefineNet` at a finer grid; one state dict,
    one config (``refine`` appears in it only when present, so older checkpoints rebuild as they were)."""

    def __init__(self, affine: dict | None = None, deformable: dict | None = None, affine_iterations: int = 1,
                 refine: dict | None = None):
        super().__init__()
        if affine_iterations < 1:
            raise ValueError(f"affine_iterations must be >= 1, got {affine_iterations}")
        self.affine = build_model(affine or {"kind": "affine"})
        self.deformable = build_model(deformable or {"kind": "deformable"})
        self.affine_iterations = int(affine_iterations)
        if not isinstance(self.affine, (AffineNet, FlowAffineNet)) or not isinstance(self.deformable, DeformableNet):
            raise ValueError("TwoStageNet needs an affine and a deformable config")
        self.refine = build_model(refine) if refine else None
        if self.refine is not None and not isinstance(self.refine, RefineNet):
            raise ValueError(f"TwoStageNet: refine must be a 'refine' network config, got {refine!r}")
        self.config = {"kind": "two_stage", "affine": dict(self.affine.config),
                       "deformable": dict(self.deformable.config), "affine_iterations": self.affine_iterations}
        if self.refine is not None:
            self.config["refine"] = dict(self.refine.config)


def build_model(config: dict) -> nn.Module:
    """Rebuild a network from its ``config`` (``model.config``) through the one registry of network
    kinds (:mod:`app.engine.nn.registry`); raises ValueError if unknown."""
    from .registry import build_network
    return build_network(config)
