"""The supervised paradigm: regression networks, point loss, training steps, inference with the
bundled checkpoint, refusals."""
import numpy as np
import pytest
import torch

from app.engine import checkpoints, datasets as D, synthetic as S
from app.engine.nn import geometry as G
from app.engine.nn.networks import build_model
from app.engine.nn.regression import (PoseRegressor, SupervisedNet, endpoint_error, params_to_theta, point_loss,
                                      run_supervised)
from app.engine.nn.twostage import PairTensors
from app.engine.types import Volume

HAVE_IXI = (D.DEFAULT_IXI_ROOT / "t1").exists()
BUNDLED = checkpoints.CHECKPOINT_DIR / "supervised.pt"
DEMO = checkpoints.CHECKPOINT_DIR.parent / "demo"


# ----------------------------------------------------------------------------- networks
def test_zero_outputs_are_the_identity_and_rotations_stay_rotations():
    for dof in (6, 12):
        th = params_to_theta(torch.zeros(2, dof, dtype=torch.float64), 0.35, 20.0, 0.1)
        torch.testing.assert_close(th, torch.eye(3, 4, dtype=torch.float64).expand(2, 3, 4))
    p = torch.randn(4, 6, dtype=torch.float64)
    th = params_to_theta(p, 0.35, 20.0, 0.1)
    r = th[:, :, :3]
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(th[:, :, 3], p[:, 3:6] * 20.0)
    # the rotation vector's length is the angle (radians)
    ang = torch.rad2deg(torch.arccos((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2))
    torch.testing.assert_close(ang, torch.rad2deg((p[:, :3] * 0.35).norm(dim=1)))
    with pytest.raises(ValueError, match=r"\(B, 6\) or \(B, 12\)"):
        params_to_theta(torch.zeros(2, 7), 0.35, 20.0, 0.1)


@pytest.mark.parametrize("dof", [6, 12])
def test_pose_regressor_shapes_and_identity_start(dof):
    net = PoseRegressor(dof=dof, channels=(4, 8, 8, 8))
    x = torch.rand(2, 1, 18, 24, 20)
    th = net(x, x)
    assert th.shape == (2, 3, 4)
    torch.testing.assert_close(th, torch.eye(3, 4).expand(2, 3, 4))
    with pytest.raises(ValueError, match="must both be"):
        net(x, x[:, :, :10])
    with pytest.raises(ValueError, match="dof must be 6"):
        PoseRegressor(dof=7)


def test_supervised_net_rebuilds_from_its_config():
    net = SupervisedNet({"kind": "pose_regressor", "dof": 12, "channels": [4, 8, 8]},
                        {"kind": "deformable", "enc": [4, 8, 8], "dec": [8, 8], "out_level": 1}, iterations=2)
    again = build_model(net.config)
    assert isinstance(again, SupervisedNet) and again.config == net.config and again.stages == "affine+deformable"
    again.load_state_dict(net.state_dict(), strict=True)
    rigid = SupervisedNet({"kind": "pose_regressor", "dof": 6, "channels": [4, 8]})
    assert rigid.stages == "rigid" and rigid.deformable is None


def test_point_loss_is_the_distance_in_mm():
    pts = torch.rand(2, 50, 3, dtype=torch.float64) * 100
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    shifted = eye.clone()
    shifted[:, :3, 3] = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert float(point_loss(shifted, eye, pts, eps_mm=0.0)) == pytest.approx(5.0)
    assert float(point_loss(eye, eye, pts, eps_mm=0.0)) == 0.0
    # a rotation costs in proportion to the lever arm: 1 degree at 100 mm ~ 1.75 mm
    rot = eye.clone()
    rot[:, :3, :3] = torch.as_tensor(S.axis_angle_matrix([0, 0, 1], 1.0))
    far = torch.tensor([[[100.0, 0.0, 0.0]]], dtype=torch.float64).expand(2, 1, 3)
    assert float(point_loss(rot, eye, far, eps_mm=0.0)) == pytest.approx(100 * np.deg2rad(1.0), rel=1e-3)
    with pytest.raises(ValueError, match="points must be"):
        point_loss(eye, eye, pts[0])
    f = torch.zeros(1, 3, 4, 4, 4)
    g = f.clone()
    g[:, 0] = 3.0
    g[:, 2] = 4.0
    assert float(endpoint_error(g, f)) == pytest.approx(5.0, abs=1e-4)


def test_forward_pass_of_an_untrained_net_is_the_start():
    grid = Volume(np.zeros((16, 20, 18), np.float32), (4.0, 4.0, 4.0), (-30.0, -40.0, -20.0),
                  S.rotation_matrix([10, 0, 5]))
    img = np.random.default_rng(0).random((16, 20, 18)).astype(np.float32)
    start = S.about_centre(S.rotation_matrix([0, 5, 0]), G.grid_centre(grid), [2.0, 0.0, -1.0])
    pair = PairTensors.from_numpy([img], [img], [G.grid_matrix(grid)], [G.grid_matrix(grid)], [G.theta_frame(grid)],
                                  [start])
    net = SupervisedNet({"kind": "pose_regressor", "dof": 12, "channels": [4, 8, 8]}, iterations=3)
    out = run_supervised(net, pair, deformable=False)
    np.testing.assert_allclose(out["affine"][0].detach().numpy(), start, atol=1e-5)


# ----------------------------------------------------------------------------- training
TINY = dict(grid="18x24x24", spacing_mm=10.0, max_train_subjects=2, channels="4,8,8,8", pose_enc="4,8,8",
            pose_dec="8,8", device="cpu", points_per_pair=64)


@pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")
@pytest.mark.parametrize("pose_net", ["flow", "direct"])
def test_a_few_training_steps_lower_the_loss(tmp_path, pose_net):
    from app.engine.training import make_config
    from app.engine.training.supervised import SupervisedTrainer
    cfg = make_config("supervised", {**TINY, "max_val_pairs": 0, "batch_size": 4, "iterations": 1,
                                     "aug_intensity": False, "pose_net": pose_net}, out=str(tmp_path / "t.pt"))
    torch.manual_seed(0)
    tr = SupervisedTrainer("supervised", cfg, torch.device("cpu"))
    tr.model = tr.build(None)
    objective = tr.objective()
    batch = tr.sample(1, np.random.default_rng(0), np.random.default_rng(1))
    opt = torch.optim.Adam(tr.trainable(), lr=3e-3)
    losses = []
    for _ in range(25):
        parts = objective(**batch)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        losses.append(float(parts["point_mm"].detach()))
    assert losses[0] > 3.0                              # a real misalignment to start with (mm)
    assert min(losses[-5:]) < 0.8 * losses[0]


@pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")
def test_train_writes_a_supervised_checkpoint_then_the_deformable_stage(tmp_path):
    from app.engine.training import make_config, run_training
    out = tmp_path / "s.pt"
    cfg = make_config("supervised", {**TINY, "max_val_pairs": 2, "batch_size": 2, "steps": 2, "val_every": 0,
                                     "ckpt_every": 0}, out=str(out))
    r = run_training("supervised", cfg)
    assert np.isfinite(r["val"]["point_error_mm"])
    ck = checkpoints.load_checkpoint(out, "supervised", kinds=("supervised",))
    assert isinstance(ck["model"], SupervisedNet) and ck["training"]["steps"] == 2
    assert ck["training"]["ranges"]["rot_deg_per_axis"] == 20.0 and ck["model"].stages == "affine"
    r2 = run_training("supervised", make_config("supervised", {**cfg.__dict__, "resume": str(out), "steps": 3}))
    assert len(r2["history"]) == 1 and checkpoints.load_checkpoint(out)["training"]["steps"] == 3
    with pytest.raises(ValueError, match="trained for paradigm 'supervised', not 'unsupervised'"):
        checkpoints.load_checkpoint(out, "unsupervised")
    # the deformable stage behind the trained pose net: end-point error against the known field
    out2 = tmp_path / "d.pt"
    cfg2 = make_config("supervised", {**TINY, "max_val_pairs": 2, "batch_size": 2, "steps": 2, "val_every": 0,
                                      "stage": "deformable", "init": str(out), "enc": "4,8,8", "dec": "8,8,8",
                                      "out_level": 0}, out=str(out2))
    r3 = run_training("supervised", cfg2)
    assert "epe_mm" in r3["history"][0] and np.isfinite(r3["val"]["epe_mm"])
    ck2 = checkpoints.load_checkpoint(out2, "supervised")
    assert ck2["model"].stages == "affine+deformable"
    pose_before = checkpoints.load_checkpoint(out)["model"].pose.state_dict()     # frozen: unchanged
    torch.testing.assert_close(ck2["model"].pose.state_dict(), pose_before)


# ----------------------------------------------------------------------------- inference
def _demo():
    from app.engine import io
    fixed = io.read_volume(DEMO / "fixed_IXI174_T1.nii.gz")
    moving = io.read_volume(DEMO / "moving_IXI136_T1.nii.gz")
    fl = io.read_labels(DEMO / "fixed_IXI174_labels.nii.gz", reference=fixed)
    ml = io.read_labels(DEMO / "moving_IXI136_labels.nii.gz")
    return fixed, moving, fl, ml


def test_a_checkpoint_of_another_paradigm_is_refused():
    from app.engine.paradigms.supervised import SupervisedParams, SupervisedRegistrar
    fixed, moving, _, _ = _demo()
    with pytest.raises(ValueError, match="trained for paradigm 'unsupervised', not 'supervised'"):
        SupervisedRegistrar().register(fixed, moving, SupervisedParams(stages="affine"), device="cpu",
                                       checkpoint=checkpoints.CHECKPOINT_DIR / "unsupervised.pt")


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled supervised checkpoint")
def test_register_the_demo_pair_with_the_bundled_checkpoint():
    from app.engine.evaluation import register_and_measure
    fixed, moving, fl, ml = _demo()
    res, m = register_and_measure("supervised", fixed, moving, {"stages": "affine"}, fixed_labels=fl,
                                  moving_labels=ml, device="cpu", with_hd95=False)
    assert m["dice_mean"] > m["before"]["dice_mean"] + 0.2
    assert res.transform.kind == "affine" and res.warped.same_grid(fixed)
    assert res.timings["network"] < 5.0
    rigid, _ = register_and_measure("supervised", fixed, moving, {"stages": "rigid"}, device="cpu")
    lin = S.transform_to_matrix(rigid.transform)[:3, :3]
    np.testing.assert_allclose(lin @ lin.T, np.eye(3), atol=1e-6)


@pytest.mark.skipif(not BUNDLED.exists() or not HAVE_IXI, reason="no bundled supervised checkpoint / IXI data")
def test_known_transform_recovered_and_out_of_range_warned():
    from app.engine.datasets import load_split
    from app.engine.paradigms.supervised import SupervisedParams, SupervisedRegistrar
    subject = load_split()["test"][3]
    reg = SupervisedRegistrar()
    case = S.make_cases([subject], per_band=1, seed=5)[1]             # 10-20 degrees, 10-20 mm
    pair = S.case_pair(case)
    pts = S.brain_points(pair.fixed_labels, 2000)
    res = reg.register(pair.fixed, pair.moving, SupervisedParams(stages="affine"), device="cpu")
    truth = case.matrix(pair.centre)
    assert S.mean_point_error(res.transform, truth, pts) < 0.5 * S.mean_point_error(np.eye(4), truth, pts)
    far = S.make_cases([subject], per_band=1, seed=5, bands=((80.0, 10.0), (90.0, 20.0)))[1]
    res = reg.register(*(lambda p: (p.fixed, p.moving))(S.case_pair(far)), SupervisedParams(stages="affine"),
                       device="cpu")
    assert res.warnings and any("range" in w or "similar" in w for w in res.warnings)


def test_bad_input_is_refused():
    from app.engine.paradigms.supervised import SupervisedParams, nearest_rigid, register_supervised
    flat = Volume(np.zeros((1, 64, 64), np.float32), (1.0, 1.0, 1.0))
    if BUNDLED.exists():
        with pytest.raises(ValueError, match="2D images"):
            register_supervised(flat, flat, SupervisedParams(stages="affine"), device="cpu")
    with pytest.raises(ValueError, match="stages must be one of"):
        register_supervised(flat, flat, SupervisedParams(stages="bogus"), device="cpu")
    m = S.about_centre(S.rotation_matrix([5, -3, 8]), [10, 20, 30], [1, 2, 3])
    np.testing.assert_allclose(nearest_rigid(m, [0, 0, 0]), m, atol=1e-9)


@pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")
def test_warm_start_from_a_two_stage_affine_stage(tmp_path):
    from app.engine.nn.networks import AffineNet
    from app.engine.training import make_config
    from app.engine.training.supervised import SupervisedTrainer
    src = checkpoints.CHECKPOINT_DIR / "unsupervised.pt"
    cfg = make_config("supervised", {"init": str(src), "max_train_subjects": 1, "max_val_pairs": 0, "device": "cpu"},
                      out=str(tmp_path / "w.pt"))
    tr = SupervisedTrainer("supervised", cfg, torch.device("cpu"))
    model = tr.build(None)
    ref = checkpoints.load_checkpoint(src)
    assert isinstance(model.pose, AffineNet) and model.stages == "affine"
    torch.testing.assert_close(model.pose.state_dict(), ref["model"].affine.state_dict())
    assert tr.preprocessing()["grid_shape"] == ref["preprocessing"]["grid_shape"]
    assert tr.record()["init"]["paradigm"] == "unsupervised"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")
def test_cli_train_then_register(tmp_path):
    import subprocess
    import sys
    root = checkpoints.CHECKPOINT_DIR.parents[1]

    def run(*args):
        return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=root, capture_output=True, text=True,
                              timeout=600)
    ck = tmp_path / "tiny.pt"
    tiny = ["grid=18x24x24", "spacing_mm=10", "pose_enc=4,8,8", "pose_dec=8,8", "max_train_subjects=2",
            "max_val_pairs=1", "val_every=0", "batch_size=2", "points_per_pair=32", "threads=1"]
    r = run("train", "--paradigm", "supervised", "--out", ck, "--steps", "2", "--no-progress",
            *[x for p in tiny for x in ("--param", p)])
    assert r.returncode == 0, r.stderr
    assert "checkpoint written" in r.stdout and ck.is_file()
    fixed, moving = DEMO / "fixed_IXI174_T1.nii.gz", DEMO / "moving_IXI136_T1.nii.gz"
    r = run("register", fixed, moving, "--paradigm", "supervised", "--param", "stages=affine", "--checkpoint", ck,
            "--out", tmp_path / "reg", "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "reg" / "warped.nii.gz").is_file() and (tmp_path / "reg" / "transform.h5").is_file()
    # no deformable net in this checkpoint: the deformable stage is refused with one clear line
    r = run("register", fixed, moving, "--paradigm", "supervised", "--param", "stages=affine+deformable",
            "--checkpoint", ck, "--out", tmp_path / "reg2", "--no-progress", "--device", "cpu")
    assert r.returncode == 1 and "no deformable net" in r.stderr and not (tmp_path / "reg2").exists()
    r = run("register", fixed, moving, "--paradigm", "unsupervised", "--checkpoint", ck, "--out", tmp_path / "reg3",
            "--no-progress", "--device", "cpu")
    assert r.returncode == 1 and "supervised" in r.stderr


@pytest.mark.skipif(not BUNDLED.exists() or not HAVE_IXI, reason="no bundled supervised checkpoint / IXI data")
def test_initial_transform_is_the_start_and_the_result_is_the_whole_chain():
    from app.engine.datasets import load_split
    from app.engine.paradigms.supervised import SupervisedParams, SupervisedRegistrar
    case = S.make_cases([load_split()["test"][2]], per_band=1, seed=9)[2]           # 20-30 degrees
    pair = S.case_pair(case)
    truth = case.matrix(pair.centre)
    pts = S.brain_points(pair.fixed_labels, 1000)
    # a start 1 degree / 1 mm off the truth: the result (the whole chain) stays close to the truth
    near = truth @ S.about_centre(S.axis_angle_matrix([1, 0, 0], 1.0), pair.centre, [1.0, 0, 0])
    reg = SupervisedRegistrar()
    for it in (1, 2):
        res = reg.register(pair.fixed, pair.moving, SupervisedParams(stages="affine", iterations=it), device="cpu",
                           initial=S.matrix_to_transform(near))
        assert res.transform.is_linear
        err = S.mean_point_error(res.transform, truth, pts)
        if res.warnings:          # the prediction made the images less similar: the start is kept
            assert any("kept the initial" in w or "kept the start" in w for w in res.warnings)
            assert err == pytest.approx(S.mean_point_error(near, truth, pts))
        else:
            assert err < 3.0
