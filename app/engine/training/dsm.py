"""Trainer of the ``dsm`` paradigm: a CNN learns whether two patches of different contrasts correspond.

Data (``build``): *aligned sets* of images of one head in several contrasts on one isotropic grid
per training scale (``spacing_mm``, e.g. 2 and 4 mm), intensities clipped to the 99th percentile and
scaled to [0, 1] (what :func:`app.engine.optimise.optimise` feeds the similarity):

* the aligned multimodal subjects of ``/work/shared/data/multimodal`` named in ``train_subjects``
  (every image of a subject folder but the lesion / tumour masks; the modalities are co-registered
  voxel for voxel by the dataset's authors);
* ``ixi_subjects`` IXI training T1 images, whose second "modality" is made at every sample by a
  random non-monotone intensity remapping (a smooth random look-up table).

A sample (``sample``): a set, a scale, two different contrasts A and B, a centre ``c`` inside A's
foreground (A's patch inside A's grid), an integer voxel offset ``d`` (zero a third of the time,
small ``|d_i| <= 2`` a third, large ``3 <= |d|_inf <= max_offset`` a third) and, for a share
``rotate_fraction`` of the displaced samples, a rotation ``R`` (random axis, angle up to
``max_rotation_deg``); the input is the pair of patches A at ``c + o`` and B at ``c + d + R o``
for the patch offsets ``o`` (B zero outside its grid, as a warped moving image is; linear
interpolation when rotated); a share ``frame_fraction`` of the samples is cut in a rotated frame
``Q`` (A at ``c + Q o``, B at ``c + d + R Q o``): the anatomy at another head pose, as a fixed image
in any orientation shows it. The target is ``exp(-msd / (2 sigma^2))`` (or the heavy-tailed
``1 / (1 + msd / (2 sigma^2))``, ``target_shape=cauchy``, per scale) with ``msd`` the mean squared
displacement of the patch's voxels, ``|d|^2 + mean |(R - I) o|^2`` (``|d|^2`` for a translation),
and ``sigma`` (voxels) per scale (``target_sigma``, 1 by default): 1 when the patches correspond,
falling off smoothly with the misalignment, so the learned score peaks at alignment and has a
slope around it; a wider ``sigma`` at a coarse scale keeps the slope over larger misalignments
(graded targets: the score regresses how far off the patches are, Haskins et al. 2019). Loss: binary
cross-entropy with logits on those soft targets.

Whole-image poses (``pose_weight`` > 0): at the coarsest spacing the optimiser's patches cover most of
the head, so its landscape is the mean score of a few patches at a whole-image pose, which single-patch
targets do not shape. Each step adds ``pose_pairs`` pose pairs: ``pose_patches`` fixed patch centres, the
moving image seen through a far pose and through a nearer pose on the straight path from it to the
truth (:func:`partial_pose`), and the logistic ranking loss ``softplus(-(S_near - S_far) / temperature)``
on their mean log-scores ``S`` (:func:`mean_log_score`). Far poses are random rigid misalignments, or,
for a share ``pose_hard_fraction``, *hard poses*: where the coarse search of a network stopped short on a
training subject (``pose_hard``, mined by :mod:`app.engine.training.dsm_poses`; their fixed image is the
modality seen through the case's known transform, as in the benchmark). The pose pieces live in
:mod:`app.engine.training.dsm_ranking`.

Validation (``validate``, held-out ``val_subjects``): the loss on a fixed set of samples; ``rank1``
and ``rank3``: how often the aligned patch pair scores higher than the same centre displaced by 1 or
3 voxels; ``auc``: aligned vs large offsets; ``pose_rank`` / ``pose_rank60``: how often the nearer of
two whole-image poses on a path to the truth scores higher (far poses of any angle / of 60 degrees and more).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import io
from ..datasets import load_split, normalize_intensity
from ..nn.dsm_net import DsmNet
from ..types import Progress, Volume
# the pose-ranking pieces live in dsm_ranking; their old import path (this module) keeps working
from .dsm_ranking import (PoseRankingMixin, _coarse_grid, mean_log_score, partial_pose,  # noqa: F401
                          pose_patches, rigid_about)  # noqa: F401
from .loop import Trainer

log = logging.getLogger(__name__)

SIGMA_VOX = 1.0    # the default soft-target width (voxels; ``target_sigma``)


def soft_target(msd: float, sigma: float, shape: str = "gaussian") -> float:
    """The soft correspondence target of a patch whose voxels moved by ``msd`` (mean squared, voxels^2).

    ``gaussian``: ``exp(-msd / 2 sigma^2)``; ``cauchy``: ``1 / (1 + msd / 2 sigma^2)``: the same value
    and slope at alignment, but a heavy tail, so a network trained on it still ranks misalignments far
    beyond ``sigma`` (its loss ``-log t ~ log(msd)`` keeps a slope where the Gaussian's target is ~0).
    """
    u = float(msd) / (2.0 * float(sigma) ** 2)
    if shape == "gaussian":
        return float(np.exp(-u))
    if shape == "cauchy":
        return float(1.0 / (1.0 + u))
    raise ValueError(f"unknown target shape {shape!r} (gaussian or cauchy)")


TARGET_SHAPES = ("gaussian", "cauchy")


def _ints(text) -> list[int]:
    return [int(c) for c in str(text).split(",") if c.strip()]


def _floats(text) -> list[float]:
    return [float(c) for c in str(text).split(",") if c.strip()]


def to_isotropic(v: Volume, spacing_mm: float) -> Volume:
    """``v`` smoothed and resampled onto an isotropic grid of ``spacing_mm`` (same origin, direction,
    extent), linear interpolation."""
    img = v.to_sitk(sitk.sitkFloat32)
    size = [max(4, int(round(s * p / spacing_mm))) for s, p in zip(img.GetSize(), img.GetSpacing())]
    sig = [max(0.5 * (spacing_mm - p), 0.1 * p) for p in img.GetSpacing()]
    out = sitk.Resample(sitk.SmoothingRecursiveGaussian(img, sig), size, sitk.Transform(), sitk.sitkLinear,
                        img.GetOrigin(), [spacing_mm] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, v.name)


def modality_files(folder: Path) -> dict[str, Path]:
    """``{modality: path}`` of an aligned subject folder (lesion / tumour / seg masks left out)."""
    out = {}
    for p in sorted(Path(folder).glob("*.nii.gz")):
        name = p.name[:-7]
        if any(k in name.lower() for k in ("lesion", "seg", "mask", "tumour", "tumor")):
            continue
        out[name] = p
    if len(out) < 1:
        raise ValueError(f"no images found in {folder}")
    return out


def skull_stripped(image: Volume, labels, margin_mm: float = 2.0) -> Volume:
    """``image`` with everything farther than ``margin_mm`` from the brain (``labels > 0``, on the
    image's grid) set to zero: a skull-stripped scan made from a labelled head."""
    from scipy import ndimage
    lab = np.asarray(labels.array if hasattr(labels, "array") else labels)
    if lab.shape != image.array.shape:
        raise ValueError(f"labels {lab.shape} and image {image.array.shape} are not on one grid")
    sampling = tuple(float(s) for s in image.spacing[::-1])      # (z, y, x) spacing of the arrays
    dist = ndimage.distance_transform_edt(lab == 0, sampling=sampling)
    return image.with_array(np.where(dist <= margin_mm, image.array, 0).astype(np.float32), image.name)


def random_lut(rng: np.random.Generator, knots: int = 6):
    """A smooth random intensity remapping [0, 1] -> [0, 1] that is usually not monotone."""
    xs = np.linspace(0, 1, knots)
    ys = rng.uniform(0, 1, knots)
    ys[0] = rng.uniform(0, 0.15)            # background stays dark-ish
    return lambda a: np.interp(a, xs, ys).astype(np.float32)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A (3, 3) rotation about a uniformly random axis by an angle uniform in (0, max_deg] degrees."""
    from scipy.spatial.transform import Rotation
    axis = rng.normal(size=3)
    axis /= max(np.linalg.norm(axis), 1e-12)
    return Rotation.from_rotvec(axis * np.deg2rad(rng.uniform(0.0, float(max_deg)))).as_matrix()


def patch_msd(offset, rotation, patch: int, frame=None) -> float:
    """Mean squared displacement (voxels^2) of a patch's voxels moved by ``c + o -> c + offset + R o``;
    with a sampling ``frame`` ``Q`` the voxels are ``c + Q o`` and move to ``c + offset + R Q o``."""
    r = patch // 2
    o = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    if frame is not None:
        o = o @ np.asarray(frame, float).T
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    disp = o @ (rot - np.eye(3)).T
    return float((np.asarray(offset, float) ** 2).sum() + (disp ** 2).sum(1).mean())


def cut_patch(image: np.ndarray, centre, offset, rotation, patch: int) -> np.ndarray:
    """The (P, P, P) patch of ``image`` at ``centre + offset + R o`` (zyx voxels; zero outside the grid).

    An unrotated patch inside the grid is a plain slice (exact); otherwise linear interpolation.
    """
    r = patch // 2
    c = np.asarray(centre, int) + np.asarray(offset, int)
    if rotation is None and all(c[i] - r >= 0 and c[i] + r < image.shape[i] for i in range(3)):
        return image[c[0] - r:c[0] + r + 1, c[1] - r:c[1] + r + 1, c[2] - r:c[2] + r + 1]
    from scipy.ndimage import map_coordinates
    o = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    if rotation is not None:
        o = o @ np.asarray(rotation, float).T
    pts = (o + c).T
    return map_coordinates(image, pts, order=1, mode="constant", cval=0.0).reshape(patch, patch, patch)


class DsmLoss(nn.Module):
    """Binary cross-entropy of the correspondence logit against soft targets, plus (``pose_weight`` > 0)
    a logistic ranking of whole-image poses: ``softplus(-(S_near - S_far) / temperature)`` with ``S``
    the mean log-score of the same fixed patches at a pose nearer the truth and at a farther one."""

    def __init__(self, model: DsmNet, pose_weight: float = 0.0, temperature: float = 0.05):
        super().__init__()
        self.model = model
        self.pose_weight = float(pose_weight)
        self.temperature = float(temperature)

    def forward(self, pair: torch.Tensor, target: torch.Tensor, pose_fixed: torch.Tensor | None = None,
                pose_near: torch.Tensor | None = None, pose_far: torch.Tensor | None = None) -> dict:
        """``pair`` (B, 2, P, P, P), ``target`` (B,) in [0, 1]; ``pose_*`` (N, K, P, P, P) ->
        {"total", "bce"[, "pose"]}."""
        logit = self.model(pair)
        bce = F.binary_cross_entropy_with_logits(logit.float(), target)
        out = {"total": bce, "bce": bce.detach()}
        if pose_fixed is not None and self.pose_weight > 0:
            s_near = mean_log_score(self.model, pose_fixed, pose_near)
            s_far = mean_log_score(self.model, pose_fixed, pose_far)
            rank = F.softplus(-(s_near - s_far) / self.temperature).mean()
            out["total"] = bce + self.pose_weight * rank
            out["pose"] = rank.detach()
        return out


class DsmTrainer(PoseRankingMixin, Trainer):
    """See the module docstring."""

    def build(self, resume, progress):
        cfg = self.cfg
        self.scales = _floats(cfg.spacing_mm)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"spacing_mm must list positive spacings like 2,4, got {cfg.spacing_mm!r}")
        self._sigma(0)          # target_sigma / target_shape checked against the scales before any data is read
        self._shape(0)
        root = Path(cfg.multimodal_root)
        self.train_sets = self._load_sets(root, cfg.train_subjects, progress)
        self.val_sets = self._load_sets(root, cfg.val_subjects, progress) if cfg.val_subjects else []
        split = load_split(cfg.split)
        names = split["train"][:cfg.ixi_subjects]
        self.ixi_sets = []
        for i, name in enumerate(names):
            path = Path(cfg.data_root) / "t1" / f"{name}_T1.nii.gz"
            v = io.read_volume(path)
            images = {"T1": v}
            if float(getattr(cfg, "ixi_strip", 0.0)) > 0:
                images["T1_stripped"] = skull_stripped(v, io.read_labels(Path(cfg.data_root) / "seg" /
                                                                         f"{name}_T1_DLMUSE.nii.gz"))
            self.ixi_sets.append({"name": name, "scales": [{k: normalize_intensity(to_isotropic(im, s).array, 99.0)
                                                            for k, im in images.items()} for s in self.scales],
                                  "coarse_grid": _coarse_grid(v, max(self.scales))})
            if progress:
                progress(Progress("load", i + 1, len(names), message=f"IXI {name}"))
        self.hard_poses = self._load_hard_poses(getattr(cfg, "pose_hard", ""))
        if resume is not None:
            return resume["model"]
        model = DsmNet(cfg.patch, tuple(_ints(cfg.channels)))
        if cfg.init:
            from .. import checkpoints
            ck = checkpoints.load_checkpoint(cfg.init, expected_paradigm="dsm", kinds=("dsm",))
            model.load_state_dict(ck["model"].state_dict(), strict=True)
        return model

    def _load_sets(self, root: Path, names: str, progress) -> list[dict]:
        sets = []
        for name in [n.strip() for n in str(names).split(",") if n.strip()]:
            files = modality_files(root / name)
            if len(files) < 2:
                raise ValueError(f"{root / name} holds fewer than two modalities")
            vols = {m: io.read_volume(p) for m, p in files.items()}
            sets.append({"name": name, "scales": [{m: normalize_intensity(to_isotropic(v, s).array, 99.0)
                                                   for m, v in vols.items()} for s in self.scales],
                         "coarse_grid": _coarse_grid(next(iter(vols.values())), max(self.scales))})
            if progress:
                progress(Progress("load", message=f"aligned set {name}: {', '.join(files)}"))
        return sets

    def objective(self):
        return DsmLoss(self.model, float(getattr(self.cfg, "pose_weight", 0.0)),
                       float(getattr(self.cfg, "pose_temperature", 0.05)))

    def preprocessing(self) -> dict:
        p = int(self.cfg.patch)
        return {"spacing_mm": self.scales, "percentile": 99.0, "patch": p, "grid_shape": [p, p, p],
                "spatial_dims": 3,
                "grid": "isotropic, fixed image's origin and direction",
                "intensity": "clip to [min, p99] then scale to [0, 1]", "prealignment": "center_of_mass",
                "modalities": "multimodal (trained on T1 / T1POST / T1c / T2 / FLAIR pairs and remapped IXI T1)",
                "trained_modalities": self.trained_modalities()}

    def trained_modalities(self) -> list[str]:
        """Modality families (:func:`app.engine.modality.modality_from_name`) of the aligned training images."""
        from ..modality import modality_from_name
        names = {m for s in getattr(self, "train_sets", []) for m in s["scales"][0]}
        return sorted({f for f in map(modality_from_name, names) if f})

    # ------------------------------------------------------------------ sampling
    def _sigma(self, scale_index: int) -> float:
        """Soft-target width (voxels) at scale ``scale_index`` (``target_sigma``: one number or one per scale)."""
        sig = _floats(getattr(self.cfg, "target_sigma", "1") or "1")
        if len(sig) not in (1, len(self.scales)) or min(sig) <= 0:
            raise ValueError(f"target_sigma must be one positive width or one per spacing ({len(self.scales)}), "
                             f"got {self.cfg.target_sigma!r}")
        return float(sig[scale_index] if len(sig) > 1 else sig[0])

    def _shape(self, scale_index: int) -> str:
        """Soft-target fall-off at scale ``scale_index`` (``target_shape``: one name or one per scale)."""
        shapes = [s.strip() for s in str(getattr(self.cfg, "target_shape", "gaussian") or "gaussian").split(",")
                  if s.strip()]
        if len(shapes) not in (1, len(self.scales)) or any(s not in TARGET_SHAPES for s in shapes):
            raise ValueError(f"target_shape must be one of {sorted(TARGET_SHAPES)}, once or one per spacing "
                             f"({len(self.scales)}), got {getattr(self.cfg, 'target_shape', None)!r}")
        return shapes[scale_index] if len(shapes) > 1 else shapes[0]

    def _pick(self, rng: np.random.Generator, s: dict, synthetic: bool):
        """Two contrasts (A, B) of one aligned set at one scale, and the image whose foreground holds
        the centres: two modalities of a multimodal subject, or random remappings of an IXI T1 (its
        skull-stripped version for a share ``ixi_strip``)."""
        if synthetic:
            strip = "T1_stripped" in s and rng.random() < float(getattr(self.cfg, "ixi_strip", 0.0))
            base = s["T1_stripped" if strip else "T1"]
            a = random_lut(rng)(base) if rng.random() < 0.5 else base
            b = random_lut(rng)(base)
            return a, b, base       # centres inside the head or brain, whatever the remapping made of it
        mods = list(s)
        i, j = rng.choice(len(mods), 2, replace=False)
        return s[mods[i]], s[mods[j]], s[mods[i]]

    def _draw(self, rng: np.random.Generator, sets: list[dict], synthetic: bool, kind: str | None = None,
              offset=None, rotation=None, scale: int | None = None, frame_rotation=None):
        """One (pair (2, P, P, P) float32, target, offset (3,) voxels zyx) sample; ``offset`` forces d
        (no rotation unless ``rotation`` (3, 3) is given), ``scale`` forces the scale index,
        ``frame_rotation`` (3, 3) the sampling frame (none unless given when ``offset`` or ``rotation`` is)."""
        cfg = self.cfg
        p, r = cfg.patch, cfg.patch // 2
        si = int(rng.integers(len(self.scales)))
        if scale is not None:
            si = int(scale)
        s = sets[int(rng.integers(len(sets)))]["scales"][si]
        a, b, fg_image = self._pick(rng, s, synthetic)
        kind = kind or ("zero", "small", "large")[int(rng.integers(3))]
        big = int(cfg.max_offset)
        if offset is not None:
            d = np.asarray(offset, int)
        elif kind == "zero":
            d = np.zeros(3, int)
        elif kind == "small":
            d = rng.integers(-2, 3, 3)
            while not d.any():
                d = rng.integers(-2, 3, 3)
        else:
            d = rng.integers(-big, big + 1, 3)
            while np.abs(d).max() < 3:
                d = rng.integers(-big, big + 1, 3)
        rot = None if rotation is None else np.asarray(rotation, float)
        share = float(getattr(cfg, "rotate_fraction", 0.0))
        if rotation is None and offset is None and kind != "zero" and share > 0 and rng.random() < share:
            rot = random_rotation(rng, float(getattr(cfg, "max_rotation_deg", 45.0)))
        # the fixed patch lies inside its grid (as the optimiser's patches do); the moving one may
        # reach outside its grid, where it is zero (as a warped moving image is)
        shape = np.array(a.shape)
        fg = fg_image[r:shape[0] - r, r:shape[1] - r, r:shape[2] - r] > 0.1
        idx = np.argwhere(fg)
        if len(idx) == 0:
            raise ValueError(f"an image of {sets[0]['name']} is too small for patches of {p} voxels")
        c = idx[int(rng.integers(len(idx)))] + r
        # a rotated sampling frame Q: A at c + Q o, B at c + d + R Q o (the same anatomy at another head pose)
        frame = None
        if frame_rotation is not None:
            frame = np.asarray(frame_rotation, float)
        elif offset is None and rotation is None and rng.random() < float(getattr(cfg, "frame_fraction", 0.0)):
            frame = random_rotation(rng, float(getattr(cfg, "max_frame_deg", 180.0)))
        if frame is None:
            pa = a[c[0] - r:c[0] + r + 1, c[1] - r:c[1] + r + 1, c[2] - r:c[2] + r + 1]
            pb = cut_patch(b, c, d, rot, p)
        else:
            pa = cut_patch(a, c, np.zeros(3, int), frame, p)
            pb = cut_patch(b, c, d, frame if rot is None else rot @ frame, p)
        if cfg.aug_intensity:
            pa = np.clip(pa, 0, 1) ** rng.uniform(0.7, 1.4)
            pb = np.clip(pb, 0, 1) ** rng.uniform(0.7, 1.4)
        sigma = self._sigma(si)
        msd = float((d ** 2).sum()) if rot is None else patch_msd(d, rot, p, frame)
        target = soft_target(msd, sigma, self._shape(si))
        return np.stack([pa, pb]).astype(np.float32), target, d

    def sample(self, step, rng, step_rng):
        pairs, targets = [], []
        for _ in range(self.cfg.batch_size):
            synthetic = bool(self.ixi_sets) and rng.random() < self.cfg.synthetic_fraction
            pair, t, _ = self._draw(rng, self.ixi_sets if synthetic else self.train_sets, synthetic)
            pairs.append(pair)
            targets.append(t)
        batch = {"pair": torch.as_tensor(np.stack(pairs), device=self.device),
                 "target": torch.as_tensor(np.array(targets, np.float32), device=self.device)}
        if float(getattr(self.cfg, "pose_weight", 0.0)) > 0:
            poses = []
            hard = getattr(self, "hard_poses", [])
            for _ in range(int(self.cfg.pose_pairs)):
                if hard and rng.random() < float(self.cfg.pose_hard_fraction):
                    poses.append(self._hard_pair(rng, hard[int(rng.integers(len(hard)))])[0])
                    continue
                synthetic = bool(self.ixi_sets) and rng.random() < self.cfg.synthetic_fraction
                poses.append(self._pose_pair(rng, self.ixi_sets if synthetic else self.train_sets, synthetic)[0])
            for i, name in enumerate(("pose_fixed", "pose_near", "pose_far")):
                batch[name] = torch.as_tensor(np.stack([q[i] for q in poses]), device=self.device)
        return batch

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        if not self.val_sets:
            return {}
        cfg = self.cfg
        rng = np.random.default_rng(12345)
        self.model.eval()
        out = {}
        with torch.no_grad():
            pairs, targets = [], []
            for _ in range(256):
                pr, t, _ = self._draw(rng, self.val_sets, False)
                pairs.append(pr)
                targets.append(t)
            logit = self.model(torch.as_tensor(np.stack(pairs), device=self.device)).float()
            out["loss"] = float(F.binary_cross_entropy_with_logits(
                logit, torch.as_tensor(np.array(targets, np.float32), device=self.device)))
            # ranking: the aligned pair against the same centre displaced by 1 or 3 voxels
            for name, step in (("rank1", 1), ("rank3", 3)):
                wins = 0
                n = 64
                for k in range(n):
                    e = np.zeros(3, int)
                    e[k % 3] = step if k % 2 else -step
                    pr0, _, _ = self._draw(np.random.default_rng(1000 + k), self.val_sets, False, offset=(0, 0, 0))
                    pr1, _, _ = self._draw(np.random.default_rng(1000 + k), self.val_sets, False, offset=e)
                    lg = self.model(torch.as_tensor(np.stack([pr0, pr1]), device=self.device))
                    wins += int(lg[0] > lg[1])
                out[name] = wins / n
            # graded: the same centre displaced by 2 and by 5 voxels along one axis, on the coarsest scale;
            # a score that still falls beyond a few voxels ranks the nearer pair higher (a wider basin)
            wins = 0
            n = 64
            coarse = int(np.argmax(self.scales))
            for k in range(n):
                e = np.zeros(3, int)
                e[k % 3] = 1 if k % 2 else -1
                pr2, _, _ = self._draw(np.random.default_rng(2000 + k), self.val_sets, False, offset=2 * e,
                                       scale=coarse)
                pr5, _, _ = self._draw(np.random.default_rng(2000 + k), self.val_sets, False, offset=5 * e,
                                       scale=coarse)
                lg = self.model(torch.as_tensor(np.stack([pr2, pr5]), device=self.device))
                wins += int(lg[0] > lg[1])
            out["grade"] = wins / n
            # the same on the coarsest scale in a random frame (any head pose): misrotated by 10 vs 40 deg
            # about one axis, and aligned vs 20 deg; the ranking a coarse rigid search climbs
            from scipy.spatial.transform import Rotation
            wins10, wins0 = 0, 0
            for k in range(n):
                g = np.random.default_rng(3000 + k)
                frame = random_rotation(g, 180.0)
                axis = g.normal(size=3)
                axis /= np.linalg.norm(axis)
                rots = [Rotation.from_rotvec(axis * np.deg2rad(a)).as_matrix() for a in (0.0, 10.0, 20.0, 40.0)]
                prs = [self._draw(np.random.default_rng(4000 + k), self.val_sets, False, offset=(0, 0, 0),
                                  rotation=rt, scale=coarse, frame_rotation=frame)[0] for rt in rots]
                lg = self.model(torch.as_tensor(np.stack(prs), device=self.device)).float()
                wins10 += int(lg[1] > lg[3])
                wins0 += int(lg[0] > lg[2])
            out["frame_grade"] = wins10 / n
            out["frame_peak"] = wins0 / n
            out.update(self.validate_poses())
            pos = [self._draw(rng, self.val_sets, False, kind="zero")[0] for _ in range(64)]
            neg = [self._draw(rng, self.val_sets, False, kind="large")[0] for _ in range(64)]
            lp = self.model(torch.as_tensor(np.stack(pos), device=self.device)).float().cpu().numpy()
            ln = self.model(torch.as_tensor(np.stack(neg), device=self.device)).float().cpu().numpy()
            out["auc"] = float((lp[:, None] > ln[None, :]).mean())
        self.model.train()
        return out

    def record(self) -> dict:
        cfg = self.cfg
        return {"data": {"multimodal_train": cfg.train_subjects, "multimodal_val": cfg.val_subjects,
                         "ixi_synthetic": [s["name"] for s in self.ixi_sets]},
                "loss": (f"BCE with logits on soft targets ({getattr(cfg, 'target_shape', 'gaussian')}: gaussian "
                         f"exp(-msd / 2 sigma^2), cauchy 1 / (1 + msd / 2 sigma^2); msd: mean squared voxel "
                         f"displacement of the patch), sigma {cfg.target_sigma} voxels at {cfg.spacing_mm} mm"),
                "offsets": f"zero / small (|d_i| <= 2) / large (3..{cfg.max_offset}) voxels, one third each",
                "rotations": (f"{cfg.rotate_fraction:.0%} of displaced samples rotated up to "
                              f"{cfg.max_rotation_deg:g} deg" if cfg.rotate_fraction > 0 else "none"),
                "skull_stripped_ixi": float(getattr(cfg, "ixi_strip", 0.0)),
                "frames": (f"{cfg.frame_fraction:.0%} of samples cut in a frame rotated up to {cfg.max_frame_deg:g} "
                           f"deg" if getattr(cfg, "frame_fraction", 0.0) > 0 else "none"),
                "poses": (f"whole-image pose ranking at the coarsest spacing, weight {cfg.pose_weight:g}: "
                          f"{cfg.pose_pairs} pairs x {cfg.pose_patches} patches per step, far poses up to "
                          f"{cfg.pose_max_deg:g} deg / {cfg.pose_max_mm:g} mm, temperature {cfg.pose_temperature:g}"
                          + (f"; {cfg.pose_hard_fraction:.0%} of the pairs from {len(getattr(self, 'hard_poses', []))} "
                             f"hard poses ({Path(cfg.pose_hard).name}: where the coarse search of the initial network "
                             f"stopped short on training subjects)" if getattr(self, "hard_poses", None) else "")
                          if getattr(cfg, "pose_weight", 0.0) > 0 else "none"),
                "augmentation": "gamma 0.7-1.4 per patch" if cfg.aug_intensity else "none"}

    def summary(self, val: dict) -> str:
        return " ".join(f"{k} {val[k]:.3f}" for k in ("loss", "rank1", "rank3", "grade", "frame_grade", "frame_peak",
                                                     "pose_rank", "pose_rank60", "auc") if k in val)
