"""dsm's wider basin: graded / rotated training targets, the similarity profile through the optimiser's
pipeline (physical space kept), the coarse pyramid level, the landscape's peak on a held-out pair."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import paradigms
from app.engine.nn.dsm_net import DsmNet
from app.engine.optimise import similarity_profile
from app.engine.training.dsm import DsmTrainer, cut_patch, patch_msd, random_rotation
from app.engine.types import Volume

BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "checkpoints" / "dsm.pt"
HELD_OUT = Path("/work/shared/data/multimodal/ms_cross_sectional_patient19")


def test_cut_patch_is_a_slice_inside_and_zero_outside_the_grid():
    a = np.random.default_rng(0).random((12, 13, 14)).astype(np.float32)
    p = cut_patch(a, (6, 6, 7), (1, -2, 0), None, 5)
    assert np.array_equal(p, a[5:10, 2:7, 5:10])
    # reaching past the border: the inside part is the image, the outside is zero (a warped moving image)
    q = cut_patch(a, (6, 6, 7), (0, 0, 6), None, 5)
    assert q.shape == (5, 5, 5)
    assert np.allclose(q[:, :, :2], a[4:9, 4:9, 11:13]) and not q[:, :, 3:].any()


def test_cut_patch_rotates_about_the_patch_centre():
    # a linear ramp along z: rotating the sampling 90 deg about x turns the z-gradient into a y-gradient
    z = np.arange(21, dtype=np.float32)[:, None, None]
    a = np.broadcast_to(z, (21, 21, 21)).copy()
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])   # (z, y, x): o -> (-o_y, o_z, o_x)
    p = cut_patch(a, (10, 10, 10), (0, 0, 0), rot, 5)
    o = np.arange(-2, 3)
    assert np.allclose(p, 10.0 - o[None, :, None] + 0 * o[:, None, None], atol=1e-5)


def test_patch_msd_is_the_squared_offset_for_translations_and_grows_with_rotation():
    assert patch_msd((1, 2, 0), None, 9) == pytest.approx(5.0)
    rng = np.random.default_rng(1)
    r_small = random_rotation(np.random.default_rng(2), 5.0)
    r = random_rotation(rng, 40.0)
    assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
    assert 0 < patch_msd((0, 0, 0), r_small, 9) < patch_msd((0, 0, 0), r, 9) + 1e-9
    # 90 deg about one axis moves a voxel at offset o by sqrt(2) |o_perp|: mean |o_perp|^2 = 2 * (r (r+1) / 3)
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert patch_msd((0, 0, 0), rot, 5) == pytest.approx(2 * 2 * (2 * 3 / 3))


def _trainer(cfg_over):
    from scipy.ndimage import gaussian_filter
    tex = gaussian_filter(np.random.default_rng(0).normal(size=(30, 30, 30)), 1.5)
    t1 = ((tex - tex.min()) / (tex.max() - tex.min()) * 0.8 + 0.15).astype(np.float32)
    cfg = paradigms.make_params(paradigms.registrar_class("dsm").TrainConfig,
                                {"out": "x.pt", "patch": 9, "channels": "4,8,8", "max_offset": 6,
                                 "batch_size": 8, "aug_intensity": False, **cfg_over})
    tr = DsmTrainer("dsm", cfg, torch.device("cpu"))
    tr.scales = [2.0, 8.0]
    tr.train_sets = [{"name": "toy", "scales": [{"T1": t1, "T2": 1.1 - t1}, {"T1": t1, "T2": 1.1 - t1}]}]
    tr.val_sets = tr.train_sets
    tr.ixi_sets = []
    tr.model = DsmNet(9, (4, 8, 8))
    return tr


def test_graded_targets_are_wider_at_the_coarse_scale_and_rotations_lower_them():
    tr = _trainer({"target_sigma": "1,3"})
    d = (0, 3, 0)
    _, fine, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=d, scale=0)
    _, coarse, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=d, scale=1)
    assert fine == pytest.approx(np.exp(-9 / 2)) and coarse == pytest.approx(np.exp(-9 / 18))
    rot = random_rotation(np.random.default_rng(3), 30.0)
    _, t_rot, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=(0, 0, 0), rotation=rot, scale=1)
    assert t_rot == pytest.approx(np.exp(-patch_msd((0, 0, 0), rot, 9) / 18)) and t_rot < 1.0
    # a share of the displaced samples is rotated
    tr = _trainer({"rotate_fraction": 1.0, "max_rotation_deg": 30.0})
    targets = [tr._draw(np.random.default_rng(k), tr.train_sets, False, kind="small")[1] for k in range(20)]
    plain = [tr._draw(np.random.default_rng(k), tr.train_sets, False,
                      offset=tr._draw(np.random.default_rng(k), tr.train_sets, False, kind="small")[2])[1]
             for k in range(20)]
    assert sum(t < p - 1e-9 for t, p in zip(targets, plain)) >= 15
    with pytest.raises(ValueError, match="target_sigma"):
        _trainer({"target_sigma": "1,2,3"})._sigma(0)


def oblique_volume(seed=0) -> Volume:
    from scipy.ndimage import gaussian_filter
    d = np.array(sitk.VersorTransform((0.3, 1, 0.2), 0.4).GetMatrix()).reshape(3, 3)
    a = gaussian_filter(np.random.default_rng(seed).random((26, 30, 28)), 2.0)
    a = (a - a.min()) / (a.max() - a.min())
    return Volume(a.astype(np.float32), (2.2, 1.8, 2.6), (-20.0, 14.0, 7.0), d, "blob")


def test_similarity_profile_keeps_physical_space():
    # the moving image is the fixed one on another (shifted, oblique) grid: the true map is the identity
    # in physical space, so the profile over physical translations is lowest at zero
    from app.engine.nn.geometry import grid_centre
    fixed = oblique_volume()
    d = np.array(sitk.VersorTransform((1, 0.2, 0.1), 0.3).GetMatrix()).reshape(3, 3)
    origin = grid_centre(fixed) - d @ np.full(3, 63 * 2.0 / 2)      # a 128 mm oblique box around the fixed image
    moving_img = sitk.Resample(fixed.to_sitk(sitk.sitkFloat32), [64, 64, 64], sitk.Transform(), sitk.sitkLinear,
                               tuple(origin), (2.0, 2.0, 2.0), tuple(d.reshape(-1)), 0.0)
    moving = Volume.from_sitk(moving_img, "moving")
    shifts = np.linspace(-8, 8, 9)
    mats = []
    for s in shifts:
        m = np.eye(4)
        m[:3, 3] = (s, 0.5 * s, 0.0)
        mats.append(m)
    loss = similarity_profile(fixed, moving, mats, similarity="ncc")
    assert int(np.argmin(loss)) == 4 and loss[4] < loss[0] - 0.05 and loss[4] < loss[-1] - 0.05
    coarse = similarity_profile(fixed, moving, mats, similarity="ncc", level=2)
    assert int(np.argmin(coarse)) == 4
    with pytest.raises(ValueError, match="NaN"):
        similarity_profile(fixed, moving, [np.full((4, 4), np.nan)], similarity="ncc")


def test_the_dsm_levels_drop_a_coarse_level_that_cannot_hold_a_patch():
    # a small field of view: the 8 mm level of a 2 mm grid is under one patch; it is dropped with a warning
    from app.engine.checkpoints import save_checkpoint  # noqa: F401  (the registrar loads through it)
    fixed = oblique_volume()
    reg = paradigms.get("dsm")
    p = paradigms.make_params(reg.Params, {"levels": "4,2,1", "iterations": "2", "patches": 8,
                                           "similarity_map": False})
    net = DsmNet(9, (4, 8, 8))
    ckpt = {"model": net, "preprocessing": {"spacing_mm": [2.0, 4.0, 8.0]}}
    import app.engine.paradigms._learned as learned
    orig = learned.load_model
    learned.load_model = lambda *a, **k: ckpt
    try:
        res = reg.register(fixed, fixed.with_array(1.0 - fixed.array, "inv"), p, device="cpu")
    finally:
        learned.load_model = orig
    assert any("levels [4] dropped" in w for w in res.warnings), res.warnings


needs_bundle = pytest.mark.skipif(not (BUNDLED.exists() and HELD_OUT.is_dir()),
                                  reason="bundled dsm checkpoint or held-out data not available")


@needs_bundle
def test_rotation_sweep_of_the_learned_similarity_peaks_at_alignment_on_a_held_out_pair():
    from bench.sweep_dsm import rotation_about
    from app.engine import io
    from app.engine.datasets import center_of_mass
    from app.engine.paradigms._learned import load_model
    from app.engine.training.dsm import to_isotropic
    net = load_model("dsm", BUNDLED, kinds=("dsm",))["model"]
    fixed = to_isotropic(io.read_volume(HELD_OUT / "T1.nii.gz"), 4.0)
    moving = to_isotropic(io.read_volume(HELD_OUT / "T2.nii.gz"), 4.0)
    c = center_of_mass(fixed)
    angles = (-20.0, -10.0, 0.0, 10.0, 20.0)
    mats = [rotation_about(c, 2, a) for a in angles]
    loss = similarity_profile(fixed, moving, mats, similarity="dsm",
                              sim_options={"net": net, "patches": 128, "seed": 0}, level=1)
    assert int(np.argmin(loss)) == 2, loss
    assert loss[2] < loss[0] - 0.05 and loss[2] < loss[-1] - 0.05, loss


def test_lattice_centres_cover_the_mask_evenly_and_stay_inside():
    from app.engine.nn.dsm_net import lattice_centres
    m = torch.zeros((23, 28, 23), dtype=torch.bool)
    m[3:20, 4:24, 3:20] = True
    c = lattice_centres(m, 96, 17)
    assert 0 < len(c) <= 96 and bool(m[c[:, 0], c[:, 1], c[:, 2]].all())
    assert int(c.min()) >= 8 and all(int(c[:, i].max()) <= m.shape[i] - 9 for i in range(3))
    # one stride on every axis: the lattice is regular
    for i in range(3):
        steps = np.diff(np.unique(c[:, i].numpy()))
        assert len(set(steps.tolist())) <= 1
    assert len(lattice_centres(torch.zeros((20, 20, 20), dtype=torch.bool), 10, 7)) == 1
    with pytest.raises(ValueError, match="smaller than a patch"):
        lattice_centres(m, 96, 25)


def test_lattice_sampling_is_deterministic_and_differentiable():
    from app.engine.nn.dsm_net import DsmSimilarity
    net = DsmNet(9, (4, 8, 8))
    f = torch.rand(1, 1, 24, 24, 24)
    w = torch.rand(1, 1, 24, 24, 24, requires_grad=True)
    lat = DsmSimilarity(net, patches=30, foreground=0.0, sampling="lattice")
    a, b = lat(f, w), lat(f, w)
    assert float(a.detach()) == float(b.detach())
    a.backward()
    assert float(w.grad.abs().sum()) > 0
    rnd = DsmSimilarity(net, patches=30, foreground=0.0)
    assert float(rnd(f, w).detach()) != float(rnd(f, w).detach())
    with pytest.raises(ValueError, match="lattice"):
        DsmSimilarity(net, sampling="grid")


def test_coarse_learning_rate_runs_the_first_level_apart_and_mi_gets_the_same_schedule():
    fixed = oblique_volume()
    moving = fixed.with_array(1.0 - fixed.array, "inverted")
    reg = paradigms.get("dsm")
    hist = {}
    for extra in ({"coarse_learning_rate": 0.0}, {"coarse_learning_rate": 3.0}):
        p = paradigms.make_params(reg.Params, {"similarity": "mi", "levels": "2,1", "iterations": "4,3", **extra})
        res = reg.register(fixed, moving, p, device="cpu")
        hist[extra["coarse_learning_rate"] > 0] = res.history
        assert res.transform.kind == "rigid" and len(res.history) == 7
    # the first level's steps differ (3 mm vs 1 mm), so the paths differ
    assert hist[True][3]["loss"] != hist[False][3]["loss"]


def test_cauchy_targets_share_the_peak_and_slope_and_keep_a_tail():
    from app.engine.training.dsm import soft_target
    for sigma in (1.0, 2.0):
        assert soft_target(0.0, sigma, "gaussian") == soft_target(0.0, sigma, "cauchy") == 1.0
        eps = 1e-4      # the same slope -1 / (2 sigma^2) at alignment
        for shape in ("gaussian", "cauchy"):
            assert (soft_target(eps, sigma, shape) - 1.0) / eps == pytest.approx(-1 / (2 * sigma ** 2), rel=1e-3)
    # far off, the Gaussian target is ~0 (no ranking left to learn), the Cauchy one still falls with msd
    assert soft_target(200.0, 2.0, "gaussian") < 1e-10
    assert soft_target(100.0, 2.0, "cauchy") > soft_target(200.0, 2.0, "cauchy") > 0.03
    with pytest.raises(ValueError, match="target shape"):
        soft_target(1.0, 1.0, "laplace")
    tr = _trainer({"target_sigma": "1,2", "target_shape": "gaussian,cauchy"})
    _, fine, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=(0, 3, 0), scale=0)
    _, coarse, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=(0, 3, 0), scale=1)
    assert fine == pytest.approx(np.exp(-9 / 2)) and coarse == pytest.approx(1 / (1 + 9 / 8))
    with pytest.raises(ValueError, match="target_shape"):
        _trainer({"target_shape": "gaussian,cauchy,cauchy"})._shape(0)


def test_a_rotated_frame_keeps_an_aligned_pair_aligned_and_rotates_both_patches():
    tr = _trainer({"frame_fraction": 1.0})
    frame = random_rotation(np.random.default_rng(5), 120.0)
    pair, t, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=(0, 0, 0), scale=0,
                          frame_rotation=frame, rotation=np.eye(3))
    assert t == pytest.approx(1.0)
    # T2 = 1.1 - T1 voxel for voxel: the framed patches are still each other's remapping inside the grid
    inside = pair[0] > 0
    assert inside.mean() > 0.5 and np.allclose(pair[1][inside], 1.1 - pair[0][inside], atol=1e-5)
    plain, _, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=(0, 0, 0), scale=0)
    assert not np.allclose(plain[0], pair[0])          # the frame turned the sampled axes
    # the misalignment seen in a frame: msd of R Q o - Q o; a quarter turn frame about R's own axis is a
    # symmetry of the cubic patch, so it leaves the msd unchanged
    rot = np.array([[1.0, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    quarter = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    assert patch_msd((0, 0, 0), rot, 9, quarter) == pytest.approx(patch_msd((0, 0, 0), rot, 9))
    _, t_rot, _ = tr._draw(np.random.default_rng(0), tr.train_sets, False, offset=(0, 0, 0), rotation=rot,
                           scale=0, frame_rotation=frame)
    assert t_rot == pytest.approx(np.exp(-patch_msd((0, 0, 0), rot, 9, frame) / 2))
    # random frames are drawn for a share of the free samples only
    tr0 = _trainer({"frame_fraction": 0.0})
    a, _, _ = tr0._draw(np.random.default_rng(3), tr0.train_sets, False, kind="zero", scale=0)
    tr1 = _trainer({"frame_fraction": 1.0})
    b, _, _ = tr1._draw(np.random.default_rng(3), tr1.train_sets, False, kind="zero", scale=0)
    assert not np.allclose(a, b)


def test_coarse_patches_apply_to_the_first_level_only(monkeypatch):
    from app.engine import optimise as opt_mod
    seen = []
    real = opt_mod.get_similarity

    def spy(name, **kw):
        seen.append(kw.get("patches"))
        return real(name, **kw)

    monkeypatch.setattr(opt_mod, "get_similarity", spy)
    fixed = oblique_volume()
    moving = fixed.with_array(1.0 - fixed.array, "inverted")
    net = DsmNet(5, (4, 4, 4))
    import app.engine.paradigms._learned as learned
    monkeypatch.setattr(learned, "load_model", lambda *a, **k: {"model": net, "preprocessing": {"spacing_mm": [4.0]}})
    reg = paradigms.get("dsm")
    p = paradigms.make_params(reg.Params, {"levels": "2,1", "iterations": "2,2", "patches": 12, "coarse_patches": 8,
                                           "similarity_map": False})
    reg.register(fixed, moving, p, device="cpu")
    assert seen and set(seen) == {8, 12} and seen.index(12) > seen.index(8)


def test_skull_stripped_keeps_the_brain_and_a_margin_in_physical_mm():
    from app.engine.training.dsm import skull_stripped
    a = np.ones((10, 12, 14), np.float32)
    lab = np.zeros(a.shape, np.int16)
    lab[5, 6, 4:7] = 3                           # a short brain segment along x
    # anisotropic: x voxels 1 mm, z voxels 3 mm; a 2 mm margin reaches 2 voxels along x, none along z
    v = Volume(a, (1.0, 1.5, 3.0), (0.0, 0.0, 0.0), np.eye(3), "head")
    out = skull_stripped(v, lab, margin_mm=2.0).array
    assert out[5, 6, 4:7].all() and out[5, 6, 2] == 1 and out[5, 6, 8] == 1 and out[5, 6, 1] == 0
    assert out[4, 6, 5] == 0 and out[6, 6, 5] == 0 and out[5, 7, 5] == 1 and out[5, 8, 5] == 0
    assert out.sum() < a.sum() / 10
    with pytest.raises(ValueError, match="one grid"):
        skull_stripped(v, lab[:-1], 2.0)
