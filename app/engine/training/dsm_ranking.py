"""Whole-image pose ranking for the ``dsm`` trainer (:class:`app.engine.training.dsm.DsmTrainer`).

At the coarsest spacing the optimiser's patches cover most of the head, so its landscape is the mean
score of a few patches at a whole-image pose, which single-patch targets do not shape. A pose pair
scores the same fixed patch centres with the moving image seen through a far rigid pose and through a
nearer pose on the straight path from it to the truth (:func:`partial_pose`); the trainer's loss
(:class:`app.engine.training.dsm.DsmLoss`) ranks their mean log-scores (:func:`mean_log_score`). Far
poses are random, or *hard poses*: where the coarse search of a network stopped short on a training
subject (``pose_hard``, mined by :mod:`app.engine.training.dsm_poses`). Geometry in voxel indices
(z, y, x) of the coarsest training grid; 4x4 matrices map fixed indices to moving indices.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..nn.dsm_net import DsmNet
from ..types import Volume

log = logging.getLogger(__name__)


def _coarse_grid(v: Volume, spacing_mm: float) -> np.ndarray:
    """4x4 zyx index -> xyz physical matrix of ``v``'s isotropic grid at ``spacing_mm``
    (:func:`app.engine.training.dsm.to_isotropic`)."""
    from ..nn.geometry import grid_matrix
    img = v.to_sitk(sitk.sitkFloat32)
    size = [max(4, int(round(s * p / spacing_mm))) for s, p in zip(img.GetSize(), img.GetSpacing())]
    grid = Volume(np.zeros(size[::-1], np.float32), (spacing_mm,) * 3, v.origin, v.direction, "grid")
    return grid_matrix(grid)


def pose_patches(image: np.ndarray, centres, matrix, patch: int) -> np.ndarray:
    """Patches (K, P, P, P) of ``image`` seen through a pose, as the optimiser's warped image shows them.

    The patch voxel ``x = c + o`` (fixed grid, zyx voxels; ``c`` in ``centres`` (K, 3), ``o`` the patch
    offsets) reads ``image`` at ``matrix @ (x, 1)`` (4x4, fixed -> image voxel indices, zyx: the pose
    ``warped(x) = moving(T(x))`` in index space), linear interpolation, zero outside the grid (the
    optimiser's ``zeros`` padding).
    """
    from scipy.ndimage import map_coordinates
    r = patch // 2
    o = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    c = np.asarray(centres, float).reshape(-1, 3)
    pts = (c[:, None, :] + o[None]).reshape(-1, 3)
    m = np.asarray(matrix, float)
    moved = pts @ m[:3, :3].T + m[:3, 3]
    out = map_coordinates(image, moved.T, order=1, mode="constant", cval=0.0)
    return out.reshape(len(c), patch, patch, patch).astype(np.float32)


def rigid_about(rotation, pivot, translation) -> np.ndarray:
    """4x4 ``x -> R (x - pivot) + pivot + translation``."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = np.asarray(pivot, float) - np.asarray(rotation, float) @ np.asarray(pivot, float) + translation
    return m


def partial_pose(matrix, pivot, fraction: float) -> np.ndarray:
    """The rigid 4x4 ``matrix`` scaled by ``fraction`` along the straight path from the identity: its
    rotation vector and its translation about ``pivot`` times ``fraction`` (0: identity, 1: itself)."""
    from scipy.spatial.transform import Rotation
    m = np.asarray(matrix, float)
    q = np.asarray(pivot, float)
    t = m[:3, :3] @ q + m[:3, 3] - q            # x -> R (x - q) + q + t
    rot = Rotation.from_matrix(m[:3, :3]).as_rotvec() * float(fraction)
    return rigid_about(Rotation.from_rotvec(rot).as_matrix(), q, t * float(fraction))


def mean_log_score(model: DsmNet, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Mean log P(correspond) over the K patches of each pose: ``fixed``, ``moving`` (N, K, P, P, P) -> (N,).

    The negative of the optimiser's loss (:class:`app.engine.nn.dsm_net.DsmSimilarity`) at that pose."""
    n, k = fixed.shape[:2]
    pair = torch.stack([fixed.reshape(n * k, *fixed.shape[2:]), moving.reshape(n * k, *moving.shape[2:])], 1)
    return -F.softplus(-model(pair).float()).reshape(n, k).mean(1)


class PoseRankingMixin:
    """The pose-pair sampling, hard-pose loading and pose validation of ``DsmTrainer`` (it brings
    ``cfg``, ``scales``, ``train_sets`` / ``ixi_sets`` / ``val_sets``, ``model``, ``device`` and ``_pick``)."""

    def _load_hard_poses(self, path: str) -> list[dict]:
        """The kept records of a ``pose_hard`` file (:mod:`app.engine.training.dsm_poses`) whose set was loaded,
        with their frame and pose as 4x4 index matrices (zyx) on the coarsest training grid."""
        if not path:
            return []
        import json
        from scipy.spatial.transform import Rotation
        records = json.loads(Path(path).read_text())
        by_name = {s["name"]: s for s in self.train_sets + self.ixi_sets}
        out, missing = [], []
        for rec in records:
            if not rec.get("kept", True):
                continue
            s = by_name.get(rec["set"])
            if s is None or rec["fixed"] not in s["scales"][0] or (rec["lut_seed"] is None and
                                                                   rec["moving"] not in s["scales"][0]):
                missing.append(f"{rec['set']}:{rec['fixed']}:{rec['moving']}")
                continue
            g = s["coarse_grid"]
            gi = np.linalg.inv(g)
            frame = gi @ np.asarray(rec["frame"], float) @ g
            pose = gi @ np.asarray(rec["pose"], float) @ g
            residual = pose @ np.linalg.inv(frame)
            deg = float(np.degrees(np.linalg.norm(Rotation.from_matrix(residual[:3, :3]).as_rotvec())))
            out.append({**rec, "set_ref": s, "frame_v": frame, "pose_v": pose, "residual_deg": deg})
        if missing:
            log.warning("pose_hard: %d record(s) skipped: their set or image is not loaded (set:fixed:moving %s; "
                        "IXI T1_stripped needs ixi_strip > 0 and the subject among ixi_subjects)", len(missing),
                        ", ".join(sorted(set(missing))))
        if not out and records:
            raise ValueError(f"pose_hard {path}: none of its hard poses belongs to a loaded training set")
        return out

    def _hard_pair(self, rng: np.random.Generator, rec: dict, fraction: float | None = None):
        """A pose pair on the path from a hard record's stopping pose (far) to the truth (see ``_pose_patches``)."""
        from .dsm import random_lut
        si = int(np.argmax(self.scales))
        s = rec["set_ref"]["scales"][si]
        a = s[rec["fixed"]]
        b = s[rec["moving"]] if rec["lut_seed"] is None else random_lut(np.random.default_rng(int(rec["lut_seed"])))(a)
        fg = a > 0.1
        pivot = np.argwhere(fg).mean(0)
        return self._pose_patches(rng, a, b, fg, rec["frame_v"], rec["pose_v"], pivot,
                                  max(rec["residual_deg"], 1.0), fraction)

    def _pose_pair(self, rng: np.random.Generator, sets: list[dict], synthetic: bool, far_deg: float | None = None,
                   fraction: float | None = None):
        """One whole-image pose pair at the coarsest scale: (fixed, near, far) patches (K, P, P, P) and the
        two angles (degrees).

        A random rigid misalignment ``far`` (random axis, angle up to ``pose_max_deg``, translation up to
        ``pose_max_mm``, about the fixed foreground's centroid) and ``near``, the same pose scaled by a
        ``fraction`` (:meth:`_fraction`): a nearer point on the straight path to the truth. The same
        ``pose_patches`` fixed centres (inside A's foreground, a patch radius from the border, as the
        optimiser draws them) are scored at both poses."""
        from scipy.spatial.transform import Rotation
        cfg = self.cfg
        si = int(np.argmax(self.scales))
        s = sets[int(rng.integers(len(sets)))]["scales"][si]
        a, b, fg_image = self._pick(rng, s, synthetic)
        pivot = np.argwhere(fg_image > 0.1).mean(0)
        axis = rng.normal(size=3)
        axis /= max(np.linalg.norm(axis), 1e-12)
        tdir = rng.normal(size=3)
        tdir /= max(np.linalg.norm(tdir), 1e-12)
        deg = float(rng.uniform(5.0, float(cfg.pose_max_deg))) if far_deg is None else float(far_deg)
        shift = tdir * rng.uniform(0.0, float(cfg.pose_max_mm)) / self.scales[si]
        far = rigid_about(Rotation.from_rotvec(axis * np.deg2rad(deg)).as_matrix(), pivot, shift)
        return self._pose_patches(rng, a, b, fg_image > 0.1, np.eye(4), far, pivot, deg, fraction)

    @staticmethod
    def _fraction(rng: np.random.Generator, deg: float) -> float:
        """Where the near pose lies on the path (0: the truth): the truth a quarter of the time, anywhere
        to 85 % of the way out a third, and 5-15 degrees nearer than the far pose otherwise (the steps an
        optimiser takes, where a barrier stops it)."""
        u = rng.random()
        if u < 0.25:
            return 0.0
        if u < 0.6:
            return float(rng.uniform(0.05, 0.85))
        return float(max(0.0, 1.0 - rng.uniform(5.0, 15.0) / max(deg, 1e-6)))

    def _pose_patches(self, rng, a, b, fg, frame, far, pivot, deg, fraction):
        """(fixed, near, far) patches of a pose pair: the fixed image is A seen through ``frame`` (4x4 index
        -> A index: the fixed image of a known-transform case), the far pose ``far`` (fixed index -> B
        index), the near one ``partial_pose(far . frame^-1, fraction) . frame`` (the residual misalignment
        scaled toward the truth about ``pivot``, A's voxels); centres in the fixed image's foreground (``fg``
        on A seen through the frame) a patch radius from the border."""
        from scipy.ndimage import map_coordinates
        cfg = self.cfg
        p, r = int(cfg.patch), int(cfg.patch) // 2
        shape = np.array(a.shape)
        inner = np.argwhere(np.ones(tuple(shape - 2 * r), bool)) + r
        if len(inner) == 0:
            raise ValueError(f"an image of shape {tuple(shape)} is too small for patches of {p} voxels")
        if np.allclose(frame, np.eye(4)):
            ok = fg[inner[:, 0], inner[:, 1], inner[:, 2]]
        else:
            pts = inner @ np.asarray(frame)[:3, :3].T + np.asarray(frame)[:3, 3]
            ok = map_coordinates(fg.astype(np.float32), pts.T, order=0, mode="constant", cval=0.0) > 0
        idx = inner[ok] if ok.any() else inner
        centres = idx[rng.integers(len(idx), size=int(cfg.pose_patches))]
        if fraction is None:
            fraction = self._fraction(rng, deg)
        residual = np.asarray(far, float) @ np.linalg.inv(frame)
        near = partial_pose(residual, pivot, fraction) @ np.asarray(frame, float)
        fixed = pose_patches(a, centres, frame, p)
        pn, pf = pose_patches(b, centres, near, p), pose_patches(b, centres, far, p)
        if cfg.aug_intensity:
            fixed = np.clip(fixed, 0, 1) ** rng.uniform(0.7, 1.4)
            g = rng.uniform(0.7, 1.4)       # one moving image: the same gamma at both poses
            pn, pf = np.clip(pn, 0, 1) ** g, np.clip(pf, 0, 1) ** g
        return (fixed.astype(np.float32), pn.astype(np.float32), pf.astype(np.float32)), (deg * fraction, deg)

    def validate_poses(self) -> dict:
        """``pose_rank`` / ``pose_rank60`` on the held-out sets (call under ``torch.no_grad``)."""
        out = {}
        # whole-image poses on the coarsest scale (pose_rank: the nearer pose of a straight path to the truth
        # scores higher, the landscape a coarse rigid search climbs; pose_rank60: far poses of 60 deg and more)
        wins, wins60, n60 = 0, 0, 0
        for k in range(48):
            (fx, nr, fr), (_, far_deg) = self._pose_pair(np.random.default_rng(5000 + k), self.val_sets, False)
            s = [float(mean_log_score(self.model, torch.as_tensor(fx[None], device=self.device),
                                      torch.as_tensor(m[None], device=self.device))) for m in (nr, fr)]
            wins += int(s[0] > s[1])
            if far_deg >= 60:
                n60 += 1
                wins60 += int(s[0] > s[1])
        out["pose_rank"] = wins / 48
        if n60:
            out["pose_rank60"] = wins60 / n60
        return out
