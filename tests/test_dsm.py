"""The `dsm` paradigm: patch geometry, training steps, the learned similarity's peak, bad input."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import paradigms
from app.engine.nn import dsm_net
from app.engine.nn.dsm_net import DsmNet, DsmSimilarity, extract_patches, sample_centres, similarity_map
from app.engine.nn.similarity import get_similarity
from app.engine.training.dsm import DsmLoss, DsmTrainer, random_lut, to_isotropic
from app.engine.types import Transform, Volume

BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "checkpoints" / "dsm.pt"
HELD_OUT = Path("/work/shared/data/multimodal/ms_cross_sectional_patient19")


def oblique_ramp() -> Volume:
    """A linear function of physical position on an anisotropic, oblique grid."""
    d = np.array(sitk.VersorTransform((0.3, 1, 0.2), 0.5).GetMatrix()).reshape(3, 3)
    v = Volume(np.zeros((20, 26, 24), np.float32), (1.5, 1.2, 2.5), (-30.0, 12.0, 5.0), d, "ramp")
    z, y, x = np.meshgrid(*[np.arange(n) for n in v.shape], indexing="ij")
    pts = v.index_to_physical(np.stack([x, y, z], -1).reshape(-1, 3)).reshape(*v.shape, 3)
    return v.with_array((pts @ np.array([0.02, -0.03, 0.01]) + 1.0).astype(np.float32))


def test_patches_keep_physical_space():
    v = oblique_ramp()
    w = to_isotropic(v, 2.0)
    assert np.allclose(w.origin, v.origin) and np.allclose(w.direction, v.direction) and w.spacing == (2.0,) * 3
    img = torch.as_tensor(w.array)
    centres = torch.tensor([[8, 10, 9], [6, 7, 12]])
    p = extract_patches(img, centres, 5)
    assert p.shape == (2, 5, 5, 5)
    # element [n, a, b, c] is the image at index centre + (a, b, c) - 2 (zyx); on the working grid
    # that voxel is the physical point index_to_physical, where the ramp has a known value
    n, a, b, c = 1, 0, 3, 4
    zyx = centres[n].numpy() + np.array([a, b, c]) - 2
    x_mm = w.index_to_physical(zyx[::-1][None].astype(float))[0]
    assert float(p[n, a, b, c]) == pytest.approx(float(x_mm @ np.array([0.02, -0.03, 0.01]) + 1.0), abs=1e-3)
    with pytest.raises(ValueError, match="inside a grid"):
        extract_patches(img, torch.tensor([[1, 5, 5]]), 5)


def test_sample_centres_stay_inside_the_mask_and_grid():
    m = torch.zeros((20, 20, 20), dtype=torch.bool)
    m[5:9, 10:14, 3:6] = True
    c = sample_centres(m, 200, 7, torch.Generator().manual_seed(0))
    assert c.shape == (200, 3) and bool(m[c[:, 0], c[:, 1], c[:, 2]].all())
    assert int(c.min()) >= 3 and int(c.max()) <= 16


def test_network_shapes_and_config_rebuild():
    net = DsmNet(9, (4, 8, 8))
    out = net(torch.rand(3, 2, 9, 9, 9))
    assert out.shape == (3,)
    from app.engine.nn.registry import build_network
    assert isinstance(build_network(net.config), DsmNet)
    with pytest.raises(ValueError, match=r"\(B, 2, 9, 9, 9\)"):
        net(torch.rand(3, 1, 9, 9, 9))
    with pytest.raises(ValueError, match="odd"):
        DsmNet(8)


def test_registered_as_a_similarity_and_differentiable():
    net = DsmNet(9, (4, 8, 8))
    sim = get_similarity("dsm", net=net, patches=16, seed=1)
    assert isinstance(sim, DsmSimilarity)
    f = torch.rand(1, 1, 20, 22, 21)
    w = torch.rand(1, 1, 20, 22, 21, requires_grad=True)
    loss = sim(f, w)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and float(w.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="DsmNet"):
        DsmSimilarity(net=torch.nn.Linear(2, 2))


def _toy_trainer():
    """A trainer on an in-memory aligned set: smooth random texture 'T1' and its inverted-contrast 'T2'."""
    from scipy.ndimage import gaussian_filter
    tex = gaussian_filter(np.random.default_rng(0).normal(size=(40, 40, 40)), 1.5)
    t1 = ((tex - tex.min()) / (tex.max() - tex.min()) * 0.8 + 0.15).astype(np.float32)
    t2 = (1.1 - t1).astype(np.float32)
    cfg = paradigms.make_params(paradigms.registrar_class("dsm").TrainConfig,
                                {"out": "x.pt", "patch": 9, "channels": "4,8,8", "max_offset": 4,
                                 "batch_size": 32, "aug_intensity": False})
    tr = DsmTrainer("dsm", cfg, torch.device("cpu"))
    tr.scales = [2.0]
    tr.train_sets = [{"name": "toy", "scales": [{"T1": t1, "T2": t2}]}]
    tr.val_sets = tr.train_sets
    tr.ixi_sets = []
    torch.manual_seed(0)
    tr.model = DsmNet(9, (4, 8, 8))
    return tr


def test_a_few_training_steps_lower_the_loss():
    tr = _toy_trainer()
    obj = tr.objective()
    fixed_batch = tr.sample(0, np.random.default_rng(99), np.random.default_rng(99))
    with torch.no_grad():
        before = float(obj(**fixed_batch)["total"])
    opt = torch.optim.Adam(tr.model.parameters(), lr=1e-2)
    for step in range(40):
        batch = tr.sample(step, np.random.default_rng(step), np.random.default_rng(step))
        loss = obj(**batch)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(obj(**fixed_batch)["total"])
    assert after < 0.7 * before, (before, after)
    # targets are 1 for aligned patches and fall with the offset
    _, t0, d0 = tr._draw(np.random.default_rng(1), tr.train_sets, False, offset=(0, 0, 0))
    _, t1, _ = tr._draw(np.random.default_rng(1), tr.train_sets, False, offset=(0, 1, 0))
    assert t0 == 1.0 and 0.5 < t1 < 0.7 and not d0.any()
    val = tr.validate()
    ranks = ("rank1", "rank3", "grade", "frame_grade", "frame_peak", "pose_rank", "pose_rank60", "auc")
    assert set(val) == {"loss", *ranks}
    assert all(0.0 <= val[k] <= 1.0 for k in ranks)


def test_random_lut_maps_into_unit_range():
    f = random_lut(np.random.default_rng(3))
    a = f(np.linspace(0, 1, 50))
    assert a.min() >= 0 and a.max() <= 1 and a.dtype == np.float32


def test_similarity_map_shape_and_range():
    net = DsmNet(9, (4, 8, 8))
    f = np.random.default_rng(0).random((20, 24, 22)).astype(np.float32)
    m = similarity_map(net, f, f, stride=4)
    assert m.shape == f.shape and m.min() >= 0 and m.max() <= 1 and m.max() > 0
    with pytest.raises(ValueError, match="one shape"):
        similarity_map(net, f, f[:-1])


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused():
    reg = paradigms.get("dsm")
    flat = Volume(np.zeros((1, 30, 30), np.float32), name="slice")
    vol = Volume(np.zeros((20, 20, 20), np.float32), name="vol")
    with pytest.raises(ValueError, match="2D images"):
        reg.register(flat, vol)
    weakly = Path(__file__).resolve().parents[1] / "resources" / "checkpoints" / "weakly.pt"
    if weakly.exists():
        with pytest.raises(ValueError, match="paradigm 'weakly'"):
            reg.register(vol, vol, checkpoint=weakly)


# --------------------------------------------------------------------------- the bundled checkpoint
needs_bundle = pytest.mark.skipif(not (BUNDLED.exists() and HELD_OUT.is_dir()),
                                  reason="bundled dsm checkpoint or held-out data not available")


def _held_out_pair():
    from app.engine import io
    t1 = to_isotropic(io.read_volume(HELD_OUT / "T1.nii.gz"), 2.0)
    t2 = to_isotropic(io.read_volume(HELD_OUT / "T2.nii.gz"), 2.0)
    return t1, t2


@needs_bundle
def test_learned_similarity_peaks_at_alignment_on_a_held_out_pair():
    from app.engine.datasets import normalize_intensity
    from app.engine.paradigms._learned import load_model
    net = load_model("dsm", BUNDLED, kinds=("dsm",))["model"]
    t1, t2 = _held_out_pair()
    f = torch.as_tensor(normalize_intensity(t1.array, 99.0))
    m = torch.as_tensor(normalize_intensity(t2.array, 99.0))
    sim = DsmSimilarity(net, patches=1)
    centres = sample_centres(f > 0.1, 400, net.patch + 2 * 6, torch.Generator().manual_seed(0))
    scores = {}
    with torch.no_grad():
        for shift in range(-5, 6):       # voxels of 2 mm along x
            shifted = torch.roll(m, shift, dims=2)
            scores[shift] = float(torch.sigmoid(sim.scores(f, shifted, centres)).mean())
    best = max(scores, key=scores.get)
    assert abs(best) <= 1, scores
    assert scores[0] > scores[-5] + 0.1 and scores[0] > scores[5] + 0.1, scores


@needs_bundle
def test_one_modality_pair_gets_a_warning():
    t1, _ = _held_out_pair()
    msgs = []
    res = paradigms.get("dsm").register(t1, t1, paradigms.make_params(paradigms.registrar_class("dsm").Params,
                                                                        {"iterations": "2", "levels": "2",
                                                                         "similarity_map": False}),
                                        progress=lambda p: msgs.append(p.message), device="cpu")
    assert res.params["warnings"] and "one modality" in msgs[0] and res.warnings == res.params["warnings"]
    assert res.similarity_map is None


@needs_bundle
def test_agreement_map_is_on_the_fixed_grid_and_falls_when_misaligned():
    from app.engine.paradigms._learned import load_model
    from app.engine.paradigms.dsm import agreement_map
    net = load_model("dsm", BUNDLED, kinds=("dsm",))["model"]
    t1, t2 = _held_out_pair()
    # fixed: a central crop of T1 on its own anisotropic grid (3 x 2 x 2.5 mm)
    img = t1.to_sitk(sitk.sitkFloat32)[25:65, 30:80, 25:65]
    grid = sitk.Resample(img, [27, 50, 32], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (3.0, 2.0, 2.5),
                         img.GetDirection(), 0.0, sitk.sitkFloat32)
    fixed = Volume.from_sitk(grid, "T1 crop")
    ident = agreement_map(net, fixed, t2, Transform.identity(), 2.0)
    assert ident.same_grid(fixed) and ident.array.dtype == np.float32
    a = ident.array[np.isfinite(ident.array)]
    assert a.size > 0.2 * ident.array.size and a.min() >= 0 and a.max() <= 1
    shifted = agreement_map(net, fixed, t2, Transform(sitk.TranslationTransform(3, (6.0, 0, 0)), "rigid"), 2.0)
    assert np.nanmean(ident.array) > np.nanmean(shifted.array) + 0.3
    # the registrar returns it with the result (on by default)
    res = paradigms.get("dsm").register(fixed, t2, paradigms.make_params(paradigms.registrar_class("dsm").Params,
                                                                          {"iterations": "1", "levels": "1"}),
                                        device="cpu")
    assert res.similarity_map is not None and res.similarity_map.same_grid(fixed)
    assert "similarity_map" in res.timings


def test_checkpoint_modalities_and_the_untrained_modality_warning():
    from app.engine import modality
    old = {"preprocessing": {"modalities": "multimodal (trained on T1 / T1POST / T1c / T2 / FLAIR pairs and "
                                           "remapped IXI T1)"}}
    assert modality.checkpoint_modalities(old) == ["FLAIR", "T1", "T2"]
    assert modality.checkpoint_modalities({"preprocessing": {"trained_modalities": ["T2", "T1"]}}) == ["T1", "T2"]
    assert modality.checkpoint_modalities({"preprocessing": {}}) is None
    trained = ["FLAIR", "T1", "T2"]
    assert modality.untrained_modality_warning("T1.nii.gz", "FLAIR.nii.gz", trained) is None
    assert modality.untrained_modality_warning("fixed.nii.gz", "moving.nii.gz", trained) is None
    assert modality.untrained_modality_warning("head_ct.nii.gz", "T2.nii.gz", None) is None
    w = modality.untrained_modality_warning("head_ct.nii.gz", "T1.nii.gz", trained)
    assert w and "FLAIR / T1 / T2" in w and "fixed image 'head_ct.nii.gz' is CT" in w and "moving" not in w
    w = modality.untrained_modality_warning("T1.nii.gz", "sub01_PD.nii.gz", trained)
    assert "moving image 'sub01_PD.nii.gz' is PD" in w


def test_trainer_records_the_modalities_it_trained_on(tmp_path):
    from app.engine.training.dsm import DsmTrainer
    t = DsmTrainer.__new__(DsmTrainer)
    t.train_sets = [{"name": "a", "scales": [{"T1": None, "T2": None, "FLAIR": None, "T1POST": None}]},
                    {"name": "b", "scales": [{"t1": None, "t1c": None, "pd": None}]}]
    assert t.trained_modalities() == ["FLAIR", "PD", "T1", "T2"]


@needs_bundle
def test_a_pair_of_an_untrained_modality_gets_a_warning_naming_the_trained_ones():
    t1, t2 = _held_out_pair()
    ct = t2.with_array(t2.array, "head_CT.nii.gz")
    fixed = t1.with_array(t1.array, "T1.nii.gz")
    res = paradigms.get("dsm").register(fixed, ct, paradigms.make_params(paradigms.registrar_class("dsm").Params,
                                                                          {"iterations": "1", "levels": "2",
                                                                           "similarity_map": False}), device="cpu")
    assert any("trained on FLAIR / T1 / T2" in w and "is CT" in w for w in res.warnings), res.warnings
