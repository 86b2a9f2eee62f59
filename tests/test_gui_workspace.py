"""The main window never shows stale data, layers unload, the window fits small screens (``gui``).

Small synthetic images (written to a temporary folder) keep these tests quick:
    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest tests/test_gui_workspace.py
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine.types import LabelMap, RegistrationResult, Transform, Volume

pytestmark = pytest.mark.gui


def _write_pair(folder, tag: str, shift_vox: int = 0):
    """A 16^3 image with a labelled cube (1.5 mm voxels) and its label map; returns paths."""
    from app.engine import io
    lab = np.zeros((16, 16, 16), np.int16)
    lab[5:10, 5:10, 5 + shift_vox:10 + shift_vox] = 1
    lab[2:4, 10:14, 3:6] = 2
    vol = Volume((lab * 80 + 10).astype(np.float32), (1.5, 1.5, 1.5), (-12.0, -12.0, -12.0), name=tag)
    img, seg = folder / f"{tag}.nii.gz", folder / f"{tag}_labels.nii.gz"
    io.write_volume(vol, img)
    io.write_labels(LabelMap(lab, (1.5, 1.5, 1.5), (-12.0, -12.0, -12.0)), seg)
    return img, seg


@pytest.fixture
def files(tmp_path):
    out = {}
    for tag, shift in (("fixed", 0), ("moving", 2), ("other", 1)):
        out[tag], out[f"{tag}_labels"] = _write_pair(tmp_path, tag, shift)
    return out


@pytest.fixture
def win(qtbot, tmp_path, files):
    from app.widgets.main_window import MainWindow
    w = MainWindow(confirm_close=False, autosave_dir=tmp_path / "autosave")
    qtbot.addWidget(w)
    w.resize(1100, 700)
    w.show()
    assert w.load_pair(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"])
    yield w
    w.close()


def _run(w, dice=0.5):
    t = Transform(sitk.TranslationTransform(3, (3.0, 0.0, 0.0)), "rigid")
    from app.engine.spatial import resample
    res = RegistrationResult(t, resample(w.state.moving, w.state.fixed, t), paradigm="fake", device="cpu")
    w.registration_panel.run_finished.emit(res, {"dice_mean": dice})
    return res


def _answer_dialog(qtbot, button: str):
    """Click ``button`` ('clear' / 'keep' / 'cancel') of the next modal dialog."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QPushButton
    seen = {}

    def click():
        box = QApplication.activeModalWidget()
        if box is None:
            QTimer.singleShot(10, click)
            return
        seen["text"] = box.text()
        box.findChild(QPushButton, button).click()
    QTimer.singleShot(0, click)
    return seen


def test_replacing_the_moving_image_asks_and_clears_its_labels_landmarks_and_runs(win, qtbot, files):
    w = win
    lp = w.landmark_panel
    lp.add_point("fixed", (0.0, 0.0, 0.0))
    lp.add_point("moving", (1.0, 0.0, 0.0))
    _run(w)
    assert w.state.result is not None and len(w.runs) == 1 and w.metrics_panel.runs()
    # cancel: nothing changes
    seen = _answer_dialog(qtbot, "cancel")
    moving_before = w.state.moving
    assert not w.load_layer("moving", files["other"])
    assert "moving labels" in seen["text"] and "1 moving landmark" in seen["text"] and "1 registration run" in seen["text"]
    assert w.state.moving is moving_before and len(w.runs) == 1
    # clear: the other subject's image comes without the old labels, points, runs, metrics
    _answer_dialog(qtbot, "clear")
    assert w.load_layer("moving", files["other"])
    assert w.state.moving is not moving_before and w.state.paths["moving"].endswith("other.nii.gz")
    assert w.state.moving_labels is None and "moving_labels" not in w.state.paths
    assert w.state.fixed_labels is not None                       # the fixed side is untouched
    assert w.state.result is None and w.runs == [] and w.metrics_panel.runs() == []
    assert lp.point_count("moving") == 0 and lp.point_count("fixed") == 1
    assert w.registration_inputs()["moving_labels"] is None


def test_keeping_stale_data_is_the_users_choice(win, qtbot, files):
    w = win
    _run(w)
    _answer_dialog(qtbot, "keep")
    assert w.load_layer("fixed", files["other"])
    assert w.state.fixed_labels is not None and len(w.runs) == 1
    assert w.state.result is None           # the shown result was computed on the old image


def test_nothing_to_lose_loads_without_a_dialog(win, files):
    w = win
    w.state.set_layer("moving_labels", None)
    w.replace_policy = "ask"
    # no labels, landmarks or runs depend on the moving image: no question
    assert w.stale_if_replaced("moving") == []
    assert w.load_layer("moving", files["other"])


def test_layers_unload_from_the_menu(win, qtbot):
    w = win
    w.replace_policy = "clear"
    _run(w)
    w.unload_actions["moving_labels"].trigger()
    assert w.state.moving_labels is None and len(w.runs) == 1       # labels alone: runs stay
    w.unload_actions["fixed"].trigger()
    assert w.state.fixed is None and w.state.fixed_labels is None and w.runs == []
    assert w.state.reference is w.state.moving                         # the views show what is left
    w.slice_views["axial"].flush()
    w.act_unload_all.trigger()
    assert all(getattr(w.state, r) is None for r in ("fixed", "moving", "fixed_labels", "moving_labels"))
    assert w.cursor_label.text() == "no image loaded"
    for v in w.slice_views.values():
        v.flush()


# ----------------------------------------------------------------------------- layout and feedback
def test_window_fits_a_1366x768_screen_whatever_the_paradigm(win, qtbot, monkeypatch):
    from PySide6.QtWidgets import QApplication

    from app.widgets import registration_checkpoint as rc
    # the layout is under test, not the checkpoints: no torch import on the engine thread
    monkeypatch.setattr(rc, "_probe_checkpoints", lambda key, chosen: {"paths": [], "chosen": None, "card": "",
                                                                      "error": "no checkpoint (test)"})
    monkeypatch.setattr(rc, "_probe_cuda", lambda: False)
    w = win
    w.fit_to_screen()
    avail = QApplication.primaryScreen().availableGeometry()
    assert w.width() <= avail.width() and w.height() <= avail.height()
    size = w.size()
    p = w.registration_panel
    for key in p._keys():
        p.set_paradigm(key)
        qtbot.wait(20)
        hint = w.minimumSizeHint()
        # room for a 1366 x 768 laptop (title bar and task bar take ~70 px)
        assert hint.width() <= 1366 and hint.height() <= 768 - 70, (key, hint)
        assert w.size() == size, f"the window grew for {key}: {w.size()}"
    # the Run button stays on screen: the panel scrolls only below its minimum height
    run = p.run_button
    top_left = run.mapTo(w, run.rect().topLeft())
    assert 0 <= top_left.y() and top_left.y() + run.height() <= w.height()


def test_quitting_during_a_run_asks_first(win, qtbot, monkeypatch):
    from PySide6.QtWidgets import QMessageBox
    w = win
    w.confirm_close = True
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.No)
    w.registration_panel.run_started.emit()
    w.close()
    assert asked and "registration is running" in asked[0] and w.isVisible()
    w.registration_panel.run_cancelled.emit()
    w.confirm_close = False
    w.close()
    assert not w.isVisible()


def test_dialogs_start_next_to_the_data_and_open_shows_dicom(win, files, tmp_path):
    from app.widgets import main_window
    w = win
    assert w.data_dir() == str(files["fixed"].parent.resolve())
    assert w.landmark_panel.data_dir() == w.data_dir() == w.metrics_panel.data_dir()
    assert "*.dcm" in main_window.IMAGE_FILTER.split(";;")[0]
    w.session_path = tmp_path / "sessions" / "s.json"
    assert w.data_dir() == str(tmp_path / "sessions")


def test_sessions_keep_each_runs_recipe_and_stay_small(win, tmp_path, qtbot):
    from app.engine import io, spatial
    w = win
    fixed = w.state.fixed
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter
    a = np.stack([gaussian_filter(rng.normal(0, 8, fixed.array.shape), 3) for _ in range(3)], -1)
    img = sitk.GetImageFromArray(a, isVector=True)
    img.CopyInformation(fixed.to_sitk())
    t = Transform(sitk.DisplacementFieldTransform(img), "displacement")
    for i in range(3):
        res = RegistrationResult(t, spatial.resample(w.state.moving, fixed, t), paradigm="unsupervised",
                                 params={"diffeomorphic": bool(i % 2), "steps": 7}, checkpoint_id=f"ck{i}.pt",
                                 device="cpu")
        w.registration_panel.run_finished.emit(res, {"dice_mean": 0.5 + i / 10})
    table = tmp_path / "t.ctbl"
    table.write_text("1 cube 255 0 0 255\n")
    assert w.load_colour_table(table)
    w.workspace.runs.rename(0, "first try")
    path = tmp_path / "s.json"
    w.save_session(path)
    run_files = sorted((tmp_path / "s_runs").iterdir())
    assert [p.name for p in run_files] == ["run1.npz", "run2.npz", "run3.npz"]
    io.write_transform(t, tmp_path / "itk.h5")
    assert sum(p.stat().st_size for p in run_files) < (tmp_path / "itk.h5").stat().st_size
    from app.widgets.main_window import MainWindow
    w2 = MainWindow(confirm_close=False, autosave_dir=tmp_path / "a2")
    qtbot.addWidget(w2)
    assert w2.open_session(path)
    assert [r["result"].paradigm for r in w2.runs] == ["unsupervised"] * 3
    assert w2.runs[1]["result"].params == {"diffeomorphic": True, "steps": 7}
    assert w2.runs[2]["result"].checkpoint_id == "ck2.pt"
    assert w2.runs[0].name == "first try" and w2.runs[1].name == w.runs[1].name
    assert w2.state.label_table[1][0] == "cube" and w2.metrics_panel.label_names["1"] == "cube"
    pts = fixed.index_to_physical([[3, 4, 5], [10, 8, 2]])
    np.testing.assert_allclose(w2.runs[0]["result"].transform.transform_points(pts), t.transform_points(pts), atol=0.02)
    # saving again with fewer runs leaves no stale run files behind
    w.clear_runs()
    w.save_session(path)
    assert not list((tmp_path / "s_runs").glob("run*"))
    w2.close()


def test_files_are_read_and_written_on_the_engine_thread(win, files, tmp_path, monkeypatch):
    import threading
    import time

    from PySide6.QtCore import QTimer

    from app.widgets import session, window_layers
    w = win
    threads, ticks = [], []
    real_read, real_write = window_layers.read_layer, session.write_session

    def slow_read(*a, **k):
        threads.append(threading.get_ident())
        time.sleep(0.3)                      # the GUI keeps ticking meanwhile
        return real_read(*a, **k)

    def write(*a, **k):
        threads.append(threading.get_ident())
        return real_write(*a, **k)
    monkeypatch.setattr(window_layers, "read_layer", slow_read)
    monkeypatch.setattr(session, "write_session", write)
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    w.replace_policy = "clear"
    assert w.load_layer("moving", files["other"])
    w.save_session(tmp_path / "s.json")
    timer.stop()
    main = threading.main_thread().ident
    assert len(threads) == 2 and main not in threads and len(set(threads)) == 1
    assert len(ticks) >= 3
    assert w.state.paths["moving"].endswith("other.nii.gz")
    # not waiting: the call returns at once and the layer arrives later
    assert w.load_layer("moving", files["moving"], wait=False)
    assert w.state.paths["moving"].endswith("other.nii.gz")
    w.engine.wait_idle(10000)
    assert w.state.paths["moving"].endswith("moving.nii.gz")


def test_colour_labels_and_the_status_bar_readout(win, tmp_path, qtbot):
    w = win
    table = tmp_path / "cube.ctbl"
    table.write_text("0 background 0 0 0 0\n1 cube 255 0 0 255\n2 slab 0 0 255 255\n")
    assert w.load_colour_table(table)
    assert w.metrics_panel.label_names["1"] == "cube"
    ax = w.slice_views["axial"]
    # the cursor on the cube: label 1 in both maps, named from the table
    w.state.set_cursor(w.state.fixed.index_to_physical([[7, 7, 7]])[0])
    ax.flush()
    before = ax.grab_pixels().astype(int)
    w.state.set_overlay(label_fill="fixed", label_opacity=0.8)
    assert w.overlay_panel.fill_combo.currentData() == "fixed" and w.overlay_panel.fill_opacity.value() == 80
    ax.flush()
    after = ax.grab_pixels().astype(int)
    reddened = (after[..., 0] - before[..., 0] > 40) & (before[..., 2] - after[..., 2] > 40)
    assert reddened.sum() > 20                                   # the cube is filled in red
    text = w.cursor_label.text()
    assert "fixed label: 1 cube" in text and "moving label: 1 cube" in text
    _run(w)
    w._update_readout()
    assert "det J: 1.000" in w.cursor_label.text() and "warped label:" in w.cursor_label.text()
    # the user drives it from the overlay panel too
    w.overlay_panel.fill_combo.setCurrentIndex(w.overlay_panel.fill_combo.findData("none"))
    assert w.state.overlay.label_fill == "none"


# ----------------------------------------------------------------------------- side by side
def test_two_runs_side_by_side_with_linked_cursors(win, qtbot):
    w = win
    sbs = w.side_by_side
    _run(w)
    t2 = Transform(sitk.TranslationTransform(3, (-3.0, 0.0, 0.0)), "rigid")
    from app.engine.spatial import resample
    res2 = RegistrationResult(t2, resample(w.state.moving, w.state.fixed, t2), paradigm="other", device="cpu")
    w.registration_panel.run_finished.emit(res2, {})
    w.set_view_layout("runs")
    assert w.view_layout == "runs" and w.central_stack.currentWidget() is sbs
    # A is the current run (the last one), B the one before it
    assert sbs.left_state.result is res2 and sbs.right_state.result is w.runs[0].result
    assert "A: other" in sbs.left_head.text() and sbs.right_head.text().startswith("B: fake")
    sbs.flush()
    assert np.array_equal(sbs.left.rgba, sbs.right.rgba)   # fixed only: the same picture
    w.state.set_overlay(mode="blend", opacity=1.0)        # show the warped images themselves
    sbs.flush()
    assert sbs.left_state.overlay.mode == sbs.right_state.overlay.mode == "blend"
    assert sbs.left.rgba.shape == sbs.right.rgba.shape
    assert np.abs(sbs.left.rgba.astype(int) - sbs.right.rgba.astype(int)).max() > 50   # two different runs
    # linked cursors: moving the cursor in B moves A and the four-up views
    target = w.state.fixed.index_to_physical([[4, 6, 9]])[0]
    sbs.right_state.set_cursor(target)
    np.testing.assert_allclose(w.state.cursor, target)
    np.testing.assert_allclose(sbs.left_state.cursor, target)
    # picking another A from the combo changes the workspace's current run
    sbs.run_a_combo.setCurrentIndex(sbs.run_a_combo.findData(0))
    sbs.run_a_combo.activated.emit(sbs.run_a_combo.currentIndex())
    assert w.workspace.runs.current == 0 and sbs.left_state.result is w.runs[0].result
    w.set_view_layout("four_up")
    assert w.central_stack.currentIndex() == 0


def test_landmarks_are_placed_side_by_side_in_fixed_and_moving(win, qtbot):
    from PySide6.QtCore import QPoint, Qt
    w = win
    sbs = w.side_by_side
    w.set_view_layout("landmarks")
    assert sbs.left_state.fixed is w.state.fixed and sbs.right_state.fixed is w.state.moving
    assert sbs.left_state.interaction == sbs.right_state.interaction == "pick"
    sbs.flush()
    left, right = sbs.views()
    pf = sbs.left_state.cursor + np.array([2.0, -3.0, 0.0])
    pm = sbs.right_state.cursor + np.array([-4.0, 1.0, 0.0])
    with qtbot.waitSignal(left.clicked, timeout=3000):
        qtbot.mouseClick(left.vtk_widget, Qt.LeftButton, Qt.NoModifier, QPoint(*left.lps_to_widget(pf)))
    with qtbot.waitSignal(right.clicked, timeout=3000):
        qtbot.mouseClick(right.vtk_widget, Qt.LeftButton, Qt.NoModifier, QPoint(*right.lps_to_widget(pm)))
    pairs = w.workspace.landmarks.pairs()
    assert len(pairs) == 1 and pairs[0]["fixed"] is not None and pairs[0]["moving"] is not None
    np.testing.assert_allclose(pairs[0]["fixed"][:2], pf[:2], atol=1.6)
    np.testing.assert_allclose(pairs[0]["moving"][:2], pm[:2], atol=1.6)
    # each side shows its own points only; the pair is in the table
    assert len(sbs.right_state.moving_points) == 1 and len(sbs.right_state.fixed_points) == 0
    assert len(sbs.left_state.fixed_points) == 1 and w.landmark_panel.table.rowCount() == 1
    assert "1 point" in sbs.right_head.text()
    w.landmark_panel.undo()
    assert w.workspace.landmarks.point_count("moving") == 0


def test_a_closed_window_takes_no_more_engine_work(win, files):
    w = win
    w.close()
    assert not w.engine.alive
    assert w.load_layer("moving", files["other"]) is False          # no exception, nothing queued
    with pytest.raises(ValueError, match="closing"):
        w.save_session(files["fixed"].parent / "late.json")
