"""The ``agent`` paradigm: pose bookkeeping, exact rewards, the network, training, greedy inference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import datasets as D
from app.engine import rigid_pose as RP
from app.engine.nn import geometry as G
from app.engine.nn.agent_net import AgentNet, greedy_episode, oracle_policy, warp_through_poses
from app.engine.types import Progress, Transform, Volume


def _oblique_direction() -> np.ndarray:
    a, b = math.radians(20), math.radians(-35)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def _blob_volume(shape=(30, 34, 38), spacing=(1.3, 1.1, 1.7), direction=None, centre_shift=(0, 0, 0),
                 name="blob") -> Volume:
    """A smooth anisotropic Gaussian blob (no symmetry: rotations show) on an (oblique) grid."""
    direction = np.eye(3) if direction is None else direction
    v = Volume(np.zeros(shape, np.float32), spacing, (0.0, 0.0, 0.0), direction, name)
    lo, hi = v.physical_bounds()
    v.origin = tuple(-(np.asarray(lo) + np.asarray(hi)) / 2 + np.asarray(v.origin))   # centred on 0
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    pts = v.index_to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1)) - np.asarray(centre_shift)
    q = (pts[:, 0] / 9.0) ** 2 + ((pts[:, 1] - 0.3 * pts[:, 0]) / 6.0) ** 2 + (pts[:, 2] / 4.5) ** 2
    img = np.exp(-0.5 * q) + 0.5 * np.exp(-0.5 * np.sum(((pts - [6, 4, -3]) / 3.0) ** 2, 1))
    return v.with_array(img.reshape(shape).astype(np.float32))


# --------------------------------------------------------------------------- pose bookkeeping
def test_each_action_moves_the_declared_parameter_by_the_step():
    pose = np.array([1.0, -2.0, 3.0, 4.0, -5.0, 6.0])
    for a, name in enumerate(RP.ACTIONS):
        new = RP.apply_action(pose, a, 4.0)
        k = RP.PARAMS.index(name[1:])
        expect = pose.copy()
        expect[k] += 4.0 if name[0] == "+" else -4.0
        np.testing.assert_array_equal(new, expect)
    with pytest.raises(ValueError):
        RP.apply_action(pose, 12, 1.0)
    with pytest.raises(ValueError):
        RP.apply_action(np.zeros(5), 0, 1.0)


def test_an_action_sequence_then_its_inverse_returns_to_the_start():
    rng = np.random.default_rng(0)
    start = rng.normal(size=6) * 5
    seq = [(int(rng.integers(12)), float(rng.choice([8, 4, 2, 1]))) for _ in range(30)]
    pose = start.copy()
    for a, s in seq:
        pose = RP.apply_action(pose, a, s)
    for a, s in reversed(seq):
        pose = RP.apply_action(pose, RP.inverse_action(a), s)
    np.testing.assert_allclose(pose, start, atol=1e-12)
    c = np.array([3.0, -4.0, 5.0])
    np.testing.assert_allclose(RP.pose_matrix(pose, c), RP.pose_matrix(start, c), atol=1e-12)


def test_pose_matrix_is_simpleitks_euler_zyx_about_the_centre_and_inverts():
    rng = np.random.default_rng(1)
    c = np.array([12.0, -30.0, 7.0])
    pts = rng.normal(size=(20, 3)) * 50
    for _ in range(5):
        pose = np.r_[rng.uniform(-20, 20, 3), rng.uniform(-40, 40, 3)]
        m = RP.pose_matrix(pose, c)
        t = RP.pose_transform(pose, c)
        assert t.kind == "rigid" and isinstance(t.itk, sitk.Euler3DTransform)
        np.testing.assert_allclose(t.transform_points(pts), pts @ m[:3, :3].T + m[:3, 3], atol=1e-9)
        np.testing.assert_allclose(RP.pose_from_matrix(m, c), pose, atol=1e-9)
        # the rotation is about c: c moves by the translation only
        np.testing.assert_allclose(m[:3, :3] @ c + m[:3, 3], c + pose[:3], atol=1e-9)


def test_a_plus_1mm_x_action_moves_the_resampled_moving_image_by_1mm_in_physical_x():
    """On an oblique, anisotropic grid: the torch resampling through the pose equals SimpleITK's, and
    warped(x) = moving(x + 1 mm e_x): the image content moves by -1 mm along physical (LPS) x."""
    moving = _blob_volume(direction=_oblique_direction())
    fixed = moving
    c = G.grid_centre(fixed)
    pose = RP.apply_action(np.zeros(6), RP.ACTIONS.index("+tx"), 1.0)
    m_t = torch.as_tensor(moving.array[None, None], dtype=torch.float64)
    warped = warp_through_poses(m_t, G.grid_matrix(fixed), G.grid_matrix(moving), RP.pose_matrix(pose, c)[None],
                                fixed.shape)[0, 0].numpy()
    ref = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(sitk.sitkFloat64), fixed.to_sitk(),
                                               RP.pose_transform(pose, c).itk, sitk.sitkLinear, 0.0))
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(warped[inner], ref[inner], atol=1e-5)

    def centroid(a):
        z, y, x = np.nonzero(a > 0.3)
        w = a[z, y, x]
        idx = np.stack([x, y, z], 1).astype(float)
        return (fixed.index_to_physical(idx) * w[:, None]).sum(0) / w.sum()
    shift = centroid(warped) - centroid(moving.array)
    np.testing.assert_allclose(shift, [-1.0, 0.0, 0.0], atol=0.06)


# --------------------------------------------------------------------------- rewards
def test_rewards_on_a_hand_computed_translation():
    """Truth: +5 mm along x. From the identity, +tx by 1 removes exactly 1 mm from every point's
    error, -tx adds 1, and a 1 mm move sideways makes it sqrt(26) - 5."""
    pts = np.random.default_rng(2).normal(size=(100, 3)) * 30
    truth = G.translation([5.0, 0.0, 0.0])
    r = RP.action_rewards(np.zeros(6), 1.0, truth, pts, np.zeros(3))
    assert r[RP.ACTIONS.index("+tx")] == pytest.approx(1.0)
    assert r[RP.ACTIONS.index("-tx")] == pytest.approx(-1.0)
    for name in ("+ty", "-ty", "+tz", "-tz"):
        assert r[RP.ACTIONS.index(name)] == pytest.approx(5.0 - math.sqrt(26.0))
    assert int(np.argmax(r)) == RP.ACTIONS.index("+tx")


def test_the_correct_rotation_has_the_best_positive_reward():
    rng = np.random.default_rng(3)
    c = np.array([0.0, 10.0, -5.0])
    pts = c + rng.normal(size=(400, 3)) * 40
    truth = RP.pose_matrix([0, 0, 0, 0, 0, 12.0], c)         # 12 degrees about z
    r = RP.action_rewards(np.zeros(6), 4.0, truth, pts, c)
    assert int(np.argmax(r)) == RP.ACTIONS.index("+rz") and r.max() > 0
    assert r[RP.ACTIONS.index("-rz")] < 0


# --------------------------------------------------------------------------- network and training
def test_network_output_shapes_and_bad_input():
    net = AgentNet(channels=(4, 8), hidden=16, pooled=(2, 2, 2))
    out = net(torch.rand(3, 2, 16, 20, 18), torch.tensor([8.0, 2.0, 1.0]))
    assert out.shape == (3, 12)
    with pytest.raises(ValueError, match="state"):
        net(torch.rand(3, 1, 16, 20, 18), torch.tensor([8.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="step"):
        net(torch.rand(3, 2, 16, 20, 18), torch.tensor([8.0]))


def _tiny_subject(name="s", direction=None) -> D.Subject:
    vol = _blob_volume((16, 18, 20), (3.0, 3.0, 3.0), direction, name=name)
    labels = (vol.array > 0.2).astype(np.int16)
    return D.Subject(name, vol.array, labels, vol, D.center_of_mass(vol))


def test_a_few_training_steps_lower_the_loss_on_a_tiny_grid():
    from app.engine.paradigms.agent import AgentTrainConfig
    from app.engine.training.agent import AgentLoss, _SubjectData, draw_state, render_states
    torch.manual_seed(0)
    cfg = AgentTrainConfig(points=64, truth_rot_deg=10, truth_trans_mm=5, pose_rot_deg="20,5", pose_trans_mm="8,3")
    data = [_SubjectData(_tiny_subject("a"), torch.device("cpu")),
            _SubjectData(_tiny_subject("b", _oblique_direction()), torch.device("cpu"))]
    rng = np.random.default_rng(0)
    items = [(i % 2, draw_state(data[i % 2], rng, cfg, [4.0, 1.0])) for i in range(8)]
    batch = {"state": render_states(data, items, rng, False, torch.device("cpu")),
             "step": torch.tensor([st["step"] for _, st in items]),
             "target": torch.as_tensor(np.stack([st["target"] for _, st in items]), dtype=torch.float32)}
    assert batch["state"].shape == (8, 2, 16, 18, 20) and batch["target"].shape == (8, 12)
    loss = AgentLoss(AgentNet(channels=(4, 8), hidden=32, pooled=(2, 2, 2)))
    opt = torch.optim.Adam(loss.parameters(), lr=3e-3)
    first = float(loss(**batch)["total"].detach())
    for _ in range(40):
        opt.zero_grad()
        total = loss(**batch)["total"]
        total.backward()
        opt.step()
    assert float(loss(**batch)["total"].detach()) < 0.5 * first


# --------------------------------------------------------------------------- greedy inference
def test_greedy_inference_with_the_oracle_policy_converges():
    rng = np.random.default_rng(4)
    c = np.array([5.0, -3.0, 2.0])
    pts = c + rng.normal(size=(300, 3)) * 35
    truth = RP.pose_matrix([14.0, -9.0, 6.0, 18.0, -25.0, 9.0], c)
    seen = []
    ep = greedy_episode(oracle_policy(truth, pts, c), np.zeros(6), (8, 4, 2, 1), 200,
                        on_step=lambda n, pose, a, s, q: seen.append((n, pose)))
    assert ep.converged and "finest" in ep.reason
    assert RP.pose_error(ep.pose, truth, pts, c) < 1.0 < RP.pose_error(np.zeros(6), truth, pts, c)
    assert len(seen) == len(ep.actions) == len(ep.poses) - 1
    np.testing.assert_allclose(seen[-1][1], ep.pose)


def test_the_step_cap_ends_as_did_not_converge():
    # a policy that always wants to go further: never halves, so only the cap stops it
    ep = greedy_episode(lambda pose, step: np.eye(12)[0], np.zeros(6), (8, 4, 2, 1), max_steps=7)
    assert not ep.converged and "cap" in ep.reason and len(ep.actions) == 7


def test_oscillation_halves_the_step():
    # +tx is best below 3 mm, -tx above: at step 8 the agent flips back and forth, then halves
    def policy(pose, step):
        q = np.full(12, -1.0)
        q[0 if pose[0] < 3 else 1] = 1.0
        return q
    ep = greedy_episode(policy, np.zeros(6), (8, 4, 2, 1), 100)
    assert ep.converged and abs(ep.pose[0] - 3) <= 1.0
    # 0 -> 8 at step 8; going back to 0 would revisit a pose: the step halves instead
    assert ep.steps[:2] == [8.0, 4.0] and 1.0 in ep.steps


# --------------------------------------------------------------------------- the paradigm
@pytest.fixture
def agent_ckpt(tmp_path):
    from app.engine import checkpoints
    torch.manual_seed(0)
    net = AgentNet(channels=(4, 8), hidden=16, pooled=(2, 2, 2))
    with torch.no_grad():        # always +tx, always "helps": only the step cap stops it
        net.head.bias[0] = 100.0
    prep = D.Preprocessing(grid_shape=(12, 14, 14), spacing_mm=4.0, direction=tuple(map(tuple, np.eye(3))))
    path = tmp_path / "agent.pt"
    checkpoints.save_checkpoint(path, paradigm="agent", model=net, preprocessing=prep.to_dict(), training={})
    return path, net, prep


def test_register_reports_every_step_with_its_pose(agent_ckpt):
    from app.engine import paradigms
    from app.engine.paradigms.agent import AgentParams, agent_converged
    path, _, _ = agent_ckpt
    fixed = _blob_volume((24, 26, 28), (2.0, 2.1, 1.9), name="fixed")
    moving = _blob_volume((24, 26, 28), (2.0, 2.1, 1.9), centre_shift=(3, -2, 1), name="moving")
    reports: list[Progress] = []
    res = paradigms.get("agent").register(fixed, moving, AgentParams(max_steps=6), checkpoint=str(path),
                                          progress=reports.append, device="cpu")
    steps = [h for h in res.history if h["stage"] == "agent"]
    posed = [p for p in reports if p.stage == "agent"]
    assert len(posed) == len(steps) >= 1
    for p, h in zip(posed, steps):
        assert len(p.pose) == 6 and np.allclose(p.pose, h["pose"], atol=1e-3)
        assert h["action"] in RP.ACTIONS and len(h["values"]) == 12
    end = res.history[-1]
    assert end["stage"] == "agent_end" and agent_converged(res) == end["converged"]
    assert len(steps) == 6 and [h["action"] for h in steps] == ["+tx"] * 6
    assert end["converged"] is False and "cap" in end["reason"]
    assert res.warnings and "did not converge" in res.warnings[0]
    assert res.transform.kind == "rigid" and res.warped.same_grid(fixed)
    # 6 x 8 mm along +x made the pair worse than the centre-of-mass start: the stage check keeps that pose
    sc = res.checks["stage_check"]
    assert sc["kept"] == "prealigned" and any("the agent stage made the pair" in w for w in res.warnings)
    assert end["pose"][0] == pytest.approx(end["start_pose"][0] + 48.0)
    centre = np.asarray(end["centre"])
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 3.0]])
    np.testing.assert_allclose(res.transform.transform_points(pts),
                               RP.pose_transform(end["start_pose"], centre).transform_points(pts), atol=1e-6)
    # centre-of-mass start: the moving blob sits 3, -2, 1 mm away
    np.testing.assert_allclose(end["start_pose"][:3], [3, -2, 1], atol=0.6)


def test_register_from_an_initial_transform_returns_the_chain(agent_ckpt):
    from app.engine import paradigms
    from app.engine.paradigms.agent import AgentParams
    path, _, _ = agent_ckpt
    fixed = _blob_volume((24, 26, 28), (2.0, 2.1, 1.9), name="fixed")
    initial = Transform(sitk.TranslationTransform(3, (2.0, 0.0, 0.0)))
    # steps of 0.1 mm: the final pose stays within the stage check's margins of the start (the chain is kept)
    res = paradigms.get("agent").register(fixed, fixed, AgentParams(max_steps=3, steps="0.1"), checkpoint=str(path),
                                          initial=initial, device="cpu")
    assert res.checks["stage_check"]["kept"] == "agent"
    own = RP.pose_transform(res.history[-1]["pose"], res.history[-1]["centre"])
    pts = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(res.transform.transform_points(pts),
                               initial.transform_points(own.transform_points(pts)), atol=1e-6)


def test_pipeline_relay_keeps_the_pose():
    from app.engine.pipeline import _stage_progress
    got = []
    relay = _stage_progress(got.append, 0, 2, "agent")
    relay(Progress("agent", 3, 10, math.nan, 0.5, "x", None, (1, 2, 3, 4, 5, 6)))
    assert got[0].pose == (1, 2, 3, 4, 5, 6) and got[0].fraction == pytest.approx(0.25)


def test_checkpoints_of_another_paradigm_or_kind_and_2d_images_are_refused(agent_ckpt, tmp_path):
    from app.engine import checkpoints, paradigms
    from app.engine.nn.networks import AffineNet
    _, net, prep = agent_ckpt
    fixed = _blob_volume((24, 26, 28), (2.0, 2.1, 1.9), name="fixed")
    other = tmp_path / "other.pt"
    checkpoints.save_checkpoint(other, paradigm="unsupervised", model=net, preprocessing=prep.to_dict())
    with pytest.raises(ValueError, match="unsupervised"):
        paradigms.get("agent").register(fixed, fixed, checkpoint=str(other), device="cpu")
    wrong_kind = tmp_path / "kind.pt"
    checkpoints.save_checkpoint(wrong_kind, paradigm="agent", model=AffineNet(), preprocessing=prep.to_dict())
    with pytest.raises(ValueError, match="agent"):
        paradigms.get("agent").register(fixed, fixed, checkpoint=str(wrong_kind), device="cpu")
    flat = Volume(np.zeros((1, 20, 20), np.float32), name="slice")
    with pytest.raises(ValueError, match="3D"):
        paradigms.get("agent").register(fixed, flat, checkpoint=str(agent_ckpt[0]), device="cpu")


def test_a_pipeline_keeps_the_agents_warning(agent_ckpt):
    from app.engine.pipeline import register_pipeline
    path, _, _ = agent_ckpt
    fixed = _blob_volume((24, 26, 28), (2.0, 2.1, 1.9), name="fixed")
    res = register_pipeline("agent+agent", fixed, fixed, {"1.max_steps": 2, "2.max_steps": 1},
                            checkpoint={"agent": str(path)}, device="cpu")
    unconverged = [w.split(":")[0] for w in res.warnings if "did not converge" in w]
    assert unconverged == ["stage 1 (agent)", "stage 2 (agent)"]
    # each stage's 16 / 8 mm step along +x made the pair worse: each stage's check says so and is kept
    assert set(res.checks) == {"1:agent", "2:agent"}
    assert all(c["stage_check"]["flagged"] for c in res.checks.values())
    ends = [h for h in res.history if h["stage"] == "agent_end"]
    assert [e["pipeline_stage"] for e in ends] == [1, 2]


HAVE_IXI = (D.DEFAULT_IXI_ROOT / "t1").exists()
BUNDLED = D.REPO_ROOT / "resources" / "checkpoints" / "agent.pt"


@pytest.mark.skipif(not BUNDLED.exists() or not HAVE_IXI, reason="no bundled agent checkpoint / IXI data")
def test_the_bundled_agent_recovers_a_known_rigid_transform():
    from app.engine import paradigms
    from app.engine import synthetic as S
    case = S.make_cases([D.load_split()["test"][3]], per_band=1, seed=5)[1]      # 10-20 degrees, 10-20 mm
    pair = S.case_pair(case)
    pts = S.brain_points(pair.fixed_labels, 2000)
    truth = case.matrix(pair.centre)
    res = paradigms.get("agent").register(pair.fixed, pair.moving, device="cpu")
    assert S.mean_point_error(res.transform, truth, pts) < 2.0 < S.mean_point_error(np.eye(4), truth, pts)
    assert not res.warnings and res.history[-1]["converged"]
