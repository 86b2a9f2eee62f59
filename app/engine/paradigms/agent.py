"""Deep reinforcement-learning rigid registration (``agent``): an artificial agent steps to alignment.

    warped(x) = moving(P(x)),   P(x) = R (x - c) + c + t   (fixed physical points -> moving points)

The pose ``P`` (six numbers: translation mm, ZYX rotations in degrees about the fixed image's
centre ``c``; :mod:`app.engine.rigid_pose`) starts at the centre-of-mass alignment (or the
identity, or a pipeline's ``initial``) and changes by one action at a time: +-step along one of
the six parameters. A small 3D CNN (:class:`app.engine.nn.agent_net.AgentNet`) looks at the fixed
working image and the moving working image resampled through the current pose and predicts the
reward of each of the 12 actions; the agent takes the best one while it is predicted to help,
halves the step (8, 4, 2, 1 mm / degrees) when none is or when it oscillates, and stops after the
finest step ("converged") or at the step cap ("did not converge"; also when the image similarity
on the working grid ended lower than it started).

Training (Liao et al. 2017, greedy supervision; :mod:`app.engine.training.agent`) regresses the
known reward of every action - how much it lowers the mean distance of the brain points to their
true position - on random rigid misalignments of real IXI training images: no exploration, no
replay, no target network.

Every step goes through ``progress`` with the pose (``Progress.pose``), the action and its value in
the message; the result's ``history`` holds every step (pose, action, step size, the 12 values) and
a last record with ``converged`` and the reason; a run that did not converge says so in
``RegistrationResult.warnings``. Known limit: the agent can also settle in a wrong pose without
hitting the cap (seen from 45 degree starts); the image similarity rule catches only part of that.
The stage check (:func:`app.engine.stagecheck.guard_learned`: start, prealignment, final pose on the
fixed grid) keeps the better earlier stage when the final pose made the pair worse, with a warning
and the record in ``RegistrationResult.checks``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from ..training.config import LoopConfig
from ..types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)
from .base import parse_number_list, param


@dataclass
class AgentParams:
    prealign: str = param("center_of_mass", "start pose: translate the centres of mass onto each other, or the "
                                            "identity (a pipeline's previous stage is always applied first)",
                          choices=("center_of_mass", "none"))
    steps: str = param("8,4,2,1", "step sizes, coarse to fine (mm for translations, degrees for rotations)")
    max_steps: int = param(200, "step cap: actions taken in all (reaching it = did not converge)",
                           range=(1, 10_000))


@dataclass
class AgentTrainConfig(LoopConfig):
    """Training options of the agent (``main.py train --paradigm agent``); the trainer is
    :class:`app.engine.training.agent.AgentTrainer`."""

    batch_size: int = param(16, "states per step (per process)", range=(1, 256))
    steps: int = param(3000, "total optimisation steps", range=(1, 10_000_000))
    val_every: int = param(250, "validate every N steps (0: only at the end)", range=(0, 10_000_000))
    grid: str = param("45x60x60", "working grid z x y x x (voxels)")
    spacing_mm: float = param(4.0, "working grid spacing (isotropic, mm)", range=(0.25, 32.0))
    channels: str = param("8,16,32,32", "CNN channels per stride-2 level")
    hidden: int = param(128, "width of the fully connected layers", range=(8, 4096))
    step_sizes: str = param("8,4,2,1", "action step sizes trained for (mm / degrees)")
    truth_rot_deg: float = param(15.0, "known transforms: rotation up to this about each axis (degrees)",
                                 range=(0.0, 180.0))
    truth_trans_mm: float = param(15.0, "known transforms: translation up to this along each axis (mm)",
                                  range=(0.0, 200.0))
    pose_rot_deg: str = param("40,20,8,3", "pose errors drawn around the truth: one scale per class, rotation up "
                                           "to this about each axis (degrees)")
    pose_trans_mm: str = param("30,15,8,3", "... and translation up to this along each axis (mm), same classes")
    points: int = param(512, "brain points the reward is measured on, per state", range=(16, 100_000))
    aug_intensity: bool = param(True, "random gamma, scale and noise on both images")
    val_rot_deg: float = param(20.0, "validation episodes: rotation angle up to this (degrees, random axis)",
                               range=(0.0, 180.0))
    val_trans_mm: float = param(20.0, "validation episodes: translation length up to this (mm)", range=(0.0, 200.0))
    val_max_actions: int = param(100, "validation episodes: step cap", range=(1, 10_000))
    max_val_pairs: int = param(6, "validation subjects of the split (one episode each; 0: none)", range=(0, 100_000))
    ckpt_every: int = param(250, "write the checkpoint every N steps (0: only at the end)", range=(0, 10_000_000))


class AgentRegistrar:
    """Rigid registration by an agent that takes +-1 step actions, step by step, to alignment."""

    key: ClassVar[str] = "agent"
    Params: ClassVar[type] = AgentParams
    description: ClassVar[str] = ("Deep reinforcement learning (rigid): a CNN picks +-step actions over the six "
                                  "rigid parameters until aligned (greedy supervision, Liao et al. 2017)")
    learned: ClassVar[bool] = True
    TrainConfig: ClassVar[type] = AgentTrainConfig
    trainer: ClassVar[str] = "app.engine.training.agent:AgentTrainer"
    network_kinds: ClassVar[tuple[str, ...]] = ("agent",)

    def register(self, fixed: Volume, moving: Volume, params: Optional[AgentParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` rigidly (labels and landmarks are only carried along).

        ``checkpoint`` None: the bundled ``resources/checkpoints/agent.pt``; one of another paradigm
        is refused. ``initial`` (fixed -> moving points): the agent works on the moving image as
        ``initial`` leaves it and the result is ``initial.then(P)``. A 2D image is refused
        (ValueError). The result's last history record says whether the agent converged.
        """
        params = params or AgentParams()
        return register_agent(self.key, fixed, moving, params, checkpoint=checkpoint, initial=initial,
                              moving_labels=moving_labels, kinds=self.network_kinds, progress=progress,
                              cancel=cancel, device=device)


def parse_steps(text) -> list[float]:
    """``"8,4,2,1"`` -> ``[8.0, 4.0, 2.0, 1.0]`` (positive, coarse to fine; ValueError otherwise)."""
    steps = list(parse_number_list(text, float, "steps"))
    if not steps or min(steps) <= 0 or steps != sorted(steps, reverse=True):
        raise ValueError(f"step sizes must be positive and coarse to fine (e.g. 8,4,2,1), got {text!r}")
    return steps


def register_agent(key: str, fixed: Volume, moving: Volume, params: AgentParams, *, checkpoint=None,
                   initial: Optional[Transform] = None, moving_labels: Optional[LabelMap] = None,
                   kinds: tuple[str, ...] = ("agent",), progress: Optional[ProgressFn] = None,
                   cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
    """The agent's inference (see the module docstring)."""
    import torch
    from .. import checkpoints
    from .. import datasets as D
    from .. import rigid_pose as RP
    from ..nn import geometry as G
    from ..nn import resolve_device
    from ..nn.agent_net import greedy_episode, ncc, net_policy, warp_through_poses
    from ..spatial import axial_slice, resample
    from ._learned import load_model
    t_start = time.perf_counter()
    steps = parse_steps(params.steps)
    for v in (fixed, moving):
        if v.is_vector or min(v.shape) < 4:
            raise ValueError(f"'{v.name}' has shape {v.array.shape}: the agent registers scalar 3D volumes "
                             f"(not 2D images, thin slabs or vector images)")
    dev = resolve_device(device)
    check_cancel(cancel)
    if progress:
        progress(Progress("load", message="loading the agent", fraction=0.02))
    ckpt = load_model(key, checkpoint, kinds=kinds)
    model = ckpt["model"].to(dev).eval()
    prep = D.Preprocessing.from_dict(ckpt["preprocessing"])
    start = initial if initial is not None and initial.kind != "identity" else None
    seen = resample(moving, fixed, start, "linear") if start is not None else moving
    fixed_w = D.preprocess(fixed, prep)
    moving_w = D.preprocess(seen, prep)
    centre = G.grid_centre(fixed_w)
    pose0 = np.zeros(6)
    if params.prealign == "center_of_mass":
        pose0[:3] = D.center_of_mass(moving_w) - D.center_of_mass(fixed_w)
    f_t = torch.as_tensor(fixed_w.array[None, None], dtype=torch.float32, device=dev)
    m_t = torch.as_tensor(moving_w.array[None, None], dtype=torch.float32, device=dev)
    gf, gm = G.grid_matrix(fixed_w), G.grid_matrix(moving_w)
    policy = net_policy(model, f_t, m_t, gf, gm, centre)
    t_prep = time.perf_counter()

    def similarity(pose) -> float:
        with torch.no_grad():
            w = warp_through_poses(m_t, gf, gm, RP.pose_matrix(pose, centre)[None], fixed_w.shape)
        return ncc(f_t, w, f_t > 0.05)

    history: list[dict] = []

    def on_step(n: int, pose: np.ndarray, action: int, step: float, values: np.ndarray) -> None:
        rec = {"stage": "agent", "iteration": n, "action": RP.ACTIONS[action], "step": step,
               "pose": [round(float(v), 4) for v in pose], "values": [round(float(v), 4) for v in values]}
        history.append(rec)
        if progress:
            preview = None
            if n % 5 == 0:
                with torch.no_grad():
                    w = warp_through_poses(m_t, gf, gm, RP.pose_matrix(pose, centre)[None], fixed_w.shape)
                preview = axial_slice(w[0, 0].cpu().numpy(), fixed_w.direction)
            progress(Progress("agent", iteration=n, total=params.max_steps,
                              fraction=0.05 + 0.85 * min(n / max(params.max_steps, 1), 1.0),
                              message=f"{RP.ACTIONS[action]} by {step:g} (value {values[action]:+.3f}) -> "
                                      + _pose_text(pose),
                              preview=preview, pose=tuple(float(v) for v in pose)))

    sim0 = similarity(pose0)
    ep = greedy_episode(policy, pose0, steps, params.max_steps, on_step, cancel)
    sim1 = similarity(ep.pose)
    converged, reason = ep.converged, ep.reason
    if converged and sim1 < sim0:
        converged, reason = False, (f"{reason}, but the image similarity fell (NCC {sim0:.3f} -> {sim1:.3f} on "
                                    f"the working grid)")
    t_agent = time.perf_counter()
    check_cancel(cancel)
    own = RP.pose_transform(ep.pose, centre)
    transform = start.then(own) if start is not None else own
    # never worse than its start (issue 11): the start, the prealignment and the final pose measured on the
    # fixed grid (app.engine.stagecheck), the better kept; a wrong pose the agent settled in without hitting
    # the cap is caught here too
    from ..stagecheck import guard_learned
    s0 = start or Transform.identity()
    checked = [("start", s0)]
    if params.prealign == "center_of_mass":
        pre = RP.pose_transform(pose0, centre)
        checked.append(("prealigned", start.then(pre) if start is not None else pre))
    checked.append(("agent", transform))
    kept, checks, more = guard_learned(fixed, moving, checked, ckpt, checkpoints.checkpoint_id(ckpt).split("@")[0])
    transform = dict(checked)[kept]
    if progress:
        progress(Progress("resample", message="resampling the moving image once", fraction=0.92))
    warped = resample(moving, fixed, transform, "linear")
    warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
    t_end = time.perf_counter()
    history.append({"stage": "agent_end", "iteration": len(ep.actions), "converged": converged, "reason": reason,
                    "pose": [float(v) for v in ep.pose], "start_pose": [float(v) for v in pose0],
                    "centre": [float(v) for v in centre], "ncc_start": sim0, "ncc_end": sim1})
    timings = {"preprocess": round(t_prep - t_start, 4), "agent": round(t_agent - t_prep, 4),
               "resample": round(t_end - t_agent, 4), "total": round(t_end - t_start, 4),
               "checks": checks["seconds"]}
    if progress:
        verdict = "converged" if converged else "did not converge"
        progress(Progress("done", message=f"{verdict} after {len(ep.actions)} actions ({reason}); "
                                          f"{timings['total']:.2f} s on {dev.type}", fraction=1.0,
                          pose=tuple(float(v) for v in ep.pose)))
    warnings = ([] if converged else [f"the agent did not converge: {reason}"]) + more
    return RegistrationResult(transform=transform, warped=warped, field=None, history=history, timings=timings,
                              device=str(dev), paradigm=key, params=params_to_dict(params),
                              checkpoint_id=checkpoints.checkpoint_id(ckpt), warped_labels=warped_labels,
                              warnings=warnings, checks=checks)


def _pose_text(pose) -> str:
    p = np.asarray(pose, float)
    return (f"t ({p[0]:+.0f}, {p[1]:+.0f}, {p[2]:+.0f}) mm, "
            f"r ({p[3]:+.0f}, {p[4]:+.0f}, {p[5]:+.0f}) deg")


def agent_converged(result: RegistrationResult) -> Optional[bool]:
    """Whether an agent result (or a pipeline holding an agent stage) converged; None if no agent ran."""
    ends = [h for h in result.history if h.get("stage") == "agent_end"]
    return None if not ends else all(bool(h.get("converged")) for h in ends)
