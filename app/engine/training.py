"""One training loop for the learned two-stage paradigms (``unsupervised``, ``weakly``).

``train(TrainConfig(...), progress, cancel) -> checkpoint path``. Subjects of the fixed split are
preprocessed once (the inference preprocessing) and kept in memory; every step samples random
(fixed, moving) pairs, augments them (random affine on the moving image, random intensity
changes), runs :func:`app.engine.nn.twostage.run_two_stage` and minimises

* ``affine`` stage:     ``w_sim * sim(fixed, moving o A)`` ``[+ w_selfsup * |A x - x|^2]`` on
                        *self pairs* (a subject and its own randomly transformed copy, whose
                        correct transform is known: self-supervision, no labels);
* ``deformable`` stage: ``w_sim * sim(fixed, moving o A o (id + u)) + w_smooth * |grad u|^2``
                        ``[+ w_dice * Dice loss of warped labels (weakly)]``
                        ``[+ w_adv * adversarial term]``; affine frozen;
* ``joint``:            both, all weights trained.

The adversarial deformation regulariser (``w_adv`` > 0, Hu et al. 2018) trains a small
discriminator, one Adam step per training step, to tell the predicted fields from smooth random
fields of the same RMS size (:func:`smooth_random_fields`); the registration net is penalised when
the discriminator spots its field. The discriminator is a training aid: it is neither saved nor
resumed.

Stages are trained one after the other (DLIR): ``init`` / ``init_affine`` carry the weights of
earlier stages over. Validation Dice (working resolution, nearest-neighbour labels) on the split's
``val_pairs`` every ``val_every`` steps; a checkpoint every ``ckpt_every`` steps (atomic, with the
optimiser state: ``resume`` continues it); mixed precision on CUDA. Under ``torchrun``
(``WORLD_SIZE`` > 1) it runs DistributedDataParallel (NCCL on GPUs, gloo on CPU): every rank
takes its own slice of each step's global pair list and rank 0 validates and writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
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
from .nn import geometry as G
from .nn import losses as L
from .nn import resolve_device
from .nn.networks import TwoStageNet
from .spatial import warp_torch
from .nn.twostage import PairTensors, run_two_stage, warp_labels_nearest, warp_labels_onehot
from .paradigms.base import param
from .types import Cancelled, Progress, ProgressFn, check_cancel

log = logging.getLogger(__name__)
LEARNED_KEYS = ("unsupervised", "weakly")


@dataclass
class TrainConfig:
    """Training options (``main.py train --param NAME=VALUE``)."""

    paradigm: str = param("unsupervised", "learned paradigm to train", choices=LEARNED_KEYS)
    out: str = param("", "checkpoint file to write")
    stage: str = param("joint", "what to train: the affine net, the deformable net (affine frozen) or both",
                       choices=("affine", "deformable", "joint"))
    init: str = param("", "checkpoint to start from: its affine stage always, its deformable stage when the configs match")
    resume: str = param("", "checkpoint (with optimiser state) to continue training from")
    diffeomorphic: bool = param(False, "deformable stage predicts a stationary velocity (scaling and squaring)")
    dual: bool = param(True, "weakly: image similarity in addition to the label Dice loss")
    steps: int = param(2000, "total optimisation steps", range=(1, 10_000_000))
    batch_size: int = param(1, "pairs per step (per process)", range=(1, 64))
    lr: float = param(1e-3, "Adam learning rate", range=(1e-7, 1.0))
    lr_schedule: str = param("cosine", "constant, or cosine decay to 10 % of lr at the last step",
                             choices=("constant", "cosine"))
    grid: str = param("45x60x60", "working grid z x y x x (voxels)")
    spacing_mm: float = param(4.0, "working grid spacing (isotropic, mm)", range=(0.25, 32.0))
    affine_kind: str = param("flow", "affine stage: 'flow' (coarse U-Net flow + least-squares affine fit) or "
                                     "'regression' (CNN regressing the 12 parameters)", choices=("flow", "regression"))
    affine_iterations: int = param(0, "recursive applications of the affine net (training draws 1..N at random); "
                                      "0: the affine checkpoint's own number (init / init_affine), else 1",
                                   range=(0, 8))
    init_affine: str = param("", "checkpoint whose affine stage replaces the one from init")
    affine_channels: str = param("8,16,32,32,32", "regression affine net: channels per stride-2 level")
    affine_pool: int = param(2, "affine net: average-pool its inputs by this factor first", range=(1, 4))
    w_affine_dense: float = param(1.0, "flow affine net: weight of the similarity of its dense (pooled) warp "
                                       "(+ w_smooth x its smoothness), which teaches the flow quickly", range=(0.0, 1e4))
    enc: str = param("8,16,32,32", "U-Net encoder channels per level")
    dec: str = param("32,32,16", "U-Net decoder channels (coarsest first, down to out_level)")
    out_level: int = param(1, "field resolution level of the U-Net (0 = working grid, 1 = half)", range=(0, 4))
    int_steps: int = param(7, "scaling-and-squaring steps (diffeomorphic)", range=(0, 12))
    similarity: str = param("lncc", "image similarity", choices=("lncc", "mse", "mi"))
    lncc_window: int = param(5, "local NCC window (voxels of the working grid, odd)", range=(1, 21))
    w_sim: float = param(1.0, "weight of the image similarity", range=(0.0, 1e4))
    w_affine_sim: float = param(1.0, "joint stage: weight of the affine-stage similarity", range=(0.0, 1e4))
    w_smooth: float = param(1.0, "weight of the gradient-L2 regulariser (voxels^2)", range=(0.0, 1e4))
    w_dice: float = param(1.0, "weakly: weight of the Dice loss on warped labels", range=(0.0, 1e4))
    dice_labels: int = param(32, "weakly: labels drawn at random per step for the Dice loss", range=(1, 256))
    w_adv: float = param(0.0, "deformable stage: weight of the adversarial deformation regulariser (a discriminator "
                              "trained to tell the predicted fields from smooth random ones, Hu et al. 2018); 0: off",
                         range=(0.0, 1e4))
    adv_lr: float = param(1e-4, "Adam learning rate of the discriminator (w_adv > 0)", range=(1e-7, 1.0))
    aug_rot_deg: float = param(10.0, "augmentation: max rotation per axis (degrees)", range=(0.0, 180.0))
    aug_scale: float = param(0.1, "augmentation: max relative scaling", range=(0.0, 0.5))
    aug_trans_mm: float = param(10.0, "augmentation: max translation per axis (mm)", range=(0.0, 100.0))
    aug_intensity: bool = param(True, "augmentation: random gamma, scale and noise")
    self_pairs: float = param(0.0, "affine/joint stages: fraction of pairs made of a subject and its own randomly "
                                   "transformed copy, whose known transform also supervises the affine stage "
                                   "(self-supervised: no labels)", range=(0.0, 1.0))
    w_selfsup: float = param(1.0, "weight of the self-supervised affine error (mean squared point error, cm^2)",
                             range=(0.0, 1e4))
    val_every: int = param(200, "validate every N steps (0: only at the end)", range=(0, 10_000_000))
    ckpt_every: int = param(500, "write the checkpoint every N steps (0: only at the end)", range=(0, 10_000_000))
    seed: int = param(0, "random seed", range=(0, 2**31 - 1))
    device: str = param("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "mixed precision (CUDA only)")
    data_root: str = param(str(D.DEFAULT_IXI_ROOT), "IXI folder (t1/, seg/)")
    split: str = param(str(D.DEFAULT_SPLIT), "split JSON (train / val / val_pairs)")
    max_train_subjects: int = param(0, "use only the first N training subjects (0: all)", range=(0, 100_000))
    max_val_pairs: int = param(10, "validation pairs used (0: none)", range=(0, 100_000))
    cache_dir: str = param("", "cache preprocessed subjects here (.npz); empty: no cache")
    threads: int = param(0, "torch CPU threads (0: default)", range=(0, 256))

    def preprocessing(self) -> D.Preprocessing:
        try:
            shape = tuple(int(s) for s in self.grid.lower().replace(",", "x").split("x"))
        except ValueError:
            raise ValueError(f"grid must look like 45x60x60, got {self.grid!r}") from None
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"grid must be 3 sizes >= 8 (z x y x x), got {self.grid!r}")
        return D.Preprocessing(grid_shape=shape, spacing_mm=self.spacing_mm)

    def network_config(self) -> dict:
        def ints(s):
            return [int(c) for c in str(s).split(",") if c.strip()]
        if self.affine_kind == "flow":
            affine = {"kind": "affine_flow", "input_pool": self.affine_pool, "spacing_mm": self.spacing_mm}
        else:
            affine = {"kind": "affine", "channels": ints(self.affine_channels), "input_pool": self.affine_pool}
        return {"kind": "two_stage", "affine": affine, "affine_iterations": max(1, self.affine_iterations),
                "deformable": {"kind": "deformable", "enc": ints(self.enc), "dec": ints(self.dec),
                               "out_level": self.out_level, "diffeomorphic": self.diffeomorphic,
                               "int_steps": self.int_steps}}


# --------------------------------------------------------------------------- helpers
def similarity_loss(name: str, window: int = 5):
    """The image similarity as a loss function ``f(fixed, warped) -> scalar``."""
    if name == "lncc":
        return lambda a, b: L.lncc(a, b, window)
    if name == "mse":
        return L.mse
    if name == "mi":
        return L.mutual_information
    raise ValueError(f"unknown similarity '{name}' (lncc, mse, mi)")


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> float:
    """Mean Dice over the non-zero labels present in ``fixed_labels`` (absent in warped: 0)."""
    f = np.asarray(fixed_labels).ravel().astype(np.int64)
    w = np.asarray(warped_labels).ravel().astype(np.int64)
    n = int(max(f.max(initial=0), w.max(initial=0))) + 1
    inter = np.bincount(f[f == w], minlength=n)
    sf, sw = np.bincount(f, minlength=n), np.bincount(w, minlength=n)
    ids = np.nonzero(sf)[0]
    ids = ids[ids != 0]
    if len(ids) == 0:
        return float("nan")
    return float(np.mean(2 * inter[ids] / (sf[ids] + sw[ids])))


def fold_fraction_vox(disp_vox: np.ndarray) -> float:
    """Fraction of voxels where ``det(I + grad u) <= 0``; ``disp_vox`` (3, D, H, W) zyx voxels."""
    grads = [np.gradient(disp_vox[c], axis=(0, 1, 2)) for c in range(3)]
    j = np.empty(disp_vox.shape[1:] + (3, 3))
    for r in range(3):
        for c in range(3):
            j[..., r, c] = grads[r][c] + (1.0 if r == c else 0.0)
    return float(np.mean(np.linalg.det(j) <= 0))


def smooth_random_fields(like: torch.Tensor, generator: torch.Generator, coarse: int = 4) -> torch.Tensor:
    """The deformation prior of the adversarial regulariser: smooth random fields shaped like ``like``.

    Gaussian noise on a lattice ``coarse`` times coarser than the field, trilinearly upsampled (a
    piecewise-smooth field), each sample scaled to the RMS magnitude of the matching sample of
    ``like``: the discriminator then judges the *shape* (smoothness, spatial structure) of a field,
    not its size.
    """
    b, c = like.shape[:2]
    small = [max(2, s // coarse + 1) for s in like.shape[2:]]
    noise = torch.randn((b, c, *small), generator=generator, device="cpu").to(like.device, like.dtype)
    field = torch.nn.functional.interpolate(noise, size=like.shape[2:], mode="trilinear", align_corners=True)
    rms = lambda t: t.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt()
    return field * (rms(like) / rms(field).clamp_min(1e-8))


def pair_tensors(fixed: D.Subject, moving: D.Subject, init: np.ndarray | None = None,
                 fixed_image: np.ndarray | None = None, moving_image: np.ndarray | None = None) -> dict:
    """Per-pair numpy pieces for :meth:`PairTensors.from_numpy` (init defaults to the prealignment)."""
    if init is None:
        init = G.translation(moving.com - fixed.com)
    return dict(fixed=fixed.image if fixed_image is None else fixed_image,
                moving=moving.image if moving_image is None else moving_image,
                fixed_grid=G.grid_matrix(fixed.grid), moving_grid=G.grid_matrix(moving.grid),
                frame=G.theta_frame(fixed.grid), init=init)


def stack_pairs(items: list[dict], device) -> PairTensors:
    keys = ("fixed", "moving", "fixed_grid", "moving_grid", "frame", "init")
    return PairTensors.from_numpy(*([it[k] for it in items] for k in keys), device=device)


class TwoStageLoss(nn.Module):
    """The training objective as a module (so DistributedDataParallel can wrap it)."""

    def __init__(self, model: TwoStageNet, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.sim = similarity_loss(cfg.similarity, cfg.lncc_window)
        self.autocast = None
        self.discriminator: Optional[nn.Module] = None    # set when cfg.w_adv > 0
        self.last_field: Optional[torch.Tensor] = None

    def forward(self, pair: PairTensors, fixed_onehot: Optional[torch.Tensor] = None,
                moving_labels: Optional[torch.Tensor] = None, label_ids: Optional[torch.Tensor] = None,
                self_points: Optional[torch.Tensor] = None, affine_pre_iterations: Optional[int] = None) -> dict:
        """Loss terms (and their sum, ``total``) for one batch.

        ``self_points`` (B, P, 4) homogeneous physical points (xyz mm, 1) of the fixed images for the
        pairs that are a subject and its own transformed copy (all zeros for the others): for those
        the correct full affine is the identity, and ``mean |A x - x|^2`` (cm^2) is added.
        """
        cfg = self.cfg
        stage = cfg.stage
        out = run_two_stage(self.model, pair, deformable=stage != "affine", train_affine=stage != "deformable",
                            autocast=self.autocast, affine_pre_iterations=affine_pre_iterations)
        shape = tuple(pair.fixed.shape[2:])
        parts: dict[str, torch.Tensor] = {}
        weakly = cfg.paradigm == "weakly" and fixed_onehot is not None
        if stage in ("affine", "joint"):
            w = cfg.w_sim if stage == "affine" else cfg.w_affine_sim
            if w > 0:
                parts["sim_affine"] = w * self.sim(pair.fixed, out.moving_affine)
            if out.affine_flow is not None and cfg.w_affine_dense > 0:
                pool = self.model.affine.pooled
                dense = warp_torch(pool(out.moving_init), out.affine_flow.disp_vox.to(pair.fixed.dtype))
                parts["sim_affine_dense"] = cfg.w_affine_dense * self.sim(pool(pair.fixed), dense)
                parts["smooth_affine_dense"] = cfg.w_affine_dense * cfg.w_smooth * L.gradient_l2(out.affine_flow.raw_vox)
            if self_points is not None and cfg.w_selfsup > 0:
                mapped = self_points @ out.affine.transpose(1, 2)              # (B, P, 4)
                err = ((mapped - self_points)[..., :3] ** 2).sum(-1)           # zero for non-self pairs
                n = (self_points[..., 3] != 0).sum().clamp_min(1)
                parts["selfsup"] = cfg.w_selfsup * err.sum() / n / 100.0
            if weakly and stage == "affine":
                warped = warp_labels_onehot(moving_labels, label_ids, out.index_affine, shape)
                parts["dice_affine"] = cfg.w_dice * L.dice_loss(fixed_onehot, warped)
        if stage in ("deformable", "joint"):
            if cfg.paradigm != "weakly" or cfg.dual or not weakly:
                parts["sim"] = cfg.w_sim * self.sim(pair.fixed, out.moving_warped)
            parts["smooth"] = cfg.w_smooth * L.gradient_l2(out.field.raw_vox)
            self.last_field = out.field.raw_vox
            if self.discriminator is not None:
                # generator side: make the field look like a draw from the prior ("real")
                logit = self.discriminator(out.field.raw_vox.float())
                parts["adv"] = cfg.w_adv * nn.functional.binary_cross_entropy_with_logits(
                    logit, torch.ones_like(logit))
            if weakly:
                warped = warp_labels_onehot(moving_labels, label_ids, out.index_affine, shape,
                                            disp_vox=out.field.disp_vox)
                parts["dice"] = cfg.w_dice * L.dice_loss(fixed_onehot, warped)
        parts["total"] = sum(parts.values())
        return parts


def _lattice(centre_xyz, half_mm: float) -> np.ndarray:
    """27 homogeneous points (27, 4) on a 3x3x3 lattice of half-width ``half_mm`` around a centre."""
    g = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], float) * half_mm
    return np.concatenate([g + np.asarray(centre_xyz), np.ones((27, 1))], 1)


def _set_trainable(model: TwoStageNet, stage: str) -> None:
    for p in model.affine.parameters():
        p.requires_grad_(stage in ("affine", "joint"))
    for p in model.deformable.parameters():
        p.requires_grad_(stage in ("deformable", "joint"))


def _build_model(cfg: TrainConfig) -> tuple[TwoStageNet, dict | None, int, dict]:
    """(model, optimiser state or None, start step, metadata inherited from init/resume)."""
    from .nn.networks import build_model
    if cfg.resume:
        ck = checkpoints.load_checkpoint(cfg.resume, cfg.paradigm)
        return ck["model"], ck.get("optimizer"), int(ck["training"].get("steps", 0)), ck["training"]
    net_cfg = cfg.network_config()
    inherited: dict = {}
    if not cfg.init and not cfg.init_affine:
        return build_model(net_cfg), None, 0, inherited

    def two_stage(path):
        ck = checkpoints.load_checkpoint(path)
        if not isinstance(ck["model"], TwoStageNet):
            raise ValueError(f"{path} holds a {type(ck['model']).__name__}, not a two-stage model")
        return ck

    ck = two_stage(cfg.init) if cfg.init else None
    ck_aff = two_stage(cfg.init_affine) if cfg.init_affine else ck
    net_cfg["affine"] = dict(ck_aff["model"].affine.config)      # the affine stage comes from a checkpoint
    if cfg.affine_iterations == 0:                               # ... and, unless set, how often it is applied
        net_cfg["affine_iterations"] = ck_aff["model"].affine_iterations
    model = build_model(net_cfg)
    model.affine.load_state_dict(ck_aff["model"].affine.state_dict(), strict=True)
    loaded = {"affine": str(cfg.init_affine or cfg.init)}
    def same_shapes(a: dict, b: dict) -> bool:
        # a plain displacement net is a good start for a velocity net of the same shape (exp(v) ~ v
        # for small v), so only the integration options may differ
        ignore = ("diffeomorphic", "int_steps")
        return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}

    if ck is not None and same_shapes(ck["model"].deformable.config, model.deformable.config):
        model.deformable.load_state_dict(ck["model"].deformable.state_dict(), strict=True)
        loaded["deformable"] = str(cfg.init)
    elif ck is not None:
        # another decoder depth or field level: warm-start every tensor of the same name and shape
        # (encoder, bottom, the shared decoder levels, head), the rest starts from its initialisation
        own = model.deformable.state_dict()
        src = {k: v for k, v in ck["model"].deformable.state_dict().items()
               if k in own and own[k].shape == v.shape}
        if src:
            model.deformable.load_state_dict(src, strict=False)
            loaded["deformable_partial"] = {"path": str(cfg.init), "tensors": len(src), "of": len(own)}
            log.warning("init %s: its deformable net %s differs from the configured %s; %d of %d tensors "
                        "warm-started (pass its enc/dec/out_level to continue it as it is)", cfg.init,
                        ck["model"].deformable.config, model.deformable.config, len(src), len(own))
    inherited = {"init": {"stages_loaded": loaded,
                          "training": {k: (ck or ck_aff)["training"].get(k) for k in ("steps", "stage", "losses", "init")}}}
    return model, None, 0, inherited


def _dist_info() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist
    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    return dist.get_rank(), dist.get_world_size(), created


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: TwoStageNet, subjects: dict[str, D.Subject], pairs: list, device) -> dict:
    """Dice before / after affine / after deformable (working grid), folding of the field, on pairs."""
    model.eval()
    rows = []
    for fixed_name, moving_name in pairs:
        f, m = subjects[fixed_name], subjects[moving_name]
        pt = stack_pairs([pair_tensors(f, m)], device)
        out = run_two_stage(model, pt, deformable=True, train_affine=False)
        shape = f.image.shape
        mlab = torch.as_tensor(m.labels[None].astype(np.int64), device=device)
        ident = G.index_map(pt.fixed_grid, pt.moving_grid, torch.eye(4, dtype=torch.float64, device=device))
        before = warp_labels_nearest(mlab, ident, shape)[0].cpu().numpy()
        aff = warp_labels_nearest(mlab, out.index_affine, shape)[0].cpu().numpy()
        dfm = warp_labels_nearest(mlab, out.index_affine, shape, out.field.disp_vox)[0].cpu().numpy()
        rows.append({"dice_before": mean_dice(f.labels, before), "dice_affine": mean_dice(f.labels, aff),
                     "dice": mean_dice(f.labels, dfm),
                     "fold_fraction": fold_fraction_vox(out.field.disp_vox[0].double().cpu().numpy())})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig, progress: Optional[ProgressFn] = None,
          cancel: Optional[threading.Event] = None) -> Path:
    """Train a learned paradigm; returns the checkpoint path (written by rank 0).

    Raises ValueError for bad options, :class:`~app.engine.types.Cancelled` when ``cancel`` is set
    (the last periodic checkpoint, if any, stays valid: files are replaced atomically).
    """
    return run_training(config, progress, cancel)["path"]


def run_training(cfg: TrainConfig, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None) -> dict:
    """:func:`train`, returning ``{"path", "model", "history", "val"}`` (for tests and scripts)."""
    if cfg.paradigm not in LEARNED_KEYS:
        raise ValueError(f"paradigm '{cfg.paradigm}' is not trained by this loop (use {', '.join(LEARNED_KEYS)})")
    if not cfg.out:
        raise ValueError("TrainConfig.out (the checkpoint file to write) is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, created_pg = _dist_info()
    device = resolve_device(cfg.device)
    prep = cfg.preprocessing()
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    try:
        split = D.load_split(cfg.split)
        names = list(split["train"])
        if cfg.max_train_subjects:
            names = names[:cfg.max_train_subjects]
        weakly = cfg.paradigm == "weakly"
        cache = cfg.cache_dir or None
        if progress:
            progress(Progress("load", message=f"preprocessing {len(names)} training subjects"))
        subjects = D.load_subjects(names, prep, cfg.data_root, with_labels=weakly, cache_dir=cache)
        if weakly and any(s.labels is None for s in subjects):
            raise ValueError("weakly supervised training needs a label map for every training subject")
        val_pairs = [tuple(p) for p in split.get("val_pairs", [])][:cfg.max_val_pairs] if rank == 0 else []
        val_names = sorted({n for p in val_pairs for n in p})
        val_subjects = {s.name: s for s in D.load_subjects(val_names, prep, cfg.data_root, True, cache)}

        model, opt_state, start, inherited = _build_model(cfg)
        stage = cfg.stage
        if cfg.resume:   # network options come from the checkpoint; the stage from its record
            stage = inherited.get("stage", stage)
        run_cfg = dataclasses.replace(cfg, stage=stage, diffeomorphic=model.deformable.diffeomorphic)
        _set_trainable(model, stage)
        model.to(device)
        objective = TwoStageLoss(model, run_cfg)
        use_amp = device.type == "cuda" and cfg.amp
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        if use_amp:
            objective.autocast = lambda: torch.autocast("cuda", dtype=amp_dtype)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        wrapped: nn.Module = objective
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        disc = d_opt = None
        if cfg.w_adv > 0:
            if stage == "affine":
                raise ValueError("w_adv (adversarial deformation regulariser) needs the deformable stage")
            if world > 1:
                raise ValueError("w_adv (adversarial deformation regulariser) runs in a single process only")
            from .nn.networks import FieldDiscriminator
            disc = FieldDiscriminator().to(device)
            d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.adv_lr)
            objective.discriminator = disc
            d_gen = torch.Generator().manual_seed(cfg.seed)
        if opt_state is not None:
            opt.load_state_dict(opt_state)

        history, val, val_history = [], {}, list(inherited.get("val_history", []))
        out_path = Path(cfg.out)
        meta_base = {k: v for k, v in inherited.items() if k == "init"}
        seconds_before = float(inherited.get("seconds", 0.0)) if cfg.resume else 0.0

        def save(step: int) -> None:
            if rank != 0:
                return
            training = {
                **meta_base,
                "data": f"IXI T1 (DLMUSE labels), {len(names)} training subjects of {cfg.split}",
                "split": str(cfg.split), "train_subjects": len(names), "val_pairs": len(val_pairs),
                "steps": step, "batch_size": cfg.batch_size, "world_size": world, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "stage": stage,
                "losses": {"similarity": cfg.similarity, "lncc_window": cfg.lncc_window, "w_sim": cfg.w_sim,
                           "w_affine_sim": cfg.w_affine_sim, "w_smooth": cfg.w_smooth,
                           "w_dice": cfg.w_dice if weakly else 0.0, "dual": cfg.dual if weakly else None,
                           "w_adv": cfg.w_adv,
                           "dice_labels": cfg.dice_labels if weakly else None,
                           "self_pairs": cfg.self_pairs, "w_selfsup": cfg.w_selfsup,
                           "w_affine_dense": cfg.w_affine_dense},
                "augmentation": {"rot_deg": cfg.aug_rot_deg, "scale": cfg.aug_scale, "trans_mm": cfg.aug_trans_mm,
                                 "intensity": cfg.aug_intensity},
                "validation": val, "val_history": val_history,
                "seconds": round(time.perf_counter() - t_start + seconds_before, 1),
                "device": str(device), "seed": cfg.seed, "config": dataclasses.asdict(run_cfg),
            }
            checkpoints.save_checkpoint(out_path, paradigm=cfg.paradigm, model=model,
                                        preprocessing=prep.to_dict(), training=training,
                                        optimizer=opt.state_dict())

        for step in range(start + 1, cfg.steps + 1):
            check_cancel(cancel)
            model.train()
            if cfg.lr_schedule == "cosine":
                lr_now = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / max(cfg.steps - 1, 1))))
                for g in opt.param_groups:
                    g["lr"] = lr_now
            # Same global list of pairs on every rank (seeded by step); each rank takes its slice.
            glob_rng = np.random.default_rng([cfg.seed, step])
            pairs = D.sample_pairs(len(subjects), cfg.batch_size * world, glob_rng)
            mine = pairs[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            rng = np.random.default_rng([cfg.seed, step, rank, 1])
            items, mlabels, flabels, spoints = [], [], [], []
            for fi, mi in mine:
                is_self = stage != "deformable" and rng.random() < cfg.self_pairs
                if is_self:
                    mi = fi
                f, m = subjects[fi], subjects[mi]
                spoints.append(_lattice(f.com, 50.0) if is_self else np.zeros((27, 4)))
                aug = D.random_affine(rng, f.com, cfg.aug_rot_deg, cfg.aug_scale, 0.03 if cfg.aug_scale else 0.0,
                                      cfg.aug_trans_mm)
                init = G.translation(m.com - f.com) @ aug
                fimg = D.augment_intensity(f.image, rng) if cfg.aug_intensity else f.image
                mimg = D.augment_intensity(m.image, rng) if cfg.aug_intensity else m.image
                items.append(pair_tensors(f, m, init, fimg, mimg))
                if weakly:
                    flabels.append(f.labels)
                    mlabels.append(m.labels)
            pair = stack_pairs(items, device)
            kw = {}
            if weakly:
                present = np.unique(np.concatenate([np.unique(x) for x in flabels]))
                present = present[present != 0]
                ids = rng.choice(present, min(cfg.dice_labels, len(present)), replace=False)
                ids_t = torch.as_tensor(ids.astype(np.int64), device=device)
                flab = torch.as_tensor(np.stack(flabels).astype(np.int64), device=device)
                kw = dict(fixed_onehot=(flab[:, None] == ids_t.view(1, -1, 1, 1, 1)).float(),
                          moving_labels=torch.as_tensor(np.stack(mlabels).astype(np.int64), device=device),
                          label_ids=ids_t)
            if cfg.self_pairs > 0 and stage != "deformable":
                kw["self_points"] = torch.as_tensor(np.stack(spoints), dtype=torch.float64, device=device)
            if model.affine_iterations > 1 and stage != "deformable":
                kw["affine_pre_iterations"] = int(glob_rng.integers(0, model.affine_iterations))
            parts = wrapped(pair, **kw)
            opt.zero_grad(set_to_none=True)
            scaler.scale(parts["total"]).backward()
            scaler.step(opt)
            scaler.update()
            rec = {"step": step, **{k: float(v.detach()) for k, v in parts.items()}}
            if disc is not None:    # discriminator side: prior fields "real", predicted fields "fake"
                fake = objective.last_field.detach().float()
                real = smooth_random_fields(fake, d_gen)
                lr_, lf_ = disc(real), disc(fake)
                bce = nn.functional.binary_cross_entropy_with_logits
                d_loss = bce(lr_, torch.ones_like(lr_)) + bce(lf_, torch.zeros_like(lf_))
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
                rec["discriminator"] = float(d_loss.detach())
            if not math.isfinite(rec["total"]):
                raise RuntimeError(f"training diverged at step {step} (loss {rec['total']}); lower the lr")
            history.append(rec)
            if rank == 0 and cfg.val_every and step % cfg.val_every == 0 and val_pairs:
                val = {"step": step, **validate(model, val_subjects, val_pairs, device)}
                val_history.append(val)
                log.info("step %d validation %s", step, val)
            if progress:
                msg = f"loss {rec['total']:.4f}"
                if val:
                    msg += f" | val Dice {val.get('dice', float('nan')):.3f} (affine {val.get('dice_affine', float('nan')):.3f})"
                progress(Progress("train", iteration=step, total=cfg.steps, loss=rec["total"],
                                  fraction=step / cfg.steps, message=msg))
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != cfg.steps:
                save(step)
        if rank == 0 and val_pairs and (not val or val.get("step") != cfg.steps):
            val = {"step": cfg.steps, **validate(model, val_subjects, val_pairs, device)}
            val_history.append(val)
        save(cfg.steps)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        return {"path": out_path, "model": model, "history": history, "val": val}
    finally:
        if created_pg:
            import torch.distributed as dist
            dist.destroy_process_group()
