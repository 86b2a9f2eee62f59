"""Viewer tests: slice geometry and compositing (headless), then the Qt + VTK views (``gui``).

Run the GUI part under a virtual display:
    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest tests/test_gui_views.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine.types import RegistrationResult, Transform, Volume
from app.viewer import compositing as comp
from app.viewer.slice_geometry import make_plane, sample, sample_point

# Qt aborts the whole process when it cannot open a display: skip (not crash) without one
_NO_DISPLAY = (not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
               and os.environ.get("QT_QPA_PLATFORM", "xcb") == "xcb")


def gui(test):
    """Mark a test as needing a display (``-m gui``) and skip it where there is none."""
    return pytest.mark.gui(pytest.mark.skipif(_NO_DISPLAY, reason="needs a display: run under xvfb-run")(test))


def _rotation_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _box_volume(direction=np.eye(3), spacing=(1.0, 1.0, 3.0), origin=None) -> Volume:
    """40 x 40 x 20 voxels (centred on LPS 0 unless ``origin`` is given) with a bright box at
    physical x in [-5, 5), y in [-10, 10), z in [-9, 15)."""
    arr = np.full((20, 40, 40), 10.0, np.float32)
    if origin is None:
        origin = -np.asarray(direction) @ (np.asarray(spacing) * np.array([39, 39, 19]) / 2)
    vol = Volume(arr, spacing, origin, direction, "box")
    k, j, i = np.meshgrid(np.arange(20), np.arange(40), np.arange(40), indexing="ij")
    p = vol.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], 1)).reshape(20, 40, 40, 3)
    inside = (np.abs(p[..., 0]) < 5) & (np.abs(p[..., 1]) < 10) & (p[..., 2] >= -9) & (p[..., 2] < 15)
    arr[inside] = 200.0
    return vol


# ----------------------------------------------------------------------------- headless
def test_plane_of_permuted_volume_is_an_exact_slice():
    # IXI-like direction: index x -> P, y -> S, z -> R (a signed permutation)
    d = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float)
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((6, 5, 4)).astype(np.float32), (2.0, 3.0, 4.0), (10, -5, 3), d)
    plane = make_plane(vol, "axial")
    # axial: u = +x (from -index z), v = -y (from -index x); pixels = voxel centres, spacing kept
    assert tuple(plane.spacing_uv) == (4.0, 2.0) and plane.size_uv == (6, 4)
    vals, inside = sample(vol, plane, order=1)
    assert inside.all()
    pts = plane.pixel_points()
    expect = np.array([[sample_point(vol, p) for p in row] for row in pts])
    np.testing.assert_allclose(vals, expect, rtol=1e-6)


def test_oblique_sampling_matches_simpleitk():
    vol = _box_volume(_rotation_z(30), spacing=(1.0, 1.5, 3.0))
    plane = make_plane(vol, "coronal", cursor=(0.0, 0.0, 0.0))
    vals, inside = sample(vol, plane, order=1)
    pts = plane.pixel_points()[inside]
    assert len(pts) > 500
    img = vol.to_sitk()
    # SimpleITK's resampler on a grid whose voxels are the plane's pixels
    grid = sitk.Image(int(plane.size_uv[0]), int(plane.size_uv[1]), 1, sitk.sitkFloat32)
    grid.SetSpacing((float(plane.spacing_uv[0]), float(plane.spacing_uv[1]), 1.0))
    grid.SetOrigin(tuple(map(float, plane.to_lps(*plane.origin_uv))))
    grid.SetDirection(tuple(np.stack([plane.u, plane.v, plane.n], 1).ravel()))
    res = sitk.GetArrayFromImage(sitk.Resample(img, grid, sitk.Transform(), sitk.sitkLinear, 0.0))[0]
    core = inside.copy()
    core[[0, -1], :] = False
    core[:, [0, -1]] = False
    np.testing.assert_allclose(vals[core], res[core], atol=1e-3)


@pytest.mark.parametrize("with_field", [False, True])
def test_plane_jacobian_equals_the_full_map(with_field):
    """Per-slice Jacobian / displacement (what the views draw) == the engine's full-volume maps."""
    from app.engine import spatial
    from app.viewer.viewer_state import ViewerState
    d = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float)       # IXI-like permuted axes
    rng = np.random.default_rng(1)
    fixed = Volume(rng.random((9, 10, 11)).astype(np.float32), (2.0, 1.5, 3.0), (4, -2, 7), d, "f")
    t = sitk.BSplineTransform(3, 3)
    img = fixed.to_sitk()
    t.SetTransformDomainOrigin(img.GetOrigin())
    t.SetTransformDomainDirection(img.GetDirection())
    t.SetTransformDomainPhysicalDimensions([sz * sp for sz, sp in zip(img.GetSize(), img.GetSpacing())])
    t.SetTransformDomainMeshSize([2, 2, 2])
    t.SetParameters(tuple(rng.normal(0, 2.5, len(t.GetParameters()))))
    tr = Transform(t, "bspline")
    full_field = spatial.transform_to_field(tr, fixed)
    st = ViewerState()
    st.set_layer("fixed", fixed)
    st.set_layer("moving", fixed)
    st.set_result(RegistrationResult(tr, fixed, field=full_field if with_field else None))
    full_det = spatial.jacobian_map(full_field)
    for o in ("axial", "coronal", "sagittal"):
        for where in ("first", "middle", "last"):
            plane = make_plane(fixed, o)
            plane = plane.with_offset({"first": plane.offset_range[0], "middle": plane.offset,
                                       "last": plane.offset_range[1]}[where])
            expect, _ = sample(full_det, plane, 0)
            np.testing.assert_allclose(st.plane_jacobian(plane), expect, rtol=1e-4, atol=1e-4, err_msg=f"{o} {where}")
            disp = st.plane_displacement(plane)[0]
            for c in range(3):
                ec, _ = sample(full_field.with_array(full_field.array[..., c]), plane, 0)
                np.testing.assert_allclose(disp[..., c], ec, atol=1e-4)


def test_compose_modes_are_exact():
    base = np.array([[0.2, 0.4], [0.6, 0.8]], np.float32)
    ov = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    ins = np.ones((2, 2), bool)
    none = comp.compose(base, ins)
    assert (none[..., 0] == np.round(base * 255)).all() and (none[..., 3] == 255).all()
    blend = comp.compose(base, ins, overlay=ov, mode="blend", opacity=0.25)
    np.testing.assert_array_equal(blend[..., 1], np.round((0.75 * base + 0.25 * ov) * 255))
    chk = comp.compose(base, ins, overlay=ov, mode="checkerboard", checker=np.array([[1, 0], [0, 1]], bool))
    np.testing.assert_array_equal(chk[..., 2], np.round(np.array([[1.0, 0.4], [0.6, 0.5]]) * 255))
    diff = comp.compose(base, ins, overlay=ov, mode="difference")
    np.testing.assert_array_equal(diff[..., 0], np.round(np.abs(ov - base) * 255))
    assert (comp.compose(base, ins, overlay=ov, mode="flicker", flicker_phase=0) == none).all()
    fl1 = comp.compose(base, ins, overlay=ov, mode="flicker", flicker_phase=1)
    np.testing.assert_array_equal(fl1[..., 0], np.round(ov * 255))
    jac = comp.compose(base, ins, jacobian=np.array([[1.0, -0.5], [4.0, 0.25]]))
    assert tuple(jac[0, 1, :3]) == tuple(np.round(comp.FOLDING_RGB * 255))  # folding fully highlighted
    assert jac[1, 0, 0] > jac[1, 0, 2] and jac[1, 1, 2] > jac[1, 1, 0]  # expansion red, compression blue
    outside = comp.compose(base, np.array([[True, False], [True, True]]))
    assert outside[0, 1, 3] == 0


def test_checker_and_label_edges():
    m = comp.checker_mask(np.arange(4) + 0.5, np.arange(4) + 0.5, 2.0)
    np.testing.assert_array_equal(m.astype(int), [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    lab = np.zeros((5, 5), int)
    lab[1:3, 1:4] = 7
    segs = comp.label_edges(lab, (0.0, 0.0), (1.0, 2.0))
    assert len(segs) == 2 * 2 + 2 * 3  # perimeter of a 3 x 2 block in pixel edges
    # one vertical edge of the block lies between columns 0 and 1: u = 0.5
    assert np.any(np.isclose(segs[:, :, 0], 0.5).all(1))


def test_vtk_adapter_keeps_geometry():
    from app.widgets import vtk_adapter
    vol = _box_volume(_rotation_z(20), spacing=(0.8, 1.2, 3.0), origin=(5, -7, 11))
    img = vtk_adapter.volume_to_vtk(vol)
    assert img.GetDimensions() == vol.size_xyz
    back = vtk_adapter.vtk_to_volume(img)
    assert back.same_grid(vol) and np.array_equal(back.array, vol.array)
    # VTK's own index -> physical agrees with the Volume's
    p = [0.0, 0.0, 0.0]
    img.TransformContinuousIndexToPhysicalPoint((3, 4, 5), p)
    np.testing.assert_allclose(p, vol.index_to_physical([3, 4, 5])[0], atol=1e-9)


# ----------------------------------------------------------------------------- GUI
def _pixels_equal(a, b, tol=1):
    return np.all(np.abs(a.astype(int) - b.astype(int)) <= tol)


@pytest.fixture(scope="module")
def window(qapp, tmp_path_factory):
    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow
    w = MainWindow(confirm_close=False, autosave_dir=tmp_path_factory.mktemp("autosave"))
    w.replace_policy = "clear"          # never a modal question in these tests
    w.resize(1000, 760)
    w.show()
    qapp.processEvents()
    d = demo_pair()
    assert w.load_pair(d["fixed"], d["moving"], d.get("fixed_labels"), d.get("moving_labels"))
    _settle(qapp, w)
    yield w
    w.close()
    qapp.processEvents()


def _settle(qapp, w):
    for _ in range(3):
        qapp.processEvents()
    for v in w.slice_views.values():
        v.flush()


@pytest.fixture
def fresh(window, qapp):
    """The shared window with default overlay settings, cursor at the centre, no result."""
    import dataclasses

    from app.viewer.viewer_state import OverlaySettings
    st = window.state
    st.set_result(None)
    st.set_overlay(**dataclasses.asdict(OverlaySettings()))
    window.set_interaction("cursor")
    for layer in ("fixed", "moving"):
        st.set_window(layer, *comp.auto_window(getattr(st, layer).array))
    if window.landmark_panel is not None:
        window.landmark_panel.clear()
    st.set_cursor(st.centre_voxel())
    for b in list(window.error_boxes):
        b.close()
    _settle(qapp, window)
    return window


def _bg():
    from app.widgets.slice_view import BACKGROUND
    return np.round(np.array(BACKGROUND) * 255)


@gui
def test_loading_the_demo_fills_the_views(fresh):
    w = fresh
    for name, v in w.slice_views.items():
        px = v.grab_pixels()
        h, wd, _ = px.shape
        assert _pixels_equal(px[1, 1], _bg()), f"{name}: corner {px[1, 1]} is not the background"
        # the slice's own pixels: the rendered image region around the centre is a brain MR
        x0, y0 = v.lps_to_display(v.state.cursor)
        cy, cx = int(round(h - 1 - y0)), int(round(x0))
        patch = px[cy - 15: cy + 15, cx - 15: cx + 15].astype(float)
        assert patch.mean() > 60, f"{name}: image region too dark ({patch.mean():.0f})"
        image_mask = np.any(np.abs(px.astype(int) - _bg()) > 2, axis=2)
        assert image_mask.mean() > 0.3, f"{name}: only {image_mask.mean():.0%} of the view shows the image"
    px3d = w.view3d.grab_pixels()
    assert px3d.std() > 10
    assert "fixed:" in w.cursor_label.text() and "moving:" in w.cursor_label.text()


@gui
def test_views_keep_physical_aspect_and_orientation(qapp, qtbot):
    """A box 10 x 20 x 24 mm on an anisotropic, rotated grid renders with its physical shape."""
    from app.widgets.slice_view import SliceView
    from app.viewer.viewer_state import ViewerState
    st = ViewerState()
    views = {o: SliceView(st, o) for o in ("axial", "coronal", "sagittal")}
    for v in views.values():
        qtbot.addWidget(v)
        v.resize(260, 280)
        v.show()
    st.set_layer("fixed", _box_volume(_rotation_z(30), spacing=(1.0, 1.0, 3.0)))
    st.set_cursor((0.0, 0.0, 0.0))
    qapp.processEvents()
    # physical box extents along (u, v) of each view, from the LPS box above
    expect = {"axial": (10, 20), "coronal": (10, 24), "sagittal": (20, 24)}
    for o, v in views.items():
        px = v.grab_pixels()
        grey = (np.ptp(px.astype(int), axis=2) < 8)   # not the coloured letters or crosshair
        bright = (px[..., 0] > 180) & grey
        ys, xs = np.nonzero(bright)
        w_mm = (xs.max() - xs.min() + 1) * v.renderer.GetActiveCamera().GetParallelScale() * 2 / px.shape[0]
        h_mm = (ys.max() - ys.min() + 1) * v.renderer.GetActiveCamera().GetParallelScale() * 2 / px.shape[0]
        ew, eh = expect[o]
        # the grid is rotated 30 deg about z, so in-plane edges of the axial view are resampled
        assert abs(w_mm - ew) < 3.5 and abs(h_mm - eh) < 4.5, f"{o}: {w_mm:.1f} x {h_mm:.1f} mm, want {ew} x {eh}"
        # the box centre (0, 0, 3) lands where lps_to_display says
        cx, cy = v.lps_to_display((0.0, 0.0, 3.0))
        assert abs((xs.min() + xs.max()) / 2 - cx) < 3 and abs((ys.min() + ys.max()) / 2 - (px.shape[0] - 1 - cy)) < 3
    # orientation: a marker at the patient's left-anterior-superior shows right / up / right
    vol = st.fixed
    lo, hi = vol.physical_bounds()
    centre = (lo + hi) / 2
    arr = np.full(vol.array.shape, 10.0, np.float32)
    idx = np.round(vol.physical_to_index([centre + [8.0, -8.0, 12.0]])[0]).astype(int)  # left, anterior, superior
    arr[idx[2], idx[1] - 1: idx[1] + 2, idx[0] - 1: idx[0] + 2] = 250
    st.set_layer("fixed", vol.with_array(arr))
    st.set_cursor(vol.index_to_physical(idx)[0])
    qapp.processEvents()
    for o, (right, up) in {"axial": (True, True), "coronal": (True, True), "sagittal": (False, True)}.items():
        px = views[o].grab_pixels()
        ys, xs = np.nonzero((px[..., 0] > 200) & (np.ptp(px.astype(int), axis=2) < 8))
        h = px.shape[0]
        cx, cy = views[o].lps_to_display(centre)
        assert (xs.mean() > cx) == right, f"{o}: marker on the wrong side horizontally"
        assert ((h - 1 - ys.mean()) > cy) == up, f"{o}: marker on the wrong side vertically"
    for v in views.values():
        v.close_vtk()


@gui
def test_clicking_moves_the_cursor_in_all_views(fresh, qtbot, qapp):
    from PySide6.QtCore import QPoint, Qt
    w = fresh
    ax, cor, sag = (w.slice_views[o] for o in ("axial", "coronal", "sagittal"))
    before = {o: v.grab_pixels() for o, v in w.slice_views.items()}
    target = w.state.cursor + np.array([15.0, -20.0, 0.0])  # 15 mm to the left, 20 mm anterior
    x, y = ax.lps_to_widget(target)
    with qtbot.waitSignal(ax.cursor_moved, timeout=2000):
        qtbot.mouseClick(ax.vtk_widget, Qt.LeftButton, Qt.NoModifier, QPoint(x, y))
    _settle(qapp, w)
    c = w.state.cursor
    px_mm = ax.renderer.GetActiveCamera().GetParallelScale() * 2 / ax.render_window.GetSize()[1]
    assert np.allclose(c[:2], target[:2], atol=1.5 * px_mm + 1e-6), (c, target)
    assert np.isclose(c[2], target[2]) and np.isclose(c[2], ax.plane.offset)
    assert np.isclose(cor.plane.offset, cor.plane.with_offset(c @ cor.plane.n).offset)
    assert np.isclose(sag.plane.offset, sag.plane.with_offset(c @ sag.plane.n).offset)
    after = {o: v.grab_pixels() for o, v in w.slice_views.items()}
    for o in ("coronal", "sagittal"):
        assert not _pixels_equal(before[o], after[o], tol=3), f"{o} did not follow the cursor"
    # the crosshair in the coronal view passes through the cursor
    cx, cy = cor.lps_to_display(c)
    col = after["coronal"][:, int(round(cx))]
    from app.widgets.slice_view import CROSSHAIR_RGB
    assert np.any(np.all(np.abs(col.astype(int) - np.round(np.array(CROSSHAIR_RGB) * 255)) < 60, axis=1))
    assert f"{c[0]:.1f}" in w.cursor_label.text()


@gui
def test_wheel_scrolls_slices(fresh, qapp):
    from PySide6.QtCore import QPoint, QPointF, Qt
    from PySide6.QtGui import QWheelEvent
    w = fresh
    ax = w.slice_views["axial"]
    z0, k0 = w.state.cursor[2], ax.plane.slice_index
    pos = QPointF(50, 50)
    ev = QWheelEvent(pos, ax.vtk_widget.mapToGlobal(pos), QPoint(0, 0), QPoint(0, 120), Qt.NoButton,
                     Qt.NoModifier, Qt.NoScrollPhase, False)
    qapp.sendEvent(ax.vtk_widget, ev)
    _settle(qapp, w)
    assert ax.plane.slice_index == k0 + 1
    assert np.isclose(w.state.cursor[2], z0 + ax.plane.step)   # superior = +z in LPS
    ax.scroll(-3)
    _settle(qapp, w)
    assert ax.plane.slice_index == k0 - 2


@gui
def test_window_level_drag_and_zoom(fresh, qtbot, qapp):
    from PySide6.QtCore import QEvent, QPointF, Qt
    from PySide6.QtGui import QMouseEvent
    w = fresh
    ax = w.slice_views["axial"]
    before = ax.grab_pixels()
    w.set_interaction("window")
    wl0 = w.state.window_of("fixed")
    widget = ax.vtk_widget

    def send(kind, x, y, button, buttons):
        ev = QMouseEvent(kind, QPointF(x, y), widget.mapToGlobal(QPointF(x, y)), button, buttons, Qt.NoModifier)
        qapp.sendEvent(widget, ev)

    send(QEvent.MouseButtonPress, 100, 100, Qt.LeftButton, Qt.LeftButton)
    send(QEvent.MouseMove, 160, 130, Qt.NoButton, Qt.LeftButton)
    send(QEvent.MouseButtonRelease, 160, 130, Qt.LeftButton, Qt.NoButton)
    _settle(qapp, w)
    wl1 = w.state.window_of("fixed")
    assert wl1[0] > wl0[0] and wl1[1] != wl0[1]
    assert not _pixels_equal(before, ax.grab_pixels(), tol=3)
    w.overlay_panel.apply_preset("Auto (0.5-99.5 %)")
    assert np.allclose(w.state.window_of("fixed"), wl0)
    scale0 = ax.renderer.GetActiveCamera().GetParallelScale()
    send(QEvent.MouseButtonPress, 100, 100, Qt.RightButton, Qt.RightButton)
    send(QEvent.MouseMove, 100, 60, Qt.NoButton, Qt.RightButton)   # drag up = zoom in
    send(QEvent.MouseButtonRelease, 100, 60, Qt.RightButton, Qt.NoButton)
    assert ax.renderer.GetActiveCamera().GetParallelScale() < scale0
    w.reset_views()
    assert np.isclose(ax.renderer.GetActiveCamera().GetParallelScale(), scale0)
    w.set_interaction("cursor")


def _fake_result(state) -> RegistrationResult:
    """An affine 'run' (scale 1.08 about the centre, shift 6 mm) without calling a paradigm."""
    from app.engine import spatial
    fixed, moving = state.fixed, state.moving
    lo, hi = fixed.physical_bounds()
    t = sitk.AffineTransform(3)
    t.SetCenter(tuple(map(float, (lo + hi) / 2)))
    t.SetMatrix(tuple((np.eye(3) * 1.08).ravel()))
    t.SetTranslation((6.0, -4.0, 3.0))
    tr = Transform(t, "affine")
    return RegistrationResult(tr, spatial.resample(moving, fixed, tr), field=spatial.transform_to_field(tr, fixed),
                              paradigm="test-affine")


@gui
@pytest.mark.parametrize("setting", [
    {"mode": "blend", "opacity": 0.6}, {"mode": "checkerboard", "checker_mm": 16.0}, {"mode": "difference"},
    {"mode": "flicker", "flicker_ms": 60000}, {"contours_fixed": True}, {"contours_warped": True}, {"grid": True, "grid_every_vox": 5},
    {"jacobian": True}])
def test_each_overlay_changes_the_rendered_image(fresh, qapp, setting):
    w = fresh
    w.add_run(_fake_result(w.state), {})
    _settle(qapp, w)
    ax = w.slice_views["axial"]
    base = ax.grab_pixels()
    w.state.set_overlay(**setting)
    if setting.get("mode") == "flicker":
        w.state.set_flicker_phase(1)
    _settle(qapp, w)
    px = ax.grab_pixels()
    assert _pixels_equal(px[1, 1], _bg()), "background corner changed"
    changed = np.any(np.abs(px.astype(int) - base.astype(int)) > 3, axis=2)
    assert changed.mean() > 0.002, f"{setting}: only {changed.sum()} pixels changed"
    if setting.get("mode") == "flicker":
        w.state.set_flicker_phase(0)
        _settle(qapp, w)
        assert _pixels_equal(ax.grab_pixels(), base, tol=1), "flicker phase 0 must show the fixed image"
    if setting.get("jacobian"):
        assert ax.scalar_bar.GetVisibility()


@gui
def test_blend_extremes_equal_single_images(fresh, qapp):
    w = fresh
    ax = w.slice_views["axial"]
    fixed_only = ax.grab_pixels()
    w.state.set_overlay(mode="blend", opacity=0.0, source="moving")
    _settle(qapp, w)
    assert _pixels_equal(ax.grab_pixels(), fixed_only, tol=1)
    w.state.set_overlay(opacity=1.0)
    _settle(qapp, w)
    moving_only = ax.grab_pixels()
    w.state.set_overlay(mode="flicker", flicker_ms=60000)     # no timer tick during the check
    w.state.set_flicker_phase(1)
    _settle(qapp, w)
    assert _pixels_equal(ax.grab_pixels(), moving_only, tol=1)
    assert not _pixels_equal(moving_only, fixed_only, tol=3)


@gui
def test_corrupt_file_gives_a_dialog_and_keeps_the_data(fresh, qapp, tmp_path):
    from PySide6.QtWidgets import QMessageBox
    w = fresh
    fixed_before = w.state.fixed
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file" * 10)
    assert w.load_layer("fixed", bad) is False
    assert w.load_layer("moving_labels", tmp_path / "missing.nii.gz") is False
    qapp.processEvents()
    boxes = [b for b in w.error_boxes if b.isVisible()]
    assert len(boxes) == 2 and all(isinstance(b, QMessageBox) for b in boxes)
    assert "broken.nii.gz" in boxes[0].text()
    assert w.state.fixed is fixed_before and w.state.moving_labels is not None
    for b in boxes:
        b.close()
    qapp.processEvents()
    assert not w.error_boxes
    # still usable: the views render the old data
    px = w.slice_views["axial"].grab_pixels()
    assert np.any(np.abs(px.astype(int) - _bg()) > 20)


@gui
def test_failed_and_cancelled_runs_keep_the_result(fresh, qapp):
    w = fresh
    panel = w.registration_panel
    if panel is None:
        pytest.skip("registration panel (part B) not available")
    res = _fake_result(w.state)
    panel.run_started.emit()
    assert not any(a.isEnabled() for a in w.load_actions)      # no new inputs during a run
    panel.run_finished.emit(res, {"dice_mean": 0.5})
    assert w.state.result is res and w.state.overlay.source == "warped" and w.unsaved_results
    assert all(a.isEnabled() for a in w.load_actions)
    panel.run_started.emit()
    panel.run_cancelled.emit()
    assert w.state.result is res and all(a.isEnabled() for a in w.load_actions)
    panel.run_started.emit()
    panel.run_failed.emit("out of memory")
    qapp.processEvents()
    assert w.state.result is res
    assert any("out of memory" in b.text() for b in w.error_boxes)
    _settle(qapp, w)
    assert "warped:" in w.cursor_label.text()
    # the metrics panel's history switches the warped layer between runs
    res2 = _fake_result(w.state)
    panel.run_finished.emit(res2, {})
    assert w.state.result is res2
    if w.metrics_panel is not None:
        w.metrics_panel.select_run(len(w.runs) - 2)
        assert w.state.result is res


@gui
def test_picking_landmarks_in_the_views(fresh, qtbot, qapp):
    from PySide6.QtCore import QPoint, Qt

    from app.widgets.slice_view import LANDMARK_FIXED_RGB
    w = fresh
    lp = w.landmark_panel
    if lp is None:
        pytest.skip("landmark panel (part B) not available")
    ax = w.slice_views["axial"]
    st = w.state
    w.set_interaction("pick", "fixed")
    assert st.interaction == "pick" and lp.pick_target == "fixed"
    target = st.cursor + np.array([-20.0, 10.0, 0.0])
    with qtbot.waitSignal(ax.clicked, timeout=2000):
        qtbot.mouseClick(ax.vtk_widget, Qt.LeftButton, Qt.NoModifier, QPoint(*ax.lps_to_widget(target)))
    _settle(qapp, w)
    pairs = lp.pairs()
    assert len(pairs) == 1 and np.allclose(pairs[0]["fixed"][:2], target[:2], atol=2.0)
    assert len(st.fixed_points) == 1
    # the glyph: a ring of the fixed-landmark colour around the point
    px = ax.grab_pixels()
    x, y = ax.lps_to_display(pairs[0]["fixed"])
    h = px.shape[0]
    patch = px[int(h - 1 - y) - 12: int(h - 1 - y) + 13, int(x) - 12: int(x) + 13].astype(int)
    colour = np.round(np.array(LANDMARK_FIXED_RGB) * 255)
    assert np.any(np.all(np.abs(patch - colour) < 40, axis=2)), "no landmark glyph drawn"
    # picking on the moving image shows the moving image, and the overlay comes back afterwards
    w.set_interaction("pick", "moving")
    assert st.overlay.mode == "blend" and st.overlay.source == "moving" and st.overlay.opacity == 1.0
    with qtbot.waitSignal(ax.clicked, timeout=2000):
        qtbot.mouseClick(ax.vtk_widget, Qt.LeftButton, Qt.NoModifier, QPoint(*ax.lps_to_widget(target + 3)))
    assert lp.pair_count(complete_only=True) == 1
    lp.pick_target = None            # the panel's own buttons end picking too
    assert st.interaction == "cursor" and st.overlay.mode == "none"
    assert w.registration_inputs()["fixed_points"] is not None
    auto = lp.autosave_path
    assert auto is not None and auto.exists() and len(json.loads(auto.read_text())["pairs"]) == 1


@gui
def test_dropped_files_are_opened_by_name(fresh, qapp):
    from app.gui import demo_pair
    w = fresh
    d = demo_pair()
    before = dict(w.state.paths)
    w.load_files([d["fixed_labels"], d["moving"], d["fixed"], d["moving_labels"]])
    assert w.state.paths == before      # each file went back to its own layer, by name
    assert [r for r, _ in w._roles_for([Path("a.nii.gz"), Path("b_seg.nii.gz"), Path("c.nii.gz")])] == \
        ["fixed", "fixed_labels", "moving"]
    # a real drop of two files (fixed, moving by name)
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDropEvent
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(d["moving"])), QUrl.fromLocalFile(str(d["fixed"]))])
    fixed_before = w.state.fixed
    w.dropEvent(QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))
    assert w.state.fixed is not fixed_before and w.state.paths == before
    assert not w.error_boxes


@gui
def test_session_roundtrip(fresh, qapp, tmp_path):
    from app.widgets.main_window import MainWindow
    w = fresh
    w.add_run(_fake_result(w.state), {"dice_mean": 0.42})
    w.state.set_overlay(mode="checkerboard", checker_mm=12.0, contours_fixed=True)
    w.state.set_window("fixed", 400.0, 250.0)
    target = w.state.cursor + np.array([4.0, 6.0, -8.0])
    w.state.set_cursor(target)
    path = tmp_path / "s.json"
    w.save_session(path)
    w2 = MainWindow(confirm_close=False, autosave_dir=tmp_path)
    w2.resize(700, 500)
    w2.show()
    try:
        assert w2.open_session(path)
        assert w2.state.overlay.mode == "checkerboard" and w2.state.overlay.checker_mm == 12.0
        assert w2.state.windows["fixed"] == (400.0, 250.0)
        assert np.allclose(w2.state.cursor, target)
        assert w2.state.paths["fixed"] == w.state.paths["fixed"]
        assert w2.state.fixed_labels is not None
        assert len(w2.runs) == len(w.runs) and w2.state.result is not None
        assert w2.state.result.transform.kind in ("affine", "composite")
        if w2.metrics_panel is not None:
            assert len(w2.metrics_panel.runs()) == len(w.runs)
    finally:
        w2.close()
        qapp.processEvents()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert w.open_session(bad) is False and w.error_boxes


@gui
def test_save_results_writes_every_output(fresh, tmp_path):
    from app.engine import io
    w = fresh
    with pytest.raises(ValueError, match="no registration result"):
        w.save_results(tmp_path / "none")
    res = _fake_result(w.state)
    w.add_run(res, {"dice_mean": 0.4})
    files = w.save_results(tmp_path / "out")
    names = {p.name for p in files}
    assert {"warped.nii.gz", "transform.h5", "transform.tfm", "field.nii.gz", "metrics.json", "runs.json"} <= names
    assert all(p.exists() for p in files)
    pts = w.state.fixed.index_to_physical([[10, 20, 30], [60, 60, 45]])
    for name in ("transform.tfm", "transform.h5"):
        t = io.read_transform(tmp_path / "out" / name)
        np.testing.assert_allclose(t.transform_points(pts), res.transform.transform_points(pts), atol=1e-4)
    field = io.read_field(tmp_path / "out" / "field.nii.gz")
    assert field.array.shape == (*w.state.fixed.shape, 3) and field.same_grid(w.state.fixed)
    assert not w.unsaved_results
