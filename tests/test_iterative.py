"""The conventional `iterative` paradigm on small synthetic volumes with hand-known answers.

The volumes are 40^3-ish, anisotropic and oblique, so that spacing and direction mistakes show.
MeanSquares is used on synthetic data (Mattes MI shrinks the scale of zero-padded volumes).
"""
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import paradigms
from app.engine.metrics import jacobian_determinant
from app.engine.paradigms.iterative import IterativeParams, IterativeRegistrar
from app.engine.spatial import resample
from app.engine.types import Cancelled, LabelMap, Transform, Volume

SHAPE = (32, 40, 36)  # z, y, x
SPACING = (1.5, 1.2, 2.0)  # x, y, z mm


def rot(ax, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    m = {0: [[1, 0, 0], [0, c, -s], [0, s, c]], 1: [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         2: [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[ax]
    return np.array(m, float)


def phantom() -> Volume:
    """Smooth asymmetric blobs on an oblique, anisotropic grid (no symmetry to get lost in)."""
    direction = rot(2, 25) @ rot(0, -10)
    v = Volume(np.zeros(SHAPE, np.float32), SPACING, (-20.0, 5.0, 12.0), direction, "phantom")
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ijk = np.stack([x, y, z], -1).reshape(-1, 3)
    pts = v.index_to_physical(ijk).reshape(*SHAPE, 3)
    centre = v.index_to_physical([[(n - 1) / 2 for n in v.size_xyz]])[0]
    arr = np.zeros(SHAPE)
    for off, sigma, amp in [((0, 0, 0), 14, 1.0), ((8, -4, 2), 5, 0.8), ((-7, 6, -3), 4, -0.6),
                            ((3, 9, 6), 3.5, 0.7), ((-5, -8, 5), 4.5, 0.5)]:
        d2 = np.sum((pts - centre - np.array(off)) ** 2, -1)
        arr += amp * np.exp(-d2 / (2 * sigma ** 2))
    return v.with_array(arr.astype(np.float32))


def mse(a: Volume, b: Volume) -> float:
    return float(np.mean((a.array.astype(float) - b.array.astype(float)) ** 2))


def fixed_grid_points(v: Volume, n=20, seed=0):
    rng = np.random.default_rng(seed)
    ijk = rng.uniform(0.3, 0.7, (n, 3)) * (np.array(v.size_xyz) - 1)
    return v.index_to_physical(ijk)


def fast_params(**kw) -> IterativeParams:
    base = dict(metric="mse", histogram_match=False, use_mask=False, levels="2,1", linear_iterations=200,
                sampling_percentage=1.0, deformable_levels="2,1", deformable_iterations=30)
    base.update(kw)
    p = IterativeParams(**base)
    paradigms.validate_params(p)
    return p


@pytest.fixture(scope="module")
def fixed():
    return phantom()


def test_registry_returns_iterative():
    reg = paradigms.get("iterative")
    assert isinstance(reg, IterativeRegistrar)
    assert reg.key == "iterative" and reg.learned is False and reg.description
    assert isinstance(reg, paradigms.Registrar)


def test_known_rigid_transform_is_recovered(fixed):
    # moving(T(x)) = fixed(x) for a known rigid T: fixed point x must map to T(x)
    truth = sitk.Euler3DTransform()
    truth.SetCenter(tuple(fixed.index_to_physical([[(n - 1) / 2 for n in fixed.size_xyz]])[0]))
    truth.SetRotation(np.deg2rad(6), np.deg2rad(-4), np.deg2rad(5))
    truth.SetTranslation((4.0, -3.0, 2.5))
    moving = resample(fixed, fixed, Transform(truth.GetInverse()))
    res = IterativeRegistrar().register(fixed, moving, fast_params(stages="rigid"))
    pts = fixed_grid_points(fixed)
    expected = Transform(truth).transform_points(pts)
    err = np.linalg.norm(res.transform.transform_points(pts) - expected, axis=1)
    assert err.max() < 1.0, f"rigid recovery error {err.max():.2f} mm"
    assert res.field is None and res.transform.is_linear
    assert res.warped.same_grid(fixed)
    # as close as the true transform gets (both interpolate twice and lose the corners)
    ideal = resample(moving, fixed, Transform(truth))
    assert mse(res.warped, fixed) < 1.2 * mse(ideal, fixed) < 0.2 * mse(moving, fixed)
    assert res.paradigm == "iterative" and res.device == "cpu" and "total" in res.timings


def test_known_translation_through_rigid_affine_composite(fixed):
    truth = sitk.TranslationTransform(3, (5.0, 2.0, -3.0))
    moving = resample(fixed, fixed, Transform(truth.GetInverse()))
    moving_labels = LabelMap.from_volume(moving.with_array((moving.array > 0.5).astype(np.int32)))
    res = IterativeRegistrar().register(fixed, moving, fast_params(stages="rigid+affine"),
                                        moving_labels=moving_labels)
    assert isinstance(res.warped_labels, LabelMap) and res.warped_labels.same_grid(fixed)
    fixed_mask = fixed.array > 0.5
    ideal = resample(moving_labels, fixed, Transform(truth)).array == 1

    def dice(a):
        return 2 * np.sum(fixed_mask & a) / (fixed_mask.sum() + a.sum())
    assert dice(res.warped_labels.array == 1) > 0.97 * dice(ideal)
    assert dice(moving_labels.array == 1) < 0.8
    pts = fixed_grid_points(fixed)
    err = np.linalg.norm(res.transform.transform_points(pts) - (pts + [5.0, 2.0, -3.0]), axis=1)
    assert err.max() < 1.0
    assert res.transform.kind == "composite"


def smooth_displacement(fixed: Volume, amp=3.0) -> Volume:
    """A smooth displacement (xyz mm) that vanishes at the borders, max about ``amp`` mm."""
    z, y, x = np.meshgrid(*[np.linspace(0, np.pi, n) for n in fixed.shape], indexing="ij")
    bump = np.sin(x) * np.sin(y) * np.sin(z)
    f = np.stack([amp * bump * np.cos(y), -amp * bump * np.sin(2 * z) * 0.8, amp * 0.6 * bump], -1)
    return fixed.with_array(f.astype(np.float32), name="truth")


@pytest.mark.parametrize("deformable", ["diffeomorphic_demons", "bspline"])
def test_smooth_deformation_is_reduced(fixed, deformable):
    from app.engine.spatial import field_to_transform
    truth = smooth_displacement(fixed)
    moving = resample(fixed, fixed, field_to_transform(truth))  # moving(x) = fixed(x + u(x))
    # then warped(x) = moving(T(x)) = fixed(x) needs T(x) + u(T(x)) = x: roughly T(x) = x - u(x)
    p = fast_params(stages="deformable", deformable=deformable, bspline_mesh=6, deformable_iterations=40)
    res = IterativeRegistrar().register(fixed, moving, p)
    before, after = mse(moving, fixed), mse(res.warped, fixed)
    assert after < 0.35 * before, f"{deformable}: MSE {before:.2e} -> {after:.2e}"
    assert res.field is not None and res.field.array.shape == fixed.shape + (3,)
    assert res.field.same_grid(fixed)
    det = jacobian_determinant(res.field.array, res.field.spacing, res.field.direction)
    assert np.mean(det <= 0) == 0.0
    # the recovered displacement points the right way (minus the truth, in mm, LPS)
    inner = (slice(6, -6),) * 3
    cos = np.sum(res.field.array[inner] * -truth.array[inner]) / (
        np.linalg.norm(res.field.array[inner]) * np.linalg.norm(truth.array[inner]))
    assert cos > 0.7


def test_full_pipeline_field_is_the_whole_transform(fixed):
    truth = sitk.TranslationTransform(3, (3.0, -2.0, 1.0))
    moving = resample(fixed, fixed, Transform(truth.GetInverse()))
    res = IterativeRegistrar().register(fixed, moving, fast_params(stages="rigid+affine+deformable"))
    pts = fixed_grid_points(fixed, 5)
    ijk = np.round(fixed.physical_to_index(pts)).astype(int)
    grid_pts = fixed.index_to_physical(ijk)
    from_field = grid_pts + res.field.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    np.testing.assert_allclose(from_field, res.transform.transform_points(grid_pts), atol=1e-3)
    np.testing.assert_allclose(from_field - grid_pts, np.tile([3.0, -2.0, 1.0], (5, 1)), atol=1.0)


def test_progress_reports_increasing_iterations(fixed):
    moving = resample(fixed, fixed, Transform(sitk.TranslationTransform(3, (2.0, 0.0, 0.0))))
    seen = []
    IterativeRegistrar().register(fixed, moving, fast_params(stages="rigid+deformable", deformable_iterations=5),
                                  progress=seen.append)
    for stage in ("rigid", "deformable"):
        its = [p.iteration for p in seen if p.stage == stage]
        assert len(its) > 3 and its == sorted(its) and its[0] >= 1, (stage, its)
        assert all(np.isfinite(p.loss) for p in seen if p.stage == stage)
    fr = [p.fraction for p in seen]
    assert fr == sorted(fr) and 0 <= fr[0] and fr[-1] == 1.0
    assert seen[0].iteration == 0 and "one modality" in seen[0].message     # what was chosen, first
    assert 0 < [p.fraction for p in seen if p.iteration > 0][0]


@pytest.mark.parametrize("stage", ["rigid", "deformable"])
def test_cancel_from_progress_raises(fixed, stage):
    moving = resample(fixed, fixed, Transform(sitk.TranslationTransform(3, (2.0, 0.0, 0.0))))
    cancel = threading.Event()
    calls = []

    def progress(p):
        calls.append(p)
        if p.stage == stage and p.iteration >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        IterativeRegistrar().register(fixed, moving, fast_params(stages="rigid+deformable"),
                                      progress=progress, cancel=cancel)
    # stopped promptly, not after the whole stage
    assert sum(p.stage == stage for p in calls) <= 3


def test_cancel_before_start_raises(fixed):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        IterativeRegistrar().register(fixed, fixed, fast_params(), cancel=cancel)


@pytest.mark.parametrize("overrides, match", [
    ({"linear_iterations": 0}, r"linear_iterations=0 is outside its range \[1, 5000\]"),
    ({"sampling_percentage": 0.0}, r"sampling_percentage=0.0 is outside its range"),
    ({"sampling_percentage": 1.5}, r"sampling_percentage=1.5 is outside its range"),
    ({"demons_sigma": -1.0}, r"demons_sigma=-1.0 is outside its range"),
    ({"bspline_mesh": 1}, r"bspline_mesh=1 is outside its range"),
    ({"stages": "warp"}, r"stages='warp' is not one of"),
    ({"metric": "mi"}, r"metric='mi' is not one of"),
    ({"deformable": "syn"}, r"deformable='syn' is not one of"),
])
def test_bad_params_are_refused_when_made(overrides, match):
    with pytest.raises(ValueError, match=match):
        paradigms.make_params(IterativeRegistrar.Params, overrides)


@pytest.mark.parametrize("overrides, match", [
    ({"levels": "4,0,1"}, r"\blevels must hold shrink factors between 1 and 32, got '4,0,1'"),
    ({"levels": "four"}, r"\blevels must be comma-separated shrink factors"),
    ({"deformable_levels": ""}, r"deformable_levels must hold shrink factors"),
])
def test_bad_level_lists_are_refused_by_register(fixed, overrides, match):
    reg = IterativeRegistrar()
    p = paradigms.make_params(reg.Params, overrides)      # a string parameter: accepted here ...
    with pytest.raises(ValueError, match=match):           # ... and refused before any work
        reg.register(fixed, fixed, p)


def test_bad_input_raises_value_error(fixed):
    vec = fixed.with_array(np.zeros(fixed.shape + (3,), np.float32))
    with pytest.raises(ValueError, match="scalar"):
        IterativeRegistrar().register(fixed, vec, fast_params())


def test_params_have_help_and_defaults():
    import dataclasses
    for f in dataclasses.fields(IterativeParams):
        assert f.metadata.get("help"), f.name
    paradigms.validate_params(IterativeParams())
