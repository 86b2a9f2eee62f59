"""The ``refine`` stage of the two-stage trainer: a fine-grid (2 mm) residual net on frozen coarse stages.

Subjects are preprocessed once at the *fine* grid (:func:`app.engine.datasets.fine_preprocessing` of
the checkpoint's working grid); the working-grid inputs of the frozen affine and deformable stages
are pooled from it (:func:`app.engine.nn.twostage.coarse_from_fine`), exactly as at inference. Every
step draws a random pair, augments it (random affine on the moving image; random skull stripping,
contrast and resolution loss on either image so that the model meets skull-stripped, other-contrast,
other-resolution inputs), runs the coarse stages without gradients, then the refinement net on a
random block of the fine fixed grid (the net is fully convolutional; a block keeps a CPU step
cheap) and minimises

    w_sim * sim(fixed, moving o A o (id + d)) + w_smooth * |grad r|^2 [+ w_dice * Dice loss (weakly)]

with ``d = r + u o (id + r)`` the composed fine field (:func:`app.engine.nn.twostage.run_refine`).
Validation runs the whole pipeline at the fine grid on the split's validation pairs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import datasets as D
from ..nn import geometry as G
from ..nn import losses as L
from ..nn.twostage import (PairTensors, coarse_from_fine, run_refine, run_two_stage, warp_labels_nearest,
                           warp_labels_onehot)


def refine_config(cfg) -> dict:
    """The RefineNet config a TrainConfig asks for."""
    from .twostage import _ints
    return {"kind": "refine", "enc": _ints(cfg.refine_enc), "dec": _ints(cfg.refine_dec), "factor": 2,
            "diffeomorphic": bool(cfg.diffeomorphic), "int_steps": int(cfg.refine_int_steps)}


def brain_distance(labels: np.ndarray, spacing_mm: float, max_mm: float = 12.0) -> np.ndarray:
    """Distance (mm, uint8, clipped at ``max_mm``) of every voxel to the brain (``labels > 0``): a
    random skull stripping is then ``distance <= r`` for a random margin ``r``."""
    from scipy import ndimage
    d = ndimage.distance_transform_edt(labels == 0) * float(spacing_mm)
    return np.minimum(np.round(d), max_mm).astype(np.uint8)


def augment_appearance(image: np.ndarray, rng: np.random.Generator, distance: Optional[np.ndarray],
                       p_strip: float, p_blur: float, contrast: bool) -> np.ndarray:
    """Random skull stripping, contrast and resolution loss of one fine-grid image in [0, 1].

    * skull stripping (probability ``p_strip``, needs ``distance``): keep ``distance <= r`` mm with
      ``r`` uniform in [1, 6], zero elsewhere, then rescale to [0, 1] (a stripped scan's percentile
      normalisation spans the brain only);
    * contrast (``contrast``): a random monotone piecewise-linear intensity map (4 random knots);
    * resolution loss (probability ``p_blur``): Gaussian blur of sigma 0.5 - 1.5 voxels.
    """
    from scipy import ndimage
    out = np.asarray(image, np.float32)
    if distance is not None and rng.random() < p_strip:
        out = np.where(distance <= rng.uniform(1.0, 6.0), out, 0.0).astype(np.float32)
        hi = float(np.percentile(out[out > 0], 99.0)) if np.any(out > 0) else 1.0
        out = np.clip(out / max(hi, 1e-6), 0, 1).astype(np.float32)
    if contrast and rng.random() < 0.5:
        xs = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 4)), [1.0]])
        ys = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 4)), [1.0]])
        out = np.interp(out, xs, ys).astype(np.float32)
    if rng.random() < p_blur:
        out = ndimage.gaussian_filter(out, float(rng.uniform(0.5, 1.5))).astype(np.float32)
    return out


def random_crop(shape_zyx, size: int, multiple: int, rng: np.random.Generator):
    """A random block ``((z0, y0, x0), (d, h, w))`` of at most ``size`` voxels per side (a multiple of
    ``multiple``) inside ``shape_zyx``; None when ``size`` is 0 (whole grid)."""
    if not size:
        return None
    sizes = [min(int(size), int(n)) // multiple * multiple for n in shape_zyx]
    starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape_zyx, sizes)]
    return tuple(starts), tuple(sizes)


def warp_labels_in_box(labels: torch.Tensor, ids: torch.Tensor, index_affine: torch.Tensor,
                       disp_vox: torch.Tensor) -> torch.Tensor:
    """:func:`~app.engine.nn.twostage.warp_labels_onehot` on the bounding box of the sampled moving
    indices only (the one-hot of a whole 2 mm label map is ~40 M values per 32 labels; a 64^3 block
    samples a small part of it). labels (B, d, h, w); index_affine (B, 4, 4); disp_vox (B, 3, D, H, W)."""
    with torch.no_grad():
        b = labels.shape[0]
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=labels.device)
                                            for n in disp_vox.shape[2:]], indexing="ij"), 0)[None]
        p = (grid + disp_vox.detach()).reshape(b, 3, -1)
        k = index_affine.float()
        idx = torch.bmm(k[:, :3, :3], p) + k[:, :3, 3:]
        lo = torch.clamp(idx.amin(dim=(0, 2)).floor() - 1, min=0).long()
        hi = torch.minimum(idx.amax(dim=(0, 2)).ceil().long() + 2,
                           torch.as_tensor(labels.shape[1:], device=labels.device))
        lo = torch.minimum(lo, hi - 1)
    sub = labels[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    from ..nn.twostage import crop_shift
    shift = crop_shift([-float(v) for v in lo.tolist()], index_affine)
    return warp_labels_onehot(sub, ids, shift @ index_affine, tuple(disp_vox.shape[2:]), disp_vox=disp_vox)


class RefineLoss(nn.Module):
    """Training objective of the refinement stage (a module for DistributedDataParallel)."""

    def __init__(self, model, cfg, weakly: bool, trainer):
        super().__init__()
        from .twostage import similarity_loss
        self.model = model
        self.cfg = cfg
        self.weakly = weakly
        self.sim = similarity_loss(cfg.similarity, cfg.lncc_window)
        self._trainer = [trainer]

    def forward(self, fine: PairTensors, crop=None, fixed_labels: Optional[torch.Tensor] = None,
                moving_labels: Optional[torch.Tensor] = None, label_ids: Optional[torch.Tensor] = None) -> dict:
        """Loss terms for one batch; ``fixed_labels`` (B, D, H, W) fine fixed labels (cropped like the
        block), ``moving_labels`` (B, d, h, w) on the fine moving grids, ``label_ids`` (K,)."""
        cfg, model = self.cfg, self.model
        with torch.no_grad():
            model.affine.eval()
            model.deformable.eval()
            coarse = run_two_stage(model, coarse_from_fine(fine, model.refine.factor), deformable=True,
                                   train_affine=False)
        out = run_refine(model, coarse, fine, crop=crop, autocast=self._trainer[0].autocast)
        parts: dict[str, torch.Tensor] = {}
        weakly = self.weakly and label_ids is not None
        if not weakly or cfg.dual:
            parts["sim"] = cfg.w_sim * self.sim(out.fixed, out.moving_warped)
        parts["smooth"] = cfg.w_smooth * L.gradient_l2(out.residual.raw_vox)
        if weakly:
            fixed_onehot = (fixed_labels[:, None] == label_ids.view(1, -1, 1, 1, 1)).float()
            warped = warp_labels_in_box(moving_labels, label_ids, out.index_affine, out.disp_vox)
            parts["dice"] = cfg.w_dice * L.dice_loss(fixed_onehot, warped)
        parts["total"] = sum(parts.values())
        return parts


def sample_refine(trainer, rng: np.random.Generator, step_rng: np.random.Generator) -> dict:
    """One batch of the refine stage (see the module docstring) as keyword arguments of RefineLoss."""
    from .twostage import pair_tensors, stack_pairs
    cfg = trainer.cfg
    subjects, dist = trainer.subjects, trainer.distances
    pairs = D.sample_pairs(len(subjects), cfg.batch_size * trainer.world, step_rng)
    mine = pairs[trainer.rank * cfg.batch_size:(trainer.rank + 1) * cfg.batch_size]
    items, flabels, mlabels = [], [], []
    for fi, mi in mine:
        f, m = subjects[fi], subjects[mi]
        aug = D.random_affine(rng, f.com, cfg.aug_rot_deg, cfg.aug_scale, 0.03 if cfg.aug_scale else 0.0,
                              cfg.aug_trans_mm)
        init = G.translation(m.com - f.com) @ aug
        imgs = []
        for s, d in ((f, dist[fi]), (m, dist[mi])):
            img = D.augment_intensity(s.image, rng) if cfg.aug_intensity else s.image
            imgs.append(augment_appearance(img, rng, d, cfg.aug_skullstrip, cfg.aug_blur, cfg.aug_contrast))
        items.append(pair_tensors(f, m, init, imgs[0], imgs[1]))
        flabels.append(f.labels)
        mlabels.append(m.labels)
    fine = stack_pairs(items, trainer.device)
    crop = random_crop(fine.fixed.shape[2:], cfg.refine_crop, 16, rng)
    kw: dict = {"fine": fine, "crop": crop}
    if trainer.weakly:
        flab = np.stack(flabels)
        if crop is not None:
            (z0, y0, x0), (d, h, w) = crop
            flab = flab[:, z0:z0 + d, y0:y0 + h, x0:x0 + w]
        present = np.unique(flab)
        present = present[present != 0]
        if len(present):
            ids = rng.choice(present, min(cfg.dice_labels, len(present)), replace=False)
            kw.update(fixed_labels=torch.as_tensor(flab.astype(np.int64), device=trainer.device),
                      moving_labels=torch.as_tensor(np.stack(mlabels).astype(np.int64), device=trainer.device),
                      label_ids=torch.as_tensor(ids.astype(np.int64), device=trainer.device))
    return kw


@torch.no_grad()
def validate_refine(model, subjects: dict, pairs: list, device) -> dict:
    """Dice after the coarse stages and after the refinement (fine grid, nearest-neighbour labels) and
    the folding fraction of the full fine field, on ``pairs`` of fine-grid subjects."""
    from .twostage import fold_fraction_vox, mean_dice, pair_tensors, stack_pairs
    model.eval()
    rows = []
    for fixed_name, moving_name in pairs:
        f, m = subjects[fixed_name], subjects[moving_name]
        fine = stack_pairs([pair_tensors(f, m)], device)
        coarse = run_two_stage(model, coarse_from_fine(fine, model.refine.factor), deformable=True,
                               train_affine=False)
        out = run_refine(model, coarse, fine, warp=False)
        mlab = torch.as_tensor(m.labels[None].astype(np.int64), device=device)
        shape = f.image.shape
        aff = warp_labels_nearest(mlab, out.index_affine, shape)[0].cpu().numpy()
        crs = warp_labels_nearest(mlab, out.index_affine, shape, out.coarse_vox)[0].cpu().numpy()
        dfm = warp_labels_nearest(mlab, out.index_affine, shape, out.disp_vox)[0].cpu().numpy()
        rows.append({"dice_affine": mean_dice(f.labels, aff), "dice_coarse": mean_dice(f.labels, crs),
                     "dice": mean_dice(f.labels, dfm),
                     "fold_fraction": fold_fraction_vox(out.disp_vox[0].double().cpu().numpy())})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
