"""Rigid pose bookkeeping of the ``agent`` paradigm: six parameters, twelve actions, exact rewards.

A *pose* is six numbers ``(tx, ty, tz, rx, ry, rz)``: a translation in mm and rotations in degrees
about the physical x, y, z axes (LPS), about a fixed centre ``c`` (the fixed image's centre):

    P(x) = R (x - c) + c + t,      R = Rz(rz) @ Ry(ry) @ Rx(rx),

mapping **fixed physical points to moving physical points** (the engine's Transform convention).
That is exactly ``SimpleITK.Euler3DTransform`` with ``ComputeZYX`` on, centre ``c``, angles in
radians (:func:`pose_transform`).

Actions (:data:`ACTIONS`): +-1 step along each of the six parameters; action ``k`` moves parameter
``k // 2`` by ``+step`` when ``k`` is even and ``-step`` when odd, so ``k ^ 1`` undoes ``k``
exactly. Steps are mm for translations and degrees for rotations (coarse to fine, e.g. 8, 4, 2, 1).

Reward of an action (Liao et al. 2017, "greedy supervision"): how much it reduces the mean
distance (mm) between where the pose and the known true transform send the brain points,

    D(p) = mean_x |P(x) - T(x)|,      r(a) = D(p) - D(p + a).

Everything here is numpy (no torch): cheap, exact, and shared by training, inference and tests.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .types import Transform

PARAMS = ("tx", "ty", "tz", "rx", "ry", "rz")
UNITS = ("mm", "mm", "mm", "deg", "deg", "deg")
ACTIONS = tuple(f"{s}{p}" for p in PARAMS for s in "+-")     # "+tx", "-tx", "+ty", ...
N_ACTIONS = len(ACTIONS)
DEFAULT_STEPS = (8.0, 4.0, 2.0, 1.0)


def check_pose(pose) -> np.ndarray:
    """``pose`` as a float64 (6,) array (ValueError naming the shape otherwise)."""
    p = np.asarray(pose, np.float64)
    if p.shape != (6,) or not np.all(np.isfinite(p)):
        raise ValueError(f"a pose is 6 finite numbers (tx, ty, tz mm, rx, ry, rz deg), got {pose!r}")
    return p


def action_delta(action: int, step: float) -> np.ndarray:
    """The (6,) change of the pose made by ``action`` (0..11) with step ``step`` (mm or degrees)."""
    if not 0 <= int(action) < N_ACTIONS:
        raise ValueError(f"action must be 0..{N_ACTIONS - 1}, got {action!r}")
    d = np.zeros(6)
    d[int(action) // 2] = float(step) if int(action) % 2 == 0 else -float(step)
    return d


def inverse_action(action: int) -> int:
    """The action that undoes ``action`` (same parameter, opposite sign)."""
    return int(action) ^ 1


def apply_action(pose, action: int, step: float) -> np.ndarray:
    """``pose`` after ``action`` with step ``step``: a new (6,) array."""
    return check_pose(pose) + action_delta(action, step)


def all_actions(pose, step: float) -> np.ndarray:
    """(12, 6): ``pose`` after each of the 12 actions."""
    p = check_pose(pose)
    return p[None] + np.stack([action_delta(a, step) for a in range(N_ACTIONS)])


def rotation_zyx(angles_deg: np.ndarray) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (..., 3) in degrees about x, y, z -> (..., 3, 3)."""
    a = np.deg2rad(np.asarray(angles_deg, np.float64))
    c, s = np.cos(a), np.sin(a)
    one, zero = np.ones_like(c[..., 0]), np.zeros_like(c[..., 0])
    rx = np.stack([one, zero, zero, zero, c[..., 0], -s[..., 0], zero, s[..., 0], c[..., 0]], -1)
    ry = np.stack([c[..., 1], zero, s[..., 1], zero, one, zero, -s[..., 1], zero, c[..., 1]], -1)
    rz = np.stack([c[..., 2], -s[..., 2], zero, s[..., 2], c[..., 2], zero, zero, zero, one], -1)
    shape = a.shape[:-1] + (3, 3)
    return rz.reshape(shape) @ ry.reshape(shape) @ rx.reshape(shape)


def pose_matrices(poses, centre_xyz) -> np.ndarray:
    """Poses (N, 6) (or (6,)) -> homogeneous matrices (N, 4, 4) (or (4, 4)), fixed -> moving points."""
    p = np.asarray(poses, np.float64)
    single = p.ndim == 1
    p = p.reshape(-1, 6)
    c = np.asarray(centre_xyz, np.float64).reshape(3)
    r = rotation_zyx(p[:, 3:])
    m = np.tile(np.eye(4), (len(p), 1, 1))
    m[:, :3, :3] = r
    m[:, :3, 3] = c - r @ c + p[:, :3]
    return m[0] if single else m


def pose_matrix(pose, centre_xyz) -> np.ndarray:
    """One pose (6,) -> 4x4 ``x -> R (x - c) + c + t`` (LPS mm)."""
    return pose_matrices(check_pose(pose), centre_xyz)


def pose_from_matrix(matrix, centre_xyz) -> np.ndarray:
    """The pose (6,) of a rigid 4x4 (fixed -> moving points) about ``centre_xyz``.

    The rotation is the closest rotation to the linear part (SVD); its ZYX Euler angles are in
    degrees, rx, rz in (-180, 180], ry in [-90, 90].
    """
    m = np.asarray(matrix, np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    ry = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    rx = np.arctan2(r[2, 1], r[2, 2])
    rz = np.arctan2(r[1, 0], r[0, 0])
    c = np.asarray(centre_xyz, np.float64).reshape(3)
    t = m[:3, 3] - (c - r @ c)
    return np.concatenate([t, np.degrees([rx, ry, rz])])


def pose_transform(pose, centre_xyz) -> Transform:
    """The pose as a rigid :class:`~app.engine.types.Transform` (``sitk.Euler3DTransform``, ZYX)."""
    p = check_pose(pose)
    t = sitk.Euler3DTransform()
    t.SetComputeZYX(True)
    t.SetCenter(tuple(float(v) for v in np.asarray(centre_xyz, float).reshape(3)))
    t.SetRotation(*(float(v) for v in np.deg2rad(p[3:])))
    t.SetTranslation(tuple(float(v) for v in p[:3]))
    return Transform(t, "rigid")


def mean_distances(matrices, truth, points) -> np.ndarray:
    """Mean ``|M x - T x|`` (mm) over ``points`` (P, 3) LPS mm for each of ``matrices`` (N, 4, 4) -> (N,)."""
    m = np.asarray(matrices, np.float64).reshape(-1, 4, 4)
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    if len(pts) == 0:
        raise ValueError("no points to measure the pose error on")
    t = np.asarray(truth, np.float64)
    target = pts @ t[:3, :3].T + t[:3, 3]                                   # (P, 3)
    mapped = np.einsum("nij,pj->npi", m[:, :3, :3], pts) + m[:, None, :3, 3]  # (N, P, 3)
    return np.linalg.norm(mapped - target[None], axis=-1).mean(1)


def pose_error(pose, truth, points, centre_xyz) -> float:
    """Mean point distance (mm) between ``pose`` and the true 4x4 ``truth`` over ``points`` (P, 3)."""
    return float(mean_distances(pose_matrix(pose, centre_xyz)[None], truth, points)[0])


def action_rewards(pose, step: float, truth, points, centre_xyz) -> np.ndarray:
    """(12,) rewards ``D(pose) - D(pose + a)`` (mm) of every action with step ``step``.

    Parameters
    ----------
    pose : (6,) current pose about ``centre_xyz``.
    truth : (4, 4) the known transform, fixed -> moving physical points (LPS mm).
    points : (P, 3) fixed-space points (LPS mm) where the distance is measured (brain voxels).
    """
    c = centre_xyz
    d = mean_distances(np.concatenate([pose_matrix(pose, c)[None], pose_matrices(all_actions(pose, step), c)]),
                       truth, points)
    return d[0] - d[1:]
