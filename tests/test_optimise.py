"""The torch optimiser over transform models, and the similarity registry.

Every pair is analytic: ``fixed(x) = g(T*(x))`` and ``moving(y) = g(y)`` for a smooth image ``g``
(Gaussian blobs) in physical space, sampled on two *different* anisotropic, oblique grids, so the
known answer is ``T*`` (fixed physical points -> moving physical points, LPS mm).
"""
import threading
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from app.engine import spatial
from app.engine.nn import losses, resolve_device
from app.engine.nn.geometry import grid_matrix, sample_through
from app.engine.nn.similarity import (SIMILARITIES, available, get_similarity, register_similarity)
from app.engine.optimise import RigidModel, make_model, optimise, rotation_matrix, warp_moving
from app.engine.types import Cancelled, LabelMap, Transform, Volume


def _rot(deg) -> np.ndarray:
    return Rotation.from_euler("xyz", deg, degrees=True).as_matrix()


FIXED_DIR = _rot([15, -10, 25])           # oblique, not a permutation
MOVING_DIR = _rot([-5, 20, 10])
RNG = np.random.default_rng(0)
CENTRES = RNG.uniform(-16, 16, size=(50, 3))
AMPS = RNG.uniform(0.3, 1.0, size=50)


def _grid(shape, spacing, direction, centre) -> Volume:
    half = (np.array(shape[::-1]) - 1) / 2 * np.array(spacing)
    origin = np.asarray(centre, float) - direction @ half
    return Volume(np.zeros(shape, np.float32), spacing, tuple(origin), direction)


def _points(g: Volume) -> np.ndarray:
    """Physical points (z, y, x, 3 xyz LPS mm) of the grid's voxel centres."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
    return g.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*g.shape, 3)


def _image(p: np.ndarray) -> np.ndarray:
    out = np.zeros(p.shape[:-1])
    for c, a in zip(CENTRES, AMPS):
        out += a * np.exp(-np.sum((p - c) ** 2, -1) / (2 * 4.0 ** 2))
    return out.astype(np.float32)


FIXED_GRID = _grid((16, 30, 24), (1.2, 0.8, 2.0), FIXED_DIR, (0.0, 0.0, 0.0))          # spacing xyz mm
MOVING_GRID = _grid((36, 44, 50), (1.0, 1.1, 1.5), MOVING_DIR, (1.0, -1.0, 0.5))      # covers fixed after T*
FIXED_PTS = _points(FIXED_GRID)

R_TRUE = _rot([4, -3, 5])
C_TRUE = np.array([0.5, -0.5, 1.0])
T_TRUE = np.array([2.0, -1.5, 2.5])
A_TRUE = R_TRUE @ np.diag([1.05, 0.95, 1.02])


def _linear_map(a):
    return lambda p: (p - C_TRUE) @ a.T + C_TRUE + T_TRUE


def _smooth_field(p):
    q = p / 60.0 * 2 * np.pi
    return 2.0 * np.stack([np.sin(q[..., 1]), np.sin(q[..., 2]), np.cos(q[..., 0])], -1)


@lru_cache(maxsize=None)
def _pair(kind: str, same_grid: bool = False):
    """(fixed, moving) with fixed(x) = g(T*(x)), moving = g on its grid."""
    tmap = {"rigid": _linear_map(R_TRUE), "affine": _linear_map(A_TRUE),
            "field": lambda p: p + _smooth_field(p), "identity": lambda p: p}[kind]
    fixed = FIXED_GRID.with_array(_image(tmap(FIXED_PTS)), name="fixed")
    mg = FIXED_GRID if same_grid else MOVING_GRID
    moving = mg.with_array(_image(_points(mg)), name="moving")
    return fixed, moving


def _point_error(t: Transform, tmap) -> np.ndarray:
    pts = FIXED_PTS.reshape(-1, 3)
    return np.linalg.norm(t.transform_points(pts) - tmap(pts), axis=1)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("kind,a", [("rigid", R_TRUE), ("affine", A_TRUE)])
def test_linear_models_recover_known_transform(kind, a):
    fixed, moving = _pair(kind)
    # global NCC: the two images are normalised over different fields of view (an affine intensity change)
    r = optimise(fixed, moving, kind, similarity="ncc", levels=(2, 1), iterations=(20, 15), optimizer="lbfgs",
                 device="cpu")
    err = _point_error(r.transform, _linear_map(a))
    before = _point_error(Transform.identity(), _linear_map(a))
    assert before.mean() > 3.0
    assert err.mean() < 0.1, err.mean()
    assert r.transform.kind == kind and r.model_transform.kind == kind
    assert r.history[-1]["loss"] < r.history[0]["loss"] and r.history[0]["stage"] == "optimise"


def test_rigid_with_adam_too():
    fixed, moving = _pair("rigid")
    r = optimise(fixed, moving, "rigid", similarity="ncc", levels=(2, 1), iterations=(150, 100), optimizer="adam",
                 device="cpu")
    assert _point_error(r.transform, _linear_map(R_TRUE)).mean() < 0.1


@pytest.mark.parametrize("kind", ["displacement", "velocity"])
def test_field_models_recover_smooth_field(kind):
    fixed, moving = _pair("field")
    # intensities kept (percentile=None): the pair has exactly the same intensities, so MSE fits
    r = optimise(fixed, moving, kind, similarity="mse", percentile=None, weight=0.05, levels=(2, 1),
                 iterations=(60, 40), optimizer="lbfgs", lr=1.0, device="cpu")
    field = spatial.transform_to_field(r.transform, fixed).array
    truth = _smooth_field(FIXED_PTS)
    inner = (slice(3, -3),) * 3
    before = np.linalg.norm(truth, axis=-1)[inner].mean()
    after = np.linalg.norm(field - truth, axis=-1)[inner].mean()
    assert before > 2.0
    assert after < 0.3 * before, (before, after)              # measured: 0.78-0.8 reduction
    assert r.transform.kind == "displacement"


def test_landmarks_alone_recover_a_translation():
    fixed, moving = _pair("identity")
    shift = np.array([3.0, -2.0, 4.5])
    fp = FIXED_PTS[::5, ::6, ::5].reshape(-1, 3)
    r = optimise(fixed, moving, "rigid", similarity=None, landmarks=(fp, fp + shift, 1.0), levels=(1,),
                 iterations=(30,), optimizer="lbfgs", device="cpu")
    np.testing.assert_allclose(r.transform.transform_points(fp), fp + shift, atol=1e-3)
    assert r.history[-1]["landmarks"] < 1e-6


def test_landmarks_move_a_field_model_and_an_initial_transform_is_respected():
    """Field path: T(x) = T0(x + u(x)) at the landmarks (T0 a non-linear initial transform)."""
    fixed, moving = _pair("identity", same_grid=True)
    fp = FIXED_PTS[2:-2:4, 3:-3:6, 3:-3:5].reshape(-1, 3)
    shift = np.array([1.5, -1.0, 2.0])
    bump = fixed.with_array(np.broadcast_to(np.array([0.5, 0.0, -0.5], np.float32), (*fixed.shape, 3)).copy())
    t0 = spatial.field_to_transform(bump)                        # a (constant) displacement field
    r = optimise(fixed, moving, "displacement", initial=t0, similarity=None, landmarks=(fp, fp + shift, 1.0),
                 weight=0.01, levels=(1,), iterations=(60,), optimizer="lbfgs", lr=1.0, device="cpu")
    before = np.linalg.norm(t0.transform_points(fp) - (fp + shift), axis=1).mean()
    after = np.linalg.norm(r.transform.transform_points(fp) - (fp + shift), axis=1).mean()
    assert before > 2.0 and after < 0.1 * before, (before, after)
    assert r.transform.kind == "composite"


def test_dice_on_labels_recovers_a_translation():
    fixed, moving = _pair("identity", same_grid=True)
    pts = FIXED_PTS
    shift = np.array([2.0, -1.5, 1.0])

    def box(p):
        lab = np.zeros(p.shape[:-1], np.int32)
        lab[np.all(np.abs(p - [0, 0, 0]) < [8, 6, 9], -1)] = 1
        lab[np.all(np.abs(p - [3, 2, -4]) < [4, 4, 5], -1)] = 2
        return lab

    fl = LabelMap(box(pts + shift), fixed.spacing, fixed.origin, fixed.direction)   # fixed(x) = moving(x + s)
    ml = LabelMap(box(pts), fixed.spacing, fixed.origin, fixed.direction)
    r = optimise(fixed, moving, "rigid", similarity="dice", labels=(fl, ml), levels=(2, 1), iterations=(60, 40),
                 lr=0.5, device="cpu")
    t = r.transform.transform_points(np.zeros((1, 3)))[0]
    # label edges are quantised by voxels up to 2 mm long (measured error 0.7 mm, from 2.7 mm)
    assert np.linalg.norm(t - shift) < 1.0, t
    assert r.history[-1]["similarity"] < 0.5 * r.history[0]["similarity"]
    with pytest.raises(ValueError, match="labels"):
        optimise(fixed, moving, "rigid", similarity="dice", device="cpu")


def test_iterative_linear_stages_on_the_torch_optimiser():
    from app.engine.paradigms import get, make_params
    fixed, moving = _pair("affine")
    it = get("iterative")
    p = make_params(it.Params, dict(stages="rigid+affine", histogram_match=False, use_mask=False, levels="2,1",
                                    linear_iterations=30, linear_optimiser="torch", torch_similarity="mi"))
    r = it.register(fixed, moving, p, device="cpu")
    assert _point_error(r.transform, _linear_map(A_TRUE)).mean() < 0.1       # measured 0.03 (SimpleITK: 0.04)
    assert r.transform.kind == "affine"           # the rigid stage folded into the affine model: one transform
    assert {h["stage"] for h in r.history} == {"rigid", "affine"} and r.device == "cpu"


# ----------------------------------------------------------------------------- initial transforms
def test_linear_initial_is_folded_or_composed():
    fixed, moving = _pair("rigid")
    near = sitk.Euler3DTransform()
    near.SetCenter(tuple(C_TRUE))
    near.SetMatrix(tuple(R_TRUE.reshape(-1)))
    near.SetTranslation(tuple(T_TRUE + [1.0, -1.0, 0.5]))          # 1.5 mm off
    init = Transform(near, "rigid")
    kw = dict(similarity="ncc", levels=(1,), iterations=(40,), optimizer="lbfgs", device="cpu")
    folded = optimise(fixed, moving, "affine", initial=init, **kw)
    assert folded.folded and folded.transform.kind == "affine"      # one ITK affine, the initial inside
    assert _point_error(folded.transform, _linear_map(R_TRUE)).mean() < 0.1
    # a rigid model cannot hold an affine: the initial stays in front, T = T0(M(x))
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(tuple((R_TRUE @ np.diag([1.01, 1.0, 0.99])).reshape(-1)))
    aff.SetCenter(tuple(C_TRUE))
    aff.SetTranslation(tuple(T_TRUE))
    composed = optimise(fixed, moving, "rigid", initial=Transform(aff, "affine"), **kw)
    assert not composed.folded and composed.transform.kind == "composite"
    assert _point_error(composed.transform, _linear_map(R_TRUE)).mean() < 0.15


# ----------------------------------------------------------------------------- export vs SimpleITK
@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_exported_linear_transform_matches_sitk_resample(kind):
    fixed, moving = _pair(kind)
    r = optimise(fixed, moving, kind, similarity="ncc", levels=(2,), iterations=(8,), optimizer="lbfgs",
                 device="cpu")
    assert np.abs(r.model.translation.detach().numpy()).max() > 0.5      # a real, non-trivial transform
    torch_warp = warp_moving(r, fixed, moving)
    itk_warp = spatial.resample(moving, fixed, r.transform, "linear")
    np.testing.assert_allclose(torch_warp.array, itk_warp.array, atol=2e-4)


@pytest.mark.parametrize("kind", ["displacement", "velocity"])
def test_exported_field_matches_sitk_resample(kind):
    fixed, moving = _pair("field", same_grid=True)
    r = optimise(fixed, moving, kind, similarity="mse", levels=(2, 1), iterations=(20, 10), lr=0.3, device="cpu")
    torch_warp = warp_moving(r, fixed, moving)
    itk_warp = spatial.resample(moving, fixed, r.transform, "linear")
    assert np.abs(torch_warp.array - moving.array).max() > 0.1            # it moved
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(torch_warp.array[inner], itk_warp.array[inner], atol=2e-3)


def test_rigid_export_is_an_euler_transform_with_the_model_centre():
    m = RigidModel([1.0, 2.0, 3.0], radius_mm=20.0)
    with torch.no_grad():
        m.rotation.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        m.translation.copy_(torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64))
    t = m.to_transform()
    assert isinstance(t.itk, sitk.Euler3DTransform) and t.itk.GetCenter() == (1.0, 2.0, 3.0)
    pts = np.random.default_rng(1).uniform(-30, 30, (10, 3))
    with torch.no_grad():
        ref = m.points(torch.as_tensor(pts)).numpy()
    np.testing.assert_allclose(t.transform_points(pts), ref, atol=1e-9)


# ----------------------------------------------------------------------------- gradients (float64)
def test_gradcheck_rigid_model_through_the_sampler():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 6, 7, 8, generator=g, dtype=torch.float64)
    fix = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64)
    fixed = Volume(np.zeros((5, 5, 5), np.float32), (1.2, 0.8, 2.0), (0, 0, 0), FIXED_DIR)
    moving = Volume(np.zeros((6, 7, 8), np.float32), (1.0, 1.1, 1.5), (-1, 0, 1), MOVING_DIR)
    gf = torch.as_tensor(grid_matrix(fixed))
    gm_inv = torch.as_tensor(np.linalg.inv(grid_matrix(moving)))
    c = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)

    def loss(rot, trans):
        # the rigid model's map x -> R (x - c) + c + t, R = exp([rot]x), through the optimiser's sampler
        r = rotation_matrix(rot)
        top = torch.cat([r, (c + trans - r @ c)[:, None]], 1)
        full = torch.cat([top, torch.tensor([[0.0, 0, 0, 1]], dtype=torch.float64)])
        k = gm_inv @ full @ gf
        return losses.ncc(fix, sample_through(img, k[None], (5, 5, 5), padding_mode="zeros"))

    rot = torch.tensor([0.13, -0.21, 0.17], dtype=torch.float64, requires_grad=True)
    trans = torch.tensor([0.31, 0.27, -0.12], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (rot, trans), eps=1e-6, atol=1e-5)


def test_gradcheck_masked_similarities():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, 5, 5, 5, generator=g) > 0.3).double()
    # mse bound to a pair (a fixed variance scale; unbound, the scale is a detached per-call constant)
    for name, opts in (("ncc", {}), ("lncc", {"window": 3}), ("mi", {"bins": 8}), ("mse", {"scale": 2.0})):
        sim = get_similarity(name, **opts)
        assert torch.autograd.gradcheck(lambda x: sim(b, x, mask), (a,)), name
        assert torch.autograd.gradcheck(lambda x: sim(b, x), (a,)), name


# ----------------------------------------------------------------------------- similarity registry
def test_registry_entries_and_errors():
    assert set(SIMILARITIES) == {"mse", "ncc", "lncc", "mi", "dice"} and set(SIMILARITIES) <= set(available())
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 1, 10, 10, 10, generator=g)
    noise = torch.rand(a.shape, generator=g)
    for name in ("mse", "ncc", "lncc", "mi"):
        sim = get_similarity(name)
        assert sim(a, a).dim() == 0 and sim(a, a) < sim(a, noise), name
    assert get_similarity("ncc")(a, 2 * a + 1).item() == pytest.approx(-1.0, abs=1e-5)
    one = torch.zeros(1, 2, 4, 4, 4)
    one[0, 0, :2], one[0, 1, 2:] = 1, 1
    assert get_similarity("dice")(one, one).item() == pytest.approx(0.0, abs=1e-6)
    assert get_similarity("dice")(one, one.flip(1)).item() == pytest.approx(1.0, abs=1e-5)
    # normalised MSE: about 1 - r, whatever the intensity scale; bind() fixes the scale once
    mse = get_similarity("mse").bind(a, a)
    assert mse.scale == pytest.approx(1.0 / float(2 * a.var()))
    assert get_similarity("mse")(10 * a, 10 * noise).item() == pytest.approx(
        get_similarity("mse")(a, noise).item(), rel=1e-4)
    with pytest.raises(ValueError, match="mse, ncc, lncc, mi, dice"):
        get_similarity("ssd")
    with pytest.raises(ValueError, match="window"):
        get_similarity("lncc", radius=3)
    with pytest.raises(ValueError, match="odd"):
        get_similarity("lncc", window=4)


def test_a_registered_similarity_is_used_by_name():
    calls = []

    def factory(power: float = 1.0):
        def loss(fixed, warped, mask=None):
            calls.append(1)
            return torch.mean(torch.abs(fixed - warped) ** power)
        return loss

    register_similarity("l1_test", factory)
    try:
        assert "l1_test" in available()
        fixed, moving = _pair("identity", same_grid=True)
        shifted = Volume(moving.array, moving.spacing, tuple(np.asarray(moving.origin) + [1.5, 0, 0]),
                         moving.direction)
        r = optimise(fixed, shifted, "rigid", similarity="l1_test", sim_options={"power": 1.0}, levels=(1,),
                     iterations=(60,), lr=0.2, device="cpu", percentile=None)
        assert calls and r.history[-1]["loss"] < 0.5 * r.history[0]["loss"]
        np.testing.assert_allclose(r.transform.transform_points(np.zeros((1, 3)))[0], [1.5, 0, 0], atol=0.3)
    finally:
        from app.engine.nn import similarity
        similarity._REGISTRY.pop("l1_test", None)


# ----------------------------------------------------------------------------- errors, cancel, devices
def test_bad_inputs_raise_clear_errors():
    fixed, moving = _pair("identity", same_grid=True)
    with pytest.raises(ValueError, match="rigid, affine, displacement, velocity"):
        optimise(fixed, moving, "bspline", device="cpu")
    with pytest.raises(ValueError, match="iterations gives 2 numbers for 3 levels"):
        optimise(fixed, moving, "rigid", levels=(4, 2, 1), iterations=(5, 5), device="cpu")
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(3, 3\)"):
        optimise(fixed, moving, "rigid", landmarks=(np.zeros((4, 3)), np.zeros((3, 3)), 1.0), device="cpu")
    with pytest.raises(ValueError, match="levels must be comma-separated integers"):
        optimise(fixed, moving, "rigid", levels="4,x", device="cpu")
    with pytest.raises(ValueError, match="optimizer"):
        optimise(fixed, moving, "rigid", optimizer="sgd", device="cpu")
    with pytest.raises(ValueError, match="nothing to optimise"):
        optimise(fixed, moving, "rigid", similarity=None, device="cpu")
    with pytest.raises(ValueError, match="scalar"):
        optimise(fixed.with_array(np.zeros((*fixed.shape, 3), np.float32)), moving, "rigid", device="cpu")
    with pytest.raises(ValueError, match="field_downsample"):
        make_model("velocity", fixed, field_downsample=0)
    with pytest.raises(ValueError, match="bad options"):
        make_model("rigid", fixed, spacing=3)


def test_cancel_raises_cancelled():
    fixed, moving = _pair("identity", same_grid=True)
    ev = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == 3:
            ev.set()

    for optimizer in ("adam", "lbfgs"):
        seen.clear()
        ev.clear()
        with pytest.raises(Cancelled):
            optimise(fixed, moving, "affine", levels=(1,), iterations=(50,), optimizer=optimizer,
                     progress=progress, cancel=ev, device="cpu")
        assert len(seen) == 3 and seen[-1].stage == "optimise"



def test_budget_caps_the_iterations_of_every_level():
    fixed, moving = _pair("field", same_grid=True)
    kw = dict(similarity="lncc", levels=(2, 1), iterations=(6, 4), device="cpu")
    full = optimise(fixed, moving, "velocity", **kw)
    assert full.iterations_run == {2: 6, 1: 4} and len(full.history) == 10
    # a budget already spent when the first level starts: one iteration per level, finest level included
    tiny = optimise(fixed, moving, "velocity", budget_s=1e-9, **kw)
    assert tiny.iterations_run == {2: 1, 1: 1}
    assert [h["level"] for h in tiny.history] == [0, 1]
    # a generous budget changes nothing
    ample = optimise(fixed, moving, "velocity", budget_s=3600.0, **kw)
    assert ample.iterations_run == full.iterations_run
    assert ample.final_loss == pytest.approx(full.final_loss, rel=1e-5)
    with pytest.raises(ValueError, match="budget_s must be >= 0"):
        optimise(fixed, moving, "velocity", budget_s=-1.0, **kw)
    with pytest.raises(ValueError, match="lbfgs"):
        optimise(fixed, moving, "affine", budget_s=5.0, optimizer="lbfgs", levels=(1,), iterations=(3,), device="cpu")

def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="cuda:N"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert resolve_device("auto") == torch.device("cpu")
    else:
        monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
        with pytest.raises(ValueError, match="LOCAL_RANK"):
            resolve_device("cuda")
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert resolve_device("cuda") == torch.device("cuda", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    fixed, moving = _pair("rigid")
    kw = dict(similarity="ncc", levels=(2, 1), iterations=(20, 20), optimizer="adam")
    cpu = optimise(fixed, moving, "rigid", device="cpu", **kw)
    gpu = optimise(fixed, moving, "rigid", device="cuda", **kw)
    assert gpu.device.startswith("cuda")
    assert np.abs(_point_error(gpu.transform, cpu.transform.transform_points)).max() < 0.05
