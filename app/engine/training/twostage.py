"""Trainer of the learned two-stage paradigms (``unsupervised``, ``weakly``), behind the shared loop.

Subjects of the split are preprocessed once (the inference preprocessing) and kept in memory; every
step samples random (fixed, moving) pairs, augments them (random affine on the moving image, random
intensity changes), runs :func:`app.engine.nn.twostage.run_two_stage` and minimises

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
the discriminator spots its field. The discriminator is a training aid: neither saved nor resumed.

Stages are trained one after the other (DLIR): ``init`` / ``init_affine`` carry the weights of
earlier stages over. Validation: Dice before / after the affine / after the deformable stage (working
resolution, nearest-neighbour labels) and the folding fraction, on the split's ``val_pairs``.
The options are :class:`app.engine.paradigms.unsupervised.UnsupervisedTrainConfig` (and its
``weakly`` subclass, which adds the label loss).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoints
from .. import datasets as D
from .. import metrics as M
from ..nn import geometry as G
from ..nn import losses as L
from ..nn.networks import TwoStageNet
from ..nn.similarity import get_similarity
from ..nn.twostage import PairTensors, run_two_stage, warp_labels_nearest, warp_labels_onehot
from ..spatial import warp_torch
from .config import parse_grid
from .loop import Trainer

log = logging.getLogger(__name__)


def similarity_loss(name: str, window: int = 5):
    """The image similarity as a loss ``f(fixed, warped) -> scalar``, from :mod:`app.engine.nn.similarity`.

    MSE stays the plain mean squared difference here (``normalise=False``), as the bundled models
    were trained with it.
    """
    options = {"lncc": {"window": window}, "mse": {"normalise": False}}.get(name, {})
    return get_similarity(name, **options)


def _ints(text) -> list[int]:
    from ..paradigms.base import parse_number_list
    return list(parse_number_list(text, int, "channels"))


def preprocessing(cfg) -> D.Preprocessing:
    """The working grid of a two-stage TrainConfig."""
    return D.Preprocessing(grid_shape=parse_grid(cfg.grid), spacing_mm=cfg.spacing_mm)


def network_config(cfg) -> dict:
    """The TwoStageNet config a two-stage TrainConfig asks for."""
    if cfg.affine_kind == "flow":
        affine = {"kind": "affine_flow", "input_pool": cfg.affine_pool, "spacing_mm": cfg.spacing_mm}
    else:
        affine = {"kind": "affine", "channels": _ints(cfg.affine_channels), "input_pool": cfg.affine_pool}
    return {"kind": "two_stage", "affine": affine, "affine_iterations": max(1, cfg.affine_iterations),
            "deformable": {"kind": "deformable", "enc": _ints(cfg.enc), "dec": _ints(cfg.dec),
                           "out_level": cfg.out_level, "diffeomorphic": cfg.diffeomorphic,
                           "int_steps": cfg.int_steps}}


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``fixed_labels`` (:func:`app.engine.metrics.dice_per_label`)."""
    return M.summarize_dice(M.dice_per_label(np.asarray(fixed_labels), np.asarray(warped_labels)))


def fold_fraction_vox(disp_vox: np.ndarray) -> float:
    """Fraction of voxels where ``det(I + grad u) <= 0``; ``disp_vox`` (3, D, H, W) zyx voxels.

    The field is handed to :func:`app.engine.metrics.jacobian_determinant` as a unit-spacing grid
    (components reordered to xyz), where a voxel displacement is a displacement in "mm".
    """
    field = np.moveaxis(np.asarray(disp_vox, np.float64)[::-1], 0, -1)
    return M.jacobian_stats(M.jacobian_determinant(field, (1.0, 1.0, 1.0)))["fold_fraction"]


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


def _lattice(centre_xyz, half_mm: float) -> np.ndarray:
    """27 homogeneous points (27, 4) on a 3x3x3 lattice of half-width ``half_mm`` around a centre."""
    g = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], float) * half_mm
    return np.concatenate([g + np.asarray(centre_xyz), np.ones((27, 1))], 1)


class TwoStageLoss(nn.Module):
    """The training objective as a module (so DistributedDataParallel can wrap it)."""

    def __init__(self, model: TwoStageNet, cfg, weakly: bool, trainer: "TwoStageTrainer"):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.weakly = weakly
        self.sim = similarity_loss(cfg.similarity, cfg.lncc_window)
        self._trainer = [trainer]                         # a list: not a submodule
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
                            autocast=self._trainer[0].autocast, affine_pre_iterations=affine_pre_iterations)
        shape = tuple(pair.fixed.shape[2:])
        parts: dict[str, torch.Tensor] = {}
        weakly = self.weakly and fixed_onehot is not None
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
            if not weakly or cfg.dual:
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


def _set_trainable(model: TwoStageNet, stage: str) -> None:
    for p in model.affine.parameters():
        p.requires_grad_(stage in ("affine", "joint"))
    for p in model.deformable.parameters():
        p.requires_grad_(stage in ("deformable", "joint"))


def _two_stage_checkpoint(path) -> dict:
    return checkpoints.load_checkpoint(path, kinds=("two_stage",))


def build_from_init(cfg) -> tuple[TwoStageNet, dict]:
    """A new TwoStageNet for ``cfg``, warm-started from ``cfg.init`` / ``cfg.init_affine``.

    Returns (model, metadata of what was loaded). The affine stage always comes from the checkpoint
    (with its own ``affine_iterations`` unless set); the deformable stage when its config matches
    (integration options aside), else every tensor of the same name and shape (with a warning).
    """
    from ..nn.networks import build_model
    net_cfg = network_config(cfg)
    if not cfg.init and not cfg.init_affine:
        return build_model(net_cfg), {}
    ck = _two_stage_checkpoint(cfg.init) if cfg.init else None
    ck_aff = _two_stage_checkpoint(cfg.init_affine) if cfg.init_affine else ck
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
    src_training = (ck or ck_aff)["training"]
    return model, {"init": {"stages_loaded": loaded,
                            "training": {k: src_training.get(k) for k in ("steps", "stage", "losses", "init")}}}


class TwoStageTrainer(Trainer):
    """Trains a :class:`~app.engine.nn.networks.TwoStageNet` for ``unsupervised`` or ``weakly``."""

    def build(self, resume, progress):
        cfg = self.cfg
        self.weakly = self.key == "weakly"
        # resuming: the network, its working grid, its stage and its lineage come from the checkpoint
        if cfg.stage == "refine" or (resume is not None and resume["training"].get("stage") == "refine"):
            return self._build_refine(resume, progress)
        self.prep = D.Preprocessing.from_dict(resume["preprocessing"]) if resume is not None else preprocessing(cfg)
        self.subjects = self.load_training_subjects(self.prep, self.weakly, progress)
        split, cache = D.load_split(cfg.split), cfg.cache_dir or None
        if self.weakly and any(s.labels is None for s in self.subjects):
            raise ValueError("weakly supervised training needs a label map for every training subject")
        self.val_pairs = [tuple(p) for p in split.get("val_pairs", [])][:cfg.max_val_pairs] if self.rank == 0 else []
        val_names = sorted({n for p in self.val_pairs for n in p})
        self.val_subjects = {s.name: s for s in D.load_subjects(val_names, self.prep, cfg.data_root, True, cache)}
        self.inherited: dict = {}
        if resume is not None:
            model = resume["model"]
            self.inherited = {k: v for k, v in resume["training"].items() if k == "init"}
            self.stage = resume["training"].get("stage", cfg.stage)
        else:
            model, self.inherited = build_from_init(cfg)
            self.stage = cfg.stage
        self.run_cfg = dataclasses.replace(cfg, stage=self.stage, diffeomorphic=model.deformable.diffeomorphic)
        if cfg.w_adv > 0:
            if self.stage == "affine":
                raise ValueError("w_adv (adversarial deformation regulariser) needs the deformable stage")
            if self.world > 1:
                raise ValueError("w_adv (adversarial deformation regulariser) runs in a single process only")
        _set_trainable(model, self.stage)
        return model

    def _build_refine(self, resume, progress):
        """The refine stage: init's (or resume's) network with a RefineNet, subjects at the fine grid."""
        from .refine import brain_distance, refine_config
        cfg = self.cfg
        self.stage = "refine"
        if resume is not None:
            model = resume["model"]
            self.inherited = {k: v for k, v in resume["training"].items() if k == "init"}
            self.prep = D.Preprocessing.from_dict(resume["preprocessing"])
        else:
            if not cfg.init:
                raise ValueError("the refine stage needs init: the two-stage checkpoint whose stages it refines")
            ck = _two_stage_checkpoint(cfg.init)
            base = ck["model"]
            if getattr(base, "refine", None) is not None:
                raise ValueError(f"init {cfg.init} has a refinement net already (use resume to continue it)")
            from ..nn.networks import build_model
            net_cfg = {**base.config, "refine": refine_config(cfg)}
            model = build_model(net_cfg)
            missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
            if unexpected or any(not k.startswith("refine.") for k in missing):
                raise ValueError(f"init {cfg.init}: its stages do not fit ({missing}, {unexpected})")
            self.prep = D.Preprocessing.from_dict(ck["preprocessing"])
            warm = model.refine.warm_start(model.deformable) if cfg.refine_warm else 0
            self.inherited = {"init": {"stages_loaded": {"affine": str(cfg.init), "deformable": str(cfg.init),
                                                         "refine_unet_from_deformable": warm},
                                       "training": {k: ck["training"].get(k) for k in
                                                    ("steps", "stage", "losses", "init", "validation")}}}
        self.fine_prep = D.fine_preprocessing(self.prep, model.refine.factor)
        self.subjects = self.load_training_subjects(self.fine_prep, self.weakly, progress)
        if self.weakly and any(s.labels is None for s in self.subjects):
            raise ValueError("weakly supervised training needs a label map for every training subject")
        sp = self.fine_prep.spacing_mm
        self.distances = [brain_distance(s.labels, sp) if s.labels is not None else None for s in self.subjects]
        split = D.load_split(cfg.split)
        self.val_pairs = [tuple(p) for p in split.get("val_pairs", [])][:cfg.max_val_pairs] if self.rank == 0 else []
        val_names = sorted({n for p in self.val_pairs for n in p})
        self.val_subjects = {s.name: s for s in D.load_subjects(val_names, self.fine_prep, cfg.data_root, True,
                                                                cfg.cache_dir or None)}
        self.run_cfg = dataclasses.replace(cfg, stage="refine", diffeomorphic=model.refine.diffeomorphic)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.refine.parameters():
            p.requires_grad_(True)
        return model

    def objective(self):
        if self.stage == "refine":
            from .refine import RefineLoss
            self.disc = None
            self.loss = RefineLoss(self.model, self.run_cfg, self.weakly, self)
            return self.loss
        self.loss = TwoStageLoss(self.model, self.run_cfg, self.weakly, self)
        self.disc = None
        if self.cfg.w_adv > 0:
            from ..nn.networks import FieldDiscriminator
            self.disc = FieldDiscriminator().to(self.device)
            self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.adv_lr)
            self.d_gen = torch.Generator().manual_seed(self.cfg.seed)
            self.loss.discriminator = self.disc
        return self.loss

    def sample(self, step, rng, step_rng):
        cfg, stage = self.cfg, self.stage
        if stage == "refine":
            from .refine import sample_refine
            return sample_refine(self, rng, step_rng)
        pairs = D.sample_pairs(len(self.subjects), cfg.batch_size * self.world, step_rng)
        mine = pairs[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        items, mlabels, flabels, spoints = [], [], [], []
        for fi, mi in mine:
            is_self = stage != "deformable" and rng.random() < cfg.self_pairs
            if is_self:
                mi = fi
            f, m = self.subjects[fi], self.subjects[mi]
            spoints.append(_lattice(f.com, 50.0) if is_self else np.zeros((27, 4)))
            aug = D.random_affine(rng, f.com, cfg.aug_rot_deg, cfg.aug_scale, 0.03 if cfg.aug_scale else 0.0,
                                  cfg.aug_trans_mm)
            init = G.translation(m.com - f.com) @ aug
            fimg = D.augment_intensity(f.image, rng) if cfg.aug_intensity else f.image
            mimg = D.augment_intensity(m.image, rng) if cfg.aug_intensity else m.image
            items.append(pair_tensors(f, m, init, fimg, mimg))
            if self.weakly:
                flabels.append(f.labels)
                mlabels.append(m.labels)
        kw: dict = {"pair": stack_pairs(items, self.device)}
        if self.weakly:
            present = np.unique(np.concatenate([np.unique(x) for x in flabels]))
            present = present[present != 0]
            ids = rng.choice(present, min(cfg.dice_labels, len(present)), replace=False)
            ids_t = torch.as_tensor(ids.astype(np.int64), device=self.device)
            flab = torch.as_tensor(np.stack(flabels).astype(np.int64), device=self.device)
            kw.update(fixed_onehot=(flab[:, None] == ids_t.view(1, -1, 1, 1, 1)).float(),
                      moving_labels=torch.as_tensor(np.stack(mlabels).astype(np.int64), device=self.device),
                      label_ids=ids_t)
        if cfg.self_pairs > 0 and stage != "deformable":
            kw["self_points"] = torch.as_tensor(np.stack(spoints), dtype=torch.float64, device=self.device)
        if self.model.affine_iterations > 1 and stage != "deformable":
            kw["affine_pre_iterations"] = int(step_rng.integers(0, self.model.affine_iterations))
        return kw

    def after_step(self, step, parts):
        if self.disc is None:
            return {}
        # discriminator side: prior fields "real", predicted fields "fake"
        fake = self.loss.last_field.detach().float()
        real = smooth_random_fields(fake, self.d_gen)
        lr_, lf_ = self.disc(real), self.disc(fake)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(lr_, torch.ones_like(lr_)) + bce(lf_, torch.zeros_like(lf_))
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()
        return {"discriminator": float(d_loss.detach())}

    @torch.no_grad()
    def validate(self):
        if self.stage == "refine":
            from .refine import validate_refine
            return validate_refine(self.model, self.val_subjects, self.val_pairs, self.device)
        return validate(self.model, self.val_subjects, self.val_pairs, self.device)

    def summary(self, val):
        if "dice_coarse" in val:
            return f"Dice {val.get('dice', float('nan')):.3f} (coarse {val['dice_coarse']:.3f})"
        return f"Dice {val.get('dice', float('nan')):.3f} (affine {val.get('dice_affine', float('nan')):.3f})"

    def preprocessing(self):
        return self.prep.to_dict()

    def expects(self) -> dict:
        """What the training images looked like, for :func:`app.engine.expectations.expectations`:
        IXI T1 heads; ``skull`` None (either) when the refine stage stripped skulls at random."""
        from ..expectations import KNOWN_DATA
        exp = dict(KNOWN_DATA["IXI T1"])
        if self.stage == "refine" and self.cfg.aug_skullstrip > 0:
            exp.update(skull=None, data="IXI T1 heads, with and without skull (augmented)")
        return exp

    def record(self):
        cfg, weakly = self.cfg, self.weakly
        return {
            **self.inherited,
            "expects": self.expects(),
            "data": f"IXI T1 (DLMUSE labels), {len(self.names)} training subjects of {cfg.split}",
            "split": str(cfg.split), "train_subjects": len(self.names), "val_pairs": len(self.val_pairs),
            "stage": self.stage,
            "losses": {"similarity": cfg.similarity, "lncc_window": cfg.lncc_window, "w_sim": cfg.w_sim,
                       "w_affine_sim": cfg.w_affine_sim, "w_smooth": cfg.w_smooth,
                       "w_dice": cfg.w_dice if weakly else 0.0, "dual": cfg.dual if weakly else None,
                       "w_adv": cfg.w_adv, "dice_labels": cfg.dice_labels if weakly else None,
                       "self_pairs": cfg.self_pairs, "w_selfsup": cfg.w_selfsup,
                       "w_affine_dense": cfg.w_affine_dense},
            "augmentation": {"rot_deg": cfg.aug_rot_deg, "scale": cfg.aug_scale, "trans_mm": cfg.aug_trans_mm,
                             "intensity": cfg.aug_intensity,
                             **({"skullstrip": cfg.aug_skullstrip, "contrast": cfg.aug_contrast, "blur": cfg.aug_blur,
                                 "crop": cfg.refine_crop} if self.stage == "refine" else {})},
        }


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
