"""Headless models of "trust what you see": the error-map colours, the workspace's error maps and
guide pairs, and the corrected run computed for the workstation (:mod:`app.viewer.trust`)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine.types import Landmarks, RegistrationResult, Transform, Volume
from app.viewer import compositing as comp
from app.viewer import trust
from app.viewer.runs import Run
from app.viewer.workspace import Workspace


def _oblique(shape=(10, 12, 11), spacing=(1.3, 0.9, 2.0)) -> Volume:
    r = sitk.Euler3DTransform()
    r.SetRotation(0.2, -0.15, 0.3)
    d = np.array(r.GetMatrix()).reshape(3, 3)
    a = np.random.default_rng(0).normal(50, 10, shape).astype(np.float32)
    return Volume(a, spacing, (-7.0, 4.0, -9.0), d, name="fixed")


def _result(fixed: Volume, t: Transform) -> RegistrationResult:
    from app.engine.spatial import resample
    return RegistrationResult(t, resample(fixed, fixed, t), paradigm="iterative")


def test_error_colours_fade_to_transparent_at_zero_and_saturate_at_the_top():
    rgb, alpha = comp.error_rgba(np.array([0.0, 2.0, 4.0, 9.0, np.nan]), 4.0)
    assert alpha[0] == 0.0 and alpha[-1] == 0.0                     # no error, unknown: the image shows
    assert alpha[2] == pytest.approx(comp.ERROR_ALPHA) and alpha[3] == pytest.approx(comp.ERROR_ALPHA)
    assert alpha[1] == pytest.approx(comp.ERROR_ALPHA * 0.5)
    np.testing.assert_allclose(rgb[2], comp.error_table()[-1])
    base = np.full((1, 5), 0.5, np.float32)
    out = comp.compose(base, np.ones((1, 5), bool), error=np.array([[0.0, 2.0, 4.0, 9.0, np.nan]]), error_max_mm=4.0)
    assert tuple(out[0, 0, :3]) == (128, 128, 128) and tuple(out[0, 4, :3]) == (128, 128, 128)
    expect = 0.5 * (1 - comp.ERROR_ALPHA) + comp.error_table()[-1] * comp.ERROR_ALPHA
    np.testing.assert_allclose(out[0, 2, :3] / 255, expect, atol=1 / 255)


def test_guides_are_kept_apart_from_the_landmarks():
    ws = Workspace()
    f = _oblique()
    ws.state.set_layer("fixed", f)
    ws.state.set_layer("moving", f)
    ws.add_run(_result(f, Transform(sitk.TranslationTransform(3, (1.0, 0, 0)), "rigid")), {"paradigm": "iterative"})
    ws.guides.add_point("fixed", (0.0, 0.0, 0.0))
    ws.guides.add_point("moving", (1.0, 0.0, 0.0))
    np.testing.assert_allclose(ws.state.guide_fixed_points, [[0, 0, 0]])
    assert len(ws.state.fixed_points) == 0 and len(ws.landmarks) == 0
    assert ws.registration_inputs()["fixed_points"] is None
    assert ws.runs[0].metrics.get("tre_mean_mm") is None
    assert "1 moving guide point" in ws.stale_if_replaced("moving")
    ws.clear_dependents("moving")
    assert ws.guides.point_count("moving") == 0 and ws.guides.point_count("fixed") == 1


def test_an_error_map_belongs_to_its_run_and_goes_when_the_image_changes():
    ws = Workspace()
    f = _oblique()
    ws.state.set_layer("fixed", f)
    ws.state.set_layer("moving", f)
    ws.add_run(_result(f, Transform.identity()), {"paradigm": "iterative"})
    ws.add_run(_result(f, Transform.identity()), {"paradigm": "iterative"}, select=False)
    seen = []
    ws.state.events.layers.connect(seen.append)
    em = f.with_array(np.arange(f.array.size, dtype=np.float32).reshape(f.shape), name="error_map")
    with pytest.raises(ValueError, match="fixed grid"):
        ws.set_error_map(0, Volume(np.zeros((2, 2, 2), np.float32)))
    ws.set_error_map(1, em, {"error_map_p95_mm": 3.0})            # not on screen: no redraw
    assert seen == [] and ws.state.error_map is None
    ws.set_error_map(0, em, {"error_map_p95_mm": 3.0, "error_map_peak_mm": [1.0, 2.0, 3.0]})
    assert seen == ["error_map"] and ws.state.error_map is em and ws.runs[0].metrics["error_map_p95_mm"] == 3.0
    xyz = f.index_to_physical([[4, 5, 6]])[0]
    assert ws.state.error_at(xyz) == pytest.approx(em.array[6, 5, 4])
    assert ws.state.error_at(xyz + 1000) is None
    assert ws.state.error_scale_mm() >= np.percentile(em.array, 99)
    ws.state.set_overlay(error_max_mm=5.0)
    assert ws.state.error_scale_mm() == 5.0
    ws.state.set_layer("fixed", _oblique())                        # runs kept (the caller's choice), maps not
    assert all(r.result.error_map is None for r in ws.runs.runs)
    assert not any(k.startswith("error_map_") for r in ws.runs.runs for k in r.metrics)


@pytest.mark.parametrize("deformable", [False, True])
def test_correct_run_maps_guides_onto_partners_on_an_oblique_anisotropic_grid(deformable):
    from app.engine.spatial import transform_to_field
    fixed = _oblique()
    t = Transform(sitk.TranslationTransform(3, (1.0, -0.5, 0.3)), "rigid")
    res = _result(fixed, t)
    if deformable:                  # a dense result with a stored field, as the learned paradigms give
        res.field = transform_to_field(t, fixed)
    lo, hi = fixed.physical_bounds()
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    gf = centre + np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0]])
    gm = t.transform_points(gf) + np.array([[1.5, 0.5, 0.0], [-1.0, 0.8, 0.5]])
    new, m = trust.correct_run(fixed, fixed, res, Landmarks(gf, ["a", "b"]), Landmarks(gm, ["a", "b"]),
                               sigma_mm=10.0, base_metrics={"paradigm": "iterative", "before": {"dice_mean": 0.1}},
                               base_name="run 1")
    err = np.linalg.norm(new.transform.transform_points(gf) - gm, axis=1)
    assert err.max() < 1.0, err
    assert m["guide_tre_mm"] < 1.0 and m["guide_tre_uncorrected_mm"] == pytest.approx(
        np.linalg.norm(t.transform_points(gf) - gm, axis=1).mean())
    assert m["before"] == {"dice_mean": 0.1} and m["corrected_from"] == "run 1" and m["paradigm"] == "iterative"
    assert m["guidance"]["guide_names"] == ["a", "b"]
    assert new.field is not None and new.field.shape == fixed.shape and new.warped.shape == fixed.shape
    # far from the guides the transform stays put
    far = fixed.index_to_physical([[1, 1, 1]])[0]                  # inside the grid (it carries the field)
    assert np.linalg.norm(far - gf, axis=1).min() > 4 * max(m["guidance"]["widths_mm"])
    np.testing.assert_allclose(new.transform.transform_points(far[None]), t.transform_points(far[None]), atol=0.05)
    with pytest.raises(ValueError, match="complete guide pairs"):
        trust.correct_run(fixed, fixed, res, Landmarks(gf), Landmarks(gm[:1]))


def test_run_spec_gives_each_pipeline_stage_its_parameters():
    single = Run("a", None, {"paradigm": "iterative", "params": {"stages": "rigid"}})
    assert trust.run_spec(single) == ("iterative", {"stages": "rigid"})
    res = RegistrationResult(Transform.identity(), None, paradigm="iterative+instance",
                             stages=[{"paradigm": "iterative", "params": {"stages": "rigid"}},
                                     {"paradigm": "instance", "params": {"iterations": 5}}])
    pipe = Run("b", res, {"paradigm": "iterative+instance", "params": {}})
    assert trust.run_spec(pipe) == ("iterative+instance", [{"stages": "rigid"}, {"iterations": 5}])
    with pytest.raises(ValueError, match="paradigm"):
        trust.run_spec(Run("c", None, {}))
    assert trust.correction_name("run", 1) == "run + correction (1 guide)"


def test_disagreement_colours_fade_where_patches_agree_and_nan_is_transparent():
    rgb, alpha = comp.disagreement_rgba(np.array([1.0, 0.5, 0.0, np.nan]))
    assert alpha[0] == 0.0 and alpha[3] == 0.0                      # agree / not scored: the image shows
    assert alpha[1] == pytest.approx(comp.DISAGREE_ALPHA * 0.5) and alpha[2] == pytest.approx(comp.DISAGREE_ALPHA)
    np.testing.assert_allclose(rgb[2], comp.disagreement_table()[-1])
    base = np.full((1, 3), 0.5, np.float32)
    out = comp.compose(base, np.ones((1, 3), bool), agreement=np.array([[1.0, 0.0, np.nan]]))
    assert tuple(out[0, 0, :3]) == (128, 128, 128) and tuple(out[0, 2, :3]) == (128, 128, 128)
    expect = 0.5 * (1 - comp.DISAGREE_ALPHA) + comp.disagreement_table()[-1] * comp.DISAGREE_ALPHA
    np.testing.assert_allclose(out[0, 1, :3] / 255, expect, atol=1 / 255)


def test_similarity_map_read_out_follows_the_current_run():
    ws = Workspace()
    f = _oblique()
    ws.state.set_layer("fixed", f)
    ws.state.set_layer("moving", f)
    assert ws.state.similarity_map is None and ws.state.similarity_at((0.0, 0.0, 0.0)) is None
    res = _result(f, Transform.identity())
    prob = np.full(f.shape, np.nan, np.float32)
    prob[2, 3, 4] = 0.25
    res.similarity_map = f.with_array(prob)
    ws.add_run(res, {"paradigm": "dsm"})
    xyz = f.index_to_physical([[4, 3, 2]])[0]
    assert ws.state.similarity_map is res.similarity_map
    assert ws.state.similarity_at(xyz) == pytest.approx(0.25)
    assert ws.state.similarity_at(f.index_to_physical([[0, 0, 0]])[0]) is None     # not scored there
