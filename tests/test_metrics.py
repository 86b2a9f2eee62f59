"""Tests of app.engine.metrics: hand-computable cases and cross-checks against SimpleITK."""
from __future__ import annotations

import glob
import math

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import metrics as M

IXI_SEG = sorted(glob.glob("/work/shared/data/ixi/seg/*_T1_DLMUSE.nii.gz"))


def _img(arr, spacing):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    return im


def _smooth_pair(shift=1.5, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:20, 24:0:-1, 0:28].astype(float)
    base = lambda xx: np.sin(xx / 4) + np.cos(y / 5) * np.sin(z / 3)  # noqa: E731
    a = base(x) + noise * rng.standard_normal(x.shape)
    b = base(x + shift) + noise * rng.standard_normal(x.shape)
    return a, b


# ---------------------------------------------------------------------------- overlap
def _two_cubes():
    """4^3 cubes of label 1, the warped one shifted by one voxel along x (array axis 2)."""
    f = np.zeros((8, 8, 8), np.uint8)
    w = np.zeros_like(f)
    f[2:6, 2:6, 2:6] = 1
    w[2:6, 2:6, 3:7] = 1
    return f, w


def test_dice_jaccard_self_is_one():
    f = np.zeros((6, 7, 8), np.int32)
    f[1:3, 2:5, 1:4] = 3
    f[4:6, :, 5:] = 7
    assert M.dice_per_label(f, f) == {3: 1.0, 7: 1.0}
    assert M.jaccard_per_label(f, f) == {3: 1.0, 7: 1.0}


def test_dice_jaccard_shifted_cubes_by_hand():
    f, w = _two_cubes()
    # overlap 3*4*4 = 48 of 64 voxels each: Dice 96/128, Jaccard 48/80
    assert M.dice_per_label(f, w) == {1: pytest.approx(0.75)}
    assert M.jaccard_per_label(f, w) == {1: pytest.approx(0.6)}


def test_absent_labels():
    f = np.zeros((4, 4, 4), np.int16)
    f[0, 0, :2] = 1
    f[3, 3, :2] = 2
    w = np.zeros_like(f)
    w[0, 0, :2] = 1
    w[1, 1, 1] = 5                       # only in warped: not scored by default
    assert M.dice_per_label(f, w) == {1: 1.0, 2: 0.0}
    d = M.dice_per_label(f, w, labels=[2, 5, 9])
    assert d[2] == 0.0 and d[5] == 0.0 and math.isnan(d[9])
    assert M.summarize_dice(d) == 0.0
    assert M.dice_per_label(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int)) == {}


def test_dice_jaccard_match_sitk_label_overlap():
    rng = np.random.default_rng(1)
    f = ndimage_blobs(rng)
    w = np.roll(f, (1, -2, 1), axis=(0, 1, 2))
    sp = (0.8, 1.3, 2.2)
    flt = sitk.LabelOverlapMeasuresImageFilter()
    flt.Execute(_img(f, sp), _img(w, sp))
    dice, jac = M.dice_per_label(f, w), M.jaccard_per_label(f, w)
    assert set(dice) == set(int(v) for v in np.unique(f) if v)
    for label in dice:
        assert dice[label] == pytest.approx(flt.GetDiceCoefficient(label), abs=1e-12)
        assert jac[label] == pytest.approx(flt.GetJaccardCoefficient(label), abs=1e-12)


def ndimage_blobs(rng, shape=(16, 18, 20), n=6):
    """Label map of ``n`` overlapping random ellipsoids (later ones paint over earlier)."""
    z, y, x = np.indices(shape)
    out = np.zeros(shape, np.int32)
    for label in range(1, n + 1):
        c = rng.uniform(3, np.array(shape) - 3)
        r = rng.uniform(2, 5, size=3)
        inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        out[inside] = label * 10          # non-contiguous ids
    return out


def test_label_map_validation():
    with pytest.raises(ValueError, match=r"\(3, 3, 3\).*\(3, 3, 4\)"):
        M.dice_per_label(np.zeros((3, 3, 3), int), np.zeros((3, 3, 4), int))
    with pytest.raises(ValueError, match="integer"):
        M.dice_per_label(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------- surface distances
def test_surface_distances_self_are_zero():
    f = ndimage_blobs(np.random.default_rng(2))
    for v in M.hd95_per_label(f, f, (1.0, 2.0, 3.0)).values():
        assert v == 0.0
    for v in M.assd_per_label(f, f, (1.0, 2.0, 3.0)).values():
        assert v == 0.0


def test_surface_distances_shifted_cubes_by_hand():
    f, w = _two_cubes()
    # 56 surface voxels per cube. Fixed -> warped: the x=lo face (16 voxels) is one x-step
    # from warped's face; the 4 face-interior voxels of the x=hi face are one step (the
    # cheapest axis) from warped's side faces; the rest lie on warped's surface.
    sp = (2.0, 3.0, 1.5)                      # xyz
    one_way = 16 * 2.0 + 4 * 1.5
    assert M.assd_per_label(f, w, sp)[1] == pytest.approx(2 * one_way / 112)
    assert M.hd95_per_label(f, w, sp)[1] == pytest.approx(2.0)
    iso = M.assd_per_label(f, w, (1.0, 1.0, 1.0))[1]
    assert iso == pytest.approx(5 / 14)


def test_hausdorff_matches_sitk_anisotropic():
    f = np.zeros((20, 20, 20), np.uint8)
    w = np.zeros_like(f)
    f[4:10, 5:12, 3:9] = 1
    w[7:13, 6:13, 5:11] = 1                   # shift (x, y, z) = (2, 1, 3) voxels
    sp = (0.7, 1.2, 2.5)
    flt = sitk.HausdorffDistanceImageFilter()
    flt.Execute(_img(f, sp), _img(w, sp))
    by_hand = math.sqrt((2 * 0.7) ** 2 + (1 * 1.2) ** 2 + (3 * 2.5) ** 2)
    hd = M.hd95_per_label(f, w, sp, percentile=100)[1]
    assert hd == pytest.approx(by_hand) and hd == pytest.approx(flt.GetHausdorffDistance())
    assert M.hd95_per_label(f, w, sp)[1] <= hd


def test_surface_distance_missing_label_is_nan():
    f = np.zeros((6, 6, 6), int)
    f[1:3, 1:3, 1:3] = 1
    f[4:6, 4:6, 4:6] = 2
    w = np.where(f == 2, 0, f)
    hd, assd = M.hd95_per_label(f, w, (1, 1, 1)), M.assd_per_label(f, w, (1, 1, 1))
    assert hd[1] == 0.0 and math.isnan(hd[2])
    assert assd[1] == 0.0 and math.isnan(assd[2])
    assert M.summarize_dice(hd) == 0.0
    with pytest.raises(ValueError, match="spacing"):
        M.hd95_per_label(f, w, (1, 1))


@pytest.mark.skipif(len(IXI_SEG) < 2, reason="IXI sample data not available")
def test_dice_on_real_ixi_labels_matches_sitk():
    fi, wi = (sitk.ReadImage(p) for p in IXI_SEG[:2])
    wi.CopyInformation(fi)
    f, w = sitk.GetArrayFromImage(fi), sitk.GetArrayFromImage(wi)
    dice = M.dice_per_label(f, w)
    assert len(dice) == len(np.unique(f)) - 1
    flt = sitk.LabelOverlapMeasuresImageFilter()
    flt.Execute(fi, wi)
    for label in list(dice)[::15]:
        assert dice[label] == pytest.approx(flt.GetDiceCoefficient(label), abs=1e-12)


def test_summarize_dice():
    assert M.summarize_dice({1: 0.5, 2: float("nan"), 3: 1.0}) == pytest.approx(0.75)
    assert math.isnan(M.summarize_dice({}))
    assert math.isnan(M.summarize_dice({4: float("nan")}))


# ---------------------------------------------------------------------------- TRE
def test_tre_identity_and_345():
    p = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 2.0]])
    r = M.tre(p, p)
    assert r["per_point"] == [0.0, 0.0] and r["mean"] == 0.0 and r["max"] == 0.0
    r = M.tre(p, p + [[3.0, 4.0, 0.0], [0.0, 3.0, 4.0]])
    assert r["per_point"] == pytest.approx([5.0, 5.0])
    assert r["mean"] == r["median"] == r["max"] == pytest.approx(5.0)
    assert r["std"] == pytest.approx(0.0)


def test_tre_mismatched_counts():
    with pytest.raises(ValueError, match=r"3 fixed.*2 mapped"):
        M.tre(np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        M.tre(np.zeros((3, 2)), np.zeros((3, 2)))


# ---------------------------------------------------------------------------- Jacobian
def _world_grid(shape_zyx, spacing, origin, direction):
    """Physical xyz position (LPS mm) of every voxel: (z, y, x, 3)."""
    k, j, i = np.indices(shape_zyx, dtype=float)
    idx = np.stack([i, j, k], axis=-1)
    return origin + idx @ (np.asarray(direction) @ np.diag(spacing)).T


def test_jacobian_zero_field_is_one():
    det = M.jacobian_determinant(np.zeros((5, 6, 7, 3)), (1.0, 2.0, 3.0))
    assert det.shape == (5, 6, 7)
    np.testing.assert_allclose(det, 1.0)
    st = M.jacobian_stats(det)
    assert st == {"fold_fraction": 0.0, "sdlogj": 0.0, "jac_min": 1.0, "jac_max": 1.0}


def test_jacobian_affine_field_oblique_anisotropic():
    spacing = np.array([0.9, 1.7, 2.6])
    c, s = math.cos(0.4), math.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]])
    a = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.15], [-0.2, 0.1, 1.3]])
    x = _world_grid((6, 7, 8), spacing, np.array([-20.0, 5.0, 3.0]), direction)
    u = x @ (a - np.eye(3)).T + np.array([1.0, -2.0, 0.5])
    det = M.jacobian_determinant(u, spacing, direction)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-10)


def test_jacobian_folding_field():
    x = _world_grid((4, 5, 12), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    u = np.zeros_like(x)
    u[..., 0] = np.where(x[..., 0] > 5, -2.0 * (x[..., 0] - 5), 0.0)   # x' = 5 - (x - 5)
    det = M.jacobian_determinant(u, (1.0, 1.0, 1.0))
    st = M.jacobian_stats(det)
    assert 0.0 < st["fold_fraction"] < 1.0
    assert st["jac_min"] == pytest.approx(-1.0) and st["jac_max"] == pytest.approx(1.0)
    assert st["sdlogj"] > 1.0
    masked = M.jacobian_stats(det, mask=x[..., 0] < 4)
    assert masked["fold_fraction"] == 0.0 and masked["sdlogj"] == 0.0
    assert M.jacobian_stats(det, border=1)["fold_fraction"] > 0.0


def test_jacobian_bad_inputs():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        M.jacobian_determinant(np.zeros((4, 4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="direction"):
        M.jacobian_determinant(np.zeros((3, 3, 3, 3)), (1, 1, 1), np.eye(2))
    with pytest.raises(ValueError, match="border"):
        M.jacobian_stats(np.ones((4, 4, 4)), border=2)


# ---------------------------------------------------------------------------- similarity
def test_mse_and_ncc_by_hand():
    a = np.arange(24, dtype=float).reshape(2, 3, 4)
    assert M.mse(a, a + 2) == 4.0
    mask = np.zeros(a.shape, bool)
    mask[0] = True
    b = a.copy()
    b[1] += 10
    assert M.mse(a, b, mask=mask) == 0.0 and M.mse(a, b) == 50.0
    assert M.ncc(a, 3 * a + 2) == pytest.approx(1.0)
    assert M.ncc(a, -a) == pytest.approx(-1.0)
    assert math.isnan(M.ncc(a, np.ones_like(a)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        M.ncc(a, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="selects no voxel"):
        M.mse(a, a, mask=np.zeros(a.shape, bool))


def test_local_ncc():
    a, _ = _smooth_pair()
    assert M.local_ncc(a, 2 * a + 1, window=5) == pytest.approx(1.0)
    assert M.local_ncc(a, -a) == pytest.approx(-1.0)
    noise = np.random.default_rng(3).standard_normal(a.shape)
    assert abs(M.local_ncc(a, noise, window=5)) < 0.1
    with pytest.raises(ValueError, match="window"):
        M.local_ncc(a, a, window=1)


def test_mutual_information_by_hand():
    a = np.tile(np.arange(4.0), (4, 4, 4))           # 4 equally frequent levels
    assert M.mutual_information(a, a, bins=4) == pytest.approx(math.log(4))
    assert M.mutual_information(a, 5 - 2 * a, bins=4) == pytest.approx(math.log(4))
    assert M.mutual_information(a, a, bins=4, normalized=True) == pytest.approx(2.0)
    rng = np.random.default_rng(4)
    x, y = rng.random((2, 40, 50, 50))
    assert M.mutual_information(x, y, bins=8) < 0.01
    assert M.mutual_information(x, y, bins=8, normalized=True) == pytest.approx(1.0, abs=0.01)
    assert M.mattes_mi(x, y, bins=8) < 0.01


def test_mattes_mi_close_to_sitk():
    a, b = _smooth_pair()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInitialTransform(sitk.Transform(3, sitk.sitkIdentity))
    reg.SetInterpolator(sitk.sitkLinear)
    ia, ib = sitk.GetImageFromArray(a), sitk.GetImageFromArray(b)
    assert M.mattes_mi(a, b) == pytest.approx(-reg.MetricEvaluate(ia, ib), rel=0.1)
    assert M.mattes_mi(a, a) == pytest.approx(-reg.MetricEvaluate(ia, ia), rel=0.1)
    assert M.mattes_mi(a, a) > M.mattes_mi(a, b)


def test_ssim_and_psnr():
    a, b = _smooth_pair()
    assert M.ssim(a, a) == pytest.approx(1.0)
    s = M.ssim(a, b)
    assert -1.0 < s < 1.0 and s == pytest.approx(M.ssim(b, a))
    ref = (np.indices((6, 6, 6)).sum(axis=0) % 2).astype(float)     # range 1
    sign = np.where(np.arange(216).reshape(6, 6, 6) % 3 == 0, 1.0, -1.0)
    assert M.psnr(ref, ref + 0.1 * sign) == pytest.approx(20.0)     # MSE 0.01
    assert M.psnr(ref, ref + 0.1 * sign, data_range=10.0) == pytest.approx(40.0)
    assert M.psnr(ref, ref) == math.inf


# ---------------------------------------------------------------------------- Learn2Reg-style HD95 and SDlogJ
DEMO = __import__("pathlib").Path(__file__).resolve().parents[1] / "resources" / "demo"


@pytest.mark.parametrize("axis, spacing_on_axis", [(2, 2.0), (1, 3.0), (0, 1.5)])
def test_learn2reg_hd95_cubes_offset_by_one_voxel(axis, spacing_on_axis):
    """Surfels lie on the voxel-corner grid; the face of the fixed cube that the shift leaves behind is
    one step (the spacing along the shift) from the warped surface, and it is more than 5 % of the
    area (a sixth), so both the 95th percentile and the maximum are that spacing."""
    f = np.zeros((9, 9, 9), np.uint8)
    f[2:6, 2:6, 2:6] = 1
    w = np.roll(f, 1, axis=axis)
    sp = (2.0, 3.0, 1.5)                      # xyz: array axis 2 -> 2.0, 1 -> 3.0, 0 -> 1.5
    assert M.hd95_per_label(f, w, sp, style="learn2reg")[1] == pytest.approx(spacing_on_axis)
    assert M.hd95_per_label(f, w, sp, style="learn2reg", percentile=100)[1] == pytest.approx(spacing_on_axis)
    assert M.hd95_per_label(f, f, sp, style="learn2reg")[1] == 0.0


def test_learn2reg_percentile_is_area_weighted_without_interpolation():
    from app.engine.metrics.overlap import _area_percentile
    d = np.array([0.0, 1.0, 2.0, 3.0])
    assert _area_percentile(d, np.ones(4), 50) == 1.0        # cumulative area reaches 0.5 at d=1
    assert np.percentile(d, 50) == 1.5                       # the voxel style interpolates
    assert _area_percentile(d, np.array([1.0, 1.0, 1.0, 0.01]), 95) == 2.0   # a tiny last surfel
    assert _area_percentile(d, np.ones(4), 95) == 3.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the package uses old scipy namespaces
def test_learn2reg_hd95_equals_deepmind_surface_distance():
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(5)
    f, w = ndimage_blobs(rng), ndimage_blobs(rng)
    sp = (0.7, 1.3, 2.2)
    ours = M.hd95_per_label(f, w, sp, labels=[10, 20, 30], style="learn2reg")
    for label, v in ours.items():
        ref = sd.compute_robust_hausdorff(sd.compute_surface_distances(f == label, w == label, sp[::-1]), 95)
        assert v == pytest.approx(ref, abs=1e-12)


@pytest.mark.skipif(not (DEMO / "fixed_IXI174_labels.nii.gz").is_file(), reason="demo labels missing")
def test_learn2reg_hd95_reads_lower_on_an_ixi_label_pair():
    from app.engine import io
    f = io.read_labels(DEMO / "fixed_IXI174_labels.nii.gz")
    m = io.read_labels(DEMO / "moving_IXI136_labels.nii.gz", reference=f)
    labels = np.unique(f.array)[1:31]
    ours = M.hd95_per_label(f.array, m.array, f.spacing, labels=labels)
    l2r = M.hd95_per_label(f.array, m.array, f.spacing, labels=labels, style="learn2reg")
    for k in ours:
        assert l2r[k] <= ours[k] + 1e-9
    gap = M.summarize_dice(ours) - M.summarize_dice(l2r)
    assert 0.3 < gap < 1.0          # measured 0.62 mm over all 148 labels at 2 mm voxels


def test_learn2reg_sdlogj_adds_three_inside_the_log():
    det = np.array([1.0, 1.0, 5.0, 5.0])
    assert M.jacobian_stats(det)["sdlogj"] == pytest.approx(0.5 * math.log(5.0))
    assert M.jacobian_stats(det, style="learn2reg")["sdlogj"] == pytest.approx(0.5 * math.log(2.0))  # log 4, log 8
    folded = np.array([-1.0, 1.0])
    assert M.jacobian_stats(folded, style="learn2reg")["sdlogj"] == pytest.approx(0.5 * math.log(2.0))
    assert M.jacobian_stats(folded, style="learn2reg")["fold_fraction"] == 0.5
    with pytest.raises(ValueError, match="style"):
        M.jacobian_stats(det, style="monai")
    with pytest.raises(ValueError, match="style"):
        M.hd95_per_label(np.ones((3, 3, 3), int), np.ones((3, 3, 3), int), (1, 1, 1), style="l2r")


def test_transform_metrics_passes_the_metric_style_down():
    from app.engine.evaluation import transform_metrics
    from app.engine.types import LabelMap, Transform, Volume
    f = ndimage_blobs(np.random.default_rng(1))
    sp = (1.0, 1.5, 2.0)
    fixed = Volume(f.astype(np.float32), sp)
    moving = Volume(np.roll(f, 1, axis=2).astype(np.float32), sp)
    z, y, x = np.indices(f.shape)
    u = np.stack([0.3 * np.sin(x / 3.0), 0.2 * np.cos(y / 4.0), 0.25 * np.sin(z / 2.5)], -1).astype(np.float32)
    field = fixed.with_array(u)
    from app.engine.spatial import field_to_transform
    t = field_to_transform(field)
    kw = dict(field=field, fixed_labels=LabelMap(f, sp), moving_labels=LabelMap(np.roll(f, 1, axis=2), sp))
    ours = transform_metrics(fixed, moving, t, **kw)
    l2r = transform_metrics(fixed, moving, t, metric_style="learn2reg", **kw)
    det = M.jacobian_determinant(u, sp)[2:-2, 2:-2, 2:-2]
    assert ours["sdlogj"] == pytest.approx(np.log(det).std(), rel=1e-6)
    assert l2r["sdlogj"] == pytest.approx(np.log(det + 3).std(), rel=1e-6)
    assert l2r["hd95_mean"] <= ours["hd95_mean"] and l2r["dice_mean"] == ours["dice_mean"]
