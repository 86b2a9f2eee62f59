"""Instance optimisation: recovery of a known smooth deformation, folding, cancel, refine, progress."""
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import spatial
from app.engine.paradigms import make_params
from app.engine.paradigms.instance import InstanceParams, InstanceRegistrar, refine
from app.engine.types import Cancelled, LabelMap, RegistrationResult, Transform, Volume

# an oblique (IXI-like, permuted) orientation and anisotropic spacing, so that the axis order and
# the voxel -> mm conversion are exercised, not just an identity grid
DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
SPACING = (2.0, 2.0, 2.5)
SHAPE = (24, 30, 30)            # z, y, x
ORIGIN = (30.0, -25.0, -20.0)


def _grid() -> Volume:
    return Volume(np.zeros(SHAPE, np.float32), SPACING, ORIGIN, DIRECTION)


def _points(grid: Volume) -> np.ndarray:
    """Physical points (z, y, x, 3 xyz LPS mm) of the grid's voxel centres."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3)
    return grid.index_to_physical(ijk).reshape(*grid.shape, 3)


def _blobs(pts: np.ndarray, lo: np.ndarray, hi: np.ndarray, seed: int = 3) -> np.ndarray:
    """A smooth textured test image at physical points ``pts``: Gaussian blobs (sigma 4 mm) at random
    positions in the box ``lo``..``hi`` (LPS mm)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(lo, hi, size=(60, 3))
    amps = rng.uniform(0.3, 1.0, size=60)
    out = np.zeros(pts.shape[:3])
    for c, a in zip(centres, amps):
        out += a * np.exp(-np.sum((pts - c) ** 2, -1) / (2 * 4.0 ** 2))
    return out.astype(np.float32)


def _true_field(pts: np.ndarray, amp: float) -> np.ndarray:
    """A smooth displacement (xyz mm) at physical points ``pts``."""
    c = pts.reshape(-1, 3).mean(0)
    q = (pts - c) / 60.0 * 2 * np.pi
    return amp * np.stack([np.sin(q[..., 1]), np.sin(q[..., 2]), np.cos(q[..., 0])], -1)


def _pair(amp: float = 2.5):
    """fixed(x) = moving(x + u(x)) exactly (both analytic): T(x) = x + u(x) is the answer."""
    grid = _grid()
    pts = _points(grid)
    u = _true_field(pts, amp)
    lo, hi = grid.physical_bounds()
    fixed = grid.with_array(_blobs(pts + u, lo, hi), name="fixed")
    moving = grid.with_array(_blobs(pts, lo, hi), name="moving")
    return fixed, moving, u


def _det(field: Volume) -> np.ndarray:
    u = field.array.astype(np.float64)
    g = np.stack(np.gradient(u, axis=(2, 1, 0)), -1)           # d u / d index (x, y, z)
    jac = np.eye(3) + g @ np.linalg.inv(field.direction @ np.diag(field.spacing))
    return np.linalg.det(jac)


# MSE: the synthetic pair has the same intensities, and smooth blobs leave flat regions where local
# NCC is ill-defined (measured: mean error 0.44-0.49 mm with MSE, 0.9 mm with local NCC)
FAST = dict(prealign="none", levels="2,1", iterations="60,40", field_downsample=2, learning_rate=0.2,
            similarity="mse", lncc_window=5, smoothness=0.1)


def _params(**kw) -> InstanceParams:
    return make_params(InstanceParams, {**FAST, **kw})


def _interior_error(field: Volume, u: np.ndarray, b: int = 3) -> float:
    return float(np.linalg.norm(field.array - u, axis=-1)[b:-b, b:-b, b:-b].mean())


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_recovers_known_smooth_deformation(diffeomorphic):
    fixed, moving, u = _pair()
    lab = LabelMap((moving.array > 0.5).astype(np.int32), moving.spacing, moving.origin, moving.direction)
    r = InstanceRegistrar().register(fixed, moving, _params(diffeomorphic=diffeomorphic), moving_labels=lab,
                                     device="cpu")
    before = _interior_error(fixed.with_array(np.zeros((*SHAPE, 3), np.float32)), u)
    after = _interior_error(r.field, u)
    assert before > 3.0
    assert after < 0.7, (before, after)
    assert np.mean(_det(r.field) <= 0) == 0.0
    # the warped image is the moving image resampled through T: close to fixed
    err0 = np.abs(moving.array - fixed.array)[3:-3, 3:-3, 3:-3].mean()
    err1 = np.abs(r.warped.array - fixed.array)[3:-3, 3:-3, 3:-3].mean()
    assert err1 < 0.3 * err0
    assert r.transform.transform_points(np.zeros((1, 3))).shape == (1, 3)
    assert r.warped_labels is not None and r.warped_labels.same_grid(fixed)
    assert r.paradigm == "instance" and r.params["diffeomorphic"] is diffeomorphic
    assert r.device == "cpu" and r.timings["total"] > 0


def test_diffeomorphic_gives_no_folding_on_a_large_deformation():
    """Weak smoothness on a 6 mm deformation: the displacement folds, the integrated velocity does not.

    (With no smoothness at all the velocity grows rough and the *discrete* scaling and squaring can
    fold too; measured 9 % at smoothness 0, so some regularisation is part of the contract.)
    """
    fixed, moving, _ = _pair(amp=6.0)
    kw = dict(smoothness=0.02, learning_rate=0.5)
    disp = InstanceRegistrar().register(fixed, moving, _params(diffeomorphic=False, **kw), device="cpu")
    assert np.mean(_det(disp.field) <= 0) > 0.001
    diffeo = InstanceRegistrar().register(fixed, moving, _params(diffeomorphic=True, **kw), device="cpu")
    det = _det(diffeo.field)
    assert np.mean(det <= 0) == 0.0 and det.min() > 0.1


def test_cancel_raises_cancelled():
    fixed, moving, _ = _pair()
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        InstanceRegistrar().register(fixed, moving, _params(), cancel=ev, device="cpu")
    # cancelled from the progress callback in the middle of the optimisation
    ev = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.iteration)
        if len(seen) == 5:
            ev.set()

    with pytest.raises(Cancelled):
        InstanceRegistrar().register(fixed, moving, _params(), progress=progress, cancel=ev, device="cpu")
    assert len(seen) == 5


def test_refine_after_identity_equals_plain_run():
    fixed, moving, _ = _pair()
    p = _params(iterations="20,10")
    plain = InstanceRegistrar().register(fixed, moving, p, device="cpu")
    ident = RegistrationResult(transform=Transform.identity(), warped=moving, paradigm="none")
    ref = refine(fixed, moving, ident, p, device="cpu")
    np.testing.assert_allclose(ref.field.array, plain.field.array, atol=1e-4)
    np.testing.assert_allclose(ref.warped.array, plain.warped.array, atol=1e-4)


def test_refine_composes_with_the_initial_transform():
    """A pure translation given as the initial result is kept: T = initial.then(residual)."""
    fixed, moving, u = _pair()
    shift = np.array([3.0, -2.0, 1.5])
    tr = Transform(sitk.TranslationTransform(3, tuple(shift)), "rigid")
    # the moving image lies shifted by +shift in the world: moving_shifted(p + shift) = moving(p)
    shifted = Volume(moving.array, moving.spacing, tuple(np.asarray(moving.origin) + shift), moving.direction)
    r = refine(fixed, shifted, tr, _params(), device="cpu")
    assert r.transform.kind == "composite"
    assert _interior_error(r.field, u + shift) < 0.5


def test_initial_transform_skips_the_prealignment_and_is_kept_in_the_chain():
    fixed, moving, u = _pair()
    shift = np.array([3.0, -2.0, 1.5])
    tr = Transform(sitk.TranslationTransform(3, tuple(shift)), "rigid")
    shifted = Volume(moving.array, moving.spacing, tuple(np.asarray(moving.origin) + shift), moving.direction)
    p = _params(prealign="affine")                 # ignored: the initial transform is the prealignment
    r = InstanceRegistrar().register(fixed, shifted, p, initial=tr, device="cpu")
    ref = refine(fixed, shifted, tr, p, device="cpu")
    assert r.transform.kind == "composite" and r.paradigm == "instance"
    np.testing.assert_allclose(r.field.array, ref.field.array, atol=1e-5)
    assert _interior_error(r.field, u + shift) < 0.5
    assert not any(h["stage"] in ("rigid", "affine") for h in r.history)


def test_prealign_is_a_shortcut_for_a_pipeline():
    from app.engine.pipeline import register_pipeline
    fixed, moving, _ = _pair()
    p = _params(prealign="affine", iterations="10,5")
    r = InstanceRegistrar().register(fixed, moving, p, device="cpu")
    pipe = register_pipeline(["iterative", "instance"], fixed, moving,
                             [{"stages": "rigid+affine"}, _params(prealign="none", iterations="10,5")], device="cpu")
    assert r.paradigm == "instance" and r.params["prealign"] == "affine" and len(r.stages) == 2
    assert r.timings["prealign"] > 0 and r.timings["total"] >= r.timings["prealign"]
    np.testing.assert_allclose(r.field.array, pipe.field.array, atol=1e-4)
    assert {h["stage"] for h in r.history} >= {"rigid", "affine", "instance"}


def test_progress_history_decreases():
    fixed, moving, _ = _pair()
    seen = []
    r = InstanceRegistrar().register(fixed, moving, _params(), progress=seen.append, device="cpu")
    hist = [h for h in r.history if h["stage"] == "instance"]
    assert len(hist) == 100 and sum(1 for p in seen if p.stage == "instance") == 100
    for level in (0, 1):
        losses = [h["loss"] for h in hist if h["level"] == level]
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert hist[-1]["loss"] < hist[0]["loss"]
    fr = [p.fraction for p in seen]
    assert all(b >= a for a, b in zip(fr, fr[1:])) and fr[-1] == 1.0


@pytest.mark.parametrize("similarity", ["lncc", "mi"])
def test_other_similarities_improve_alignment(similarity):
    fixed, moving, u = _pair()
    r = InstanceRegistrar().register(fixed, moving, _params(similarity=similarity, smoothness=0.5,
                                                              iterations="30,20"), device="cpu")
    assert _interior_error(r.field, u) < 1.5            # from 3.1 mm



def test_budget_s_runs_every_level_but_stops_each_early():
    fixed, moving, _ = _pair()
    r = refine(fixed, moving, None, _params(iterations="20,10", budget_s=1e-9), device="cpu")
    assert [h["level"] for h in r.history] == [0, 1]          # one iteration per level, the finest included
    assert r.params["budget_s"] == 1e-9
    with pytest.raises(ValueError, match="budget_s"):
        _params(budget_s=-1.0)

def test_bad_params_raise():
    with pytest.raises(ValueError, match="iterations"):
        refine(*_pair()[:2], None, {"levels": "4,2,1", "iterations": "10,10"})
    with pytest.raises(ValueError, match="similarity"):
        make_params(InstanceParams, {"similarity": "ssd"})
    fixed, moving, _ = _pair()
    with pytest.raises(ValueError, match="scalar"):
        InstanceRegistrar().register(fixed.with_array(np.zeros((*SHAPE, 3), np.float32)), moving, _params())


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    fixed, moving, _ = _pair()
    p = _params(iterations="20,10")
    cpu = InstanceRegistrar().register(fixed, moving, p, device="cpu")
    gpu = InstanceRegistrar().register(fixed, moving, p, device="cuda")
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.field.array, cpu.field.array, atol=0.05)
