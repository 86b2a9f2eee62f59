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
