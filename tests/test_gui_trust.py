"""Trust what you see in the workstation (``gui``): the error-map overlay of a run, landmark-guided
correction as a new run, and the stale-data rules for both. Small synthetic pairs keep it quick:

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest -q tests/test_gui_trust.py
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine.types import LabelMap, RegistrationResult, Transform, Volume

pytestmark = pytest.mark.gui

SHAPE = (16, 20, 18)                       # z, y, x


def _oblique_direction() -> np.ndarray:
    r = sitk.Euler3DTransform()
    r.SetRotation(0.15, -0.1, 0.2)
    return np.array(r.GetMatrix()).reshape(3, 3)


def _image(shift_mm: float = 0.0, oblique: bool = False, tag: str = "img") -> Volume:
    """Blobs on an anisotropic grid (1.2 x 1.0 x 1.6 mm); ``shift_mm`` moves them along x (LPS)."""
    spacing, origin = (1.2, 1.0, 1.6), (-10.0, -9.0, -12.0)
    direction = _oblique_direction() if oblique else np.eye(3)
    geo = Volume(np.zeros(SHAPE, np.float32), spacing, origin, direction)
    zyx = np.indices(SHAPE).reshape(3, -1).T
    pts = geo.index_to_physical(zyx[:, ::-1]).reshape(*SHAPE, 3) - np.array([shift_mm, 0, 0])
    img = np.zeros(SHAPE)
    for c, s, a in (((0, 0, 0), 5.0, 100.0), ((4, 3, -2), 2.5, 60.0), ((-4, -3, 3), 2.0, 80.0)):
        img += a * np.exp(-np.sum((pts - np.array(c)) ** 2, -1) / (2 * s * s))
    return Volume(img.astype(np.float32) + 5.0, spacing, origin, direction, name=tag)


def _labels(vol: Volume) -> LabelMap:
    return LabelMap((vol.array > 40).astype(np.int16), vol.spacing, vol.origin, vol.direction)


def _write(folder, oblique: bool):
    from app.engine import io
    out = {}
    for tag, shift in (("fixed", 0.0), ("moving", 2.5), ("other", 1.0)):
        v = _image(shift, oblique, tag)
        out[tag] = folder / f"{tag}.nii.gz"
        io.write_volume(v, out[tag])
        out[f"{tag}_labels"] = folder / f"{tag}_labels.nii.gz"
        io.write_labels(_labels(v), out[f"{tag}_labels"])
    return out


def _window(qtbot, tmp_path, files):
    from app.widgets.main_window import MainWindow
    w = MainWindow(confirm_close=False, autosave_dir=tmp_path / "autosave")
    qtbot.addWidget(w)
    w.resize(1100, 750)
    w.show()
    assert w.load_pair(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"])
    return w


@pytest.fixture
def files(tmp_path):
    return _write(tmp_path, oblique=False)


@pytest.fixture
def win(qtbot, tmp_path, files):
    w = _window(qtbot, tmp_path, files)
    yield w
    w.close()


def _run(w, dx=1.5, metrics=None):
    """A finished run (a translation by ``dx`` mm: a wrong one, the true shift is 2.5 mm)."""
    from app.engine.spatial import resample
    t = Transform(sitk.TranslationTransform(3, (-dx, 0.0, 0.0)), "rigid")
    res = RegistrationResult(t, resample(w.state.moving, w.state.fixed, t), paradigm="iterative", device="cpu")
    w.registration_panel.run_finished.emit(res, metrics or {"paradigm": "iterative"})
    return res


def _wait(w, job):
    assert job is not None
    assert w.engine.wait(job, 120_000)


# ----------------------------------------------------------------------------- error map overlay
def test_error_map_overlay_shows_the_estimate_at_a_known_voxel(win, qtbot, tmp_path):
    from app.engine.errormap import estimate_error_map
    from app.viewer import compositing as comp
    w = win
    tp, st = w.trust_panel, w.state
    res = _run(w)
    assert not tp.show_box.isChecked() and st.error_map is None
    assert not w.overlay_panel.error_map_box.isEnabled()
    assert tp.compute_button.isEnabled() and not tp.goto_button.isEnabled()
    qtbot.mouseClick(tp.compute_button, qtbot_button())
    job = tp.error_job
    assert job is not None and not tp.compute_button.isEnabled()      # one at a time
    _wait(w, job)
    assert job.thread_ident != threading.get_ident()                   # computed on the engine thread
    expected, info = estimate_error_map("iterative", st.fixed, st.moving, res, method="dissimilarity")
    assert st.error_map is not None and res.error_map is st.error_map
    np.testing.assert_allclose(st.error_map.array, expected.array, rtol=1e-6, atol=1e-6)
    assert st.overlay.error_map and tp.show_box.isChecked()            # model -> view
    assert w.overlay_panel.error_map_box.isEnabled() and w.overlay_panel.error_map_box.isChecked()
    m = w.runs[0].metrics
    assert m["error_map_p95_mm"] == pytest.approx(info["error_map_p95_mm"])
    assert m["error_map_method"] == "dissimilarity"

    # the worst voxel: status bar and overlay pixel
    k, j, i = np.unravel_index(np.argmax(expected.array), expected.shape)
    xyz = st.fixed.index_to_physical([[i, j, k]])[0]
    st.set_cursor(xyz)
    assert f"est. error: {expected.array[k, j, i]:.2f} mm" in w.cursor_label.text()
    view = w.slice_views["axial"]
    view.flush()
    plane = view.plane
    u, v, _ = plane.from_lps(xyz)
    col = int(round((u - plane.origin_uv[0]) / plane.spacing_uv[0]))
    row = int(round((v - plane.origin_uv[1]) / plane.spacing_uv[1]))
    sampled = view._samples["error_map"][1]
    assert sampled[row, col] == pytest.approx(expected.array[k, j, i], rel=1e-4)
    with_map = view.rgba[row, col, :3].astype(float)
    top = st.error_scale_mm()
    assert top >= np.percentile(expected.array, 99) and view.error_bar.GetVisibility()
    assert view.error_lut.GetRange() == pytest.approx((0.0, top))
    rgb, alpha = comp.error_rgba(np.array([expected.array[k, j, i]]), top)
    w.overlay_panel.error_map_box.setChecked(False)                    # view -> model
    assert not st.overlay.error_map and not tp.show_box.isChecked()
    view.flush()
    assert not view.error_bar.GetVisibility()
    without = view.rgba[row, col, :3].astype(float)
    blended = without / 255 * (1 - alpha[0]) + rgb[0] * alpha[0]
    np.testing.assert_allclose(with_map / 255, blended, atol=1.5 / 255)
    assert np.abs(with_map - without).max() > 10

    # the metrics panel says where the largest errors are, and its link moves the cursor there
    mp = w.metrics_panel
    rows = {mp.summary_table.verticalHeaderItem(r).text(): r for r in range(mp.summary_table.rowCount())}
    assert mp.summary_table.item(rows["Est. error p95 (mm)"], 1).text() == f"{info['error_map_p95_mm']:.2f}"
    assert mp.error_link.isVisibleTo(mp) and "go there" in mp.error_link.text()
    mp.error_link.linkActivated.emit("#peak")
    np.testing.assert_allclose(st.cursor, info["error_map_peak_mm"], atol=1e-6)
    st.set_cursor(st.centre_voxel())
    qtbot.mouseClick(tp.goto_button, qtbot_button())
    np.testing.assert_allclose(st.cursor, info["error_map_peak_mm"], atol=1e-6)
    # saved with the run's results
    written = [p.name for p in w.save_results(tmp_path / "results")]
    assert "error_map.nii.gz" in written


def qtbot_button():
    from PySide6.QtCore import Qt
    return Qt.LeftButton


def test_consistency_re_registers_with_progress_and_can_be_cancelled(win, qtbot):
    w = win
    tp, st = w.trust_panel, w.state
    params = {"stages": "rigid", "levels": "2,1", "linear_iterations": 15}
    _run(w, metrics={"paradigm": "iterative", "params": params})
    messages = []
    assert tp.compute_error_map("consistency")
    job = tp.error_job
    job.on_progress = (lambda f: (lambda p: (messages.append(p.message), f(p))))(job.on_progress)
    assert tp.cancel_button.isEnabled() and tp.progress_bar.isVisibleTo(tp)
    _wait(w, job)
    assert job.state == "done", job.error
    assert w.runs[0].metrics["error_map_method"] == "consistency"
    assert "inverse_consistency_mean_mm" in w.runs[0].metrics
    assert any("error map (consistency)" in m for m in messages)
    first = st.error_map
    assert first is not None and not tp.progress_bar.isVisibleTo(tp)
    # cancelled: nothing changes, the panel says so
    assert tp.compute_error_map("consistency")
    job = tp.error_job
    qtbot.mouseClick(tp.cancel_button, qtbot_button())
    _wait(w, job)
    assert job.state == "cancelled" and st.error_map is first
    assert "cancelled" in tp.error_label.text() and tp.compute_button.isEnabled()


# ----------------------------------------------------------------------------- stale data
def test_replacing_the_image_clears_the_error_map(win, qtbot, files):
    w = win
    tp, st = w.trust_panel, w.state
    _run(w)
    tp.compute_error_map()
    _wait(w, tp.error_job)
    st.set_cursor(st.centre_voxel())
    assert "est. error" in w.cursor_label.text()
    # keep the runs: their error maps were estimated on the old image and are dropped
    w.replace_policy = "keep"
    assert w.load_layer("fixed", files["other"])
    assert len(w.runs) == 1 and w.runs[0].result.error_map is None
    assert not any(k.startswith("error_map_") for k in w.runs[0].metrics)
    w.select_run(0)
    assert st.error_map is None and "est. error" not in w.cursor_label.text()
    w.slice_views["axial"].flush()
    assert not w.slice_views["axial"].error_bar.GetVisibility()
    assert not w.metrics_panel.error_link.isVisibleTo(w.metrics_panel)
    # a map still being computed when the image changes is dropped too
    assert tp.compute_error_map()
    w.replace_policy = "clear"
    assert w.load_layer("moving", files["other"])
    w.engine.wait_idle(60_000)
    assert w.runs == [] and st.error_map is None and not tp.compute_button.isEnabled()


# ----------------------------------------------------------------------------- guided correction
def test_guides_are_picked_in_the_views_apart_from_the_landmarks(win, qtbot):
    w = win
    gp, lp = w.guide_panel, w.landmark_panel
    _run(w)
    qtbot.mouseClick(gp.pick_fixed_button, qtbot_button())
    assert gp.pick_target == "fixed" and w.state.interaction == "pick" and lp.pick_target is None
    p = w.state.centre_voxel()
    w.slice_views["axial"].clicked.emit(p)
    assert w.workspace.guides.point_count("fixed") == 1 and len(w.workspace.landmarks) == 0
    np.testing.assert_allclose(w.state.guide_fixed_points, [p])
    qtbot.mouseClick(gp.pick_moving_button, qtbot_button())
    assert w.state.overlay.source == "moving"              # picking on the moving image shows it
    w.slice_views["axial"].clicked.emit(p + [2.0, 0, 0])
    assert w.workspace.guides.pair_count(complete_only=True) == 1
    # guides never enter a registration or the TRE of the runs
    assert w.registration_inputs()["fixed_points"] is None
    assert w.runs[0].metrics.get("tre_mean_mm") is None
    # picking a landmark stops picking guides
    qtbot.mouseClick(lp.pick_fixed_button, qtbot_button())
    assert gp.pick_target is None and lp.pick_target == "fixed"
    w.slice_views["axial"].clicked.emit(p)
    assert len(w.workspace.landmarks) == 1 and w.workspace.guides.point_count("fixed") == 1
    # and back: picking guides while picking landmarks
    qtbot.mouseClick(gp.pick_fixed_button, qtbot_button())
    assert gp.pick_target == "fixed" and lp.pick_target is None and w.state.interaction == "pick"
    w.slice_views["axial"].clicked.emit(p)
    assert len(w.workspace.landmarks) == 1 and w.workspace.guides.point_count("fixed") == 2
    w.set_interaction("cursor")
    assert lp.pick_target is None and gp.pick_target is None and w.state.interaction == "cursor"
    view = w.slice_views["axial"]
    view.flush()
    assert view._guide_fixed[1].GetVisibility() and view._guide_moving[1].GetVisibility()


def test_correct_adds_a_run_that_maps_the_guides_onto_their_partners(qtbot, tmp_path):
    files = _write(tmp_path, oblique=True)                 # an oblique, anisotropic grid
    w = _window(qtbot, tmp_path, files)
    try:
        tp, ws = w.trust_panel, w.workspace
        res = _run(w, dx=1.0)
        ws.runs.rename(0, "rigid try")
        ws.landmarks.add_point("fixed", (0.0, 0.0, 0.0))              # an evaluation landmark
        ws.landmarks.add_point("moving", (2.5, 0.0, 0.0))
        assert not tp.correct_button.isEnabled()
        assert tp.guide_method_combo.currentData() == "optimise"                  # the default
        tp.guide_method_combo.setCurrentIndex(tp.guide_method_combo.findData("rbf"))
        f = np.array([[0.0, 0.0, 0.0], [4.0, 3.0, -2.0], [-4.0, -3.0, 3.0]])
        m = res.transform.transform_points(f) + np.array([[1.5, 0.0, 0.0], [1.2, 0.3, 0.0], [1.6, -0.2, 0.4]])
        for a, b in zip(f, m):
            tp.guide_panel.add_point("fixed", a)
            tp.guide_panel.add_point("moving", b)
        assert tp.correct_button.isEnabled() and "3 guides" in tp.correct_button.text()
        qtbot.mouseClick(tp.correct_button, qtbot_button())
        job = tp.correct_job
        _wait(w, job)
        assert job.state == "done", job.error
        assert job.thread_ident != threading.get_ident()
        assert len(w.runs) == 2 and ws.runs.current == 1
        new = w.runs[1]
        assert new.name == "rigid try + correction (3 guides)"
        assert w.state.result is new.result and w.runs[0].result is res     # the uncorrected run is kept
        err = np.linalg.norm(new.result.transform.transform_points(f) - m, axis=1)
        assert err.max() < 1.0, err
        before = np.linalg.norm(res.transform.transform_points(f) - m, axis=1)
        g = new.metrics["guidance"]
        assert g["guides"] == 3 and g["guide_tre_before_mm"] == pytest.approx(before.mean(), rel=1e-6)
        assert new.metrics["guide_tre_mm"] == pytest.approx(g["guide_tre_after_mm"]) and g["guide_tre_after_mm"] < 1.0
        assert new.metrics["corrected_from"] == "rigid try" and new.metrics["dice_mean"] is not None
        # the evaluation landmark is measured on the new run, not used as a guide
        assert new.metrics["tre_mean_mm"] is not None and len(new.metrics["tre_per_point_mm"]) == 1
        # the guide table shows the residual of the run on screen; the metrics panel compares both runs
        _, after = tp.guide_panel.tre()
        assert np.nanmax(after) < 1.0
        assert "guide TRE" in tp.correct_label.text()
        mp = w.metrics_panel
        rows = {mp.summary_table.verticalHeaderItem(r).text(): r for r in range(mp.summary_table.rowCount())}
        assert mp.summary_table.item(rows["Guide TRE (mm)"], 1).text() == f"{g['guide_tre_after_mm']:.2f}"
        ct = mp.compare_table
        assert [ct.horizontalHeaderItem(c).text() for c in range(ct.columnCount())][1:] == \
            ["rigid try", "rigid try + correction (3 guides)"]
        w.select_run(0)
        _, after0 = tp.guide_panel.tre()
        np.testing.assert_allclose(after0, before, atol=1e-6)
    finally:
        w.close()


def test_image_aware_correction_runs_on_the_engine_thread_with_progress_and_can_be_cancelled(qtbot, tmp_path):
    files = _write(tmp_path, oblique=True)                 # an oblique, anisotropic grid
    w = _window(qtbot, tmp_path, files)
    try:
        tp, ws = w.trust_panel, w.workspace
        res = _run(w, dx=1.0)
        f = np.array([[0.0, 0.0, 0.0], [4.0, 3.0, -2.0]])
        m = res.transform.transform_points(f) + np.array([[1.5, 0.0, 0.0], [1.2, 0.3, 0.0]])
        for a, b in zip(f, m):
            tp.guide_panel.add_point("fixed", a)
            tp.guide_panel.add_point("moving", b)
        tp.guide_method_combo.setCurrentIndex(tp.guide_method_combo.findData("optimise"))   # the user's choice
        values = []
        qtbot.mouseClick(tp.correct_button, qtbot_button())
        job = tp.correct_job
        assert job is not None and tp.progress_bar.maximum() == 1000 and tp.cancel_button.isEnabled()
        assert not tp.guide_method_combo.isEnabled()
        tp.progress_bar.valueChanged.connect(values.append)
        _wait(w, job)
        assert job.state == "done", job.error
        assert job.thread_ident != threading.get_ident()
        assert values and max(values) > 0                                   # the optimiser reported progress
        new = w.runs[1]
        g = new.metrics["guidance"]
        assert g["method"] == "optimise" and g["guide_tre_after_mm"] < 1.0 < g["guide_tre_before_mm"]
        assert np.linalg.norm(new.result.transform.transform_points(f) - m, axis=1).max() < 1.0
        assert "image-aware" in tp.correct_label.text()
        # cancelled: no new run, the panel says so
        w.select_run(0)
        assert tp.correct("optimise")
        job = tp.correct_job
        qtbot.mouseClick(tp.cancel_button, qtbot_button())
        _wait(w, job)
        assert job.state == "cancelled" and len(w.runs) == 2
        assert "cancelled" in tp.correct_label.text() and tp.correct_button.isEnabled()
        with pytest.raises(ValueError, match="guide method"):
            tp.correct("tps")
    finally:
        w.close()


def test_guides_survive_a_session_and_are_autosaved(win, tmp_path):
    import json
    w = win
    w.workspace.guides.add_point("fixed", (1.0, 2.0, 3.0))
    w.workspace.guides.add_point("moving", (2.0, 2.0, 3.0))
    auto = json.loads((tmp_path / "autosave" / "guides.json").read_text())
    assert auto["pairs"][0]["moving"] == [2.0, 2.0, 3.0]
    w.save_session(tmp_path / "s.json")
    w.workspace.guides.clear()
    assert w.open_session(tmp_path / "s.json")
    np.testing.assert_allclose(w.workspace.guides.fixed_landmarks().points, [[1.0, 2.0, 3.0]])
    assert len(w.workspace.landmarks) == 0
    assert w.guide_panel.autosave_path == tmp_path / "s.guides.json" and (tmp_path / "s.guides.json").exists()


def test_side_by_side_runs_show_both_error_maps_on_one_scale(win, qtbot):
    w = win
    tp, ws = w.trust_panel, w.workspace
    for dx in (0.5, 2.5):
        _run(w, dx=dx)
        tp.compute_error_map()
        _wait(w, tp.error_job)
    ws.guides.add_point("fixed", w.state.centre_voxel())
    w.set_view_layout("runs")
    sbs = w.side_by_side
    sbs.set_run_b(0)
    left, right = sbs.left_state, sbs.right_state
    assert left.error_map is ws.runs[1].result.error_map and right.error_map is ws.runs[0].result.error_map
    tops = [s.error_map.array for s in (left, right)]
    top = left.error_scale_mm()
    assert top == right.error_scale_mm() and top >= max(np.percentile(a, 99) for a in tops) - 1e-6
    sbs.flush()
    for v in sbs.views():
        assert v.error_bar.GetVisibility() and v.error_lut.GetRange() == pytest.approx((0.0, top))
        assert v._guide_fixed[1].GetVisibility()
    # a new map for A redraws the mirrors
    w.select_run(1)
    ws.set_error_map(1, ws.runs[1].result.error_map.with_array(np.zeros(w.state.fixed.shape, np.float32)), {})
    assert not left.error_map.array.any()


def test_the_fixed_moving_layout_places_guides_while_guides_are_picked(win, qtbot):
    w = win
    gp, ws = w.guide_panel, w.workspace
    w.set_view_layout("landmarks")
    sbs = w.side_by_side
    left, right = sbs.views()
    qtbot.mouseClick(gp.pick_fixed_button, qtbot_button())
    assert sbs.pick_guides
    p = w.state.centre_voxel()
    left.clicked.emit(p)
    right.clicked.emit(p + [1.0, 0, 0])
    assert ws.guides.pair_count(complete_only=True) == 1 and len(ws.landmarks) == 0
    assert "1 guide point" in sbs.left_head.text()
    np.testing.assert_allclose(sbs.left_state.fixed_points, [p])
    qtbot.mouseClick(gp.pick_off_button, qtbot_button())
    assert not sbs.pick_guides
    left.clicked.emit(p)
    assert len(ws.landmarks) == 1 and ws.guides.point_count("fixed") == 1
    qtbot.mouseClick(gp.pick_moving_button, qtbot_button())
    w.set_interaction("cursor")                 # the toolbar ends guide picking too
    assert gp.pick_target is None and not sbs.pick_guides


# ----------------------------------------------------------------------------- dsm similarity map overlay
def test_dsm_similarity_map_overlay_checkbox_colour_bar_and_read_out(win, qtbot):
    from app.engine.spatial import resample
    from app.viewer import compositing as comp
    w, st = win, win.state
    op = w.overlay_panel
    _run(w)                                                            # a run without a map
    assert st.similarity_map is None and not op.similarity_map_box.isEnabled()
    t = Transform(sitk.TranslationTransform(3, (-2.5, 0.0, 0.0)), "rigid")
    res = RegistrationResult(t, resample(st.moving, st.fixed, t), paradigm="dsm", device="cpu")
    prob = np.full(st.fixed.shape, np.nan, np.float32)
    prob[4:12, 5:15, 4:14] = np.linspace(0.0, 1.0, 10)[None, :, None]  # disagree at low y, agree at high y
    res.similarity_map = st.fixed.with_array(prob)
    w.registration_panel.run_finished.emit(res, {"paradigm": "dsm"})
    assert st.similarity_map is res.similarity_map and op.similarity_map_box.isEnabled()
    assert not st.overlay.similarity_map
    op.similarity_map_box.setChecked(True)                             # view -> model
    assert st.overlay.similarity_map and w.toggle_actions["similarity_map"].isChecked()
    k, j, i = 8, 5, 9                                                  # P = 0: full disagreement
    xyz = st.fixed.index_to_physical([[i, j, k]])[0]
    st.set_cursor(xyz)
    assert "dsm P(match): 0.00" in w.cursor_label.text()
    view = w.slice_views["axial"]
    view.flush()
    assert view.agreement_bar.GetVisibility() and view.agreement_lut.GetRange() == pytest.approx((0.0, 1.0))
    plane = view.plane
    u, v, _ = plane.from_lps(xyz)
    col = int(round((u - plane.origin_uv[0]) / plane.spacing_uv[0]))
    row = int(round((v - plane.origin_uv[1]) / plane.spacing_uv[1]))
    with_map = view.rgba[row, col, :3].astype(float)
    st.set_overlay(similarity_map=False)                               # model -> view
    assert not op.similarity_map_box.isChecked()
    view.flush()
    assert not view.agreement_bar.GetVisibility()
    without = view.rgba[row, col, :3].astype(float)
    rgb, alpha = comp.disagreement_rgba(np.array([0.0]))
    np.testing.assert_allclose(with_map / 255, without / 255 * (1 - alpha[0]) + rgb[0] * alpha[0], atol=1.5 / 255)
    st.set_cursor(st.fixed.index_to_physical([[0, 0, 0]])[0])          # not scored there: no read-out
    assert "dsm P(match)" not in w.cursor_label.text()
