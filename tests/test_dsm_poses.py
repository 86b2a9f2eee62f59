"""dsm's whole-image pose ranking: pose patches through index matrices, partial poses on the path to the
truth, the ranking term of the loss, hard poses (where a coarse search stopped) mapped from physical
space onto the coarsest training grid, and the miner's refusal of the held-out subject."""
import json

import numpy as np
import pytest
import torch

from app.engine import paradigms
from app.engine.nn.dsm_net import DsmNet
from app.engine.training.dsm import (DsmLoss, DsmTrainer, _coarse_grid, partial_pose, pose_patches, random_rotation,
                                     rigid_about, to_isotropic)
from app.engine.types import Volume


def _toy(shape=(30, 30, 30)):
    from scipy.ndimage import gaussian_filter
    tex = gaussian_filter(np.random.default_rng(0).normal(size=shape), 1.5)
    ball = np.linalg.norm(np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2, axis=0) < 11
    return (((tex - tex.min()) / (tex.max() - tex.min()) * 0.8 + 0.15) * ball).astype(np.float32)


def _trainer(over=None, grid=None, shape=(30, 30, 30)):
    t1 = _toy(shape)
    cfg = paradigms.make_params(paradigms.registrar_class("dsm").TrainConfig,
                                {"out": "x.pt", "patch": 9, "channels": "4,8,8", "batch_size": 4, "pose_patches": 6,
                                 "aug_intensity": False, "pose_weight": 1.0, **(over or {})})
    tr = DsmTrainer("dsm", cfg, torch.device("cpu"))
    tr.scales = [2.0, 8.0]
    sets = {"T1": t1, "T2": (1.1 - t1).astype(np.float32)}     # a remapping of every voxel (linear: interpolation commutes)
    tr.train_sets = [{"name": "toy", "scales": [sets, sets], "coarse_grid": np.eye(4) if grid is None else grid}]
    tr.val_sets = tr.train_sets
    tr.ixi_sets = []
    tr.hard_poses = []
    tr.model = DsmNet(9, (4, 8, 8))
    return tr


def test_pose_patches_follow_the_index_matrix():
    a = np.random.default_rng(0).random((20, 21, 22)).astype(np.float32)
    c = np.array([[8, 9, 10], [10, 10, 10]])
    p = pose_patches(a, c, np.eye(4), 5)
    assert np.allclose(p[0], a[6:11, 7:12, 8:13]) and np.allclose(p[1], a[8:13, 8:13, 8:13])
    shift = np.eye(4)
    shift[:3, 3] = (1, -2, 0)                   # x -> x + (1, -2, 0): the image one voxel further in z
    assert np.allclose(pose_patches(a, c[:1], shift, 5)[0], a[7:12, 5:10, 8:13])
    far = np.eye(4)
    far[:3, 3] = (0, 0, 40)                     # outside the grid: zero, as the optimiser's padding
    assert not pose_patches(a, c[:1], far, 5).any()


def test_partial_pose_scales_rotation_and_translation_about_the_pivot():
    from scipy.spatial.transform import Rotation
    rot = random_rotation(np.random.default_rng(1), 90.0)
    pivot = np.array([10.0, 12.0, 9.0])
    m = rigid_about(rot, pivot, np.array([4.0, -2.0, 6.0]))
    assert np.allclose(m[:3, :3] @ pivot + m[:3, 3], pivot + (4, -2, 6))      # the pivot only translates
    assert np.allclose(partial_pose(m, pivot, 0.0), np.eye(4), atol=1e-12)
    assert np.allclose(partial_pose(m, pivot, 1.0), m, atol=1e-9)
    half = partial_pose(m, pivot, 0.5)
    angle = np.linalg.norm(Rotation.from_matrix(rot).as_rotvec())
    assert np.linalg.norm(Rotation.from_matrix(half[:3, :3]).as_rotvec()) == pytest.approx(angle / 2)
    assert np.allclose(half[:3, :3] @ pivot + half[:3, 3], pivot + 0.5 * np.array([4.0, -2.0, 6.0]))
    assert np.allclose(half[:3, :3] @ half[:3, :3], m[:3, :3], atol=1e-9)   # two half turns are the whole turn


def test_pose_pairs_share_fixed_centres_and_the_truth_matches_the_fixed_patch():
    tr = _trainer()
    (fx, near, far), (near_deg, far_deg) = tr._pose_pair(np.random.default_rng(0), tr.train_sets, False,
                                                         far_deg=60.0, fraction=0.0)
    assert fx.shape == near.shape == far.shape == (6, 9, 9, 9)
    assert near_deg == 0.0 and far_deg == 60.0
    # at the truth the moving patches are the other modality of the same voxels (T2 = 1.1 - T1 inside)
    inside = fx > 0
    assert np.allclose(near[inside], 1.1 - fx[inside], atol=1e-5)
    assert not np.allclose(far[inside], 1.1 - fx[inside], atol=1e-2)
    # the fraction draws: the truth, anywhere on the path, or a few degrees nearer
    fr = [DsmTrainer._fraction(np.random.default_rng(k), 60.0) for k in range(200)]
    assert min(fr) == 0.0 and max(fr) < 1.0 and any(0.75 < f < 0.92 for f in fr)


def test_the_ranking_term_is_added_and_lowered_by_training():
    torch.manual_seed(0)
    tr = _trainer({"pose_pairs": 4})
    loss = DsmLoss(tr.model, 1.0, 0.05)
    batch = tr.sample(1, np.random.default_rng(0), np.random.default_rng(0))
    assert batch["pose_fixed"].shape == (4, 6, 9, 9, 9)
    parts = loss(**batch)
    assert set(parts) == {"total", "bce", "pose"}
    assert float(parts["total"].detach()) == pytest.approx(float(parts["bce"]) + float(parts["pose"]), rel=1e-5)
    assert set(DsmLoss(tr.model)(**batch)) == {"total", "bce"}           # pose_weight 0: off

    def pose_loss():
        with torch.no_grad():
            return float(np.mean([float(loss(**tr.sample(1000 + k, np.random.default_rng(1000 + k), None))["pose"])
                                  for k in range(6)]))

    before = pose_loss()
    opt = torch.optim.Adam(tr.model.parameters(), 3e-3)
    for step in range(40):
        out = loss(**tr.sample(step, np.random.default_rng(step), None))
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    assert pose_loss() < before


def test_hard_poses_map_physical_matrices_onto_the_coarse_grid(tmp_path):
    # an oblique, anisotropic image: its 8 mm grid matrix, and a record whose frame is a known rotation
    img = Volume(_toy((24, 30, 28)), (1.5, 1.0, 2.0), (10.0, -20.0, 5.0),
                 random_rotation(np.random.default_rng(3), 30.0), "T1")
    g = _coarse_grid(img, 8.0)
    from app.engine.nn.geometry import grid_matrix
    assert np.allclose(g, grid_matrix(to_isotropic(img, 8.0)))
    # a 40-voxel grid, the 11-voxel ball at its centre: the patches of the ball's voxels stay inside the grid
    tr = _trainer(grid=np.diag([8.0, 8.0, 8.0, 1.0]), shape=(40, 40, 40))
    frame_v = rigid_about(random_rotation(np.random.default_rng(4), 40.0), np.full(3, 19.5), np.zeros(3))
    pose_v = rigid_about(random_rotation(np.random.default_rng(5), 50.0), np.full(3, 19.5), (1.0, 0, 2))
    gm = tr.train_sets[0]["coarse_grid"]
    rec = {"set": "toy", "fixed": "T1", "moving": "T2", "lut_seed": None, "kept": True,
           "frame": (gm @ frame_v @ np.linalg.inv(gm)).tolist(), "pose": (gm @ pose_v @ np.linalg.inv(gm)).tolist()}
    path = tmp_path / "hard.json"
    path.write_text(json.dumps([rec, {**rec, "kept": False}, {**rec, "set": "other"}]))
    hard = tr._load_hard_poses(str(path))
    assert len(hard) == 1 and np.allclose(hard[0]["frame_v"], frame_v) and np.allclose(hard[0]["pose_v"], pose_v)
    assert hard[0]["residual_deg"] > 0
    (fx, near, far), _ = tr._hard_pair(np.random.default_rng(0), hard[0], fraction=0.0)
    # the fixed patches are T1 through the frame; the truth's moving patches are T2 of the same points
    assert (fx > 0.1).mean() > 0.3 and np.allclose(near, 1.1 - fx, atol=1e-5)
    (_, _, far2), _ = tr._hard_pair(np.random.default_rng(0), hard[0], fraction=0.5)
    assert np.allclose(far, far2)                           # the far pose is the record's stop
    path.write_text(json.dumps([{**rec, "set": "other"}]))
    with pytest.raises(ValueError, match="none of its hard poses"):
        tr._load_hard_poses(str(path))


def test_the_miner_refuses_the_held_out_subject():
    from app.engine.training.dsm_poses import HELD_OUT, default_specs, mine
    specs = default_specs(2, 0, 0)
    assert specs and all(s["set"] != HELD_OUT for s in specs)
    assert {s["fixed"] for s in specs} >= {"T1", "T2"}      # both directions
    with pytest.raises(ValueError, match="held-out"):
        mine([{"set": HELD_OUT, "fixed": "T1", "moving": "T2", "lut_seed": None}])
