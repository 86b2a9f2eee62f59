"""Training of the ``supervised`` paradigm: one-shot regression learned from known transforms.

Every training pair is made from one real IXI training subject on its working grid (the inference
preprocessing, preloaded once): the subject is the moving image; the fixed image is the moving one
resampled through a random known transform ``T`` drawn about its centre of mass
(:mod:`app.engine.synthetic`'s defaults: rotations +-20 degrees per axis, translations +-25 mm,
scales 0.85-1.15, shears +-0.1; rigid stage: rotations and translations only), so
``fixed(x) = moving(T(x))`` exactly, and each image gets its own random intensity changes (gamma,
scale, noise). As at inference, the network sees the fixed image and the moving image after the
centre-of-mass prealignment ``P0``.

Losses
------
* pose (rigid / affine): :func:`app.engine.nn.regression.point_loss`, the mean distance (mm)
  between ``A(x)`` and ``T(x)`` over ``points_per_pair`` random brain points ``x`` of the fixed image
  (the moving labels > 0 mapped by ``T^-1``); the pose net is applied ``iterations`` times, training
  draws the number of earlier (gradient-free) applications at random so the net learns large and
  small corrections. With ``pose_field_mm`` > 0 the fixed image also carries a random smooth
  deformation (``fixed = moving(T(x + u(x)))``, the target still ``T``): shape variation between
  subjects that the pose net must see through.
* deformable: the fixed image is ``moving(A(x + u(x)))`` with a smooth random field ``u``
  (:func:`app.engine.synthetic.random_field` on the working grid, up to ``field_max_mm``; a bank of
  ``field_bank`` fields made once, each drawn with a random sign and size 30-100 %); the
  deformable net, on the moving image warped by the (frozen) pose net's ``A_pred``, regresses the
  remaining displacement ``r(x) = A_pred^-1(T(x)) - x``; loss = end-point error (mm) over the head +
  ``w_smooth`` x gradient-L2 of the field.

Validation: the mean point error (mm) and success rate (< 2 mm) on fixed synthetic pairs of the
validation subjects (same seed every time) every ``val_every`` steps.

The options are :class:`app.engine.paradigms.supervised.SupervisedTrainConfig`; the shared loop
(:mod:`app.engine.training.loop`) drives :class:`SupervisedTrainer`.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoints
from .. import datasets as D
from .. import synthetic as S
from ..nn import geometry as G
from ..nn import losses as L
from ..nn.regression import SupervisedNet, endpoint_error, flow_target_loss, point_loss, run_supervised
from ..nn.twostage import PairTensors
from ..spatial import identity_index_grid, physical_to_voxel_field, voxel_to_physical_field
from .config import parse_grid
from ..paradigms.base import parse_number_list
from .loop import Trainer

log = logging.getLogger(__name__)
STAGES = ("rigid", "affine", "affine+deformable")


def _ints(text: str) -> list[int]:
    return list(parse_number_list(text, int, "channel list"))


def preprocessing(cfg) -> D.Preprocessing:
    """The working grid of a supervised TrainConfig."""
    return D.Preprocessing(grid_shape=parse_grid(cfg.grid), spacing_mm=cfg.spacing_mm)


def augment_intensity_torch(img: torch.Tensor, gen: Optional[torch.Generator], gamma: float = 0.3,
                            scale: float = 0.1, noise: float = 0.01) -> torch.Tensor:
    """Per-sample random gamma ``exp(U(-gamma, gamma))``, scale ``1 +- scale`` and Gaussian noise;
    (B, 1, D, H, W) in [0, 1] -> same shape, clipped to [0, 1]."""
    b = img.shape[0]
    u = torch.rand(b, 2, generator=gen, dtype=torch.float64).to(img.device, img.dtype)
    g = torch.exp((2 * u[:, 0] - 1) * gamma).view(b, 1, 1, 1, 1)
    s = (1 + (2 * u[:, 1] - 1) * scale).view(b, 1, 1, 1, 1)
    n = torch.randn(img.shape, generator=gen).to(img.device, img.dtype) * noise
    return (img.clamp(0, 1).pow(g) * s + n).clamp(0, 1)


def centre_of_mass_torch(img: torch.Tensor, grid_matrix: torch.Tensor) -> torch.Tensor:
    """Intensity centroids (B, 3) LPS mm of images (B, 1, D, H, W) with index (zyx) -> physical
    matrices (B, 4, 4) (:func:`app.engine.nn.geometry.grid_matrix`)."""
    shape = img.shape[2:]
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=img.device) for n in shape],
                                     indexing="ij"), 0).reshape(3, -1)
    w = img.double().clamp_min(0).reshape(img.shape[0], -1)
    c = (w @ idx.T) / w.sum(1, keepdim=True).clamp_min(1e-12)
    ch = torch.cat([c, torch.ones_like(c[:, :1])], 1)
    return (grid_matrix @ ch[:, :, None])[:, :3, 0]


def residual_field(affine: torch.Tensor, truth: torch.Tensor, pair: PairTensors,
                   field_vox: Optional[torch.Tensor]) -> torch.Tensor:
    """``r(x) = A^-1(T(x)) - x`` in fixed-grid voxels (B, 3, D, H, W) zyx, ``T(x) = T_lin(x + u(x))``
    with ``u`` = ``field_vox`` (fixed-grid voxels, zyx) or 0: what the deformable net must predict
    behind the affine ``A`` (both (B, 4, 4) physical, fixed -> moving points)."""
    shape = tuple(pair.fixed.shape[2:])
    base = identity_index_grid(shape, pair.fixed.device, torch.float64)                # (1, 3, D, H, W) zyx
    idx = base if field_vox is None else base + field_vox.double()
    b = affine.shape[0]
    m = torch.linalg.inv(pair.fixed_grid) @ torch.linalg.inv(affine) @ truth @ pair.fixed_grid
    pts = idx.expand(b, -1, -1, -1, -1).reshape(b, 3, -1)
    mapped = m[:, :3, :3] @ pts + m[:, :3, 3:]
    return (mapped - base.reshape(1, 3, -1)).reshape(b, 3, *shape).float()


class SupervisedLoss(nn.Module):
    """The objective as a module (DistributedDataParallel wraps it): loss terms and their ``total``."""

    def __init__(self, model: SupervisedNet, cfg, stage: str, grid):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.stage = stage
        self._grid = [grid]            # a list: not a submodule (spacing / direction for mm conversion)

    def forward(self, pair: PairTensors, truth: torch.Tensor, points: torch.Tensor,
                field_vox: Optional[torch.Tensor] = None, pre_iterations: Optional[int] = None) -> dict:
        cfg, model = self.cfg, self.model
        parts: dict[str, torch.Tensor] = {}
        if self.stage != "deformable":
            out = run_supervised(model, pair, deformable=False, pre_iterations=pre_iterations)
            parts["point_mm"] = point_loss(out["affine"], truth, points)
            if out["pose_flow"] is not None and cfg.w_flow > 0:
                parts["flow_epe_mm"] = cfg.w_flow * flow_target_loss(model, out, pair, truth)
        else:
            out = run_supervised(model, pair, deformable=True)
            grid = self._grid[0]
            target = residual_field(out["affine"].detach(), truth, pair, field_vox)
            mask = (pair.fixed > 0.05).float()
            parts["epe_mm"] = endpoint_error(voxel_to_physical_field(out["field"].disp_vox.float(), grid),
                                             voxel_to_physical_field(target, grid), mask)
            if cfg.w_smooth > 0:
                parts["smooth"] = cfg.w_smooth * L.gradient_l2(out["field"].raw_vox)
        parts["total"] = sum(parts.values())
        return parts


class SupervisedTrainer(Trainer):
    """Known-transform pairs, the pose / deformable networks, point and end-point losses (module docstring)."""

    # ------------------------------------------------------------------ data
    def build(self, resume: Optional[dict], progress=None) -> SupervisedNet:
        cfg = self.cfg
        self.prep = D.Preprocessing.from_dict(resume["preprocessing"]) if resume is not None else preprocessing(cfg)
        self.inherited: dict = {}
        if resume is not None:
            model = resume["model"]
            self.stage = resume["training"].get("stage", cfg.stage)
            self.inherited = {k: v for k, v in resume["training"].items() if k == "init"}
        else:
            self.stage = cfg.stage
            model = self._build_model()
        self.model = model
        self._set_trainable(model)
        self._load_data(progress)
        return model

    def _build_model(self) -> SupervisedNet:
        cfg = self.cfg
        if cfg.stage == "deformable":
            if not cfg.init:
                raise ValueError("stage=deformable trains the deformable net behind a trained pose net: give "
                                 "init=<a supervised checkpoint>")
            ck = checkpoints.load_checkpoint(cfg.init, "supervised", kinds=("supervised",))
            src = ck["model"]
            if D.Preprocessing.from_dict(ck["preprocessing"]).to_dict() != self.prep.to_dict():
                self.prep = D.Preprocessing.from_dict(ck["preprocessing"])       # the pose net's own grid
            deform = {"kind": "deformable", "enc": _ints(cfg.enc), "dec": _ints(cfg.dec), "out_level": cfg.out_level}
            model = SupervisedNet(src.pose.config, deform, src.iterations)
            model.pose.load_state_dict(src.pose.state_dict(), strict=True)
            loaded = {"pose": str(cfg.init)}
            if src.deformable is not None and src.deformable.config == model.deformable.config:
                model.deformable.load_state_dict(src.deformable.state_dict(), strict=True)
                loaded["deformable"] = str(cfg.init)
            self.inherited = {"init": {"stages_loaded": loaded, "training": {
                k: ck["training"].get(k) for k in ("steps", "stage", "losses", "ranges", "validation", "init")}}}
            return model
        dof = 6 if cfg.stage == "rigid" else 12
        if cfg.pose_net == "flow":
            if dof == 6:
                raise ValueError("the flow pose net fits an affine; train stage=rigid with pose_net=direct (or use the "
                                 "affine model with stages=rigid at inference: the rigid part of its affine)")
            enc, dec = _ints(cfg.pose_enc), _ints(cfg.pose_dec)
            pose = {"kind": "affine_flow", "enc": enc, "dec": dec, "out_level": len(enc) - len(dec),
                    "input_pool": cfg.pose_pool, "spacing_mm": cfg.spacing_mm}
        else:
            pose = {"kind": "pose_regressor", "dof": dof, "channels": _ints(cfg.channels)}
        if cfg.init:
            ck = checkpoints.load_checkpoint(cfg.init)
            if ck["network"].get("kind") == "two_stage":
                # warm start from another paradigm's learned affine stage (its network, weights and grid);
                # from here on it is trained with the supervised losses only
                src = ck["model"].affine
                self.prep = D.Preprocessing.from_dict(ck["preprocessing"])
                model = SupervisedNet(src.config, None, cfg.iterations)
                model.pose.load_state_dict(src.state_dict(), strict=True)
                self.inherited = {"init": {"stages_loaded": {"pose": f"affine stage of {cfg.init}"},
                                           "paradigm": ck["paradigm"],
                                           "training": {k: ck["training"].get(k) for k in ("steps", "stage", "losses",
                                                                                            "init")}}}
                return model
        model = SupervisedNet(pose, None, cfg.iterations)
        if cfg.init:
            ck = checkpoints.load_checkpoint(cfg.init, "supervised", kinds=("supervised",))
            own = model.pose.state_dict()
            same = {k: v for k, v in ck["model"].pose.state_dict().items() if k in own and own[k].shape == v.shape}
            model.pose.load_state_dict(same, strict=False)
            self.inherited = {"init": {"stages_loaded": {"pose": str(cfg.init)}, "tensors": len(same),
                                       "training": {k: ck["training"].get(k) for k in ("steps", "stage", "losses")}}}
        return model

    def _set_trainable(self, model: SupervisedNet) -> None:
        for p in model.pose.parameters():
            p.requires_grad_(self.stage != "deformable")
        if model.deformable is not None:
            for p in model.deformable.parameters():
                p.requires_grad_(self.stage == "deformable")

    def _load_data(self, progress=None) -> None:
        cfg = self.cfg
        self.subjects = self.load_training_subjects(self.prep, True, progress)
        split, cache = D.load_split(cfg.split), cfg.cache_dir or None
        if any(s.labels is None or not np.any(s.labels > 0) for s in self.subjects):
            raise ValueError("supervised training needs a brain label map for every training subject (the loss "
                             "is measured on brain points)")
        self.points = [self._brain(s) for s in self.subjects]
        self.field_bank: list[np.ndarray] = []
        if (self.stage == "deformable" and cfg.field_max_mm > 0) or (self.stage != "deformable" and cfg.pose_field_mm > 0):
            # every working grid has the same shape, spacing and orientation: a field (xyz mm) fits any of them
            bank_rng = np.random.default_rng([cfg.seed, 77])
            self.field_bank = [S.random_field(self.subjects[0].grid, bank_rng, cfg.field_max_mm,
                                              cfg.field_spacing_mm).array for _ in range(cfg.field_bank)]
        self.val_items: list[dict] = []
        if cfg.max_val_pairs and self.rank == 0:
            vsubj = D.load_subjects(list(split.get("val", []))[:cfg.max_val_pairs], self.prep, cfg.data_root, True, cache)
            rng = np.random.default_rng(12345)            # the same validation pairs every time
            for i in range(cfg.max_val_pairs):
                s = vsubj[i % len(vsubj)]
                self.val_items.append(self._draw(s, self._brain(s), rng))
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * self.rank)

    @staticmethod
    def _brain(s: D.Subject) -> np.ndarray:
        return s.grid.index_to_physical(np.argwhere(s.labels > 0)[:, ::-1].astype(float))

    def _draw(self, s: D.Subject, pts: np.ndarray, rng: np.random.Generator) -> dict:
        """One known pair's numpy pieces: moving subject, truth ``T`` (4x4), brain points, field."""
        cfg = self.cfg
        if self.model.dof == 6:
            t = S.random_rigid(rng, s.com, cfg.rot_deg, cfg.trans_mm)
        else:
            t = S.random_affine(rng, s.com, cfg.rot_deg, cfg.trans_mm, (1 - cfg.scale, 1 + cfg.scale), cfg.shear)
        field = None
        if self.stage != "deformable" and cfg.pose_field_mm > 0:
            # shape variation the pose net must see through: fixed = moving(T(x + u(x))), target still T
            field = self.field_bank[int(rng.integers(len(self.field_bank)))] * (
                rng.choice([-1.0, 1.0]) * rng.uniform(0.0, 1.0) * cfg.pose_field_mm / max(cfg.field_max_mm, 1e-6))
        if self.stage == "deformable" and cfg.field_max_mm > 0:
            # a field of the bank (B-spline fields are ~0.1 s each to make), random sign and size
            field = self.field_bank[int(rng.integers(len(self.field_bank)))] * (
                rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.0))
        p = pts[rng.choice(len(pts), min(cfg.points_per_pair, len(pts)), replace=False)]
        return {"subject": s, "truth": t, "moving_points": p, "field": field}

    def tensors(self, items: list[dict], augment: bool) -> dict:
        """Batch known pairs: make the fixed images (``fixed(x) = moving(T(x))``), augment, prealign by the
        centres of mass, map the brain points to the fixed images; all on the device."""
        dev = self.device
        moving = torch.as_tensor(np.stack([it["subject"].image for it in items])[:, None], dtype=torch.float32, device=dev)
        grids = torch.as_tensor(np.stack([G.grid_matrix(it["subject"].grid) for it in items]), dtype=torch.float64, device=dev)
        frames = torch.as_tensor(np.stack([G.theta_frame(it["subject"].grid) for it in items]), dtype=torch.float64, device=dev)
        truth = torch.as_tensor(np.stack([it["truth"] for it in items]), dtype=torch.float64, device=dev)
        shape = tuple(moving.shape[2:])
        field_vox = None
        if items[0]["field"] is not None:
            f_mm = torch.as_tensor(np.stack([it["field"] for it in items]), dtype=torch.float32, device=dev)
            field_vox = physical_to_voxel_field(f_mm.permute(0, 4, 1, 2, 3), items[0]["subject"].grid)
        fixed = G.sample_through(moving, G.index_map(grids, grids, truth), shape, disp_vox=field_vox)
        if augment and self.cfg.aug_intensity:
            fixed = augment_intensity_torch(fixed, self.gen)
            moving = augment_intensity_torch(moving, self.gen)
        p0 = torch.eye(4, dtype=torch.float64, device=dev).repeat(len(items), 1, 1)
        p0[:, :3, 3] = centre_of_mass_torch(moving, grids) - centre_of_mass_torch(fixed, grids)
        pair = PairTensors(fixed, moving, grids, grids, frames, p0)
        mp = torch.as_tensor(np.stack([it["moving_points"] for it in items]), dtype=torch.float64, device=dev)
        tinv = torch.linalg.inv(truth)
        points = mp @ tinv[:, :3, :3].transpose(1, 2) + tinv[:, None, :3, 3]            # x = T^-1 p
        return {"pair": pair, "truth": truth, "points": points, "field_vox": field_vox}

    # ------------------------------------------------------------------ hooks
    def objective(self) -> nn.Module:
        self.loss = SupervisedLoss(self.model, self.cfg, self.stage, self.subjects[0].grid)
        return self.loss

    def sample(self, step: int, rng: np.random.Generator, step_rng: np.random.Generator) -> dict:
        cfg = self.cfg
        glob = step_rng.integers(len(self.subjects), size=cfg.batch_size * self.world)
        mine = glob[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        batch = self.tensors([self._draw(self.subjects[i], self.points[i], rng) for i in mine], augment=True)
        if self.stage != "deformable":
            batch["pre_iterations"] = int(step_rng.integers(0, self.model.iterations))
        return batch

    def preprocessing(self) -> dict:
        return self.prep.to_dict()

    @torch.no_grad()
    def validate(self) -> dict:
        if not self.val_items:
            return {}
        model = self.model
        model.eval()
        errs, epes = [], []
        for i in range(0, len(self.val_items), 8):
            items = self.val_items[i:i + 8]
            batch = self.tensors(items, augment=False)
            out = run_supervised(model, batch["pair"], deformable=self.stage == "deformable")
            diff = out["affine"] - batch["truth"]
            d = batch["points"] @ diff[:, :3, :3].transpose(1, 2) + diff[:, None, :3, 3]
            errs += d.norm(dim=-1).mean(1).cpu().tolist()
            if out["field"] is not None:
                grid = items[0]["subject"].grid
                target = residual_field(out["affine"], batch["truth"], batch["pair"], batch["field_vox"])
                mask = (batch["pair"].fixed > 0.05).float()
                epes.append(float(endpoint_error(voxel_to_physical_field(out["field"].disp_vox.float(), grid),
                                                 voxel_to_physical_field(target, grid), mask)))
        e = np.asarray(errs)
        res = {"point_error_mm": float(e.mean()), "point_error_median_mm": float(np.median(e)),
               "success_2mm": float(np.mean(e < S.SUCCESS_MM))}
        if epes:
            res["epe_mm"] = float(np.mean(epes))
        return res

    def summary(self, val: dict) -> str:
        s = f"point error {val.get('point_error_mm', float('nan')):.2f} mm"
        if "epe_mm" in val:
            s += f", field EPE {val['epe_mm']:.2f} mm"
        return s

    def record(self) -> dict:
        cfg = self.cfg
        rigid = self.model.dof == 6
        deform = self.stage == "deformable"
        return {
            **self.inherited,
            "data": f"IXI T1 (DLMUSE labels for brain points), {len(self.subjects)} training subjects of {cfg.split}, "
                    f"each paired with itself under known random transforms",
            "stage": self.stage,
            "ranges": {"rot_deg_per_axis": cfg.rot_deg, "trans_mm_per_axis": cfg.trans_mm,
                       "scale": None if rigid else [1 - cfg.scale, 1 + cfg.scale], "shear": None if rigid else cfg.shear,
                       "field_max_mm": cfg.field_max_mm if deform else None,
                       "field_spacing_mm": cfg.field_spacing_mm if deform else None,
                       "about": "the moving image's centre of mass, after a centre-of-mass prealignment"},
            "losses": {"pose": None if deform else "mean point distance (mm) over brain points",
                       "pose_flow": (f"{cfg.w_flow} x end-point error (mm) of the pose net's flow against the known "
                                     f"correspondences") if not deform and cfg.pose_net == "flow" else None,
                       "deformable": "end-point error (mm) over the head" if deform else None,
                       "w_smooth": cfg.w_smooth if deform else None},
            "augmentation": {"intensity": cfg.aug_intensity},
        }
