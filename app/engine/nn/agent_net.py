"""The ``agent`` paradigm's action-value network, its state, and the greedy episode.

State: the fixed working image and the moving working image resampled through the current pose
(:func:`warp_through_poses`), stacked as channels ``(fixed, moving o P, fixed - moving o P)``.
:class:`AgentNet` maps a batch of states ``(B, 2, D, H, W)`` and the step size of each ``(B,)``
(mm / degrees) to 12 action values ``(B, 12)``: the predicted reward of each action *per unit
step* (mm of mean point distance removed per mm or degree moved), the quantity it is trained to
regress (:func:`app.engine.rigid_pose.action_rewards` divided by the step).

:func:`greedy_episode` runs a policy (the network, or an exact oracle in tests) from a start pose:
take the best action while its value is positive; when none is, or the agent comes back to a pose
it already visited at this step size (oscillation), halve the step; stop after the finest step
(converged) or at the step cap (did not converge).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import rigid_pose as RP
from ..types import check_cancel
from . import geometry as G


class AgentNet(nn.Module):
    """Small 3D CNN: (fixed, moving o P) on the working grid + step size -> 12 action values.

    Parameters
    ----------
    channels : channels of the stride-2 levels (each a stride-2 conv, then a plain conv but at the first).
    hidden : width of the two fully connected layers.
    pooled : (d, h, w) the feature map is average-pooled to before the fully connected layers
        (keeps where things are: rotations need the layout, not just the content).
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 32), hidden: int = 128,
                 pooled: Sequence[int] = (3, 4, 4)):
        super().__init__()
        self.config = {"kind": "agent", "channels": [int(c) for c in channels], "hidden": int(hidden),
                       "pooled": [int(p) for p in pooled]}
        if len(self.config["pooled"]) != 3 or not channels:
            raise ValueError(f"AgentNet needs channels and pooled=(d, h, w), got {channels!r}, {pooled!r}")
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(self.config["channels"]):
            layers += [nn.Conv3d(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            if i > 0:     # a plain conv per level, but not at the first (full-size, the costly one)
                layers += [nn.Conv3d(c, c, 3, padding=1), nn.LeakyReLU(0.2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(tuple(self.config["pooled"]))
        n_feat = c_in * int(np.prod(self.config["pooled"]))
        self.fc1 = nn.Linear(n_feat + 2, hidden)
        self.fc2 = nn.Linear(hidden + 2, hidden)
        self.head = nn.Linear(hidden, RP.N_ACTIONS)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, state: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``state`` (B, 2, D, H, W) fixed and warped moving in [0, 1]; ``step`` (B,) mm / degrees.

        Returns (B, 12) predicted reward per unit step of each action (:data:`rigid_pose.ACTIONS`).
        """
        if state.dim() != 5 or state.shape[1] != 2:
            raise ValueError(f"AgentNet expects a state (B, 2, D, H, W), got {tuple(state.shape)}")
        step = torch.as_tensor(step, dtype=state.dtype, device=state.device).reshape(-1)
        if step.shape[0] != state.shape[0]:
            raise ValueError(f"one step size per state: {tuple(step.shape)} for a batch of {state.shape[0]}")
        x = torch.cat([state, state[:, :1] - state[:, 1:]], 1)
        f = self.pool(self.features(x)).flatten(1)
        s = torch.stack([torch.log2(step.clamp_min(1e-3)) / 3.0, 1.0 / step.clamp_min(1e-3)], 1)
        h = self.act(self.fc1(torch.cat([f, s], 1)))
        h = self.act(self.fc2(torch.cat([h, s], 1)))
        return self.head(h)


def warp_through_poses(moving: torch.Tensor, fixed_grid: np.ndarray, moving_grid: np.ndarray,
                       matrices: np.ndarray, shape_zyx) -> torch.Tensor:
    """Moving working images resampled through physical transforms onto the fixed working grid.

    Parameters
    ----------
    moving : (B, 1, d, h, w) or (1, 1, d, h, w) (shared) moving working images.
    fixed_grid, moving_grid : (4, 4) or (B, 4, 4) :func:`geometry.grid_matrix` of the grids.
    matrices : (B, 4, 4) fixed -> moving physical transforms (LPS mm), e.g. :func:`rigid_pose.pose_matrices`.
    shape_zyx : the fixed working grid's shape.

    Returns
    -------
    (B, 1, *shape_zyx): ``moving(P(x))`` for every fixed working-grid point ``x`` (zeros outside).
    """
    m = torch.as_tensor(np.asarray(matrices, np.float64), device=moving.device)
    if m.dim() == 2:
        m = m[None]
    k = G.index_map(torch.as_tensor(np.asarray(fixed_grid, np.float64), device=m.device),
                    torch.as_tensor(np.asarray(moving_grid, np.float64), device=m.device), m)
    if moving.shape[0] == 1 and k.shape[0] > 1:
        moving = moving.expand(k.shape[0], -1, -1, -1, -1)
    return G.sample_through(moving, k, tuple(shape_zyx))


def net_policy(model: AgentNet, fixed: torch.Tensor, moving: torch.Tensor, fixed_grid: np.ndarray,
               moving_grid: np.ndarray, centre_xyz, autocast=None) -> Callable[[np.ndarray, float], np.ndarray]:
    """A policy ``(pose (6,), step) -> (12,) values`` from ``model`` on one pair of working images.

    ``fixed`` (1, 1, D, H, W), ``moving`` (1, 1, d, h, w) tensors on the model's device; grids and
    centre as in :func:`warp_through_poses` / :mod:`app.engine.rigid_pose`.
    """
    shape = tuple(fixed.shape[2:])

    @torch.no_grad()
    def policy(pose: np.ndarray, step: float) -> np.ndarray:
        warped = warp_through_poses(moving, fixed_grid, moving_grid, RP.pose_matrix(pose, centre_xyz)[None], shape)
        state = torch.cat([fixed, warped.to(fixed.dtype)], 1)
        if autocast is not None:
            with autocast():
                q = model(state, torch.tensor([float(step)], device=fixed.device))
        else:
            q = model(state, torch.tensor([float(step)], device=fixed.device))
        return q[0].float().cpu().numpy().astype(np.float64)
    return policy


def oracle_policy(truth: np.ndarray, points: np.ndarray, centre_xyz) -> Callable[[np.ndarray, float], np.ndarray]:
    """The exact policy: the true reward per unit step of each action (needs the known transform)."""
    return lambda pose, step: RP.action_rewards(pose, step, truth, points, centre_xyz) / float(step)


@dataclass
class Episode:
    """What :func:`greedy_episode` did.

    poses : (n + 1, 6) the start and the pose after every step; actions, steps, values: per step
    (action index, step size, the 12 values it chose from); converged: ended after the finest step
    size (False: hit the step cap); reason: why it stopped.
    """

    poses: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    converged: bool = False
    reason: str = ""

    @property
    def pose(self) -> np.ndarray:
        return np.asarray(self.poses[-1], np.float64)


def greedy_episode(policy: Callable[[np.ndarray, float], np.ndarray], start_pose, steps=RP.DEFAULT_STEPS,
                   max_steps: int = 200, on_step: Optional[Callable[[int, np.ndarray, int, float, np.ndarray], None]] = None,
                   cancel: Optional[threading.Event] = None) -> Episode:
    """Greedy inference with step halving (see the module docstring).

    Parameters
    ----------
    policy : ``(pose (6,), step) -> (12,)`` action values (positive: the action helps).
    start_pose : (6,) pose to start from.
    steps : step sizes, coarse to fine (mm for translations, degrees for rotations).
    max_steps : the cap on actions taken (all step sizes together).
    on_step : called after every action with ``(n, pose, action, step, values)``.
    cancel : checked before every action (raises :class:`~app.engine.types.Cancelled`).
    """
    steps = [float(s) for s in steps]
    if not steps or min(steps) <= 0:
        raise ValueError(f"step sizes must be positive numbers, coarse to fine, got {steps!r}")
    pose = RP.check_pose(start_pose)
    ep = Episode(poses=[pose.copy()])
    level = 0
    visited = {tuple(np.round(pose, 6))}
    while True:
        check_cancel(cancel)
        step = steps[level]
        if len(ep.actions) >= max_steps:
            ep.reason = f"step cap ({max_steps} actions) reached at step size {step:g}"
            return ep
        q = np.asarray(policy(pose, step), np.float64)
        a = int(np.argmax(q))
        new = RP.apply_action(pose, a, step)
        why = None
        if not q[a] > 0:
            why = "no action improves"
        elif tuple(np.round(new, 6)) in visited:
            why = "oscillation"
        if why is not None:
            level += 1
            if level == len(steps):
                ep.converged = True
                ep.reason = f"{why} at the finest step size ({step:g})"
                return ep
            visited = {tuple(np.round(pose, 6))}
            continue
        pose = new
        visited.add(tuple(np.round(pose, 6)))
        ep.poses.append(pose.copy())
        ep.actions.append(a)
        ep.steps.append(step)
        ep.values.append(q.copy())
        if on_step is not None:
            on_step(len(ep.actions), pose.copy(), a, step, q)


def ncc(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Global normalised cross-correlation of two images (any equal shapes), optionally in ``mask``."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1) > 0
        a, b = a[keep], b[keep]
    a, b = a - a.mean(), b - b.mean()
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 and math.isfinite(den) else 0.0
