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
