"""File formats: exact geometry round trips, ITK interoperability, and every documented refusal."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import io
from app.engine.io import ImageReadError, LandmarkError, TransformIOError
from app.engine.types import LabelMap, Landmarks, Transform, Volume

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared sample data not available")


def _rotation(ax, ay, az):
    """Proper rotation (det +1) from angles in radians about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_volume(dtype=np.float32) -> Volume:
    """(z, y, x) = (6, 7, 8), anisotropic spacing, oblique direction, distinct integer-valued voxels."""
    arr = (np.arange(6 * 7 * 8).reshape(6, 7, 8) * 3 - 50).astype(dtype)
    return Volume(arr, spacing=(0.8, 1.3, 2.5), origin=(-12.5, 30.25, 7.0),
                  direction=_rotation(0.17, -0.35, 0.52), name="oblique")


def _assert_same_geometry(a: Volume, b: Volume, tol=1e-3):
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


def _write_dicom_series(vol: Volume, folder: Path) -> None:
    """Write an int16 DICOM series slice by slice with position/orientation tags (test fixture)."""
    folder.mkdir()
    img = vol.to_sitk(sitk.sitkInt16)
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.4242"
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
                "0020|000d": uid + ".1", "0020|000e": uid + ".2", "0020|0013": str(k + 1),
                "0020|0037": "\\".join(repr(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0020|0032": "\\".join(repr(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0018|0050": repr(img.GetSpacing()[2])}
        for key, v in tags.items():
            s.SetMetaData(key, v)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)


# --------------------------------------------------------------------------- volumes
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"])
def test_volume_round_trip_keeps_oblique_geometry_and_values(tmp_path, ext):
    vol = _oblique_volume()
    path = tmp_path / f"vol{ext}"
    io.write_volume(vol, path)
    back = io.read_volume(path)
    _assert_same_geometry(vol, back)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.name == path.name
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_detached_header_points_at_its_final_data_file(tmp_path):
    io.write_volume(_oblique_volume(), tmp_path / "v.mhd")
    header = (tmp_path / "v.mhd").read_text(errors="replace")
    data_file = [ln.split("=")[1].strip() for ln in header.splitlines() if ln.startswith("ElementDataFile")][0]
    assert not data_file.startswith(".tmp") and (tmp_path / data_file).is_file()


def test_dicom_series_folder_and_single_file(tmp_path):
    vol = _oblique_volume()
    _write_dicom_series(vol, tmp_path / "series")
    for path in (tmp_path / "series", tmp_path / "series" / "slice003.dcm"):
        back = io.read_volume(path)
        _assert_same_geometry(vol, back)
        np.testing.assert_array_equal(back.array, vol.array)
    assert io.read_volume(tmp_path / "series").name == "series"


def test_dicom_folder_without_series_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match=str(tmp_path)):
        io.read_volume(tmp_path)


def test_write_volume_refuses_unknown_extension_and_vectors(tmp_path):
    with pytest.raises(ValueError, match="unsupported image extension"):
        io.write_volume(_oblique_volume(), tmp_path / "v.png")
    field = Volume(np.zeros((2, 3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="write_field"):
        io.write_volume(field, tmp_path / "f.nii.gz")


# --------------------------------------------------------------------------- bad image files
def _save(arr, path, is_vector=False):
    img = sitk.GetImageFromArray(arr, isVector=is_vector)
    sitk.WriteImage(img, str(path))
    return path


def test_missing_and_empty(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.nii\.gz: no such file"):
        io.read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.nii\.gz is empty"):
        io.read_volume(tmp_path / "empty.nii.gz")


@pytest.mark.parametrize("keep", ["half", "300 bytes", "all but 1 byte"])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_file_is_refused(tmp_path, ext, keep):
    """ITK zero-fills a truncated NIfTI without complaint: io must notice on its own."""
    src = _save(np.random.default_rng(0).random((20, 30, 40)).astype(np.float32), tmp_path / f"full{ext}")
    data = src.read_bytes()
    n = {"half": len(data) // 2, "300 bytes": 300, "all but 1 byte": len(data) - 1}[keep]
    bad = tmp_path / f"cut{ext}"
    bad.write_bytes(data[:n])
    with pytest.raises(ImageReadError, match=rf"cut{ext.replace('.', '[.]')}.*(truncated|corrupt|not an image)"):
        io.read_volume(bad)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_text("this is not an image")
    with pytest.raises(ImageReadError, match=r"notes\.nii\.gz is not an image"):
        io.read_volume(p)


def test_2d_and_single_slice_refused(tmp_path):
    p2 = _save(np.ones((5, 6), np.float32), tmp_path / "flat.nii.gz")
    with pytest.raises(ImageReadError, match=r"flat\.nii\.gz is a 2D image"):
        io.read_volume(p2)
    p1 = _save(np.ones((1, 5, 6), np.float32), tmp_path / "slice.mha")
    with pytest.raises(ImageReadError, match=r"slice\.mha is a single slice"):
        io.read_volume(p1)


def test_4d_refused_but_unit_time_axis_squeezed(tmp_path):
    p = _save(np.ones((3, 4, 5, 6), np.float32), tmp_path / "series4d.nii.gz")
    assert sitk.ReadImage(str(p)).GetDimension() == 4
    with pytest.raises(ImageReadError, match=r"series4d\.nii\.gz is 4D .*a 3D volume is expected"):
        io.read_volume(p)
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    q = tmp_path / "one_t.nii.gz"
    img = sitk.GetImageFromArray(arr, isVector=False)
    img.SetSpacing((1.5, 2.0, 3.0, 1.0))
    sitk.WriteImage(img, str(q))
    v = io.read_volume(q)
    assert v.shape == (4, 5, 6) and v.spacing == (1.5, 2.0, 3.0)
    np.testing.assert_array_equal(v.array, arr[0])


def test_vector_image_refused_by_read_volume(tmp_path):
    p = _save(np.zeros((3, 4, 5, 3), np.float32), tmp_path / "vec.mha", is_vector=True)
    with pytest.raises(ImageReadError, match=r"vec\.mha is a vector image"):
        io.read_volume(p)


def test_nan_inf_counted(tmp_path):
    arr = np.ones((3, 4, 5), np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 2, 3] = np.inf
    arr[2, 3, 4] = -np.inf
    p = _save(arr, tmp_path / "holes.nrrd")
    with pytest.raises(ImageReadError, match=r"holes\.nrrd contains 3 NaN/Inf"):
        io.read_volume(p)


def test_zero_size_refused(tmp_path):
    p = tmp_path / "void.nii"
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), str(p))
    with pytest.raises(ImageReadError, match=r"void\.nii has a zero-size grid"):
        io.read_volume(p)


# --------------------------------------------------------------------------- labels
def _labels_4() -> LabelMap:
    arr = np.arange(64, dtype=np.int32).reshape(4, 4, 4) % 7
    return LabelMap(arr, spacing=(1, 1, 1), origin=(0, 0, 0), name="lab")


def test_labels_round_trip_stay_integer(tmp_path):
    lab = _labels_4()
    io.write_labels(lab, tmp_path / "lab.nii.gz")
    assert sitk.ReadImage(str(tmp_path / "lab.nii.gz")).GetPixelID() == sitk.sitkUInt8
    back = io.read_labels(tmp_path / "lab.nii.gz")
    assert isinstance(back, LabelMap) and back.array.dtype == np.int32
    np.testing.assert_array_equal(back.array, lab.array)
    io.write_volume(LabelMap(lab.array - 300), tmp_path / "neg.nrrd")  # write_volume delegates
    assert sitk.ReadImage(str(tmp_path / "neg.nrrd")).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(io.read_labels(tmp_path / "neg.nrrd").array, lab.array - 300)


def test_labels_resampled_to_reference_with_nearest(tmp_path):
    lab = _labels_4()
    io.write_labels(lab, tmp_path / "lab.nii.gz")
    # Reference voxel (i, j, k) sits at physical (2i, 2j, 2k) = label voxel (2i, 2j, 2k); the last
    # reference voxel along x lies at 6 mm, beyond the labels' extent (0..3.5 mm): background.
    ref = Volume(np.zeros((2, 2, 4), np.float32), spacing=(2, 2, 2), origin=(0, 0, 0), name="ref")
    out = io.read_labels(tmp_path / "lab.nii.gz", reference=ref)
    assert out.same_grid(ref) and out.array.dtype == np.int32
    expected = np.zeros((2, 2, 4), np.int32)
    expected[:, :, :2] = lab.array[::2, ::2, ::2]
    np.testing.assert_array_equal(out.array, expected)


def test_labels_on_same_grid_take_reference_geometry(tmp_path):
    lab = _labels_4()
    io.write_labels(lab, tmp_path / "lab.mha")
    ref = Volume(np.zeros((4, 4, 4)), spacing=(1, 1, 1), origin=(1e-6, 0, 0))
    out = io.read_labels(tmp_path / "lab.mha", reference=ref)
    assert out.origin == ref.origin
    np.testing.assert_array_equal(out.array, lab.array)


def test_labels_without_overlap_refused(tmp_path):
    io.write_labels(_labels_4(), tmp_path / "lab.nii.gz")
    far = Volume(np.zeros((4, 4, 4)), spacing=(1, 1, 1), origin=(100, 0, 0), name="far")
    with pytest.raises(ImageReadError, match=r"lab\.nii\.gz does not overlap the reference image 'far'"):
        io.read_labels(tmp_path / "lab.nii.gz", reference=far)


def test_labels_non_integer_refused(tmp_path):
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 1, 1] = 2.5
    p = _save(arr, tmp_path / "soft.nii.gz")
    with pytest.raises(ImageReadError, match=r"soft\.nii\.gz holds non-integer values \(e\.g\. 2\.5"):
        io.read_labels(p)
    arr[1, 1, 1] = 3.0  # integer-valued floats are fine
    np.testing.assert_array_equal(io.read_labels(_save(arr, tmp_path / "ok.nii.gz")).array, arr.astype(int))


# --------------------------------------------------------------------------- transforms
def _transforms() -> dict[str, sitk.Transform]:
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, -5.0, 6.5))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.1, 0.1, 0.0, -0.05, 0.9, 0.2, 0.05, 0.0, 1.2))
    affine.SetTranslation((1.0, -2.0, 3.0))
    affine.SetCenter((3.0, 2.0, 1.0))
    grid = sitk.Image([8, 9, 10], sitk.sitkFloat32)
    grid.SetSpacing((2.0, 3.0, 4.0))
    grid.SetOrigin((-10.0, -12.0, -15.0))
    grid.SetDirection(tuple(_rotation(0.1, 0.2, -0.3).ravel()))
    bspline = sitk.BSplineTransformInitializer(grid, [3, 3, 3])
    bspline.SetParameters(np.random.default_rng(0).normal(0, 2, len(bspline.GetParameters())).tolist())
    disp = sitk.GetImageFromArray(np.random.default_rng(1).normal(0, 1.5, (10, 9, 8, 3)), isVector=True)
    disp.CopyInformation(grid)
    field = sitk.DisplacementFieldTransform(disp)
    composite = sitk.CompositeTransform([euler, affine, bspline, field])
    return {"euler": euler, "affine": affine, "bspline": bspline, "displacement": field, "composite": composite}


_POINTS = [(0.0, 0.0, 0.0), (1.5, -2.25, 3.3), (5.0, 5.0, -7.0), (-3.0, 4.0, 10.0)]


@pytest.mark.parametrize("ext", [".h5", ".tfm", ".txt"])
@pytest.mark.parametrize("key", ["euler", "affine", "bspline", "displacement", "composite"])
def test_transform_written_reads_back_identically_in_itk(tmp_path, key, ext):
    t = _transforms()[key]
    path = tmp_path / f"t{ext}"
    io.write_transform(Transform(t), path)
    by_itk = sitk.ReadTransform(str(path))
    ours = io.read_transform(path)
    assert ours.kind == {"euler": "rigid"}.get(key, key)
    for q in _POINTS:
        assert by_itk.TransformPoint(q) == t.TransformPoint(q)
        assert tuple(ours.transform_points([q])[0]) == t.TransformPoint(q)


def test_mat_is_linear_only(tmp_path):
    t = _transforms()
    io.write_transform(Transform(t["affine"]), tmp_path / "a.mat")
    np.testing.assert_allclose(io.read_transform(tmp_path / "a.mat").transform_points(_POINTS),
                               [t["affine"].TransformPoint(q) for q in _POINTS], atol=1e-9)
    with pytest.raises(TransformIOError, match="linear transforms only"):
        io.write_transform(Transform(t["bspline"]), tmp_path / "b.mat")


@needs_data
def test_real_ms_longitudinal_transforms_read():
    files = sorted(DATA.glob("ms_longitudinal/*/*.txt"))
    assert len(files) == 8
    for f in files:
        t = io.read_transform(f)
        assert t.kind == "affine" and isinstance(t.itk, sitk.AffineTransform)
        # Recompute from the file's own numbers: T(x) = M (x - c) + c + t.
        lines = f.read_text().splitlines()
        par = np.array([float(v) for v in lines[3].split(":")[1].split()])
        c = np.array([float(v) for v in lines[4].split(":")[1].split()])
        m, tr = par[:9].reshape(3, 3), par[9:]
        x = np.array([10.0, -20.0, 30.0])
        np.testing.assert_allclose(t.transform_points([x])[0], m @ (x - c) + c + tr, atol=1e-9)


def test_transform_errors_name_the_file(tmp_path):
    with pytest.raises(TransformIOError, match=r"gone\.h5: no such file"):
        io.read_transform(tmp_path / "gone.h5")
    (tmp_path / "empty.tfm").write_text("")
    with pytest.raises(TransformIOError, match=r"empty\.tfm is empty"):
        io.read_transform(tmp_path / "empty.tfm")
    (tmp_path / "junk.tfm").write_text("hello world\n")
    with pytest.raises(TransformIOError, match=r"junk\.tfm is not a readable ITK transform"):
        io.read_transform(tmp_path / "junk.tfm")
    (tmp_path / "pts.txt").write_text("point\n1\n1 2 3\n")
    with pytest.raises(TransformIOError, match=r"pts\.txt is an elastix point file"):
        io.read_transform(tmp_path / "pts.txt")
    with pytest.raises(TransformIOError, match="unsupported transform extension"):
        io.write_transform(Transform.identity(), tmp_path / "t.json")


# --------------------------------------------------------------------------- displacement fields
def _field() -> Volume:
    rng = np.random.default_rng(2)
    return Volume(rng.normal(0, 2.0, (5, 6, 7, 3)), spacing=(1.5, 2.0, 2.5), origin=(-4.0, 3.0, 8.0),
                  direction=_rotation(0.3, 0.1, -0.4), name="field")


def _ddf_points(img: sitk.Image) -> np.ndarray:
    t = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    return np.array([t.TransformPoint(q) for q in [(-2.0, 5.0, 9.0), (1.0, 6.5, 12.0), (3.3, 4.4, 10.5)]])


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_field_written_maps_points_like_in_memory_in_itk(tmp_path, ext):
    f = _field()
    path = tmp_path / f"ddf{ext}"
    io.write_field(f, path)
    on_disk = sitk.ReadImage(str(path))
    assert on_disk.GetNumberOfComponentsPerPixel() == 3
    # The file's geometry is stored in float32 (NIfTI) or decimal text (NRRD): 1e-6 mm, not bits.
    np.testing.assert_allclose(_ddf_points(on_disk), _ddf_points(f.to_sitk()), atol=1e-6, rtol=0)
    back = io.read_field(path)
    np.testing.assert_array_equal(_ddf_points(back.to_sitk()), _ddf_points(on_disk))
    _assert_same_geometry(f, back, tol=1e-5)
    np.testing.assert_array_equal(back.array, f.array)
    tr = io.read_transform(path)
    assert tr.kind == "displacement"
    np.testing.assert_array_equal(tr.transform_points([(1.0, 6.5, 12.0)]), _ddf_points(on_disk)[1:2])
    if ext.startswith(".nii"):
        assert int(nib.load(str(path)).header["intent_code"]) == 1007


def test_field_dispvect_intent_is_ras_and_converted(tmp_path):
    """A NIFTI_INTENT_DISPVECT file stores RAS components; it must read back as the LPS field."""
    f = _field()
    io.write_field(f, tmp_path / "lps.nii")
    img = nib.load(str(tmp_path / "lps.nii"))
    data = np.asarray(img.dataobj.get_unscaled()).copy()
    data[..., 0] *= -1
    data[..., 1] *= -1
    hdr = img.header.copy()
    hdr.set_intent(1006)
    nib.save(nib.Nifti1Image(data, None, hdr), str(tmp_path / "ras.nii"))
    back = io.read_field(tmp_path / "ras.nii")
    np.testing.assert_array_equal(back.array, f.array)


def test_field_intent_is_fixed_when_missing_and_refused_on_read(tmp_path):
    f = _field()
    io.write_field(f, tmp_path / "ok.nii")
    img = nib.load(str(tmp_path / "ok.nii"))
    hdr = img.header.copy()
    hdr.set_intent("none")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj.get_unscaled()), None, hdr), str(tmp_path / "plain.nii"))
    with pytest.raises(ImageReadError, match=r"plain\.nii has NIfTI intent code 0"):
        io.read_field(tmp_path / "plain.nii")
    io.images._ensure_vector_intent(tmp_path / "plain.nii")
    assert int(nib.load(str(tmp_path / "plain.nii")).header["intent_code"]) == 1007
    back = io.read_field(tmp_path / "plain.nii")
    _assert_same_geometry(f, back, tol=1e-5)
    np.testing.assert_array_equal(back.array, f.array)


def test_field_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\(z, y, x, 3\)"):
        io.write_field(Volume(np.zeros((2, 3, 4, 2))), tmp_path / "f.nii.gz")
    p = _save(np.zeros((3, 4, 5), np.float32), tmp_path / "scalar.nii.gz")
    with pytest.raises(ImageReadError, match=r"scalar\.nii\.gz is a scalar image"):
        io.read_field(p)


# --------------------------------------------------------------------------- landmarks
_AWKWARD = np.array([[0.1 + 0.2, -1.0 / 3.0, 12345.678901234567],
                     [-1e-7, 2.0 ** 0.5, -98.76543210987654],
                     [0.0, -0.0, 1e6 / 7.0]])


@pytest.mark.parametrize("ext", [".mrk.json", ".fcsv", ".csv", ".txt", ".pts"])
def test_landmarks_round_trip(tmp_path, ext):
    lm = Landmarks(_AWKWARD, ["a", "b, with comma", "c"])
    path = tmp_path / f"lm{ext}"
    io.write_landmarks(lm, path)
    back = io.read_landmarks(path)
    np.testing.assert_allclose(back.points, lm.points, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(back.points, lm.points)  # repr writing is exact
    if ext not in (".txt", ".pts"):
        assert back.names == lm.names


def test_slicer_files_written_in_lps(tmp_path):
    lm = Landmarks(_AWKWARD)
    io.write_landmarks(lm, tmp_path / "a.mrk.json")
    doc = json.loads((tmp_path / "a.mrk.json").read_text())
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    assert doc["markups"][0]["controlPoints"][1]["position"] == _AWKWARD[1].tolist()
    io.write_landmarks(lm, tmp_path / "a.fcsv")
    assert "# CoordinateSystem = LPS" in (tmp_path / "a.fcsv").read_text()


def test_ras_markups_json_converted_to_lps(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"id": "1", "label": "P1", "position": [10.5, -20.0, 30.0]},
                                          {"id": "2", "label": "P2", "position": [-1.0, 2.0, -3.0]}]}]}
    (tmp_path / "ras.mrk.json").write_text(json.dumps(doc))
    lm = io.read_landmarks(tmp_path / "ras.mrk.json")
    np.testing.assert_array_equal(lm.points, [[-10.5, 20.0, 30.0], [1.0, -2.0, -3.0]])
    assert lm.names == ["P1", "P2"]


@pytest.mark.parametrize("system,flip", [("RAS", True), ("0", True), ("LPS", False), ("1", False), (None, True)])
def test_fcsv_coordinate_systems(tmp_path, system, flip):
    head = "# Markups fiducial file version = 4.10\n"
    if system is not None:
        head += f"# CoordinateSystem = {system}\n"
    head += "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    rows = "vtkMRMLMarkupsFiducialNode_0,1.5,-2.5,3.5,0,0,0,1,1,1,0,F-1,,\n"
    (tmp_path / "f.fcsv").write_text(head + rows)
    lm = io.read_landmarks(tmp_path / "f.fcsv")
    expected = [-1.5, 2.5, 3.5] if flip else [1.5, -2.5, 3.5]
    np.testing.assert_array_equal(lm.points, [expected])
    assert lm.names == ["F-1"]


def test_csv_with_xyz_header_only(tmp_path):
    (tmp_path / "p.csv").write_text("X, Y ,z\n1,2,3\n4.5,-6,7e-1\n")
    lm = io.read_landmarks(tmp_path / "p.csv")
    np.testing.assert_array_equal(lm.points, [[1, 2, 3], [4.5, -6, 0.7]])
    assert lm.names == ["1", "2"]


def test_elastix_index_needs_reference(tmp_path):
    (tmp_path / "idx.txt").write_text("index\n2\n0 0 0\n1 2 3\n")
    with pytest.raises(LandmarkError, match=r"idx\.txt holds voxel indices.*reference="):
        io.read_landmarks(tmp_path / "idx.txt")
    ref = Volume(np.zeros((4, 4, 4)), spacing=(2, 3, 4), origin=(10, 20, 30))
    lm = io.read_landmarks(tmp_path / "idx.txt", reference=ref)
    np.testing.assert_allclose(lm.points, [[10, 20, 30], [12, 26, 42]])


@needs_data
def test_real_lung_landmarks():
    for which in ("fixed", "moving"):
        lm = io.read_landmarks(DATA / f"lung_landmarks/CT_3D_lung_{which}_point_set_corrected.txt")
        assert len(lm) == 51
    fixed = io.read_landmarks(DATA / "lung_landmarks/CT_3D_lung_fixed_point_set_corrected.txt")
    np.testing.assert_allclose(fixed.points[0], [-36.351, -36.974, -1204.5], atol=1e-9)


@pytest.mark.parametrize("name,text,match", [
    ("count.txt", "point\n3\n1 2 3\n4 5 6\n", r"count\.txt declares 3 points but holds 2"),
    ("word.pts", "point\n1\n1 two 3\n", r"word\.pts: point 1: 'two' is not a number"),
    ("head.txt", "points\n1\n1 2 3\n", r"head\.txt is not an elastix point file"),
    ("nohead.csv", "1,2,3\n", r"nohead\.csv: the first line must be a header naming columns x,y,z"),
    ("bad.mrk.json", "{not json", r"bad\.mrk\.json is not valid JSON"),
    ("ijk.fcsv", "# CoordinateSystem = IJK\n0,1,2,3\n", r"ijk\.fcsv: unsupported CoordinateSystem"),
    ("nan.csv", "x,y,z\nnan,1,2\n", r"nan\.csv: line 2: coordinate 'nan' is not finite"),
])
def test_bad_landmark_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(LandmarkError, match=match):
        io.read_landmarks(tmp_path / name)


def test_missing_landmark_file(tmp_path):
    with pytest.raises(LandmarkError, match=r"gone\.fcsv: no such file"):
        io.read_landmarks(tmp_path / "gone.fcsv")


# --------------------------------------------------------------------------- pairs
def test_pairs_csv_resolves_relative_paths(tmp_path):
    for n in ("f.nii.gz", "m.nii.gz", "fl.nii.gz", "fp.fcsv"):
        (tmp_path / n).write_text("x")
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "PAIRS.csv").write_text("fixed,moving,fixed_labels,moving_labels,fixed_landmarks,moving_landmarks\n"
                                   "../f.nii.gz,../m.nii.gz,../fl.nii.gz,,../fp.fcsv,\n\n")
    rows = io.read_pairs_csv(sub / "PAIRS.csv")
    assert len(rows) == 1
    r = rows[0]
    assert r["fixed"] == str(tmp_path / "f.nii.gz") and r["fixed_landmarks"] == str(tmp_path / "fp.fcsv")
    assert r["moving_labels"] is None and r["moving_landmarks"] is None


def test_pairs_csv_minimal_columns_and_errors(tmp_path):
    (tmp_path / "a.nii").write_text("x")
    (tmp_path / "P.csv").write_text("fixed,moving\na.nii,a.nii\n")
    assert io.read_pairs_csv(tmp_path / "P.csv")[0]["fixed_labels"] is None
    (tmp_path / "bad.csv").write_text("fixed,mov\na.nii,a.nii\n")
    with pytest.raises(ValueError, match=r"bad\.csv lacks column\(s\) moving"):
        io.read_pairs_csv(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("fixed,moving\na.nii,b.nii\n")
    with pytest.raises(ValueError, match=r"gone\.csv names files that do not exist: line 2 moving"):
        io.read_pairs_csv(tmp_path / "gone.csv")


# --------------------------------------------------------------------------- atomic writes
def test_failed_image_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous version")

    def broken(img, fname, *a, **k):
        Path(fname).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(RuntimeError, match=r"could not write .*out\.nii\.gz: disk full"):
        io.write_volume(_oblique_volume(), target)
    assert target.read_bytes() == b"previous version"
    with pytest.raises(RuntimeError):
        io.write_volume(_oblique_volume(), tmp_path / "new.mhd")
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]


def test_failed_landmark_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(lm, tmp):
        Path(tmp).write_text("point\n3\n")
        raise OSError("interrupted")

    monkeypatch.setattr(io.landmarks, "_write_elastix", broken)
    with pytest.raises(OSError, match="interrupted"):
        io.write_landmarks(Landmarks(_AWKWARD), tmp_path / "p.txt")
    assert os.listdir(tmp_path) == []


def test_atomic_path_names_and_missing_folder(tmp_path):
    with io.atomic_path(tmp_path / "warped.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and tmp.name.endswith("-warped.nii.gz")
        tmp.write_text("done")
    assert (tmp_path / "warped.nii.gz").read_text() == "done"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with io.atomic_path(tmp_path / "no" / "x.json"):
            pass


# --------------------------------------------------------------------------- describe
def test_describe_file_kinds(tmp_path):
    io.write_volume(_oblique_volume(), tmp_path / "img.nii.gz")
    blocks = np.zeros((6, 8, 10), np.int32)
    blocks[:3, :, 2:6], blocks[3:, 2:, :5], blocks[1:5, 4:, 6:] = 1, 7, 3
    io.write_labels(LabelMap(blocks), tmp_path / "lab.nii.gz")
    io.write_field(_field(), tmp_path / "ddf.nii.gz")
    io.write_transform(Transform(_transforms()["affine"]), tmp_path / "t.txt")
    io.write_landmarks(Landmarks(_AWKWARD), tmp_path / "p.txt")
    d = io.describe_file(tmp_path / "img.nii.gz")
    assert d["kind"] == "image" and d["size"] == [8, 7, 6]
    np.testing.assert_allclose(d["spacing"], [0.8, 1.3, 2.5], atol=1e-6)
    assert d["range"] == [-50.0, 3 * 335 - 50.0]
    d = io.describe_file(tmp_path / "lab.nii.gz")
    assert d["kind"] == "labels" and d["labels"] == [1, 3, 7] and d["n_labels"] == 3
    d = io.describe_file(tmp_path / "ddf.nii.gz")
    assert d["kind"] == "field" and d["nifti_intent"] == 1007
    d = io.describe_file(tmp_path / "t.txt")
    assert d["kind"] == "transform" and d["type"] == "affine"
    np.testing.assert_allclose(d["translation"], [1.0, -2.0, 3.0])
    d = io.describe_file(tmp_path / "p.txt")
    assert d["kind"] == "landmarks" and d["count"] == 3


# --------------------------------------------------------------------------- issue 8 fixes
def _markups(path: Path, points: list[dict], system: str = "LPS") -> Path:
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": points}]}
    path.write_text(json.dumps(doc))
    return path


def _cp(label, pos, status="defined"):
    cp = {"id": label, "label": label, "positionStatus": status}
    if pos is not None:
        cp["position"] = pos
    return cp


def test_undefined_markup_points_are_skipped_with_a_warning_naming_them(tmp_path):
    # Slicer keeps a point that was never placed at (0, 0, 0) with positionStatus "undefined"
    p = _markups(tmp_path / "f.mrk.json", [_cp("P1", [1.0, 2.0, 3.0]), _cp("P2", [0.0, 0.0, 0.0], "undefined"),
                                           _cp("P3", [4.0, 5.0, 6.0]), _cp("P4", None)])
    with pytest.warns(UserWarning, match=r"skipped 2 control point.*#2 'P2'.*#4 'P4'"):
        lm = io.read_landmarks(p)
    assert lm.names == ["P1", "P3"]
    np.testing.assert_array_equal(lm.points, [[1, 2, 3], [4, 5, 6]])


def test_landmark_pair_drops_undefined_points_on_both_sides_by_label(tmp_path):
    fixed = _markups(tmp_path / "f.mrk.json", [_cp("A", [1, 0, 0]), _cp("B", [0, 0, 0], "undefined"),
                                               _cp("C", [3, 0, 0]), _cp("D", [4, 0, 0])])
    # the moving file lists the same labels in another order; C was never placed there
    moving = _markups(tmp_path / "m.mrk.json", [_cp("D", [40, 0, 0]), _cp("C", [0, 0, 0], "undefined"),
                                                _cp("B", [20, 0, 0]), _cp("A", [10, 0, 0])], system="RAS")
    with pytest.warns(UserWarning, match=r"dropped 2 landmark pair.*by label.*'B'.*'C'"):
        fp, mp = io.read_landmark_pair(fixed, moving)
    assert fp.names == mp.names == ["A", "D"]
    np.testing.assert_array_equal(fp.points, [[1, 0, 0], [4, 0, 0]])
    np.testing.assert_array_equal(mp.points, [[-10, 0, 0], [-40, 0, 0]])   # RAS -> LPS


def test_landmark_pair_matches_by_index_when_labels_differ(tmp_path):
    fixed = _markups(tmp_path / "f.mrk.json", [_cp(f"F-{i}", [i, 0, 0]) for i in (1, 2, 3)])
    moving = _markups(tmp_path / "m.mrk.json", [_cp("M-1", [10, 0, 0]), _cp("M-2", [0, 0, 0], "undefined"),
                                                _cp("M-3", [30, 0, 0])])
    with pytest.warns(UserWarning, match=r"by index.*undefined in .*m\.mrk\.json: #2 'M-2'"):
        fp, mp = io.read_landmark_pair(fixed, moving)
    np.testing.assert_array_equal(fp.points[:, 0], [1, 3])
    np.testing.assert_array_equal(mp.points[:, 0], [10, 30])
    io.write_landmarks(Landmarks([[1.0, 1, 1]], ["X"]), tmp_path / "one.csv")
    with pytest.raises(LandmarkError, match="hold 3 and 1 points"):
        io.read_landmark_pair(fixed, tmp_path / "one.csv")


def test_pairs_csv_rows_keep_landmarks_matched(tmp_path):
    from app.engine.evaluation import load_pair
    vol = _oblique_volume()
    io.write_volume(vol, tmp_path / "v.nii.gz")
    _markups(tmp_path / "f.mrk.json", [_cp("A", [1, 0, 0]), _cp("B", [2, 0, 0])])
    _markups(tmp_path / "m.mrk.json", [_cp("A", [1, 0, 0]), _cp("B", [0, 0, 0], "undefined")])
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_landmarks,moving_landmarks\n"
                                        "v.nii.gz,v.nii.gz,f.mrk.json,m.mrk.json\n")
    row = io.read_pairs_csv(tmp_path / "pairs.csv")[0]
    with pytest.warns(UserWarning, match="'B'"):
        data = load_pair(row)
    assert data["fixed_points"].names == data["moving_points"].names == ["A"]


def _nifti_with_nonfinite(path: Path, shape=(5, 6, 7), extra=()) -> np.ndarray:
    a = np.random.default_rng(0).random(shape + tuple(extra)).astype(np.float32)
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.inf
    a[4, 5, 6] = -np.inf
    nib.save(nib.Nifti1Image(a, np.diag([1.5, 1.0, 2.0, 1.0])), str(path))
    return a


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_nan_and_inf_voxels_are_refused_like_other_formats(tmp_path, ext):
    p = tmp_path / f"nan{ext}"
    _nifti_with_nonfinite(p)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(p)))).all()   # ITK hides them as 0
    with pytest.raises(ImageReadError, match=r"contains 3 NaN/Inf voxel values \(of 210\)"):
        io.read_volume(p)
    with pytest.raises(ImageReadError, match="3 NaN/Inf"):
        io.read_labels(p)
    assert io.describe_file(p)["nonfinite_voxels"] == 3
    # the same data as NRRD: refused with the same message (ITK keeps NaN there)
    nrrd = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.transpose(_nifti_with_nonfinite(tmp_path / "x.nii"), (2, 1, 0))), str(nrrd))
    with pytest.raises(ImageReadError, match=r"contains 3 NaN/Inf voxel values \(of 210\)"):
        io.read_volume(nrrd)


def test_nifti_field_with_nan_is_refused(tmp_path):
    field = Volume(np.zeros((4, 5, 6, 3), np.float32), (1.0, 1.0, 1.0))
    io.write_field(field, tmp_path / "f.nii.gz")
    img = nib.load(str(tmp_path / "f.nii.gz"))
    data = np.asanyarray(img.dataobj).copy()
    data.reshape(-1)[7] = np.nan
    nib.save(nib.Nifti1Image(data, None, img.header), str(tmp_path / "f.nii.gz"))
    with pytest.raises(ImageReadError, match="1 NaN/Inf"):
        io.read_field(tmp_path / "f.nii.gz")


def test_integer_nifti_is_not_reread(tmp_path, monkeypatch):
    io.write_volume(_oblique_volume(np.int16), tmp_path / "i.nii.gz")
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled",
                        lambda self: (_ for _ in ()).throw(AssertionError("integer data read twice")))
    assert io.read_volume(tmp_path / "i.nii.gz").array.dtype == np.float32


def test_convert_keeps_the_dicom_pixel_type_unless_asked(tmp_path):
    vol = _oblique_volume()
    _write_dicom_series(vol, tmp_path / "series")
    out = io.convert_image(tmp_path / "series", tmp_path / "kept.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "kept.nii.gz"))
    assert back.GetPixelID() == sitk.sitkInt16 and out.array.dtype == np.int16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), vol.array)
    _assert_same_geometry(vol, io.read_volume(tmp_path / "kept.nii.gz"))
    io.convert_image(tmp_path / "series", tmp_path / "f.nrrd", dtype="float32")
    assert sitk.ReadImage(str(tmp_path / "f.nrrd")).GetPixelID() == sitk.sitkFloat32
    with pytest.raises(ValueError, match=r"outside the range of int8"):
        io.convert_image(tmp_path / "series", tmp_path / "small.nii.gz", dtype="int8")
    assert not (tmp_path / "small.nii.gz").exists()
