"""dsm's coarse restarts: run k > 0 starts from the start turned by restart_deg about the fixed centre of mass
(physical space), new patches, the best run on a fixed lattice is kept; dsm stops once its score says the images
correspond, mi makes every run."""
import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import paradigms
from app.engine.nn.dsm_net import DsmNet
from app.engine.types import Volume


def oblique_volume(seed=0) -> Volume:
    from scipy.ndimage import gaussian_filter
    d = np.array(sitk.VersorTransform((0.3, 1, 0.2), 0.4).GetMatrix()).reshape(3, 3)
    a = gaussian_filter(np.random.default_rng(seed).random((26, 30, 28)), 2.0)
    a = (a - a.min()) / (a.max() - a.min())
    return Volume(a.astype(np.float32), (2.2, 1.8, 2.6), (-20.0, 14.0, 7.0), d, "blob")


@pytest.fixture
def spied(monkeypatch):
    """The dsm registrar with a tiny network; records each optimise call's (levels, initial matrix, seed)."""
    import app.engine.optimise as opt_mod
    from app.engine.synthetic import transform_to_matrix
    net = DsmNet(5, (4, 4, 4))
    import app.engine.paradigms._learned as learned
    monkeypatch.setattr(learned, "load_model", lambda *a, **k: {"model": net, "preprocessing": {"spacing_mm": [4.0]}})
    calls = []
    real = opt_mod.optimise

    def spy(fixed, moving, model, **kw):
        calls.append((tuple(kw["levels"]), transform_to_matrix(kw["initial"]), (kw.get("sim_options") or {}).get("seed")))
        return real(fixed, moving, model, **kw)

    monkeypatch.setattr(opt_mod, "optimise", spy)
    return calls


def _register(over):
    fixed = oblique_volume()
    moving = fixed.with_array(1.0 - fixed.array, "inverted")
    reg = paradigms.get("dsm")
    p = paradigms.make_params(reg.Params, {"levels": "2,1", "iterations": "2,2", "patches": 8, "coarse_patches": 8,
                                           "similarity_map": False, **over})
    return fixed, reg.register(fixed, moving, p, device="cpu")


def test_restarts_turn_the_start_about_the_fixed_centre_and_keep_the_best_lattice_run(spied):
    from scipy.spatial.transform import Rotation

    from app.engine.datasets import center_of_mass
    from app.engine.training.dsm import to_isotropic
    fixed, res = _register({"coarse_restarts": 3, "restart_deg": 25, "restart_loss": 0.0, "prealign": "none"})
    runs = res.params["coarse_runs"]
    assert [r["run"] for r in runs] == [0, 1, 2] and sum(r["kept"] for r in runs) == 1
    kept = next(r for r in runs if r["kept"])
    assert kept["lattice_loss"] == min(r["lattice_loss"] for r in runs)
    coarse = [c for c in spied if c[0] == (2,)]
    assert len(coarse) == 3 and [c[2] for c in coarse] == [0, 1, 2]          # new patches every run
    assert np.allclose(coarse[0][1], np.eye(4))                               # prealign none: the identity
    centre = np.asarray(center_of_mass(to_isotropic(fixed, 4.0)))
    for _, m, _ in coarse[1:]:
        angle = np.degrees(np.linalg.norm(Rotation.from_matrix(m[:3, :3]).as_rotvec()))
        assert angle == pytest.approx(25.0, abs=1e-6)
        assert np.allclose(m[:3, :3] @ centre + m[:3, 3], centre, atol=1e-6)  # about the fixed centre of mass
    assert not np.allclose(coarse[1][1], coarse[2][1])                        # another axis
    # the finer levels start from the kept coarse result
    fine = [c for c in spied if c[0] == (1,)]
    assert len(fine) == 1


def test_dsm_stops_when_its_score_says_the_images_correspond_and_mi_makes_every_run(spied):
    _, res = _register({"coarse_restarts": 4, "restart_loss": 10.0})
    assert len(res.params["coarse_runs"]) == 1 and res.params["coarse_runs"][0]["kept"]
    spied.clear()
    _, res = _register({"coarse_restarts": 4, "restart_loss": 10.0, "similarity": "mi"})
    assert len(res.params["coarse_runs"]) == 4
    _, res = _register({"coarse_restarts": 1})
    assert res.params["coarse_runs"] == []


def test_restarts_compose_after_the_start_about_the_fixed_centre(spied):
    # centre-of-mass prealignment (a translation S): run k starts at x -> S(R_k x), so the fixed centre of mass
    # c goes where S sends it (R_k turns about c), and the linear part is R_k
    from app.engine.datasets import center_of_mass
    from app.engine.training.dsm import to_isotropic
    fixed = oblique_volume()
    shifted = Volume(1.0 - fixed.array, fixed.spacing, tuple(np.asarray(fixed.origin) + (6.0, -4.0, 3.0)),
                     fixed.direction, "inverted, shifted")
    reg = paradigms.get("dsm")
    p = paradigms.make_params(reg.Params, {"levels": "2,1", "iterations": "2,2", "patches": 8, "coarse_patches": 8,
                                           "similarity_map": False, "coarse_restarts": 2, "restart_loss": 0.0})
    reg.register(fixed, shifted, p, device="cpu")
    coarse = [c for c in spied if c[0] == (2,)]
    s = coarse[0][1]
    assert np.allclose(s[:3, :3], np.eye(3)) and np.linalg.norm(s[:3, 3]) > 1.0     # the prealignment
    c = np.asarray(center_of_mass(to_isotropic(fixed, 4.0)))
    m = coarse[1][1]
    assert np.allclose(m[:3, :3] @ c + m[:3, 3], s[:3, :3] @ c + s[:3, 3], atol=1e-6)
    assert not np.allclose(m[:3, :3], np.eye(3))


@pytest.mark.parametrize("kind", ["affine", "composite", "displacement"])
def test_restarts_accept_any_initial_transform(kind):
    # a pipeline stage may hand dsm an affine, a composite or a deformable start
    from app.engine.synthetic import matrix_to_transform
    from app.engine.types import Transform
    fixed = oblique_volume()
    moving = fixed.with_array(1.0 - fixed.array, "inverted")
    aff = np.eye(4)
    aff[:3, :3] = np.diag([1.05, 0.97, 1.0])
    aff[:3, 3] = (2.0, -1.0, 0.5)
    if kind == "affine":
        initial = matrix_to_transform(aff)
    elif kind == "composite":
        initial = matrix_to_transform(aff).then(Transform(sitk.TranslationTransform(3, (1.0, 0.0, -2.0))))
    else:
        comps = [sitk.Image([int(v) for v in fixed.shape[::-1]], sitk.sitkFloat64) + d for d in (0.5, -0.3, 0.2)]
        field = sitk.Compose(*comps)                  # a constant displacement, as a deformable stage's field
        field.CopyInformation(fixed.to_sitk(sitk.sitkFloat32))
        initial = Transform(sitk.DisplacementFieldTransform(field))
    reg = paradigms.get("dsm")
    p = paradigms.make_params(reg.Params, {"levels": "2,1", "iterations": "2,2", "similarity": "mi",
                                           "coarse_restarts": 2, "similarity_map": False})
    res = reg.register(fixed, moving, p, initial=initial, device="cpu")
    runs = res.params["coarse_runs"]
    assert len(runs) == 2 and all(np.isfinite(r["lattice_loss"]) for r in runs)
    assert sum(r["kept"] for r in runs) == 1
