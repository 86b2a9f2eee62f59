"""Minimal local stand-in for ``app.engine.synthetic`` (the shared known-transform generator, being
written on another branch): the same functions and semantics, linear transforms only. Delete this
file once ``app/engine/synthetic.py`` is on main (``bench_multimodal.py`` then imports it)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from app.engine.spatial import resample
from app.engine.types import LabelMap, Transform, Volume


def axis_angle_matrix(axis, angle_deg: float) -> np.ndarray:
    k = np.asarray(axis, float).reshape(3)
    k = k / np.linalg.norm(k)
    a = math.radians(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def about_centre(linear, centre_xyz, translation_xyz=(0.0, 0.0, 0.0)) -> np.ndarray:
    lin = np.asarray(linear, float).reshape(3, 3)
    c = np.asarray(centre_xyz, float).reshape(3)
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = c - lin @ c + np.asarray(translation_xyz, float).reshape(3)
    return m


def band_transform(rng, centre_xyz, rot_range, trans_range) -> np.ndarray:
    lin = axis_angle_matrix(rng.normal(size=3), rng.uniform(*rot_range))
    d = rng.normal(size=3)
    return about_centre(lin, centre_xyz, d / np.linalg.norm(d) * rng.uniform(*trans_range))


def matrix_to_transform(matrix) -> Transform:
    m = np.asarray(matrix, float)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in m[:3, :3].reshape(-1)))
    t.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    return Transform(t, "affine")


@dataclass
class KnownPair:
    fixed: Volume
    moving: Volume
    fixed_labels: Optional[LabelMap]
    transform: Transform


def make_pair(moving: Volume, moving_labels=None, matrix=None) -> KnownPair:
    t = matrix_to_transform(matrix)
    fixed = resample(moving, moving, t, "linear")
    fl = resample(moving_labels, moving, t, "nearest") if moving_labels is not None else None
    return KnownPair(fixed, moving, fl, t)


def brain_points(labels: Volume, max_points: int = 4000, seed: int = 0) -> np.ndarray:
    idx = np.argwhere(np.asarray(labels.array) > 0)
    if len(idx) > max_points:
        idx = idx[np.sort(np.random.default_rng(seed).choice(len(idx), max_points, replace=False))]
    return labels.index_to_physical(idx[:, ::-1].astype(float))


def mean_point_error(estimate, truth, points) -> float:
    p = np.atleast_2d(np.asarray(points, float))
    return float(np.linalg.norm(estimate.transform_points(p) - truth.transform_points(p), axis=1).mean())


@dataclass(frozen=True)
class Case:
    subject: str
    band: int
    rot_range: tuple
    trans_range: tuple
    linear: tuple
    translation: tuple
    index: int

    @property
    def label(self) -> str:
        return f"{self.rot_range[1]:g}deg/{self.trans_range[1]:g}mm"

    def matrix(self, centre_xyz) -> np.ndarray:
        return about_centre(np.asarray(self.linear), centre_xyz, self.translation)


def make_cases(subjects: Sequence[str], per_band: int = 5, bands=(), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out, k, prev = [], 0, (0.0, 0.0)
    for b, (rot, trans) in enumerate(bands):
        for i in range(per_band):
            m = band_transform(rng, np.zeros(3), (prev[0], rot), (prev[1], trans))
            out.append(Case(subjects[k % len(subjects)], b, (prev[0], float(rot)), (prev[1], float(trans)),
                            tuple(map(tuple, m[:3, :3])), tuple(m[:3, 3]), i))
            k += 1
        prev = (float(rot), float(trans))
    return out


def success_table(rows, error_key="error_mm", band_key="band_label", threshold_mm=2.0) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[band_key], []).append(float(r[error_key]))
    return {b: {"n": len(v), "median_mm": float(np.median(v)), "success": float(np.mean(np.asarray(v) < threshold_mm))}
            for b, v in out.items()}
