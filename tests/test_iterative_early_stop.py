"""`iterative`: the early stop of affine / B-spline stages whose coarsest level cannot improve, the exact
B-spline mesh refinement the level-by-level B-spline relies on, and the settings chosen for it.

Small oblique, anisotropic phantoms; MeanSquares on all voxels (deterministic)."""
import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import modality, paradigms
from app.engine.paradigms import iterative
from app.engine.spatial import resample
from app.engine.types import Transform, Volume


def phantom() -> Volume:
    """Smooth blobs in a head-like ball on an oblique anisotropic grid (z, y, x) = (30, 36, 34)."""
    rng = np.random.default_rng(1)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 36, 34)], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    head = (r < 0.8).astype(float)
    arr = head * (0.6 + 0.4 * np.exp(-((r - 0.65) / 0.08) ** 2))
    for _ in range(6):
        c = rng.uniform(-0.4, 0.4, 3)
        s = rng.uniform(0.1, 0.2)
        arr -= 0.45 * head * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s ** 2))
    d = sitk.VersorTransform((0.2, 0.1, 1.0), 0.3).GetMatrix()
    return Volume(np.clip(arr, 0, None).astype(np.float32), (3.0, 2.6, 3.4), (10.0, -5.0, 3.0),
                  np.array(d).reshape(3, 3), "phantom")


def params(**kw):
    base = dict(metric="mse", histogram_match=False, use_mask=False, sampling_percentage=1.0,
                bspline_fine_sampling=1.0, levels="2,1", linear_iterations=40, deformable="bspline",
                deformable_levels="2,1", deformable_iterations=15, bspline_mesh=4, early_stop="on", modality="same")
    base.update(kw)
    return paradigms.make_params(iterative.IterativeParams, base)


def smooth_bspline(img: sitk.Image, amplitude: float, seed: int = 0) -> sitk.BSplineTransform:
    b = sitk.BSplineTransformInitializer(img, [2, 2, 2], 3)
    b.SetParameters(tuple(np.random.default_rng(seed).normal(0, amplitude, b.GetNumberOfParameters())))
    return b


def deformable_levels_run(res) -> set:
    return {h["level"] for h in res.history if h["stage"] == "deformable"}


# --------------------------------------------------------------------------- refinement
def test_refine_bspline_is_the_same_transform_on_a_twice_finer_mesh():
    img = phantom().to_sitk(sitk.sitkFloat32)
    coarse = sitk.BSplineTransformInitializer(img, [2, 3, 2], 3)
    coarse.SetParameters(tuple(np.random.default_rng(0).normal(0, 5.0, coarse.GetNumberOfParameters())))
    fine = iterative.refine_bspline(coarse)
    assert list(fine.GetTransformDomainMeshSize()) == [4, 6, 4]
    assert np.allclose(fine.GetTransformDomainOrigin(), coarse.GetTransformDomainOrigin())
    idx = np.random.default_rng(1).uniform(0, 1, (300, 3)) * (np.array(img.GetSize()) - 1)
    pts = [img.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in idx]
    a = np.array([coarse.TransformPoint(p) for p in pts])
    b = np.array([fine.TransformPoint(p) for p in pts])
    assert np.abs(a - np.array(pts)).max() > 2.0          # it does move points
    assert np.abs(a - b).max() < 1e-9
    with pytest.raises(ValueError, match="cubic"):
        iterative.refine_bspline(sitk.BSplineTransform(3, 2))


# --------------------------------------------------------------------------- B-spline early stop
def test_bspline_stage_that_cannot_improve_stops_after_its_coarsest_level():
    fixed = phantom()
    moving = fixed.with_array(fixed.array, name="moving")   # aligned: any deformation only loses
    res = paradigms.get("iterative").register(fixed, moving, params(stages="deformable"))
    g = res.params["chosen"]["guards"][-1]
    assert g["stage"] == "deformable" and g["stopped"] and g["levels"] == 1 and g["kept"] == "start"
    assert deformable_levels_run(res) <= {0}                 # the fine level never ran
    assert res.transform.kind == "identity" or np.allclose(
        res.transform.transform_points([[0.0, 0.0, 0.0]]), [[0.0, 0.0, 0.0]])
    # the same pair without the early stop runs both levels (and the guard drops the stage at the end)
    res_off = paradigms.get("iterative").register(fixed, moving, params(stages="deformable", early_stop="off"))
    g_off = res_off.params["chosen"]["guards"][-1]
    assert g_off["levels"] == 2 and not g_off["stopped"] and g_off["gain"] <= 0


def test_bspline_stage_that_improves_runs_all_levels_and_is_kept():
    fixed = phantom()
    f_img = fixed.to_sitk(sitk.sitkFloat32)
    truth = smooth_bspline(f_img, 4.0)
    # moving(T(x)) = fixed(x): a smooth deformation the B-spline can undo
    moving = Volume.from_sitk(sitk.Resample(f_img, f_img, _inverse(truth, f_img), sitk.sitkLinear, 0.0), "moving")
    res = paradigms.get("iterative").register(fixed, moving, params(stages="deformable"))
    g = res.params["chosen"]["guards"][-1]
    assert not g["stopped"] and g["levels"] == 2 and g["kept"] == "result" and g["gain"] > 0.3
    assert res.transform.kind == "bspline"
    before = float(np.mean((moving.array - fixed.array) ** 2))
    after = float(np.mean((res.warped.array - fixed.array) ** 2))
    assert after < 0.5 * before, (before, after)


def _inverse(b: sitk.BSplineTransform, ref: sitk.Image) -> sitk.Transform:
    """Inverse of a small smooth B-spline on ``ref``'s grid (displacement field, fixed-point iteration)."""
    field = sitk.TransformToDisplacementField(b, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                              ref.GetSpacing(), ref.GetDirection())
    return sitk.DisplacementFieldTransform(sitk.InvertDisplacementField(field, maximumNumberOfIterations=50))


def test_bspline_early_stop_honours_the_minimum_gain():
    fixed = phantom()
    f_img = fixed.to_sitk(sitk.sitkFloat32)
    moving = Volume.from_sitk(sitk.Resample(f_img, f_img, _inverse(smooth_bspline(f_img, 4.0), f_img),
                                            sitk.sitkLinear, 0.0), "moving")
    res = paradigms.get("iterative").register(fixed, moving, params(stages="deformable", deformable_min_gain=0.99))
    g = res.params["chosen"]["guards"][-1]
    assert g["stopped"] and g["levels"] == 1 and 0 < g["gain"] < 0.99 and g["kept"] == "start"


# --------------------------------------------------------------------------- affine early stop
def test_affine_stage_that_cannot_improve_stops_after_its_coarsest_level():
    fixed = phantom()
    moving = fixed.with_array(fixed.array, name="moving")
    res = paradigms.get("iterative").register(fixed, moving, params(stages="rigid+affine"))
    rigid, affine = res.params["chosen"]["guards"]
    assert affine["stage"] == "affine" and affine["stopped"] and affine["kept"] == "start"
    assert {h["level"] for h in res.history if h["stage"] == "affine"} <= {0}
    off = paradigms.get("iterative").register(fixed, moving, params(stages="rigid+affine", early_stop="off"))
    assert "stopped" not in off.params["chosen"]["guards"][1]


def test_affine_stage_that_improves_runs_all_levels_and_is_kept():
    fixed = phantom()
    centre = fixed.index_to_physical([[(n - 1) / 2 for n in fixed.size_xyz]])[0]
    a = sitk.AffineTransform(3)
    a.SetCenter(tuple(centre))
    a.SetMatrix((1.08, 0.04, 0.0, 0.0, 0.93, 0.03, 0.02, 0.0, 1.05))
    moving = resample(fixed, fixed, Transform(a.GetInverse(), "affine"), "linear")   # moving(T(x)) = fixed(x)
    res = paradigms.get("iterative").register(fixed, moving, params(stages="affine", linear_iterations=40))
    affine = res.params["chosen"]["guards"][0]
    assert affine["kept"] == "result" and not affine.get("stopped") and affine["end"] < 0.8 * affine["start"]
    assert {h["level"] for h in res.history if h["stage"] == "affine"} == {0, 1}
    # run level by level, it is the stage a single multi-level run gives
    off = paradigms.get("iterative").register(fixed, moving, params(stages="affine", linear_iterations=40,
                                                                      early_stop="off"))
    pts = fixed.index_to_physical(np.argwhere(fixed.array > 0.3)[::37][:, ::-1].astype(float))
    assert np.abs(res.transform.transform_points(pts) - off.transform.transform_points(pts)).max() < 1e-3


# --------------------------------------------------------------------------- settings
def test_early_stop_and_mesh_are_chosen_for_multimodal_pairs_only():
    multi, same = modality.ModalityDecision(True, "hint", "t"), modality.ModalityDecision(False, "hint", "t")
    p = iterative.IterativeParams()
    cm, cs = iterative.choose_settings(p, multi, False), iterative.choose_settings(p, same, False)
    assert cm["early_stop"] and not cs["early_stop"]
    assert cm["bspline_mesh"] == iterative.MULTIMODAL_BSPLINE_MESH and cs["bspline_mesh"] == p.bspline_mesh
    assert "early stop" in iterative.describe_settings(cm) and "early stop" not in iterative.describe_settings(cs)
    assert iterative.choose_settings(iterative.IterativeParams(early_stop="on"), same, False)["early_stop"]
    assert not iterative.choose_settings(iterative.IterativeParams(early_stop="off"), multi, False)["early_stop"]
    # an explicit B-spline keeps the mesh asked for
    assert iterative.choose_settings(iterative.IterativeParams(deformable="bspline"), multi, False)["bspline_mesh"] == 8
    run = iterative._run_params(p, cs)
    assert run.early_stop == "off" and iterative._run_params(p, cm).early_stop == "on"
