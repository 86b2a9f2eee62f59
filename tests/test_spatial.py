"""Physical-space tests: the torch warp and field conversions against SimpleITK itself."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import spatial
from app.engine.types import LabelMap, Transform, Volume


def rot(ax, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    m = {0: [[1, 0, 0], [0, c, -s], [0, s, c]], 1: [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         2: [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[ax]
    return np.array(m, float)


def oblique_volume(shape=(14, 18, 22), spacing=(1.2, 0.8, 2.5), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    arr = (np.sin(3 * x) + np.cos(2 * y) * z + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    d = rot(2, 20) @ rot(0, -15)
    return Volume(arr, spacing, (-10.0, 4.0, 7.5), d, "oblique")


def smooth_field(vol: Volume, amp=2.0):
    z, y, x = np.meshgrid(*[np.linspace(0, np.pi, n) for n in vol.shape], indexing="ij")
    f = np.stack([amp * np.sin(y) * np.cos(z), -amp * np.sin(x) * 0.7, amp * 0.5 * np.sin(z + x)], -1)
    return vol.with_array(f.astype(np.float32), name="field")


def test_resample_identity_same_grid_is_exact():
    v = oblique_volume()
    out = spatial.resample(v, v)
    np.testing.assert_allclose(out.array, v.array, atol=1e-5)
    assert out.same_grid(v)


def test_known_translation_direction():
    """T maps fixed points to moving points: warped(x) = moving(x + t)."""
    v = Volume(np.zeros((10, 10, 10), np.float32), (1, 1, 1), (0, 0, 0))
    v.array[5, 5, 7] = 1.0  # voxel (x=7, y=5, z=5)
    t = Transform(sitk.TranslationTransform(3, (2.0, 0.0, 0.0)))
    out = spatial.resample(v, v, t, "nearest")
    # warped(x=5) = moving(x=7)
    assert out.array[5, 5, 5] == 1.0 and out.array.sum() == 1.0
    np.testing.assert_allclose(t.transform_points([[5, 5, 5]]), [[7, 5, 5]])


def test_field_roundtrip_matches_transform():
    v = oblique_volume()
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(tuple((rot(1, 5) * 1.05).reshape(-1)))
    aff.SetTranslation((1.0, -2.0, 0.5))
    t = Transform(aff)
    field = spatial.transform_to_field(t, v)
    assert field.array.shape == (*v.shape, 3)
    back = spatial.field_to_transform(field)
    pts = v.index_to_physical([[3, 4, 5], [10, 2, 7]])
    np.testing.assert_allclose(back.transform_points(pts), t.transform_points(pts), atol=1e-4)


def test_voxel_physical_field_inverse_and_direction():
    v = oblique_volume()
    f = smooth_field(v).array  # (z, y, x, 3) xyz mm
    mm = torch.as_tensor(np.moveaxis(f, -1, 0))[None].double()
    vox = spatial.physical_to_voxel_field(mm, v)
    back = spatial.voxel_to_physical_field(vox, v)
    torch.testing.assert_close(back, mm)
    # one voxel along array axis x (last) is spacing[0] mm along direction column 0
    e = torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64)
    e[:, 2] = 1.0
    p = spatial.voxel_to_physical_field(e, v)[0, :, 0, 0, 0].numpy()
    np.testing.assert_allclose(p, v.direction[:, 0] * v.spacing[0], atol=1e-12)


@pytest.mark.parametrize("other_grid", [False, True])
def test_torch_warp_matches_sitk_resample(other_grid):
    fixed = oblique_volume()
    moving = oblique_volume(seed=1)
    if other_grid:
        moving = Volume(moving.array, (0.9, 1.1, 2.0), (-8.0, 2.0, 9.0), rot(2, -10) @ rot(1, 8), "m")
    field = smooth_field(fixed)
    ref = spatial.resample(moving, fixed, spatial.field_to_transform(field), "linear")
    got = spatial.warp_volume_torch(moving, fixed, field.array)
    inside = ref.array != 0
    assert inside.mean() > 0.3
    np.testing.assert_allclose(got.array[inside], ref.array[inside], atol=2e-3)


def test_warp_torch_voxel_path_matches_sitk():
    """Network path: displacement in voxels + warp_torch == SimpleITK with the mm field."""
    v = oblique_volume()
    field = smooth_field(v)
    ref = spatial.resample(v, v, spatial.field_to_transform(field))
    mm = torch.as_tensor(np.moveaxis(field.array, -1, 0))[None].double()
    vox = spatial.physical_to_voxel_field(mm, v).float()
    img = torch.as_tensor(v.array)[None, None]
    got = spatial.warp_torch(img, vox)[0, 0].numpy()
    inside = ref.array != 0
    np.testing.assert_allclose(got[inside], ref.array[inside], atol=2e-3)


def test_warp_torch_shift_by_one_voxel():
    img = torch.zeros(1, 1, 4, 4, 4)
    img[0, 0, 1, 2, 3] = 1.0
    disp = torch.zeros(1, 3, 4, 4, 4)
    disp[:, 2] = 1.0  # +1 voxel along x
    out = spatial.warp_torch(img, disp)
    assert out[0, 0, 1, 2, 2] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)


def test_warp_torch_validates_shapes():
    with pytest.raises(ValueError, match="displacement"):
        spatial.warp_torch(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_compose_stages_order():
    """A later stage estimated on the already-warped image is applied first to fixed points."""
    a = Transform(sitk.TranslationTransform(3, (5.0, 0, 0)))
    s = sitk.ScaleTransform(3, (2.0, 1.0, 1.0))
    b = Transform(s)
    c = spatial.compose(a, b)
    np.testing.assert_allclose(c.transform_points([[1, 0, 0]]), [[7, 0, 0]])  # a(b(x)) = 2*1 + 5


def test_labels_resampled_nearest():
    lab = LabelMap(np.random.default_rng(0).integers(0, 4, (8, 9, 10)).astype(np.int16), (1, 1, 2))
    # 0.4 mm is less than half a voxel: nearest neighbour returns every label where it was
    out = spatial.resample(lab, lab, Transform(sitk.TranslationTransform(3, (0.4, 0, 0))))
    assert isinstance(out, LabelMap) and out.array.dtype == lab.array.dtype
    np.testing.assert_array_equal(out.array, lab.array)
    # 0.6 mm rounds to the next voxel along x: warped(x) = moving(x + 1), the last column falls outside
    out = spatial.resample(lab, lab, Transform(sitk.TranslationTransform(3, (0.6, 0, 0))))
    np.testing.assert_array_equal(out.array[:, :, :-1], lab.array[:, :, 1:])


def test_deformation_grid_identity_is_straight():
    v = oblique_volume()
    g = spatial.deformation_grid(v.with_array(np.zeros((*v.shape, 3), np.float32)), every_vox=4)
    assert g.array[:, :, 0].min() == pytest.approx(1.0)  # x index 0 is a grid line
    assert g.array[1:3, 1:3, 1:3].max() == pytest.approx(0.0)


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (1, -1, 1)), ((1, 2, 0), (-1, 1, -1)),
                                         ((0, 2, 1), (-1, -1, -1))])
def test_axial_slice_reads_like_the_axial_view_whatever_the_grid_axes(perm, flips):
    """A marker at the patient's right-anterior of an axial plane lands top-left, whatever the index axes."""
    from app.engine.spatial import axial_slice
    direction = np.zeros((3, 3))
    for idx_axis, (phys, sign) in enumerate(zip(perm, flips)):
        direction[phys, idx_axis] = sign               # index axis idx_axis runs along physical axis phys
    shape_xyz = (7, 9, 11)
    arr = np.zeros(shape_xyz[::-1], np.float32)
    ref = Volume(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    # the corner voxel that is most right (-x) and most anterior (-y), at the middle height
    corners = np.array([[i, j, k] for i in (0, shape_xyz[0] - 1) for j in (0, shape_xyz[1] - 1)
                        for k in (0, shape_xyz[2] - 1)], float)
    sup_axis = int(np.argmax(np.abs(direction[2])))
    mid = np.array(shape_xyz, float) // 2
    pts = corners.copy()
    pts[:, sup_axis] = mid[sup_axis]
    phys = ref.index_to_physical(pts)
    target = pts[np.argmin(phys[:, 0] + phys[:, 1])].astype(int)        # smallest x + y: right-anterior
    arr[target[2], target[1], target[0]] = 1.0
    out = axial_slice(arr, direction)
    assert out.shape[0] * out.shape[1] * shape_xyz[sup_axis] == arr.size
    assert out[0, 0] == 1.0 and out.sum() == 1.0
    with pytest.raises(ValueError, match="3D"):
        axial_slice(arr[0], direction)
