"""The training loop on tiny real data (4 IXI subjects at 10 mm), and the learned paradigms' inference."""
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import checkpoints as C
from app.engine import datasets as D
from app.engine import spatial, training
from app.engine.paradigms import _learned
from app.engine.paradigms.unsupervised import UnsupervisedParams, UnsupervisedRegistrar
from app.engine.paradigms.weakly import WeaklyRegistrar
from app.engine.types import Cancelled, LabelMap, Volume

HAVE_IXI = D.ixi_paths(D.load_split()["train"][0])[0].exists()
needs_ixi = pytest.mark.skipif(not HAVE_IXI, reason="IXI data not available")


def tiny_config(tmp_path, paradigm="unsupervised", **kw):
    """(paradigm, its TrainConfig) for a tiny run: 10 mm grid, a few subjects, a few steps."""
    base = dict(out=str(tmp_path / "tiny.pt"), grid="18x24x24", spacing_mm=10.0, enc="4,8,8", dec="8,8",
                out_level=1, max_train_subjects=4, max_val_pairs=1, val_every=0, ckpt_every=0, steps=4,
                lr=3e-3, lncc_window=3, cache_dir=str(tmp_path / "cache"), threads=2)
    base.update(kw)
    return paradigm, training.config_class(paradigm)(**base)


@needs_ixi
def test_loss_falls_on_tiny_real_data(tmp_path):
    cfg = tiny_config(tmp_path, stage="joint", steps=30, max_train_subjects=2, aug_intensity=False,
                      aug_rot_deg=0.0, aug_scale=0.0, aug_trans_mm=0.0, lr=5e-3)
    seen = []
    out = training.run_training(*cfg, progress=seen.append)
    losses = [h["total"] for h in out["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.01
    assert [p.iteration for p in seen if p.stage == "train"] == list(range(1, 31))
    ck = C.load_checkpoint(out["path"], "unsupervised")
    assert ck["training"]["steps"] == 30 and "dice" in ck["training"]["validation"]
    assert ck["preprocessing"]["grid_shape"] == [18, 24, 24]


@needs_ixi
def test_weakly_resume_and_cancel(tmp_path):
    cfg = tiny_config(tmp_path, paradigm="weakly", stage="deformable", steps=3, dice_labels=8, ckpt_every=2)
    out = training.run_training(*cfg)
    assert {"dice", "sim", "smooth"} <= set(out["history"][-1])
    resumed = training.run_training(*tiny_config(tmp_path, paradigm="weakly", resume=str(out["path"]), steps=5,
                                                out=str(tmp_path / "resumed.pt")))
    assert [h["step"] for h in resumed["history"]] == [4, 5]
    assert C.load_checkpoint(resumed["path"], "weakly")["training"]["steps"] == 5
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        training.train(*tiny_config(tmp_path, out=str(tmp_path / "never.pt")), cancel=ev)
    assert not (tmp_path / "never.pt").exists()


def test_bad_options_raise():
    from app.engine.training import twostage
    with pytest.raises(ValueError, match="grid"):
        twostage.preprocessing(training.make_config("unsupervised", grid="12x12"))
    with pytest.raises(ValueError, match="out"):
        training.train("unsupervised", training.make_config("unsupervised", out=""))
    with pytest.raises(ValueError, match="not trained"):
        training.config_class("iterative")
    with pytest.raises(ValueError, match="dice_labels"):     # a weakly-only option
        training.make_config("unsupervised", {"dice_labels": "8"})
    with pytest.raises(ValueError, match="trains with WeaklyTrainConfig"):
        training.train("weakly", training.make_config("unsupervised", out="x.pt"))


def test_mean_dice_and_folding_by_hand():
    f = np.zeros((4, 4, 4), int)
    f[:2] = 1
    w = np.zeros_like(f)
    w[:1] = 1
    from app.engine.training.twostage import fold_fraction_vox, mean_dice
    assert mean_dice(f, w) == pytest.approx(2 * 16 / (32 + 16))
    d = np.zeros((3, 6, 6, 6))
    assert fold_fraction_vox(d) == 0.0
    d[0] = -2.0 * np.arange(6)[:, None, None]        # z -> z - 2z: det = -1 everywhere
    assert fold_fraction_vox(d) == 1.0
    d[0] = -0.5 * np.arange(6)[:, None, None]        # z -> z / 2: det = 0.5, no folding
    assert fold_fraction_vox(d) == 0.0


# ----------------------------------------------------------------------------- inference
def _tiny_checkpoint(path, paradigm="unsupervised"):
    from app.engine.nn.networks import build_model
    torch.manual_seed(0)
    model = build_model({"kind": "two_stage", "affine": {"kind": "affine", "channels": [4, 4]},
                         "deformable": {"kind": "deformable", "enc": [4, 8], "dec": [8], "out_level": 1}})
    prep = D.Preprocessing(grid_shape=(16, 16, 16), spacing_mm=4.0, direction=np.eye(3).tolist())
    return C.save_checkpoint(path, paradigm=paradigm, model=model, preprocessing=prep.to_dict(), training={})


def _blob_pair(shift_mm=(6.0, -4.0, 8.0)):
    """A fixed blob image and the same blob moved by shift_mm in a moving image with another origin."""
    shape, sp = (16, 16, 16), (4.0, 4.0, 4.0)
    def blob(origin, centre):
        z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        vol = Volume(np.zeros(shape, np.float32), sp, origin)
        p = vol.index_to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1))
        arr = np.exp(-np.sum((p - centre) ** 2, 1) / (2 * 10.0 ** 2)).reshape(shape)
        return vol.with_array(arr.astype(np.float32))
    fixed = blob((0.0, 0.0, 0.0), np.array([30.0, 30.0, 30.0]))
    moving = blob((3.0, -5.0, 2.0), np.array([30.0, 30.0, 30.0]) + shift_mm)
    return fixed, moving


def test_untrained_model_gives_centre_of_mass_translation(tmp_path):
    """Affine net = identity and field ~ 0 at initialisation: T is the centroid translation."""
    ck = _tiny_checkpoint(tmp_path / "u.pt")
    fixed, moving = _blob_pair()
    res = UnsupervisedRegistrar().register(fixed, moving, UnsupervisedParams(), checkpoint=ck, device="cpu")
    centre = fixed.index_to_physical([[7.5, 7.5, 7.5]])
    np.testing.assert_allclose(res.transform.transform_points(centre) - centre, [[6.0, -4.0, 8.0]], atol=0.6)
    assert res.field.array.shape == (16, 16, 16, 3) and res.device == "cpu"
    assert res.transform.kind == "composite" and res.paradigm == "unsupervised"
    assert set(res.timings) >= {"preprocess", "network", "compose", "resample", "total"}


def test_field_transform_and_warp_agree(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "w.pt", "weakly")
    fixed, moving = _blob_pair()
    labels = LabelMap.from_volume(moving.with_array((moving.array > 0.5).astype(np.int32)))
    res = WeaklyRegistrar().register(fixed, moving, None, checkpoint=ck, moving_labels=labels, device="cpu")
    idx = np.array([[2, 3, 4], [8, 8, 8], [12, 5, 9]])
    pts = fixed.index_to_physical(idx)
    fld = np.array([res.field.array[k, j, i] for i, j, k in idx])
    np.testing.assert_allclose(res.transform.transform_points(pts), pts + fld, atol=1e-3)
    again = spatial.resample(moving, fixed, res.transform)
    np.testing.assert_allclose(res.warped.array, again.array, atol=1e-6)
    assert res.warped_labels is not None and res.warped_labels.array.sum() > 0


def test_inference_refuses_bad_inputs(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "u.pt")
    fixed, moving = _blob_pair()
    flat = Volume(np.zeros((1, 16, 16), np.float32), (4, 4, 4))
    with pytest.raises(ValueError, match="2D"):
        UnsupervisedRegistrar().register(flat, moving, None, checkpoint=ck, device="cpu")
    with pytest.raises(ValueError, match="not 'unsupervised'"):
        UnsupervisedRegistrar().register(fixed, moving, None, checkpoint=_tiny_checkpoint(tmp_path / "w.pt", "weakly"))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        UnsupervisedRegistrar().register(fixed, moving, None, checkpoint=ck, cancel=cancel)


def test_affine_prealign_returns_affine(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "u.pt")
    fixed, moving = _blob_pair()
    t = _learned.affine_prealign(fixed, moving, checkpoint=ck, device="cpu")
    assert t.kind == "affine"
    # an untrained affine net is the identity: the prealignment is the centre-of-mass translation,
    # the same at every point (6, -4, 8 mm: the blob's shift)
    pts = fixed.index_to_physical([[7.5, 7.5, 7.5], [0.0, 0.0, 0.0], [15.0, 3.0, 9.0]])
    np.testing.assert_allclose(t.transform_points(pts) - pts, [[6.0, -4.0, 8.0]] * 3, atol=0.6)


# ----------------------------------------------------------------------------- datasets helpers
def test_dataset_helpers_by_hand():
    a = np.arange(100, dtype=np.float32).reshape(4, 5, 5)
    n = D.normalize_intensity(a, 50)
    assert n.min() == 0 and n.max() == 1 and n.dtype == np.float32
    rng = np.random.default_rng(0)
    assert all(f != m for f, m in D.sample_pairs(3, 20, rng))
    m = D.random_affine(rng, (10.0, 0.0, -5.0), rot_deg=0, scale=0, shear=0, trans_mm=0)
    np.testing.assert_allclose(m, np.eye(4))
    grid = Volume(np.zeros((10, 12, 14), np.float32), (2, 2, 2))
    f = D.synthetic_deformation(grid, max_mm=3.0, control_points=5, rng=rng)
    assert f.array.shape == (10, 12, 14, 3) and np.abs(f.array).max() <= 3.0
    assert np.abs(f.array).max() > 0.1


def test_working_grid_is_centred_on_the_image():
    prep = D.Preprocessing(grid_shape=(8, 10, 12), spacing_mm=5.0, direction=np.eye(3).tolist())
    vol = Volume(np.random.default_rng(0).random((20, 25, 30)).astype(np.float32), (2, 2, 2), (10.0, -4.0, 3.0))
    w = D.preprocess(vol, prep)
    lo, hi = vol.physical_bounds()
    wlo, whi = w.physical_bounds()
    np.testing.assert_allclose((lo + hi) / 2, (wlo + whi) / 2, atol=1e-6)
    assert w.shape == (8, 10, 12) and 0 <= w.array.min() and w.array.max() <= 1


def test_field_upsampling_fast_path_matches_physical_interpolation():
    from app.engine.nn import geometry as G
    prep = D.Preprocessing(grid_shape=(6, 8, 10), spacing_mm=4.0)
    fixed = Volume(np.zeros((12, 16, 20), np.float32), (2, 2, 2), (5.0, -3.0, 7.0), np.asarray(D.IXI_DIRECTION))
    work = D.working_grid(fixed, prep)
    disp = torch.randn(1, 3, *work.shape, generator=torch.Generator().manual_seed(0))
    fast = _learned.field_on_fixed_grid(disp, work, fixed)
    k = torch.as_tensor(np.linalg.inv(G.grid_matrix(work)) @ G.grid_matrix(fixed))[None]
    slow = G.sample_through(disp, k, fixed.shape, padding_mode="border")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


@needs_ixi
def test_cache_without_labels_is_refreshed_when_labels_are_needed(tmp_path):
    prep = D.Preprocessing(grid_shape=(18, 24, 24), spacing_mm=10.0)
    name = D.load_split()["train"][:1]
    assert D.load_subjects(name, prep, with_labels=False, cache_dir=tmp_path)[0].labels is None
    again = D.load_subjects(name, prep, with_labels=True, cache_dir=tmp_path)[0]
    assert again.labels is not None and again.labels.max() > 0
    assert D.load_subjects(name, prep, with_labels=True, cache_dir=tmp_path)[0].labels is not None


def test_smooth_random_fields_match_the_rms_and_are_smooth():
    like = torch.randn(2, 3, 12, 16, 16) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    from app.engine.training.twostage import smooth_random_fields
    f = smooth_random_fields(like, torch.Generator().manual_seed(0))
    assert f.shape == like.shape
    rms = lambda t: t.pow(2).mean(dim=(1, 2, 3, 4)).sqrt()
    torch.testing.assert_close(rms(f), rms(like), rtol=1e-4, atol=0)
    # neighbouring voxels differ far less than in white noise of the same size
    step = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()
    assert step(f) < 0.5 * step(like)


@needs_ixi
def test_adversarial_regulariser_trains_both_players(tmp_path):
    cfg = tiny_config(tmp_path, paradigm="weakly", stage="deformable", steps=3, dice_labels=8, w_adv=0.1)
    out = training.run_training(*cfg)
    last = out["history"][-1]
    assert {"adv", "discriminator", "dice", "smooth"} <= set(last)
    assert all(np.isfinite(h["discriminator"]) for h in out["history"])
    assert C.load_checkpoint(out["path"], "weakly")["training"]["losses"]["w_adv"] == 0.1
    with pytest.raises(ValueError, match="deformable stage"):
        training.run_training(*tiny_config(tmp_path, stage="affine", w_adv=0.1))


@needs_ixi
def test_weakly_needs_labels_in_training_only(tmp_path):
    # run time: a pair without any label map registers
    fixed, moving = _blob_pair()
    res = WeaklyRegistrar().register(fixed, moving, None, checkpoint=_tiny_checkpoint(tmp_path / "w.pt", "weakly"),
                                     device="cpu")
    assert res.warped.array.shape == fixed.array.shape and res.warped_labels is None
    # training: subjects without label maps are refused with a clear message
    root = tmp_path / "ixi"
    (root / "t1").mkdir(parents=True)
    (root / "seg").mkdir()
    for name in D.load_split()["train"][:2]:
        (root / "t1" / D.ixi_paths(name)[0].name).symlink_to(D.ixi_paths(name)[0])
    with pytest.raises(ValueError, match="label map"):
        training.run_training(*tiny_config(tmp_path, paradigm="weakly", stage="deformable", data_root=str(root),
                                          max_train_subjects=2, cache_dir=""))


@needs_ixi
def test_init_keeps_the_affine_iterations_of_the_checkpoint(tmp_path):
    first = training.run_training(*tiny_config(tmp_path, stage="affine", steps=1, affine_iterations=2,
                                              out=str(tmp_path / "a.pt")))
    assert first["model"].affine_iterations == 2
    kept = training.run_training(*tiny_config(tmp_path, stage="deformable", steps=1, init=str(first["path"]),
                                             out=str(tmp_path / "b.pt")))
    assert kept["model"].affine_iterations == 2
    changed = training.run_training(*tiny_config(tmp_path, stage="deformable", steps=1, init=str(first["path"]),
                                                affine_iterations=1, out=str(tmp_path / "c.pt")))
    assert changed["model"].affine_iterations == 1
