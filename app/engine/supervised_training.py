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
  small corrections.
* deformable: the fixed image is ``moving(A(x + u(x)))`` with a smooth random field ``u``
  (:func:`app.engine.synthetic.random_field` on the working grid, up to ``field_max_mm``); the
  deformable net, on the moving image warped by the (frozen) pose net's ``A_pred``, regresses the
  remaining displacement ``r(x) = A_pred^-1(T(x)) - x``; loss = end-point error (mm) over the head +
  ``w_smooth`` x gradient-L2 of the field.

Validation: the mean point error (mm) and success rate (< 2 mm) on fixed synthetic pairs of the
validation subjects (same seed every time) every ``val_every`` steps.

The trainer is written with the hooks of the shared training loop (``build``, ``objective``,
``sample``, ``validate``, ``preprocessing``, ``record``) and drives them with its own small loop
(:func:`train`): Adam, cosine learning rate, checkpoint every ``ckpt_every`` steps (atomic, with the
optimiser state: ``resume`` continues it), progress and cancel.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import checkpoints
from . import datasets as D
from . import synthetic as S
from .nn import geometry as G
from .nn import losses as L
from .nn import resolve_device
from .nn.regression import SupervisedNet, endpoint_error, flow_target_loss, point_loss, run_supervised
from .nn.twostage import PairTensors
from .paradigms.base import param
from .spatial import identity_index_grid, physical_to_voxel_field, voxel_to_physical_field
from .types import Progress, ProgressFn, check_cancel

log = logging.getLogger(__name__)
STAGES = ("rigid", "affine", "affine+deformable")


@dataclass
class SupervisedTrainConfig:
    """Training options of ``supervised`` (``main.py train --paradigm supervised --param NAME=VALUE``)."""

    out: str = param("", "checkpoint file to write")
    resume: str = param("", "checkpoint (with optimiser state) to continue training from")
    init: str = param("", "supervised checkpoint to start from (its pose net; its deformable net when shapes match)")
    stage: str = param("affine", "what to train: the rigid (6) or affine (12) pose net, or the deformable net "
                                 "(pose net frozen, from init)", choices=("rigid", "affine", "deformable"))
    steps: int = param(3000, "total optimisation steps", range=(1, 10_000_000))
    batch_size: int = param(8, "pairs per step", range=(1, 256))
    lr: float = param(1e-3, "Adam learning rate", range=(1e-7, 1.0))
    lr_schedule: str = param("cosine", "constant, or cosine decay to 10 % of lr at the last step",
                             choices=("constant", "cosine"))
    val_every: int = param(250, "validate every N steps (0: only at the end)", range=(0, 10_000_000))
    ckpt_every: int = param(250, "write the checkpoint every N steps (0: only at the end)", range=(0, 10_000_000))
    seed: int = param(0, "random seed", range=(0, 2**31 - 1))
    device: str = param("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "mixed precision for the deformable net (CUDA only); the pose net stays float32")
    threads: int = param(0, "torch CPU threads (0: default)", range=(0, 256))
    data_root: str = param(str(D.DEFAULT_IXI_ROOT), "IXI folder (t1/, seg/)")
    split: str = param(str(D.DEFAULT_SPLIT), "split JSON (train / val)")
    max_train_subjects: int = param(0, "use only the first N training subjects (0: all)", range=(0, 100_000))
    max_val_pairs: int = param(16, "synthetic validation pairs (from the validation subjects; 0: none)",
                               range=(0, 100_000))
    cache_dir: str = param("", "cache preprocessed subjects here (.npz); empty: no cache")
    grid: str = param("45x60x60", "working grid z x y x x (voxels)")
    spacing_mm: float = param(4.0, "working grid spacing (isotropic, mm)", range=(0.25, 32.0))
    iterations: int = param(2, "applications of the pose net (recursive: each on the moving image warped so far)",
                            range=(1, 8))
    pose_net: str = param("flow", "pose net: 'flow' (a coarse U-Net flow, supervised densely by the known "
                                  "correspondences, then a least-squares affine fit) or 'direct' (a strided CNN "
                                  "regressing the 6 / 12 parameters)", choices=("flow", "direct"))
    channels: str = param("8,16,32,64,64", "direct pose net: channels of the stride-2 conv levels")
    pose_enc: str = param("8,16,32,32", "flow pose net: U-Net encoder channels (on the 2x pooled grid)")
    pose_dec: str = param("32,32,16", "flow pose net: decoder channels (flow at half the pooled grid)")
    w_flow: float = param(1.0, "flow pose net: weight of the end-point error of its flow against the known "
                               "correspondences (mm)", range=(0.0, 1e4))
    rot_deg: float = param(20.0, "training transforms: max rotation per axis (degrees)", range=(0.0, 90.0))
    trans_mm: float = param(25.0, "training transforms: max translation per axis (mm)", range=(0.0, 100.0))
    scale: float = param(0.15, "training transforms (affine): scales in 1 +- scale", range=(0.0, 0.5))
    shear: float = param(0.1, "training transforms (affine): shears in +- shear", range=(0.0, 0.5))
    aug_intensity: bool = param(True, "random gamma, scale and noise on each image")
    points_per_pair: int = param(512, "brain points per pair in the point-distance loss", range=(8, 100_000))
    enc: str = param("8,16,32,32", "deformable net: U-Net encoder channels per level")
    dec: str = param("32,32,16", "deformable net: decoder channels (coarsest first, down to out_level)")
    out_level: int = param(1, "deformable net: field resolution level (0 = working grid, 1 = half)", range=(0, 4))
    field_max_mm: float = param(8.0, "deformable stage: max length of the random training fields (mm)",
                                range=(0.0, 50.0))
    field_spacing_mm: float = param(40.0, "deformable stage: control-point spacing of the random fields (mm)",
                                    range=(8.0, 200.0))
    w_smooth: float = param(0.01, "deformable stage: weight of the gradient-L2 regulariser (voxels^2)",
                            range=(0.0, 1e4))

    def preprocessing(self) -> D.Preprocessing:
        try:
            shape = tuple(int(s) for s in self.grid.lower().replace(",", "x").split("x"))
        except ValueError:
            raise ValueError(f"grid must look like 45x60x60, got {self.grid!r}") from None
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"grid must be 3 sizes >= 8 (z x y x x), got {self.grid!r}")
        return D.Preprocessing(grid_shape=shape, spacing_mm=self.spacing_mm)


def _ints(text: str) -> list[int]:
    try:
        return [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def augment_intensity_torch(img: torch.Tensor, gen: torch.Generator, gamma: float = 0.3, scale: float = 0.1,
                            noise: float = 0.01) -> torch.Tensor:
    """Per-sample random gamma ``exp(U(-gamma, gamma))``, scale ``1 +- scale`` and Gaussian noise; (B, 1, D, H, W) in [0, 1]."""
    b = img.shape[0]
    u = torch.rand(b, 2, generator=gen, dtype=torch.float64).to(img.device, img.dtype)
    g = torch.exp((2 * u[:, 0] - 1) * gamma).view(b, 1, 1, 1, 1)
    s = (1 + (2 * u[:, 1] - 1) * scale).view(b, 1, 1, 1, 1)
    n = torch.randn(img.shape, generator=gen).to(img.device, img.dtype) * noise
    return (img.clamp(0, 1).pow(g) * s + n).clamp(0, 1)


def centre_of_mass_torch(img: torch.Tensor, grid_matrix: torch.Tensor) -> torch.Tensor:
    """Intensity centroids (B, 3) LPS mm of images (B, 1, D, H, W) with index->physical matrices (B, 4, 4)."""
    shape = img.shape[2:]
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=img.device) for n in shape],
                                     indexing="ij"), 0).reshape(3, -1)           # zyx index
    w = img.double().clamp_min(0).reshape(img.shape[0], -1)
    c = (w @ idx.T) / w.sum(1, keepdim=True).clamp_min(1e-12)                    # (B, 3) zyx
    ch = torch.cat([c, torch.ones_like(c[:, :1])], 1)
    return (grid_matrix @ ch[:, :, None])[:, :3, 0]


class SupervisedTrainer:
    """The hooks of one training run of ``supervised`` (see the module docstring)."""

    def __init__(self, cfg: SupervisedTrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.prep = cfg.preprocessing()
        self.subjects: list[D.Subject] = []
        self.val_items: list[dict] = []
        self.inherited: dict = {}
        self.model: Optional[SupervisedNet] = None
        self._points: list[np.ndarray] = []

    # ------------------------------------------------------------------ data
    def load_data(self, progress: Optional[ProgressFn] = None) -> None:
        cfg = self.cfg
        split = D.load_split(cfg.split)
        names = list(split["train"])[:cfg.max_train_subjects or None]
        if progress:
            progress(Progress("load", message=f"preprocessing {len(names)} training subjects"))
        cache = cfg.cache_dir or None
        self.subjects = D.load_subjects(names, self.prep, cfg.data_root, with_labels=True, cache_dir=cache)
        if any(s.labels is None or not np.any(s.labels > 0) for s in self.subjects):
            raise ValueError("supervised training needs a brain label map for every training subject (the loss "
                             "is measured on brain points)")
        self._points = [s.grid.index_to_physical(np.argwhere(s.labels > 0)[:, ::-1].astype(float)) for s in self.subjects]
        self.val_items = []
        if cfg.max_val_pairs:
            val_names = list(split.get("val", []))
            vsubj = D.load_subjects(val_names[:cfg.max_val_pairs], self.prep, cfg.data_root, True, cache)
            rng = np.random.default_rng(12345)
            for i in range(cfg.max_val_pairs):
                s = vsubj[i % len(vsubj)]
                pts = s.grid.index_to_physical(np.argwhere(s.labels > 0)[:, ::-1].astype(float))
                self.val_items.append(self._draw(s, pts, rng, val=True))
        self.train_names = names

    def _draw(self, s: D.Subject, pts: np.ndarray, rng: np.random.Generator, val: bool = False) -> dict:
        """One known pair's numpy pieces: moving subject, truth T (4x4), brain points, field."""
        cfg = self.cfg
        rigid = cfg.stage == "rigid" or (cfg.stage == "deformable" and self.model is not None
                                         and self.model.dof == 6)
        if rigid:
            t = S.random_rigid(rng, s.com, cfg.rot_deg, cfg.trans_mm)
        else:
            t = S.random_affine(rng, s.com, cfg.rot_deg, cfg.trans_mm, (1 - cfg.scale, 1 + cfg.scale), cfg.shear)
        field = None
        if cfg.stage == "deformable" and cfg.field_max_mm > 0:
            f = S.random_field(s.grid, rng, rng.uniform(0.3, 1.0) * cfg.field_max_mm, cfg.field_spacing_mm)
            field = f.array
        n = min(cfg.points_per_pair, len(pts))
        p = pts[rng.choice(len(pts), n, replace=False)]
        return {"subject": s, "truth": t, "moving_points": p, "field": field}

    # ------------------------------------------------------------------ hooks
    def preprocessing(self) -> dict:
        return self.prep.to_dict()

    def build(self, resume_ckpt: Optional[dict] = None) -> SupervisedNet:
        cfg = self.cfg
        if resume_ckpt is not None:
            return resume_ckpt["model"]
        if cfg.stage == "deformable":
            if not cfg.init:
                raise ValueError("stage=deformable trains the deformable net behind a trained pose net: give "
                                 "init=<a supervised checkpoint>")
            ck = checkpoints.load_checkpoint(cfg.init, "supervised")
            src = ck["model"]
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
            dec = _ints(cfg.pose_dec)
            pose = {"kind": "affine_flow", "enc": _ints(cfg.pose_enc), "dec": dec,
                    "out_level": len(_ints(cfg.pose_enc)) - len(dec), "input_pool": 2, "spacing_mm": cfg.spacing_mm}
        else:
            pose = {"kind": "pose_regressor", "dof": dof, "channels": _ints(cfg.channels)}
        model = SupervisedNet(pose, None, cfg.iterations)
        if cfg.init:
            ck = checkpoints.load_checkpoint(cfg.init, "supervised")
            src = ck["model"]
            own = model.pose.state_dict()
            same = {k: v for k, v in src.pose.state_dict().items() if k in own and own[k].shape == v.shape}
            model.pose.load_state_dict(same, strict=False)
            self.inherited = {"init": {"stages_loaded": {"pose": str(cfg.init)}, "tensors": len(same),
                                       "training": {k: ck["training"].get(k) for k in ("steps", "stage", "losses")}}}
        return model

    def set_trainable(self, model: SupervisedNet) -> None:
        for p in model.pose.parameters():
            p.requires_grad_(self.cfg.stage != "deformable")
        if model.deformable is not None:
            for p in model.deformable.parameters():
                p.requires_grad_(self.cfg.stage == "deformable")

    def sample(self, step: int, rng: np.random.Generator) -> list[dict]:
        out = []
        for _ in range(self.cfg.batch_size):
            i = int(rng.integers(len(self.subjects)))
            out.append(self._draw(self.subjects[i], self._points[i], rng))
        return out

    def tensors(self, items: list[dict], gen: Optional[torch.Generator], augment: bool) -> dict:
        """Batch the known pairs: make the fixed images, prealign, points (all on the device)."""
        dev = self.device
        moving = torch.as_tensor(np.stack([it["subject"].image for it in items])[:, None], dtype=torch.float32, device=dev)
        grids = torch.as_tensor(np.stack([G.grid_matrix(it["subject"].grid) for it in items]), dtype=torch.float64, device=dev)
        frames = torch.as_tensor(np.stack([G.theta_frame(it["subject"].grid) for it in items]), dtype=torch.float64, device=dev)
        truth = torch.as_tensor(np.stack([it["truth"] for it in items]), dtype=torch.float64, device=dev)
        shape = tuple(moving.shape[2:])
        k = G.index_map(grids, grids, truth)
        disp_vox = None
        if items[0]["field"] is not None:
            f_mm = torch.as_tensor(np.stack([it["field"] for it in items]), dtype=torch.float32, device=dev)
            f_mm = f_mm.permute(0, 4, 1, 2, 3)                                         # (B, 3 xyz, D, H, W)
            disp_vox = physical_to_voxel_field(f_mm, items[0]["subject"].grid)
        fixed = G.sample_through(moving, k, shape, disp_vox=disp_vox)                  # fixed(x) = moving(T(x))
        if augment and self.cfg.aug_intensity:
            fixed = augment_intensity_torch(fixed, gen)
            moving = augment_intensity_torch(moving, gen)
        p0 = torch.eye(4, dtype=torch.float64, device=dev).repeat(len(items), 1, 1)
        p0[:, :3, 3] = centre_of_mass_torch(moving, grids) - centre_of_mass_torch(fixed, grids)
        pair = PairTensors(fixed, moving, grids, grids, frames, p0)
        mp = torch.as_tensor(np.stack([it["moving_points"] for it in items]), dtype=torch.float64, device=dev)
        tinv = torch.linalg.inv(truth)
        fixed_points = mp @ tinv[:, :3, :3].transpose(1, 2) + tinv[:, None, :3, 3]      # x = T^-1 p
        return {"pair": pair, "truth": truth, "points": fixed_points, "field_vox": disp_vox}

    def objective(self, model: SupervisedNet, batch: dict, pre_iterations: int | None = None) -> dict:
        cfg = self.cfg
        pair = batch["pair"]
        parts: dict[str, torch.Tensor] = {}
        if cfg.stage != "deformable":
            out = run_supervised(model, pair, deformable=False, pre_iterations=pre_iterations)
            parts["point_mm"] = point_loss(out["affine"], batch["truth"], batch["points"])
            if out["pose_flow"] is not None and cfg.w_flow > 0:
                parts["flow_epe_mm"] = cfg.w_flow * flow_target_loss(model, out, pair, batch["truth"])
        else:
            with torch.no_grad():
                out0 = run_supervised(model, pair, deformable=False)
            out = run_supervised(model, pair, deformable=True)
            grid = self.subjects[0].grid if self.subjects else None
            target_vox = self.residual_field(out0["affine"], batch, pair)
            pred = out["field"]
            mask = (pair.fixed > 0.05).float()
            parts["epe_mm"] = endpoint_error(voxel_to_physical_field(pred.disp_vox, grid),
                                             voxel_to_physical_field(target_vox, grid), mask)
            if cfg.w_smooth > 0:
                parts["smooth"] = cfg.w_smooth * L.gradient_l2(pred.raw_vox)
        parts["total"] = sum(parts.values())
        return parts

    def residual_field(self, affine: torch.Tensor, batch: dict, pair: PairTensors) -> torch.Tensor:
        """``r(x) = A^-1(T(x)) - x`` in fixed-grid voxels (B, 3, D, H, W) zyx, where ``T(x) = T_lin(x + u(x))``."""
        shape = tuple(pair.fixed.shape[2:])
        idx = identity_index_grid(shape, pair.fixed.device, torch.float64)             # (1, 3, D, H, W) zyx
        if batch["field_vox"] is not None:
            idx = idx + batch["field_vox"].double()
        b = affine.shape[0]
        # index -> index map of A^-1 T_lin on the fixed grid: Gf^-1 A^-1 T Gf (zyx homogeneous)
        m = torch.linalg.inv(pair.fixed_grid) @ torch.linalg.inv(affine) @ batch["truth"] @ pair.fixed_grid
        pts = idx.expand(b, -1, -1, -1, -1).reshape(b, 3, -1)
        mapped = m[:, :3, :3] @ pts + m[:, :3, 3:]
        base = identity_index_grid(shape, pair.fixed.device, torch.float64).reshape(1, 3, -1)
        return (mapped - base).reshape(b, 3, *shape).float()

    @torch.no_grad()
    def validate(self, model: SupervisedNet) -> dict:
        if not self.val_items:
            return {}
        model.eval()
        errs, epes = [], []
        for i in range(0, len(self.val_items), 8):
            items = self.val_items[i:i + 8]
            batch = self.tensors(items, None, augment=False)
            out = run_supervised(model, batch["pair"], deformable=self.cfg.stage == "deformable")
            d = batch["points"] @ (out["affine"] - batch["truth"])[:, :3, :3].transpose(1, 2) + \
                (out["affine"] - batch["truth"])[:, None, :3, 3]
            errs += d.norm(dim=-1).mean(1).cpu().tolist()
            if out["field"] is not None:
                grid = items[0]["subject"].grid
                target = self.residual_field(out["affine"], batch, batch["pair"])
                mask = (batch["pair"].fixed > 0.05).float()
                epes.append(float(endpoint_error(voxel_to_physical_field(out["field"].disp_vox, grid),
                                                 voxel_to_physical_field(target, grid), mask)))
        e = np.asarray(errs)
        res = {"point_error_mm": float(e.mean()), "point_error_median_mm": float(np.median(e)),
               "success_2mm": float(np.mean(e < S.SUCCESS_MM))}
        if epes:
            res["epe_mm"] = float(np.mean(epes))
        return res

    def record(self) -> dict:
        cfg = self.cfg
        rigid = cfg.stage == "rigid"
        return {
            **self.inherited,
            "data": f"IXI T1 (DLMUSE labels for brain points), {len(self.subjects)} training subjects of {cfg.split}, "
                    f"each paired with itself under known random transforms",
            "stage": cfg.stage,
            "ranges": {"rot_deg_per_axis": cfg.rot_deg, "trans_mm_per_axis": cfg.trans_mm,
                       "scale": None if rigid else [1 - cfg.scale, 1 + cfg.scale], "shear": None if rigid else cfg.shear,
                       "field_max_mm": cfg.field_max_mm if cfg.stage == "deformable" else None,
                       "field_spacing_mm": cfg.field_spacing_mm if cfg.stage == "deformable" else None,
                       "about": "the moving image's centre of mass, after a centre-of-mass prealignment"},
            "losses": {"pose": "mean point distance (mm) over brain points" if cfg.stage != "deformable" else None,
                       "pose_flow": (f"{cfg.w_flow} x end-point error (mm) of the pose net's flow against the known "
                                     f"correspondences") if cfg.stage != "deformable" and cfg.pose_net == "flow" else None,
                       "deformable": "end-point error (mm) over the head" if cfg.stage == "deformable" else None,
                       "w_smooth": cfg.w_smooth if cfg.stage == "deformable" else None},
            "augmentation": {"intensity": cfg.aug_intensity},
            "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "seed": cfg.seed,
            "config": dataclasses.asdict(cfg),
        }


def train(cfg: SupervisedTrainConfig, progress: Optional[ProgressFn] = None,
          cancel: Optional[threading.Event] = None) -> dict:
    """Train; returns {"path", "model", "history", "val"}. Raises ValueError for bad options."""
    if not cfg.out:
        raise ValueError("out (the checkpoint file to write) is required")
    if cfg.stage not in ("rigid", "affine", "deformable"):
        raise ValueError(f"stage must be rigid, affine or deformable, got {cfg.stage!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    trainer = SupervisedTrainer(cfg, device)
    resume = checkpoints.load_checkpoint(cfg.resume, "supervised") if cfg.resume else None
    if resume is not None:
        trainer.cfg = cfg = dataclasses.replace(cfg, stage=resume["training"].get("stage", cfg.stage))
        trainer.inherited = {k: v for k, v in resume["training"].items() if k == "init"}
    model = trainer.build(resume)
    trainer.model = model
    trainer.load_data(progress)
    trainer.set_trainable(model)
    model.to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    start = 0
    if resume is not None:
        if resume.get("optimizer"):
            opt.load_state_dict(resume["optimizer"])
        start = int(resume["training"].get("steps", 0))
    seconds_before = float(resume["training"].get("seconds", 0.0)) if resume is not None else 0.0
    history, val = [], {}
    val_history = list(resume["training"].get("val_history", [])) if resume is not None else []
    out_path = Path(cfg.out)

    def save(step: int) -> None:
        training = {**trainer.record(), "steps": step, "validation": val, "val_history": val_history,
                    "loss_last100": float(np.mean([h["total"] for h in history[-100:]])) if history else None,
                    "seconds": round(time.perf_counter() - t_start + seconds_before, 1), "device": str(device)}
        checkpoints.save_checkpoint(out_path, paradigm="supervised", model=model, preprocessing=trainer.preprocessing(),
                                    training=training, optimizer=opt.state_dict())

    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(start + 1, cfg.steps + 1):
        check_cancel(cancel)
        model.train()
        if cfg.lr_schedule == "cosine":
            lr_now = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / max(cfg.steps - 1, 1))))
            for g in opt.param_groups:
                g["lr"] = lr_now
        rng = np.random.default_rng([cfg.seed, step])
        batch = trainer.tensors(trainer.sample(step, rng), gen, augment=True)
        pre = int(rng.integers(0, model.iterations)) if cfg.stage != "deformable" else None
        parts = trainer.objective(model, batch, pre)
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        opt.step()
        rec = {"step": step, **{k: float(v.detach()) for k, v in parts.items()}}
        if not math.isfinite(rec["total"]):
            raise RuntimeError(f"training diverged at step {step} (loss {rec['total']}); lower the lr")
        history.append(rec)
        if cfg.val_every and step % cfg.val_every == 0 and trainer.val_items:
            val = {"step": step, **trainer.validate(model)}
            val_history.append(val)
            log.info("step %d validation %s", step, val)
        if progress:
            msg = f"loss {rec['total']:.3f}"
            if val:
                msg += f" | val point error {val.get('point_error_mm', float('nan')):.2f} mm"
            progress(Progress("train", iteration=step, total=cfg.steps, loss=rec["total"], fraction=step / cfg.steps,
                              message=msg))
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != cfg.steps:
            save(step)
    if trainer.val_items and (not val or val.get("step") != cfg.steps):
        val = {"step": cfg.steps, **trainer.validate(model)}
        val_history.append(val)
    save(cfg.steps)
    return {"path": out_path, "model": model, "history": history, "val": val}
