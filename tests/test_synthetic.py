"""The known-transform generator (app.engine.synthetic): exact transforms in physical space."""
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from app.engine import synthetic as S
from app.engine.datasets import DEFAULT_IXI_ROOT, IXI_DIRECTION, center_of_mass, ixi_paths
from app.engine.metrics import jacobian_determinant
from app.engine.spatial import resample
from app.engine.types import LabelMap, Volume

OBLIQUE = S.rotation_matrix([12.0, -20.0, 7.0]) @ np.asarray(IXI_DIRECTION)


def phantom(shape=(30, 36, 32), spacing=(1.7, 1.3, 2.6), direction=OBLIQUE, origin=(-30.0, 12.0, -25.0)):
    """A smooth, asymmetric head-like blob on an anisotropic, oblique grid, and its 'brain' labels."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = np.exp(-((x - 0.1) ** 2 / 0.35 + (y + 0.05) ** 2 / 0.25 + z ** 2 / 0.3)) * (1.2 + 0.5 * np.sin(3 * x + 2 * y))
    img = img + 0.6 * np.exp(-((x + 0.35) ** 2 + (y - 0.3) ** 2 + (z - 0.2) ** 2) / 0.03)
    vol = Volume(img.astype(np.float32), spacing, origin, direction, "phantom")
    labels = LabelMap((img > 0.5).astype(np.int16), spacing, origin, direction, "labels")
    return vol, labels


def sample_physical(vol: Volume, pts: np.ndarray) -> np.ndarray:
    """Trilinear value of ``vol`` at physical points (N, 3), independent of SimpleITK's resampler."""
    ijk = vol.physical_to_index(pts)                   # xyz
    return map_coordinates(vol.array.astype(np.float64), ijk[:, ::-1].T, order=1, mode="constant", cval=np.nan)


def test_point_maps_where_the_matrix_says():
    rng = np.random.default_rng(0)
    m = S.random_affine(rng, [3.0, -4.0, 10.0])
    t = S.matrix_to_transform(m)
    p = rng.uniform(-80, 80, (10, 3))
    np.testing.assert_allclose(t.transform_points(p), p @ m[:3, :3].T + m[:3, 3], atol=1e-9)
    np.testing.assert_allclose(S.transform_to_matrix(t), m, atol=1e-9)


def test_fixed_is_moving_at_the_mapped_points_on_an_oblique_anisotropic_grid():
    moving, labels = phantom()
    rng = np.random.default_rng(1)
    m = S.random_rigid(rng, center_of_mass(moving), rot_deg=15, trans_mm=6)
    pair = S.make_pair(moving, labels, m)
    assert pair.fixed.same_grid(moving)
    # fixed(x) = moving(T(x)) at voxel centres of the fixed grid well inside the image
    idx = np.argwhere(pair.fixed.array > 0.3)[::7]
    x = pair.fixed.index_to_physical(idx[:, ::-1].astype(float))
    expect = sample_physical(moving, x @ m[:3, :3].T + m[:3, 3])
    ok = np.isfinite(expect)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(pair.fixed.array[tuple(idx[ok].T)], expect[ok], atol=1e-4)
    # a wrong direction convention (the inverse) would not match
    wrong = sample_physical(moving, (x - m[:3, 3]) @ np.linalg.inv(m[:3, :3]).T)
    assert np.nanmean(np.abs(pair.fixed.array[tuple(idx.T)] - wrong)) > 0.05


def test_inverse_warp_returns_the_moving_image_in_the_interior():
    moving, labels = phantom()
    m = S.random_affine(np.random.default_rng(2), center_of_mass(moving), rot_deg=10, trans_mm=5,
                        scale=(0.95, 1.05), shear=0.03)
    pair = S.make_pair(moving, labels, m)
    back = resample(pair.fixed, moving, S.matrix_to_transform(np.linalg.inv(m)), "linear")
    inner = labels.array > 0          # the object's interior: inside the field of view both ways
    err = np.abs(back.array - moving.array)[inner]
    assert err.mean() < 0.02 * moving.array.max() and np.percentile(err, 95) < 0.06 * moving.array.max()
    # the labels went along: warped labels sit on the warped object
    brain = pair.fixed_labels.array > 0
    assert pair.fixed.array[brain].mean() > 2 * pair.fixed.array[~brain].mean()


def test_random_field_is_smooth_and_within_amplitude():
    grid, _ = phantom()
    rng = np.random.default_rng(3)
    f = S.random_field(grid, rng, max_mm=6.0, control_spacing_mm=20.0)
    n = np.linalg.norm(f.array, axis=-1)
    assert f.array.shape == (*grid.shape, 3)
    assert n.max() == pytest.approx(6.0, rel=1e-4)
    # smooth: neighbouring voxels differ by a small fraction of the amplitude per mm
    for ax, sp in zip((0, 1, 2), grid.spacing[::-1]):
        step = np.abs(np.diff(f.array, axis=ax)).max() / sp
        assert step < 6.0 / 20.0 * 3
    # and no translation bias
    assert np.linalg.norm(f.array.reshape(-1, 3).mean(0)) < 1.0


def test_diffeomorphic_field_does_not_fold():
    grid, _ = phantom()
    rng = np.random.default_rng(4)
    plain = S.random_field(grid, np.random.default_rng(4), max_mm=12.0, control_spacing_mm=12.0)
    diffeo = S.random_field(grid, rng, max_mm=12.0, control_spacing_mm=12.0, diffeomorphic=True)
    assert np.linalg.norm(diffeo.array, axis=-1).max() <= 12.0 + 1e-3
    det_plain = jacobian_determinant(plain.array, plain.spacing, plain.direction)
    det_diffeo = jacobian_determinant(diffeo.array, diffeo.spacing, diffeo.direction)
    assert det_plain.min() <= 0            # this amplitude folds as a plain displacement ...
    assert det_diffeo[2:-2, 2:-2, 2:-2].min() > 0   # ... and not when integrated


def test_dense_pair_is_exact():
    moving, labels = phantom()
    rng = np.random.default_rng(5)
    m = S.random_rigid(rng, center_of_mass(moving), 8, 4)
    u = S.random_field(moving, rng, max_mm=4.0, control_spacing_mm=25.0)
    pair = S.make_pair(moving, labels, m, u)
    idx = np.argwhere(pair.fixed.array > 0.3)[::9]
    x = pair.fixed.index_to_physical(idx[:, ::-1].astype(float))
    # T(x) = A(x + u(x)): u sampled at the voxel centre x itself
    ux = u.array[tuple(idx.T)].astype(float)
    y = (x + ux) @ m[:3, :3].T + m[:3, 3]
    np.testing.assert_allclose(pair.transform.transform_points(x), y, atol=1e-4)
    expect = sample_physical(moving, y)
    ok = np.isfinite(expect)
    np.testing.assert_allclose(pair.fixed.array[tuple(idx[ok].T)], expect[ok], atol=1e-4)
    d = pair.displacement_mm()
    np.testing.assert_allclose(d.array[tuple(idx.T)], y - x, atol=1e-3)


def test_point_error():
    pts = np.random.default_rng(6).uniform(-50, 50, (100, 3))
    t = np.eye(4)
    t[:3, 3] = [3.0, 4.0, 0.0]
    assert S.mean_point_error(np.eye(4), np.eye(4), pts) == 0.0
    assert S.mean_point_error(t, np.eye(4), pts) == pytest.approx(5.0)
    assert S.mean_point_error(S.matrix_to_transform(t), np.eye(4), pts) == pytest.approx(5.0)
    _, labels = phantom()
    bp = S.brain_points(labels, max_points=50)
    assert bp.shape == (50, 3) and np.array_equal(bp, S.brain_points(labels, max_points=50))
    with pytest.raises(ValueError, match="no voxel > 0"):
        S.brain_points(labels.with_array(np.zeros_like(labels.array)))


def test_cases_are_deterministic_and_in_their_bands():
    subjects = ["a", "b", "c"]
    cases = S.make_cases(subjects, per_band=6, seed=3)
    assert cases == S.make_cases(subjects, per_band=6, seed=3)
    assert cases != S.make_cases(subjects, per_band=6, seed=4)
    assert len(cases) == 6 * len(S.BANDS)
    for c in cases:
        ang = S.rotation_angle_deg(np.asarray(c.linear))
        assert c.rot_range[0] - 1e-6 <= ang <= c.rot_range[1] + 1e-6
        assert c.trans_range[0] - 1e-6 <= np.linalg.norm(c.translation) <= c.trans_range[1] + 1e-6
        # rotation about the centre: the centre moves by the translation alone
        centre = np.array([10.0, -20.0, 5.0])
        np.testing.assert_allclose(S._map(c.matrix(centre), centre[None])[0], centre + c.translation, atol=1e-9)
    t = S.target_cases(subjects, n=5)
    for c in t:
        lin = np.asarray(c.linear)
        assert 0.9 ** 3 * 0.9 < abs(np.linalg.det(lin)) < 1.1 ** 3 * 1.1


@pytest.mark.skipif(not (DEFAULT_IXI_ROOT / "t1").exists(), reason="IXI data not available")
def test_case_pair_on_real_ixi_subject():
    from app.engine.datasets import load_split
    subject = load_split()["test"][0]
    case = S.make_cases([subject], per_band=1, seed=0)[1]
    pair = S.case_pair(case)
    assert pair.fixed.same_grid(pair.moving)
    assert not np.allclose(pair.moving.direction, np.eye(3))         # IXI is oblique in LPS
    pts = S.brain_points(pair.fixed_labels, 500)
    m = case.matrix(pair.centre)
    assert S.mean_point_error(pair.transform, m, pts) < 1e-6
    err0 = S.mean_point_error(np.eye(4), m, pts)
    assert 5 < err0 < 60
