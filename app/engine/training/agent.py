"""Trainer of the ``agent`` paradigm: greedy supervision of the known reward (Liao et al. 2017).

Every state of a batch is drawn as follows (``sample``):

1. a training subject (its preprocessed working image is the *moving* image);
2. a known rigid transform ``T`` about the grid's centre ``c`` (pose parameters uniform in
   ``+-truth_rot_deg`` / ``+-truth_trans_mm``); the *fixed* image is the moving image resampled
   through it on the same grid, ``fixed(x) = moving(T(x))``, so ``T`` is the exact answer;
3. a current pose ``p`` around the truth: one of the error classes of ``pose_rot_deg`` /
   ``pose_trans_mm`` (uniform per parameter within the class), and a step size (the class's own
   step half of the time, any step otherwise);
4. the state is (fixed, moving o P) and the target of action ``a`` is its exact reward per unit
   step, ``(D(p) - D(p + a)) / step``, with ``D`` the mean distance of the brain points (label > 0)
   to their true position (:func:`app.engine.rigid_pose.action_rewards`).

The objective is the mean squared error of the 12 predicted values. No exploration, no replay
memory, no target network: the targets are exact, so plain supervised regression is stable.

Validation (``validate``): greedy episodes (:func:`app.engine.nn.agent_net.greedy_episode`) from
the centre-of-mass start on the split's validation subjects with known transforms up to
``val_rot_deg`` degrees (random axis) and ``val_trans_mm`` mm (random direction): success rate
(final mean point error < 2 mm), median final error, actions per episode; plus the regression loss
on a fixed set of validation states.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn

from .. import datasets as D
from .. import rigid_pose as RP
from ..nn import geometry as G
from ..nn.agent_net import AgentNet, greedy_episode, net_policy, warp_through_poses
from .config import parse_grid
from ..paradigms.base import parse_number_list
from .loop import Trainer

log = logging.getLogger(__name__)

SUCCESS_MM = 2.0


def _floats(text) -> list[float]:
    return list(parse_number_list(text, float, "list"))


class AgentLoss(nn.Module):
    """Mean squared error of the predicted action values against the exact rewards per unit step."""

    def __init__(self, model: AgentNet):
        super().__init__()
        self.model = model

    def forward(self, state: torch.Tensor, step: torch.Tensor, target: torch.Tensor) -> dict:
        """``state`` (B, 2, D, H, W), ``step`` (B,), ``target`` (B, 12) -> {"total": mse}."""
        q = self.model(state, step)
        return {"total": ((q.float() - target) ** 2).mean()}


class _SubjectData:
    """A subject's moving working image (tensor), grid matrix, centre and brain points (P, 3) LPS mm."""

    def __init__(self, s: D.Subject, device):
        self.name = s.name
        self.image = torch.as_tensor(s.image[None, None], dtype=torch.float32, device=device)
        self.array = s.image
        self.volume = s.grid
        self.grid = G.grid_matrix(s.grid)
        self.centre = G.grid_centre(s.grid)
        self.shape = s.image.shape
        mask = s.labels > 0 if s.labels is not None else s.image > 0.2
        idx = np.argwhere(mask)[:, ::-1].astype(float)       # xyz indices
        if len(idx) == 0:
            raise ValueError(f"subject {s.name} has no brain voxels to measure rewards on")
        self.points = s.grid.index_to_physical(idx)


def draw_state(sd: _SubjectData, rng: np.random.Generator, cfg, steps: list[float]) -> dict:
    """One training state (numpy): truth 4x4, pose (6,), step, fixed-space points (P, 3), rewards (12,)."""
    truth_pose = np.concatenate([rng.uniform(-cfg.truth_trans_mm, cfg.truth_trans_mm, 3),
                                 rng.uniform(-cfg.truth_rot_deg, cfg.truth_rot_deg, 3)])
    truth = RP.pose_matrix(truth_pose, sd.centre)
    rots, trans = _floats(cfg.pose_rot_deg), _floats(cfg.pose_trans_mm)
    k = int(rng.integers(len(rots)))
    pose = truth_pose + np.concatenate([rng.uniform(-trans[k], trans[k], 3), rng.uniform(-rots[k], rots[k], 3)])
    step = steps[min(k, len(steps) - 1)] if rng.random() < 0.5 else steps[int(rng.integers(len(steps)))]
    # brain points of the fixed image: where T sends them are the moving image's brain points
    sel = rng.choice(len(sd.points), min(cfg.points, len(sd.points)), replace=False)
    inv = np.linalg.inv(truth)
    pts = sd.points[sel] @ inv[:3, :3].T + inv[:3, 3]
    rewards = RP.action_rewards(pose, step, truth, pts, sd.centre)
    return {"truth": truth, "pose": pose, "step": float(step), "points": pts, "target": rewards / step}


def render_states(data: list[_SubjectData], items: list[tuple[int, dict]], rng: np.random.Generator,
                  augment: bool, device) -> torch.Tensor:
    """(B, 2, D, H, W) states: (fixed = moving o T, moving o P) for each (subject index, state)."""
    out = []
    for si, st in items:
        sd = data[si]
        mats = np.stack([st["truth"], RP.pose_matrix(st["pose"], sd.centre)])
        with torch.no_grad():
            pair = warp_through_poses(sd.image, sd.grid, sd.grid, mats, sd.shape)[:, 0]     # (2, D, H, W)
        if augment:
            pair = torch.stack([torch.as_tensor(D.augment_intensity(p.cpu().numpy(), rng), device=device)
                                for p in pair])
        out.append(pair)
    return torch.stack(out)


class AgentTrainer(Trainer):
    """Trains :class:`~app.engine.nn.agent_net.AgentNet` by regression of the exact action rewards."""

    def build(self, resume, progress):
        cfg = self.cfg
        if resume is not None:
            self.prep = D.Preprocessing.from_dict(resume["preprocessing"])
        else:
            self.prep = D.Preprocessing(grid_shape=parse_grid(cfg.grid), spacing_mm=cfg.spacing_mm,
                                        prealignment="center_of_mass")
        self.steps = sorted(_floats(cfg.step_sizes), reverse=True)
        if not self.steps or min(self.steps) <= 0:
            raise ValueError(f"step_sizes must be positive numbers, got {cfg.step_sizes!r}")
        if len(_floats(cfg.pose_rot_deg)) != len(_floats(cfg.pose_trans_mm)) or not _floats(cfg.pose_rot_deg):
            raise ValueError(f"pose_rot_deg and pose_trans_mm need the same number of classes, got "
                             f"{cfg.pose_rot_deg!r} and {cfg.pose_trans_mm!r}")
        subjects = self.load_training_subjects(self.prep, True, progress)
        split, cache = D.load_split(cfg.split), cfg.cache_dir or None
        self.data = [_SubjectData(s, self.device) for s in subjects]
        self.val_data: list[_SubjectData] = []
        if self.rank == 0 and cfg.max_val_pairs:
            val_names = list(split.get("val", []))[:cfg.max_val_pairs]
            self.val_data = [_SubjectData(s, self.device)
                             for s in D.load_subjects(val_names, self.prep, cfg.data_root, True, cache)]
        if resume is not None:
            return resume["model"]
        return AgentNet(channels=list(parse_number_list(cfg.channels, int, "channels")), hidden=cfg.hidden)

    def objective(self):
        self.loss = AgentLoss(self.model)
        self._val_states = None
        return self.loss

    def sample(self, step, rng, step_rng):
        cfg = self.cfg
        picks = step_rng.integers(len(self.data), size=cfg.batch_size * self.world)
        mine = picks[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        items = [(int(i), draw_state(self.data[int(i)], rng, cfg, self.steps)) for i in mine]
        return self._batch(self.data, items, rng, cfg.aug_intensity)

    def _batch(self, data, items, rng, augment) -> dict:
        state = render_states(data, items, rng, augment, self.device)
        return {"state": state,
                "step": torch.tensor([st["step"] for _, st in items], dtype=torch.float32, device=self.device),
                "target": torch.as_tensor(np.stack([st["target"] for _, st in items]), dtype=torch.float32,
                                          device=self.device)}

    @torch.no_grad()
    def validate(self):
        if not self.val_data:
            return {}
        model = self.model
        model.eval()
        cfg = self.cfg
        rng = np.random.default_rng(12345)
        if self._val_states is None:    # the same validation states every time
            items = [(i % len(self.val_data), draw_state(self.val_data[i % len(self.val_data)], rng, cfg, self.steps))
                     for i in range(64)]
            self._val_states = self._batch(self.val_data, items, rng, False)
        vs = self._val_states
        val_loss = float(((model(vs["state"], vs["step"]).float() - vs["target"]) ** 2).mean())
        errors, starts, n_actions, converged = [], [], [], []
        case_rng = np.random.default_rng(54321)     # the same cases at every validation
        for sd in self.val_data:
            truth, pts = val_case(sd, case_rng, cfg.val_rot_deg, cfg.val_trans_mm)
            with torch.no_grad():
                fixed = warp_through_poses(sd.image, sd.grid, sd.grid, truth[None], sd.shape)
            # the centre-of-mass start, as inference does (both images are on the same grid here)
            pose0 = np.zeros(6)
            pose0[:3] = _com_physical(sd.array, sd.volume) - _com_physical(fixed[0, 0].cpu().numpy(), sd.volume)
            policy = net_policy(model, fixed, sd.image, sd.grid, sd.grid, sd.centre)
            ep = greedy_episode(policy, pose0, self.steps, cfg.val_max_actions)
            errors.append(RP.pose_error(ep.pose, truth, pts, sd.centre))
            starts.append(RP.pose_error(pose0, truth, pts, sd.centre))
            n_actions.append(len(ep.actions))
            converged.append(ep.converged)
        e = np.asarray(errors)
        return {"val_loss": val_loss, "success": float(np.mean(e < SUCCESS_MM)), "median_mm": float(np.median(e)),
                "mean_mm": float(np.mean(e)), "start_mm": float(np.mean(starts)),
                "actions": float(np.mean(n_actions)), "converged": float(np.mean(converged))}

    def summary(self, val):
        return (f"success {val.get('success', float('nan')):.2f} median {val.get('median_mm', float('nan')):.2f} mm "
                f"(val loss {val.get('val_loss', float('nan')):.4f})")

    def preprocessing(self):
        return self.prep.to_dict()

    def record(self):
        cfg = self.cfg
        return {
            "data": f"IXI T1, {len(self.names)} training subjects of {cfg.split}: each subject against its own "
                    f"copy under a known rigid transform",
            "split": str(cfg.split), "train_subjects": len(self.names), "val_subjects": len(self.val_data),
            "objective": "MSE of the 12 action values against the exact reward per unit step (greedy supervision, "
                         "Liao et al. 2017)",
            "step_sizes": self.steps,
            "sampling": {"truth_rot_deg": cfg.truth_rot_deg, "truth_trans_mm": cfg.truth_trans_mm,
                         "pose_rot_deg": cfg.pose_rot_deg, "pose_trans_mm": cfg.pose_trans_mm,
                         "points": cfg.points, "aug_intensity": cfg.aug_intensity},
            "validation_cases": {"rot_deg": cfg.val_rot_deg, "trans_mm": cfg.val_trans_mm,
                                 "success_mm": SUCCESS_MM, "start": "center_of_mass"},
        }


def _com_physical(array: np.ndarray, grid: D.Volume) -> np.ndarray:
    return D.center_of_mass(grid.with_array(array))


def val_case(sd: _SubjectData, rng: np.random.Generator, rot_deg: float, trans_mm: float,
             n_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """A known transform (4x4) about the subject's centre: angle uniform in [0, rot_deg] about a random
    axis, translation of length uniform in [0, trans_mm] in a random direction; and fixed-space points."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(0, rot_deg))
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + np.sin(ang) * kx + (1 - np.cos(ang)) * kx @ kx
    d = rng.normal(size=3)
    t = d / np.linalg.norm(d) * rng.uniform(0, trans_mm)
    truth = np.eye(4)
    truth[:3, :3] = r
    truth[:3, 3] = sd.centre - r @ sd.centre + t
    sel = rng.choice(len(sd.points), min(n_points, len(sd.points)), replace=False)
    inv = np.linalg.inv(truth)
    return truth, sd.points[sel] @ inv[:3, :3].T + inv[:3, 3]
