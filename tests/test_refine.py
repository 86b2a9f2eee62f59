"""The fine-grid (2 mm) refinement stage of the two-stage models: network, composition, physical
space, training, and old checkpoints unchanged."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import checkpoints as C
from app.engine import datasets as D
from app.engine import spatial, training
from app.engine.nn import geometry as G
from app.engine.nn.networks import (DeformableNet, RefineNet, TwoStageNet, build_model, depth_to_space,
                                    space_to_depth)
from app.engine.nn.twostage import PairTensors, coarse_from_fine, run_refine, run_two_stage
from app.engine.paradigms import _learned
from app.engine.paradigms.weakly import WeaklyRegistrar
from app.engine.types import Volume

HAVE_IXI = D.ixi_paths(D.load_split()["train"][0])[0].exists()
needs_ixi = pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")

AFFINE = {"kind": "affine", "channels": [4, 4]}
DEFORM = {"kind": "deformable", "enc": [4, 8], "dec": [8], "out_level": 1}
REFINE = {"kind": "refine", "enc": [4, 8], "dec": [8, 8]}


def test_space_to_depth_round_trip_and_block_order():
    x = torch.arange(2 * 4 * 6 * 8, dtype=torch.float32).reshape(1, 2, 4, 6, 8)
    s = space_to_depth(x, 2)
    assert s.shape == (1, 16, 2, 3, 4)
    # channel c * 8 + (dz * 4 + dy * 2 + dx) holds voxel (2k + dz, 2j + dy, 2i + dx) of channel c
    assert s[0, 8 + 5, 1, 2, 3] == x[0, 1, 2 + 1, 4 + 0, 6 + 1]
    torch.testing.assert_close(depth_to_space(s, 2), x)
    with pytest.raises(ValueError, match="not divisible"):
        space_to_depth(torch.zeros(1, 1, 5, 6, 6), 2)


@pytest.mark.parametrize("diffeo", [False, True])
def test_refine_net_shapes_at_2mm_and_near_zero_init(diffeo):
    net = RefineNet(enc=(8, 8, 16, 16), dec=(16, 16, 8, 8), diffeomorphic=diffeo)
    x = torch.rand(1, 1, 90, 120, 120)         # the IXI 2 mm grid (the 4 mm working grid x 2)
    with torch.no_grad():
        out = net(x, x)
    assert out.disp_vox.shape == (1, 3, 90, 120, 120) and out.raw_vox.shape == (1, 3, 90, 120, 120)
    assert out.disp_vox.abs().max() < 1e-2
    assert build_model(net.config).config == net.config
    with pytest.raises(ValueError, match="RefineNet"):
        RefineNet(enc=(8, 8), dec=(8,))
    with pytest.raises(ValueError):
        net(x, torch.rand(1, 1, 90, 120, 118))


def test_refine_net_warm_start_computes_the_coarse_features_on_folded_inputs():
    """Started from a working-grid DeformableNet of the same channels, the refinement U-Net computes on
    the folded fine inputs exactly what that net computes on the average-pooled ones; heads at ~0."""
    torch.manual_seed(0)
    coarse = DeformableNet(enc=(4, 8, 8), dec=(8, 8, 4), out_level=0)
    net = RefineNet(enc=(4, 8, 8), dec=(8, 8, 4))
    assert net.warm_start(coarse) == len(coarse.state_dict()) - 2
    fixed, moving = torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16)
    pool = torch.nn.functional.avg_pool3d
    a = net.down[0](torch.cat([space_to_depth(fixed, 2), space_to_depth(moving, 2)], 1))
    b = coarse.down[0](torch.cat([pool(fixed, 2), pool(moving, 2)], 1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert net(fixed, moving).disp_vox.abs().max() < 1e-2
    assert RefineNet(enc=(4, 8), dec=(8, 8)).warm_start(coarse) == 0


def test_two_stage_without_refine_keeps_its_config_and_weights():
    net = TwoStageNet(AFFINE, DEFORM)
    assert "refine" not in net.config and net.refine is None
    assert not any(k.startswith("refine.") for k in net.state_dict())
    with_refine = TwoStageNet(AFFINE, DEFORM, refine=REFINE)
    assert with_refine.config["refine"] == RefineNet(enc=[4, 8], dec=[8, 8]).config
    assert build_model(with_refine.config).config == with_refine.config
    assert set(with_refine.state_dict()) - set(net.state_dict()) == {
        k for k in with_refine.state_dict() if k.startswith("refine.")}
    with pytest.raises(ValueError, match="refine"):
        TwoStageNet(AFFINE, DEFORM, refine=DEFORM)


@pytest.mark.parametrize("name", ["weakly", "unsupervised"])
def test_bundled_checkpoints_load_and_run_as_before(name):
    """A checkpoint without a refinement net runs the working-grid path: same field as run_two_stage."""
    path = C.default_checkpoint(name)
    ck = C.load_checkpoint(path, name, kinds=("two_stage",))
    model = ck["model"]
    if model.refine is not None:
        pytest.skip("the bundled model has a refinement net")
    prep = D.Preprocessing.from_dict(ck["preprocessing"])
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((90, 120, 120)).astype(np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0),
                 np.asarray(D.IXI_DIRECTION))
    res = _learned.run_pair(ck, vol, vol, torch.device("cpu"))
    assert res["grid"].shape == tuple(prep.grid_shape)
    w = D.preprocess(vol, prep)
    init = G.translation(D.prealign_offset(w, w, prep))
    pair = PairTensors.from_numpy([w.array], [w.array], [G.grid_matrix(w)], [G.grid_matrix(w)], [G.theta_frame(w)],
                                  [init])
    with torch.no_grad():
        out = run_two_stage(model, pair, deformable=True, train_affine=False)
    torch.testing.assert_close(res["disp_mm"], spatial.voxel_to_physical_field(out.field.disp_vox, w))


def test_coarse_grid_pooled_from_the_fine_grid_is_the_working_grid():
    prep = D.Preprocessing(grid_shape=(6, 8, 10), spacing_mm=4.0)
    vol = Volume(np.random.default_rng(1).random((13, 17, 21)).astype(np.float32), (1.5, 2.0, 2.5), (5.0, -3.0, 7.0),
                 np.asarray(D.IXI_DIRECTION))
    fprep = D.fine_preprocessing(prep, 2)
    assert fprep.grid_shape == (12, 16, 20) and fprep.spacing_mm == 2.0
    fine_grid, work = D.working_grid(vol, fprep), D.working_grid(vol, prep)
    img = np.random.default_rng(2).random(fprep.grid_shape).astype(np.float32)
    gm = G.grid_matrix(fine_grid)
    fine = PairTensors.from_numpy([img], [img], [gm], [gm], [G.theta_frame(fine_grid)], [np.eye(4)])
    coarse = coarse_from_fine(fine, 2)
    np.testing.assert_allclose(coarse.fixed_grid[0].numpy(), G.grid_matrix(work), atol=1e-9)
    np.testing.assert_allclose(G.theta_frame(fine_grid), G.theta_frame(work), atol=1e-9)
    assert coarse.fixed[0, 0, 1, 2, 3] == pytest.approx(img[2:4, 4:6, 6:8].mean(), abs=1e-6)


def _constant_refine_model(r_zyx, u_zyx=(0.0, 0.0, 0.0)):
    """A tiny model whose affine stage is the identity, whose working-grid field is the constant
    ``u_zyx`` (working voxels) and whose refinement adds the constant ``r_zyx`` (fine voxels)."""
    torch.manual_seed(0)
    model = TwoStageNet(AFFINE, {"kind": "deformable", "enc": [4, 8], "dec": [8, 8], "out_level": 0}, refine=REFINE)
    with torch.no_grad():
        model.deformable.head.weight.zero_()
        model.deformable.head.bias.copy_(torch.tensor(u_zyx))
        model.refine.head.weight.zero_()
        model.refine.head.bias.zero_()
        model.refine.detail.weight.zero_()
        model.refine.detail.bias.copy_(torch.tensor(r_zyx).repeat_interleave(8))
    return model.eval()


def test_composition_is_r_plus_u_at_x_plus_r():
    """d(x) = r(x) + u(x + r(x)): with a linear coarse field the composition is exact."""
    model = _constant_refine_model((0.5, -1.0, 0.25))
    fine_shape = (16, 16, 16)
    eye = np.eye(4)
    img = np.random.default_rng(0).random(fine_shape).astype(np.float32)
    fine = PairTensors.from_numpy([img], [img], [eye], [eye], [eye], [eye])
    with torch.no_grad():
        coarse = run_two_stage(model, coarse_from_fine(fine, 2), train_affine=False)
        # replace the coarse field by a linear one: u_z = 0.1 * z (working voxels)
        z = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8)
        coarse.field = coarse.field._replace(disp_vox=torch.cat([0.1 * z, 0 * z, 0 * z], 1))
        coarse.affine = torch.eye(4, dtype=torch.float64)[None]
        out = run_refine(model, coarse, fine)
    d = out.disp_vox[0]
    # u on the fine grid: fine z_f <-> working (z_f - 0.5) / 2; u_f = 2 * 0.1 * (z_f - 0.5) / 2 = 0.1 (z_f - 0.5)
    zf = torch.arange(16, dtype=torch.float32).view(16, 1, 1)
    expect_z = 0.5 + 0.1 * (zf + 0.5 - 0.5)
    inner = (slice(2, -2),) * 3
    torch.testing.assert_close(d[0][inner], expect_z.expand(16, 16, 16)[inner], atol=1e-4, rtol=0)
    torch.testing.assert_close(d[1][inner], torch.full((12, 12, 12), -1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(d[2][inner], torch.full((12, 12, 12), 0.25), atol=1e-5, rtol=0)
    # the warped image is one resampling of the moving image through A(x + d(x))
    torch.testing.assert_close(out.moving_warped, G.sample_through(fine.moving, out.index_affine, fine_shape,
                                                                   disp_vox=out.disp_vox))


def test_refined_field_is_physical_on_an_oblique_anisotropic_fixed_grid(tmp_path):
    """The returned transform is T(x) = A(x + d(x)); with no prealignment, an identity affine stage
    and a constant 1-voxel refinement along the working z axis, T shifts every point by 2 mm along
    that axis (in LPS) on an oblique, anisotropic fixed grid, and the warped image equals SimpleITK's
    resampling of the moving image through that translation (the moving blob is moved by just that,
    so the stage check keeps the refined stage)."""
    prep = D.Preprocessing(grid_shape=(16, 16, 16), spacing_mm=4.0, prealignment="none")
    model = _constant_refine_model((1.0, 0.0, 0.0))
    path = C.save_checkpoint(tmp_path / "r.pt", paradigm="weakly", model=model, preprocessing=prep.to_dict(),
                             training={})
    rot = sitk.VersorTransform((0.2, 0.1, -0.15), 0.3)
    direction = np.asarray(rot.GetMatrix()).reshape(3, 3) @ np.asarray(D.IXI_DIRECTION)
    shape, sp = (20, 24, 28), (2.0, 2.5, 1.8)
    fixed = Volume(np.zeros(shape, np.float32), sp, (-20.0, -30.0, -25.0), direction)
    fine_grid = D.working_grid(fixed, D.fine_preprocessing(prep, 2))
    step_mm = np.asarray(fine_grid.direction)[:, 2] * 2.0          # one fine voxel along working z, LPS
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    p = fixed.index_to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1))
    centre = p.mean(0)
    blob = lambda c: np.exp(-np.sum((p - c) ** 2, 1) / (2 * 8.0 ** 2)).reshape(shape).astype(np.float32)
    fixed = fixed.with_array(blob(centre))
    moving = fixed.with_array(blob(centre + step_mm))
    res = WeaklyRegistrar().register(fixed, moving, None, checkpoint=path, device="cpu")
    assert res.checks["stage_check"]["kept"] == "refined"
    assert list(res.checks["stage_check"]["values"]) == ["start", "prealigned", "affine", "deformable", "refined"]
    pts = fixed.index_to_physical(np.array([[14, 12, 10], [10, 10, 8], [18, 9, 12]]))
    np.testing.assert_allclose(res.transform.transform_points(pts) - pts, np.tile(step_mm, (3, 1)), atol=0.02)
    ref = sitk.TranslationTransform(3, tuple(float(v) for v in step_mm))
    want = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), fixed.to_sitk(), ref, sitk.sitkLinear, 0.0))
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(res.warped.array[inner], want[inner], atol=2e-3)
    np.testing.assert_allclose(res.field.array[inner], np.broadcast_to(step_mm, res.field.array[inner].shape),
                               atol=0.02)
    assert _learned.load_model("weakly", path)["model"].refine is not None


def test_a_refinement_that_makes_the_pair_worse_is_not_kept(tmp_path):
    """The refined field is a stage of its own in the stage check: an aligned pair, a zero working-grid
    field and a refinement that shifts everything by 3 fine voxels (6 mm): the working-grid result is kept."""
    prep = D.Preprocessing(grid_shape=(16, 16, 16), spacing_mm=4.0, prealignment="none")
    path = C.save_checkpoint(tmp_path / "bad.pt", paradigm="weakly", model=_constant_refine_model((3.0, 3.0, 0.0)),
                             preprocessing=prep.to_dict(), training={})
    shape = (24, 28, 28)
    fixed = Volume(np.zeros(shape, np.float32), (2.0, 2.0, 2.0), (-28.0, -28.0, -24.0), np.asarray(D.IXI_DIRECTION))
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    p = fixed.index_to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1))
    c = p.mean(0)
    fixed = fixed.with_array((np.sqrt(np.sum(((p - c) / [18.0, 22.0, 16.0]) ** 2, 1)) < 1).reshape(shape)
                             .astype(np.float32) * 100)
    res = WeaklyRegistrar().register(fixed, fixed.with_array(fixed.array.copy()), None, checkpoint=path, device="cpu")
    sc = res.checks["stage_check"]
    assert sc["last"] == "refined" and sc["kept"] == "deformable" and sc["flagged"] and res.flagged
    assert any(w.startswith("the refined stage made the pair less similar") for w in sc["worse"])
    pts = fixed.index_to_physical(np.array([[14, 12, 10], [10, 15, 8]]))
    np.testing.assert_allclose(res.transform.transform_points(pts), pts, atol=0.05)     # the zero coarse field


def test_augmentations_by_hand():
    from app.engine.training.refine import augment_appearance, brain_distance, random_crop
    labels = np.zeros((20, 20, 20), np.int16)
    labels[5:15, 5:15, 5:15] = 3
    d = brain_distance(labels, 2.0)
    assert d[10, 10, 10] == 0 and d[10, 10, 17] == 6 and d.max() == 12
    img = np.full((20, 20, 20), 0.5, np.float32)
    rng = np.random.default_rng(0)
    stripped = augment_appearance(img, rng, d, p_strip=1.0, p_blur=0.0, contrast=False)
    assert stripped[0, 0, 0] == 0 and stripped[10, 10, 10] == pytest.approx(1.0)
    ramp = np.linspace(0, 1, 20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20)
    for seed in range(5):
        out = augment_appearance(ramp, np.random.default_rng(seed), None, 0.0, 0.0, True)
        assert np.all(np.diff(out.ravel()) >= -1e-6) and out.min() >= 0 and out.max() <= 1    # monotone
    blurred = augment_appearance(ramp * 0 + (np.indices(ramp.shape)[0] % 2), rng, None, 0.0, 1.0, False)
    assert blurred.std() < 0.4
    (z0, y0, x0), size = random_crop((90, 120, 120), 64, 16, rng)
    assert size == (64, 64, 64) and 0 <= z0 <= 26 and 0 <= y0 <= 56
    assert random_crop((90, 120, 120), 0, 16, rng) is None


def test_a_few_refine_steps_lower_the_loss():
    """On one fixed pair (a blob and the blob moved by 4 mm), Adam steps on the refinement net alone
    lower the similarity + smoothness loss; the coarse stages are untouched."""
    from types import SimpleNamespace
    from app.engine.training.refine import RefineLoss
    torch.manual_seed(0)
    model = TwoStageNet(AFFINE, DEFORM, refine={"kind": "refine", "enc": [8, 8], "dec": [8, 8]})
    shape = (24, 24, 24)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    blob = lambda cz: np.exp(-((z - cz) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) / (2 * 4.0 ** 2)).astype(np.float32)
    eye = np.eye(4)
    eye2 = np.diag([2.0, 2.0, 2.0, 1.0])
    fine = PairTensors.from_numpy([blob(11.0)], [blob(13.0)], [eye2], [eye2], [eye2], [eye])
    cfg = SimpleNamespace(similarity="mse", lncc_window=3, w_sim=1.0, w_smooth=0.01, w_dice=1.0, dual=True)
    trainer = SimpleNamespace(autocast=None)
    loss = RefineLoss(model, cfg, weakly=False, trainer=trainer)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("refine.")}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.refine.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.refine.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        parts = loss(fine)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        losses.append(float(parts["total"]))
    assert losses[-1] < 0.75 * losses[0]
    for k, v in frozen.items():
        torch.testing.assert_close(model.state_dict()[k], v)


@needs_ixi
def test_refine_stage_trains_through_the_loop(tmp_path):
    """The refine stage through the shared loop on real data (a tiny 10 mm model refined at 5 mm):
    its checkpoint rebuilds with the refinement net, its coarse stages are init's, it validates."""
    base = dict(out=str(tmp_path / "base.pt"), grid="18x24x24", spacing_mm=10.0, enc="4,8,8", dec="8,8",
                out_level=1, max_train_subjects=2, max_val_pairs=1, val_every=0, ckpt_every=0, steps=1,
                lncc_window=3, cache_dir=str(tmp_path / "cache"), threads=2, dice_labels=8, stage="joint")
    first = training.run_training("weakly", training.make_config("weakly", {k: str(v) for k, v in base.items()}))
    cfg = {**base, "out": str(tmp_path / "refined.pt"), "stage": "refine", "init": str(first["path"]), "steps": 2,
           "refine_enc": "8,8", "refine_dec": "8,8", "refine_crop": 32, "aug_skullstrip": 0.5, "aug_blur": 0.5,
           "aug_contrast": True}
    out = training.run_training("weakly", training.make_config("weakly", {k: str(v) for k, v in cfg.items()}))
    assert {"dice", "sim", "smooth"} <= set(out["history"][-1])
    ck = C.load_checkpoint(out["path"], "weakly", kinds=("two_stage",))
    assert ck["model"].refine is not None and ck["training"]["stage"] == "refine"
    assert ck["preprocessing"]["grid_shape"] == [18, 24, 24]
    assert {"dice", "dice_coarse", "fold_fraction"} <= set(ck["training"]["validation"])
    assert ck["training"]["augmentation"]["skullstrip"] == 0.5
    # trained with and without skull: the checkpoint says so, and a skull-stripped input is no surprise
    from app.engine.expectations import expectations
    assert expectations(ck)["skull"] is None
    assert expectations(C.load_checkpoint(first["path"], "weakly", kinds=("two_stage",)))["skull"] is True
    for k, v in first["model"].state_dict().items():
        torch.testing.assert_close(ck["model"].state_dict()[k], v)
    with pytest.raises(ValueError, match="needs init"):
        training.run_training("weakly", training.make_config("weakly", {**{k: str(v) for k, v in cfg.items()},
                                                                       "init": ""}))
