"""Compact run storage for sessions (headless): exact linear parts, bounded field error."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine.types import Transform, Volume
from app.viewer.transform_store import read_transform_compact, write_transform_compact


def _field_transform(shape=(9, 10, 11), spacing=(2.0, 1.5, 3.0), seed=0) -> sitk.Transform:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 3.0, (*shape, 3))
    d = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float)        # oblique-permuted, anisotropic
    img = sitk.GetImageFromArray(a, isVector=True)
    img.SetSpacing(spacing)
    img.SetOrigin((4.0, -2.0, 7.0))
    img.SetDirection(tuple(d.ravel()))
    return sitk.DisplacementFieldTransform(img)


def test_composite_round_trip_keeps_order_exact_linear_and_bounded_field_error(tmp_path):
    aff = sitk.AffineTransform(3)
    aff.SetMatrix((1.05, 0.02, 0.0, -0.01, 0.97, 0.03, 0.0, 0.01, 1.02))
    aff.SetTranslation((3.0, -4.0, 1.5))
    aff.SetCenter((1.0, 2.0, 3.0))
    t = Transform(aff, "affine").then(Transform(_field_transform(), "displacement"))
    path = write_transform_compact(t, tmp_path / "run.npz", max_error_mm=0.005)
    back = read_transform_compact(path)
    assert back.kind == "composite"
    vol = Volume(np.zeros((9, 10, 11), np.float32), (2.0, 1.5, 3.0), (4.0, -2.0, 7.0),
                 np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float))
    rng = np.random.default_rng(1)
    pts = vol.index_to_physical(rng.uniform(0, 8, (300, 3)))
    err = np.abs(back.transform_points(pts) - t.transform_points(pts))
    # the field is interpolated from grid values each within 0.005 mm; the affine is exact and
    # maps the error through its matrix (norm < 1.1)
    assert err.max() <= 0.005 * 1.1 * 3 + 1e-9
    assert err.max() > 0                                   # quantised, not stored verbatim
    # the affine alone is bit-exact
    a2 = read_transform_compact(write_transform_compact(Transform(aff, "affine"), tmp_path / "a.npz"))
    np.testing.assert_allclose(a2.transform_points(pts), Transform(aff).transform_points(pts), atol=1e-9)
    assert a2.kind == "affine"


def test_field_is_much_smaller_than_itk_h5(tmp_path):
    from scipy.ndimage import gaussian_filter

    from app.engine import io
    rng = np.random.default_rng(0)
    a = np.stack([gaussian_filter(rng.normal(0, 20, (40, 48, 48)), 4) for _ in range(3)], -1)
    img = sitk.GetImageFromArray(a, isVector=True)
    t = Transform(sitk.DisplacementFieldTransform(img), "displacement")
    io.write_transform(t, tmp_path / "t.h5")
    write_transform_compact(t, tmp_path / "t.npz")
    assert (tmp_path / "t.npz").stat().st_size * 5 < (tmp_path / "t.h5").stat().st_size


def test_bad_files_are_value_errors(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable RegStation transform"):
        read_transform_compact(bad)
    with pytest.raises(ValueError, match="max_error_mm"):
        write_transform_compact(Transform.identity(), tmp_path / "y.npz", max_error_mm=0)
