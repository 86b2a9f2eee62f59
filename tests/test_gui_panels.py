"""Registration, metrics and landmark panels, the params form and the workers (``gui``).

A small fake registrar (registered for the test only) stands in for the real paradigms, so the
runs take a fraction of a second:

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest tests/test_gui_panels.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import paradigms
from app.engine.paradigms.base import param
from app.engine.types import (LabelMap, Landmarks, Progress, RegistrationResult, Transform, Volume,
                              check_cancel, params_to_dict)

pytestmark = pytest.mark.gui
ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- fake paradigms
CALLS: list[dict] = []
SHIFT_MM = 2.0


@dataclass
class FakeParams:
    iterations: int = param(10, "iterations", range=(1, 5000))
    delay_s: float = param(0.005, "sleep per iteration (s)", range=(0.0, 1.0))
    step: float = param(0.0001, "a small float", range=(1e-5, 10.0))
    fail: str = param("none", "how to fail", choices=("none", "error", "oom"))
    verbose: bool = param(False, "a flag")
    levels: str = param("4,2,1", "free text")


class FakeRegistrar:
    """Translation by +SHIFT_MM along x (fixed point x -> moving point x + SHIFT_MM)."""

    key: ClassVar[str] = "fake"
    learned: ClassVar[bool] = False
    description: ClassVar[str] = "Fake: a known translation, for the panel tests"
    Params: ClassVar[type] = FakeParams

    def register(self, fixed, moving, params, *, fixed_labels=None, moving_labels=None, fixed_points=None,
                 moving_points=None, checkpoint=None, initial=None, progress=None, cancel=None, device="auto"):
        CALLS.append({"thread": threading.get_ident(), "checkpoint": checkpoint, "device": device})
        n = params.iterations
        for i in range(n):
            check_cancel(cancel)
            time.sleep(params.delay_s)
            if progress:
                progress(Progress("affine", i + 1, n, loss=1.0 / (i + 1), fraction=(i + 1) / n))
        if params.fail == "error":
            raise RuntimeError("boom: the optimiser diverged\nsecond line of detail")
        if params.fail == "oom":
            raise MemoryError("Unable to allocate 12.0 GiB for an array")
        t = Transform(sitk.TranslationTransform(3, (SHIFT_MM, 0.0, 0.0)), "rigid")
        if initial is not None:          # a later pipeline stage refines the previous transform
            t = initial.then(t)
        from app.engine.spatial import resample
        return RegistrationResult(t, resample(moving, fixed, t), timings={"total": 0.01}, device="cpu",
                                  paradigm=self.key, params=params_to_dict(params), checkpoint_id=checkpoint)


class FakeLearnedRegistrar(FakeRegistrar):
    key: ClassVar[str] = "fake_learned"
    learned: ClassVar[bool] = True
    description: ClassVar[str] = "Fake learned paradigm"


@pytest.fixture
def fake_paradigms(monkeypatch):
    monkeypatch.setitem(paradigms.REGISTRY, "fake", f"{__name__}:FakeRegistrar")
    monkeypatch.setitem(paradigms.REGISTRY, "fake_learned", f"{__name__}:FakeLearnedRegistrar")
    CALLS.clear()
    yield
    from app import workers
    workers.default_engine().cancel_all()
    workers.default_engine().wait_idle(10000)


def _pair() -> dict:
    """12^3 images, 1 mm; a 4^3 cube labelled 1, at x 4..7 in fixed and 6..9 in moving."""
    a = np.zeros((12, 12, 12), np.float32)
    fl, ml = np.zeros((12, 12, 12), np.int16), np.zeros((12, 12, 12), np.int16)
    fl[4:8, 4:8, 4:8] = 1
    ml[4:8, 4:8, 6:10] = 1
    fixed = Volume(a + fl * 100, name="fixed")
    moving = Volume(a + ml * 100, name="moving")
    return {"fixed": fixed, "moving": moving, "fixed_labels": LabelMap(fl, name="fl"),
            "moving_labels": LabelMap(ml, name="ml"),
            "fixed_points": Landmarks([[5.0, 5.0, 5.0]]), "moving_points": Landmarks([[7.0, 5.0, 5.0]])}


def _wait_idle(qtbot):
    from app import workers
    qtbot.waitUntil(lambda: not workers.default_engine().busy, timeout=10000)


# ----------------------------------------------------------------------------- params form
def test_params_form_round_trip_and_clamping(qtbot):
    from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

    from app.widgets.params_form import ParamsForm
    form = ParamsForm(FakeParams)
    qtbot.addWidget(form)
    ed = form.editors
    assert isinstance(ed["iterations"], QSpinBox) and isinstance(ed["delay_s"], QDoubleSpinBox)
    assert isinstance(ed["fail"], QComboBox) and isinstance(ed["verbose"], QCheckBox)
    assert isinstance(ed["levels"], QLineEdit)
    assert ed["iterations"].toolTip().startswith("iterations") and "[1 .. 5000]" in ed["iterations"].toolTip()
    assert form.values() == FakeParams()                      # defaults, tiny float kept exactly
    custom = FakeParams(iterations=77, delay_s=0.25, step=0.0003, fail="oom", verbose=True, levels="2,1")
    form.set_values(custom)
    assert form.values() == custom
    form.set_values({"iterations": 10**6, "delay_s": -3.0})    # out of range -> clamped
    v = form.values()
    assert v.iterations == 5000 and v.delay_s == 0.0
    ed["iterations"].setValue(0)
    assert form.values().iterations == 1
    with qtbot.waitSignal(form.changed):
        ed["verbose"].setChecked(False)
    form.reset()
    assert form.values() == FakeParams()


def test_params_form_builds_every_registered_paradigm(qtbot):
    from app.widgets.params_form import ParamsForm
    for key in paradigms.available():
        cls = paradigms.get(key).Params
        form = ParamsForm(cls)
        qtbot.addWidget(form)
        assert form.values() == cls(), key


def test_params_form_round_trips_a_tuple_field(qtbot):
    from PySide6.QtWidgets import QLineEdit

    from app.engine.paradigms.instance import InstanceParams
    from app.widgets.params_form import ParamsForm
    form = ParamsForm(InstanceParams)
    qtbot.addWidget(form)
    assert isinstance(form.editors["levels"], QLineEdit) and form.editors["levels"].text() == "4,2,1"
    form.set_values({"levels": (2, 1), "iterations": [30, 20]})       # a list, as read back from JSON
    assert form.editors["iterations"].text() == "30,20"
    assert form.values().levels == (2, 1) and form.values().iterations == (30, 20)
    form.editors["levels"].setText("8, 4,2")
    assert form.values().levels == (8, 4, 2)
    form.editors["levels"].setText("4,0")
    with pytest.raises(ValueError, match="levels"):
        form.values()


# ----------------------------------------------------------------------------- registration panel
def _panel(qtbot, inputs=None, key="fake"):
    from app.widgets.metrics_panel import MetricsPanel
    from app.widgets.registration_panel import RegistrationPanel
    panel = RegistrationPanel()
    qtbot.addWidget(panel)
    panel.set_paradigm(key)
    data = inputs if inputs is not None else _pair()
    panel.set_inputs_provider(lambda: data)
    metrics = MetricsPanel()
    qtbot.addWidget(metrics)
    panel.run_finished.connect(lambda r, m: metrics.add_run(f"{len(metrics.runs()) + 1}: {r.paradigm}", r, m))
    return panel, metrics


def test_run_off_gui_thread_progress_loss_and_metrics(qtbot, fake_paradigms):
    from PySide6.QtCore import QTimer
    panel, metrics = _panel(qtbot)
    assert panel.checkpoint_group.isHidden()                 # not a learned paradigm
    panel.set_params(FakeParams(iterations=40, delay_s=0.01))
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(panel.progress_bar.value()))
    timer.start()
    with qtbot.waitSignal(panel.run_finished, timeout=60000) as sig:
        with qtbot.waitSignal(panel.run_started, timeout=1000):
            assert panel.run()
        assert panel.is_running and not panel.run_button.isEnabled() and panel.cancel_button.isEnabled()
    timer.stop()
    result, m = sig.args
    assert CALLS[-1]["thread"] != threading.main_thread().ident
    assert len(ticks) >= 5                                   # the event loop kept running
    assert any(0 < v < 1000 for v in ticks)                  # the bar moved during the run
    assert panel.progress_bar.value() == 1000
    x, y = panel.loss_curve_data()
    assert len(x) == 40 and y[0] == pytest.approx(1.0) and y[-1] == pytest.approx(1 / 40)
    assert not panel.is_running and panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()
    # known translation: Dice 4/8 overlap before (2 of 4 voxels along x), 1 after; TRE 2 mm -> 0
    assert m["dice_mean"] == pytest.approx(1.0) and m["before"]["dice_mean"] == pytest.approx(0.5)
    assert m["tre_mean_mm"] == pytest.approx(0.0, abs=1e-6) and m["before"]["tre_mean_mm"] == pytest.approx(2.0)
    assert len(metrics.runs()) == 1
    assert metrics.label_table.rowCount() == 1
    assert metrics.summary_table.item(0, 1).text() == "1.000" and metrics.summary_table.item(0, 0).text() == "0.500"
    _wait_idle(qtbot)


def test_cancel_stops_the_run(qtbot, fake_paradigms):
    panel, metrics = _panel(qtbot)
    panel.set_params(FakeParams(iterations=5000, delay_s=0.01))
    got = []
    panel.run_finished.connect(lambda *a: got.append("finished"))
    panel.run()
    qtbot.waitUntil(lambda: panel.progress_bar.value() > 0, timeout=5000)
    with qtbot.waitSignal(panel.run_cancelled, timeout=5000):
        panel.cancel_button.click()
    assert not got and not panel.is_running and panel.run_button.isEnabled()
    assert "Cancelled" in panel.status_label.text() and not metrics.runs()
    _wait_idle(qtbot)


@pytest.mark.parametrize("mode, expect", [("error", "RuntimeError: boom: the optimiser diverged"),
                                          ("oom", "out of memory: Unable to allocate 12.0 GiB")])
def test_exception_becomes_failed_message(qtbot, fake_paradigms, mode, expect):
    panel, metrics = _panel(qtbot)
    panel.set_params(FakeParams(iterations=2, fail=mode))
    with qtbot.waitSignal(panel.run_failed, timeout=10000) as sig:
        panel.run()
    msg = sig.args[0]
    assert msg.startswith(expect) and "\n" not in msg
    assert panel.run_button.isEnabled() and not panel.is_running
    assert panel.status_label.text() == msg and not metrics.runs()
    _wait_idle(qtbot)


def test_progress_covers_the_metrics_stage_resets_on_cancel_and_loss_is_per_stage(qtbot, fake_paradigms):
    from app.engine.types import Progress as P
    from app.widgets.registration_panel import REGISTRATION_SHARE, normalise_curve
    panel, _ = _panel(qtbot)
    assert normalise_curve([10.0, 5.0, 0.0]) == [1.0, 0.5, 0.0] and normalise_curve([3.0, 3.0]) == [0.5, 0.5]
    panel._on_worker_progress(P("affine", 10, 10, fraction=1.0))
    assert panel.progress_bar.value() == int(REGISTRATION_SHARE * 1000)      # not full before the metrics
    panel._on_worker_progress(P("evaluate", message="measuring", fraction=1.0))
    assert panel.progress_bar.maximum() == 0                                  # busy during the metrics
    # a cancelled run leaves an empty bar
    panel.set_params(FakeParams(iterations=5000, delay_s=0.01))
    panel.run()
    qtbot.waitUntil(lambda: panel.progress_bar.value() > 0, timeout=10000)
    with qtbot.waitSignal(panel.run_cancelled, timeout=10000):
        panel.cancel()
    assert panel.progress_bar.value() == 0 and panel.progress_bar.maximum() == 1000
    # the loss plot is cleared between runs and each stage is drawn on its own 0-1 scale
    panel.set_params(FakeParams(iterations=7))
    with qtbot.waitSignal(panel.run_finished, timeout=20000):
        panel.run()
    xs, ys = panel.loss_curve_data()
    assert len(xs) == 7 and ys[0] == pytest.approx(1.0) and ys[-1] == pytest.approx(1 / 7)
    (item, _, _), = panel.run_plot.stage_curves().values()
    drawn = item.getData()[1]
    assert drawn.min() == pytest.approx(0.0) and drawn.max() == pytest.approx(1.0)
    _wait_idle(qtbot)


def test_run_without_images_is_a_message(qtbot, fake_paradigms):
    panel, _ = _panel(qtbot, inputs={"fixed": None, "moving": None})
    with qtbot.waitSignal(panel.run_failed, timeout=1000) as sig:
        assert not panel.run()
    assert "fixed and a moving image" in sig.args[0] and panel.run_button.isEnabled()


def test_checkpoint_row_for_learned_paradigms(qtbot, fake_paradigms, monkeypatch, tmp_path):
    import types

    import app.engine
    from app.widgets import registration_checkpoint as rc
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    fake = types.ModuleType("app.engine.checkpoints")
    fake.list_checkpoints = lambda key: [good, bad] if key == "fake_learned" else []
    fake.read_card = lambda p: {"title": Path(p).stem, "summary": "trained on fakes", "training": {"steps": 3}}

    def load_checkpoint(p, expected_paradigm=None):
        if Path(p) == bad:
            raise ValueError("bad.pt was trained for paradigm 'weakly', not 'fake_learned'")
        return {"paradigm": expected_paradigm}
    fake.load_checkpoint = load_checkpoint
    monkeypatch.setitem(sys.modules, "app.engine.checkpoints", fake)
    monkeypatch.setattr(app.engine, "checkpoints", fake, raising=False)
    monkeypatch.setattr(rc, "_probe_cuda", lambda: False)

    panel, metrics = _panel(qtbot)
    panel.show()
    assert not panel.checkpoint_group.isVisible()
    panel.set_paradigm("fake_learned")
    assert panel.checkpoint_group.isVisible() and not panel.run_button.isEnabled()   # checking
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=5000)
    assert panel.checkpoint == str(good) and panel.checkpoint_combo.count() == 2
    assert "trained on fakes" in panel.card_text.toPlainText()
    panel.set_checkpoint(bad)
    qtbot.waitUntil(lambda: "weakly" in panel.checkpoint_status.text(), timeout=5000)
    assert not panel.run_button.isEnabled() and panel.checkpoint_error.startswith("bad.pt was trained")
    panel.set_checkpoint(good)
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=5000)
    panel.set_params(FakeParams(iterations=2))
    with qtbot.waitSignal(panel.run_finished, timeout=10000):
        panel.run()
    assert CALLS[-1]["checkpoint"] == str(good)
    panel.set_paradigm("fake")
    assert not panel.checkpoint_group.isVisible()
    _wait_idle(qtbot)


def test_panel_starts_without_torch():
    code = ("import sys; from PySide6.QtWidgets import QApplication; app = QApplication([]);"
            "from app.widgets.registration_panel import RegistrationPanel; p = RegistrationPanel();"
            "p.set_paradigm('iterative'); assert p.form is not None;"
            "print('torch' in sys.modules)")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_worker_throttles_progress_but_keeps_every_loss(qtbot, fake_paradigms):
    from app import workers
    w = workers.RegistrationRun("fake", _pair(), FakeParams(iterations=3000, delay_s=0.0), min_interval_s=0.05)
    got = []
    w.progress.connect(got.append)
    with qtbot.waitSignal(w.finished, timeout=60000):
        w.start()
    qtbot.wait(50)
    assert len(w.loss_history()) == 3000 and w.loss_history()[-1] == ("affine", 3000, pytest.approx(1 / 3000))
    assert 1 <= len(got) < 300
    assert got[-1].stage == "evaluate"          # the last report is always delivered
    assert w.thread_ident != threading.main_thread().ident
    _wait_idle(qtbot)


def test_engine_runs_every_job_on_one_long_lived_thread(qtbot):
    from PySide6.QtWidgets import QWidget

    from app import workers
    owner = QWidget()
    eng = workers.Engine(owner)
    seen = []

    def work(a, b=0):
        seen.append(threading.get_ident())
        return a + b

    try:
        with qtbot.waitCallback(timeout=5000) as cb:
            eng.submit(work, 2, b=3, on_done=lambda v: cb((v, threading.get_ident())))
        assert cb.args[0] == (5, threading.main_thread().ident)
        with qtbot.waitCallback(timeout=5000) as cb:
            eng.submit(lambda: 1 / 0, on_error=cb)
        assert cb.args[0] == "ZeroDivisionError: division by zero"
        # many requests: one thread, no new QThread or QObject per request
        got = []
        for i in range(20):
            eng.submit(work, i, on_done=got.append)
        # a job cancelled before it starts never runs, and says so
        blocker = threading.Event()
        eng.submit(blocker.wait, 5)
        skipped = eng.submit(work, 100, on_done=got.append, on_cancelled=lambda: got.append("skipped"))
        skipped.cancel()
        blocker.set()
        assert eng.wait_idle(10000)
        assert got == list(range(20)) + ["skipped"]
        assert len(set(seen)) == 1 and seen[0] != threading.main_thread().ident
        assert eng.thread.isRunning()
        # callbacks of a deleted context are dropped, not called on a dead widget
        ctx = QWidget()
        calls = []
        eng.submit(blocker.wait, 5, context=ctx, on_done=calls.append)
        import shiboken6
        shiboken6.delete(ctx)
        assert eng.wait_idle(10000) and calls == []
    finally:
        assert eng.shutdown(10000)
    assert not eng.thread.isRunning()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.submit(work, 1)
    owner.deleteLater()


# ----------------------------------------------------------------------------- metrics panel
def _metrics(dice_after: float, tre: float) -> dict:
    before = {"dice_mean": 0.5, "dice_per_label": {"1": 0.4, "2": 0.6, "10": 0.5}, "hd95_mean": 4.0,
              "hd95_per_label": {"1": 5.0, "2": 3.0, "10": 4.0}, "tre_mean_mm": 6.0, "tre_median_mm": 6.0,
              "tre_max_mm": 9.0, "tre_per_point_mm": [3.0, 6.0, 9.0], "fold_fraction": 0.0, "sdlogj": 0.0}
    return {"dice_mean": dice_after, "dice_per_label": {"1": 0.9, "2": np.float64(0.7), "10": 0.95},
            "hd95_mean": 2.0, "hd95_per_label": {"1": 1.0, "2": 3.0, "10": float("nan")},
            "tre_mean_mm": tre, "tre_median_mm": tre, "tre_max_mm": tre + 1, "tre_per_point_mm": np.array([tre] * 3),
            "fold_fraction": 0.0012, "sdlogj": 0.05, "runtime_s": 3.25, "device": "cpu", "paradigm": "fake",
            "field": np.zeros((4, 4, 4, 3)), "before": before}


def test_metrics_panel_tables_history_and_export(qtbot, tmp_path):
    from app.widgets.metrics_panel import MetricsPanel
    panel = MetricsPanel()
    qtbot.addWidget(panel)
    panel.add_run("1: fake", None, _metrics(0.85, 1.5))
    with qtbot.waitSignal(panel.run_selected) as sig:
        panel.add_run("2: fake", None, _metrics(0.9, 1.0))
    assert sig.args == [1]
    s = panel.summary_table
    rows = {s.verticalHeaderItem(r).text(): r for r in range(s.rowCount())}
    assert s.item(rows["Dice mean"], 0).text() == "0.500" and s.item(rows["Dice mean"], 1).text() == "0.900"
    assert s.item(rows["Folding (%)"], 1).text() == "0.120"
    assert s.item(rows["TRE max (mm)"], 1).text() == "2.00" and s.item(rows["Device"], 1).text() == "cpu"
    # per label: numeric sort of the ids and of Dice after
    t = panel.label_table
    t.sortItems(0)
    assert [t.item(r, 0).text() for r in range(3)] == ["1", "2", "10"]
    t.sortItems(2)
    assert [t.item(r, 0).text() for r in range(3)] == ["2", "1", "10"]
    assert t.item(2, 5).text() == "–"                        # HD95 NaN shown as a dash
    # comparison: a column per run after Before
    c = panel.compare_table
    assert [c.horizontalHeaderItem(i).text() for i in range(c.columnCount())] == ["Before", "1: fake", "2: fake"]
    assert c.item(0, 1).text() == "0.850" and c.item(0, 2).text() == "0.900"
    with qtbot.waitSignal(panel.run_selected) as sig:
        panel.history.setCurrentRow(0)
    assert sig.args == [0] and s.item(rows["Dice mean"], 1).text() == "0.850"
    # copy / export
    panel.tabs.setCurrentIndex(2)
    text = panel.copy_to_clipboard()
    from PySide6.QtGui import QGuiApplication
    assert QGuiApplication.clipboard().text() == text
    assert text.splitlines()[0] == "\tBefore\t1: fake\t2: fake"
    assert text.splitlines()[1].startswith("Dice mean\t0.500\t0.850\t0.900")
    out = panel.export_csv(tmp_path / "m.csv")
    assert out.read_text().splitlines()[0] == ",Before,1: fake,2: fake"
    # JSON-safe state round trip, no arrays
    d = panel.to_dict()
    back = json.loads(json.dumps(d))
    assert "field" not in back["runs"][0]["metrics"]
    assert back["runs"][0]["metrics"]["tre_per_point_mm"] == [1.5] * 3
    assert back["runs"][1]["metrics"]["hd95_per_label"]["10"] is None
    other = MetricsPanel()
    qtbot.addWidget(other)
    with qtbot.assertNotEmitted(other.run_selected):
        other.from_dict(back)
    assert other.history.count() == 2 and other.current_index == 0
    assert other.to_dict() == back


# ----------------------------------------------------------------------------- landmark panel
def _shift_transform(dx: float, dy: float = 0.0, dz: float = 0.0) -> Transform:
    return Transform(sitk.TranslationTransform(3, (dx, dy, dz)), "rigid")


def test_landmark_pairs_and_tre(qtbot):
    from app.widgets.landmark_panel import LandmarkPanel
    lp = LandmarkPanel()
    qtbot.addWidget(lp)
    with qtbot.waitSignal(lp.landmarks_changed):
        lp.add_point("fixed", (0.0, 0.0, 0.0))
    lp.add_point("fixed", (10.0, 0.0, 0.0))
    lp.add_point("moving", (3.0, 4.0, 0.0))         # completes pair 1
    assert len(lp.fixed_landmarks()) == 1 and lp.pair_count() == 2
    lp.add_point("moving", (13.0, 0.0, 0.0))        # completes pair 2
    lp.add_point("fixed", (0.0, 0.0, 20.0))         # pair 3, incomplete
    f, m = lp.fixed_landmarks(), lp.moving_landmarks()
    np.testing.assert_allclose(f.points, [[0, 0, 0], [10, 0, 0]])
    np.testing.assert_allclose(m.points, [[3, 4, 0], [13, 0, 0]])
    assert f.names == m.names == ["1", "2"]
    t = lp.table
    assert t.item(0, 7).text() == "5.00" and t.item(1, 7).text() == "3.00" and t.item(2, 7).text() == "–"
    assert t.item(0, 8).text() == "–"
    # T maps fixed -> moving points: x + (3, 4, 0) hits pair 1 exactly, pair 2 is 4 mm off
    lp.set_transform(_shift_transform(3.0, 4.0))
    before, after = lp.tre()
    np.testing.assert_allclose(before[:2], [5.0, 3.0])
    np.testing.assert_allclose(after[:2], [0.0, 4.0], atol=1e-9)
    assert t.item(0, 8).text() == "0.00" and t.item(1, 8).text() == "4.00"
    # editing a cell moves the point; a non-number is refused
    with qtbot.waitSignal(lp.landmarks_changed):
        t.item(1, 4).setText("10")
    np.testing.assert_allclose(lp.moving_landmarks().points[1], [10, 0, 0])
    assert t.item(1, 7).text() == "0.00"
    t.item(1, 5).setText("abc")
    assert t.item(1, 5).text() == "0.0"
    assert not t.item(2, 4).flags() & t.item(2, 4).flags().ItemIsEditable   # missing moving half
    # selecting a row jumps to its fixed point, or the moving one from a moving cell
    with qtbot.waitSignal(lp.point_selected) as sig:
        t.setCurrentCell(1, 1)
    np.testing.assert_allclose(sig.args[0], [10, 0, 0])
    with qtbot.waitSignal(lp.point_selected) as sig:
        t.setCurrentCell(0, 5)
    np.testing.assert_allclose(sig.args[0], [3, 4, 0])
    # delete, numbering stays stable
    lp.delete_rows([0])
    assert [p["name"] for p in lp.pairs()] == ["2", "3"]
    lp.add_point("moving", (1.0, 1.0, 1.0))         # completes pair 3
    assert [p["name"] for p in lp.pairs()] == ["2", "3"] and lp.pair_count(complete_only=True) == 2
    lp.add_point("moving", (2.0, 2.0, 2.0))         # moving first: pair 4, waiting for its fixed point
    lp.add_point("fixed", (2.0, 2.0, 0.0))
    assert [p["name"] for p in lp.pairs()] == ["2", "3", "4"] and lp.table.item(2, 7).text() == "2.00"
    # pick target property <-> buttons
    with qtbot.waitSignal(lp.pick_target_changed) as sig:
        lp.pick_moving_button.click()
    assert sig.args == ["moving"] and lp.pick_target == "moving"
    lp.pick_target = None
    assert lp.pick_off_button.isChecked()
    # to_dict / from_dict
    d = json.loads(json.dumps(lp.to_dict()))
    other = LandmarkPanel()
    qtbot.addWidget(other)
    other.from_dict(d)
    assert other.to_dict() == d


@pytest.mark.parametrize("ext", [".mrk.json", ".fcsv", ".csv"])
def test_landmark_export_import_round_trip(qtbot, tmp_path, ext):
    from app.widgets.landmark_panel import LandmarkPanel
    lp = LandmarkPanel()
    qtbot.addWidget(lp)
    rng = np.random.default_rng(1)
    fixed, moving = rng.uniform(-90, 90, (4, 3)), rng.uniform(-90, 90, (4, 3))
    for f, m in zip(fixed, moving):
        lp.add_point("fixed", f)
        lp.add_point("moving", m)
    lp.add_point("fixed", (1, 2, 3))                # incomplete: not exported
    assert lp.export_file(tmp_path / f"f{ext}", "fixed") == 4
    assert lp.export_file(tmp_path / f"m{ext}", "moving") == 4
    other = LandmarkPanel()
    qtbot.addWidget(other)
    other.import_file(tmp_path / f"f{ext}", "fixed")
    assert other.pair_count() == 4 and other.pair_count(complete_only=True) == 0
    other.import_file(tmp_path / f"m{ext}", "moving")
    np.testing.assert_allclose(other.fixed_landmarks().points, fixed, atol=1e-9)
    np.testing.assert_allclose(other.moving_landmarks().points, moving, atol=1e-9)
    np.testing.assert_allclose(other.tre()[0], np.linalg.norm(fixed - moving, axis=1), atol=1e-9)


def test_landmark_autosave(qtbot, tmp_path):
    from app.widgets.landmark_panel import LandmarkPanel
    lp = LandmarkPanel()
    qtbot.addWidget(lp)
    path = tmp_path / "sub" / "landmarks.json"
    lp.set_autosave_path(path)
    assert json.loads(path.read_text())["pairs"] == []
    lp.add_point("fixed", (1.5, -2.0, 3.25))
    assert json.loads(path.read_text())["pairs"][0]["fixed"] == [1.5, -2.0, 3.25]
    lp.add_point("moving", (0, 0, 0))
    lp.delete_rows([0])
    assert json.loads(path.read_text())["pairs"] == []
    assert not [p for p in path.parent.iterdir() if p.name != "landmarks.json"]   # no temp files left


def test_diffeomorphic_option_follows_the_bundled_variant(qtbot, monkeypatch, tmp_path):
    from app.widgets import registration_checkpoint as rc
    from app.widgets import registration_panel as rp
    monkeypatch.setattr(rc, "_probe_cuda", lambda: False)
    bundled = Path(rp._BUNDLED_DIR)
    if not (bundled / "unsupervised_diffeomorphic.pt").is_file():
        pytest.skip("bundled diffeomorphic checkpoint missing")
    panel, _ = _panel(qtbot, key="unsupervised")
    qtbot.waitUntil(lambda: not panel._probing, timeout=60000)
    assert panel.checkpoint == str(bundled / "unsupervised.pt") and panel.checkpoint_error is None
    from app.engine.paradigms.unsupervised import UnsupervisedParams
    panel.form.editors["diffeomorphic"].setChecked(True)        # as a click does
    qtbot.waitUntil(lambda: not panel._probing and panel.checkpoint.endswith("_diffeomorphic.pt"), timeout=60000)
    assert panel.checkpoint_error is None
    # a checkpoint of the user's own is left alone
    import shutil
    own = str(tmp_path / "mine.pt")
    shutil.copy(bundled / "unsupervised.pt", own)
    panel.set_checkpoint(own)
    qtbot.waitUntil(lambda: not panel._probing, timeout=60000)
    panel.set_params(UnsupervisedParams(diffeomorphic=False))
    assert panel.checkpoint == own
    _wait_idle(qtbot)


def test_then_chain_builds_a_pipeline_with_a_form_per_stage(qtbot, fake_paradigms, monkeypatch):
    from app.widgets import registration_checkpoint as rc
    monkeypatch.setattr(rc, "_probe_cuda", lambda: False)
    panel, metrics = _panel(qtbot)
    panel.show()
    assert panel.paradigm_key == "fake" and len(panel.forms) == 1
    assert panel.then_combos[0].isVisible() and not panel.then_combos[1].isVisible()
    panel.then_combo.setCurrentIndex(panel.then_combo.findData("fake"))        # as the user picks it
    assert panel.paradigm_key == "fake+fake" and len(panel.forms) == 2 and panel.is_pipeline
    assert panel.then_combos[1].isVisible() and "Pipeline" in panel.description_label.text()
    panel.set_params([FakeParams(iterations=3), FakeParams(iterations=4)])
    assert [p.iterations for p in panel.params()] == [3, 4]
    with qtbot.waitSignal(panel.run_finished, timeout=20000) as sig:
        assert panel.run()
    result, m = sig.args
    # one run, its stages listed: two translations of 2 mm compose to 4 mm
    assert result.paradigm == "fake+fake" and [s["paradigm"] for s in result.stages] == ["fake", "fake"]
    assert [s["params"]["iterations"] for s in result.stages] == [3, 4]
    np.testing.assert_allclose(result.transform.transform_points([[0.0, 0.0, 0.0]]), [[2 * SHIFT_MM, 0, 0]], atol=1e-9)
    assert len(metrics.runs()) == 1 and "fake → fake" in metrics.history.item(0).toolTip()
    assert metrics.model[0].name.startswith("fake → fake") or metrics.model[0].name.endswith("fake")
    assert len(metrics.model[0].stages) == 2
    # back to a single paradigm, and a pipeline set by key
    panel.set_paradigm("fake")
    assert panel.paradigm_key == "fake" and len(panel.forms) == 1
    panel.set_paradigm("fake+fake+fake")
    assert panel.stage_keys() == ["fake"] * 3 and len(panel.forms) == 3
    with pytest.raises(ValueError, match="not in the list"):
        panel.set_paradigm("fake+nope")
    _wait_idle(qtbot)


def test_landmarks_undo_delete_all_asks_and_both_sides_export(qtbot, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from app.engine import io
    from app.widgets.landmark_panel import LandmarkPanel
    lp = LandmarkPanel()
    qtbot.addWidget(lp)
    pts = [((1.0, 2.0, 3.0), (1.5, 2.5, 3.5)), ((-4.0, 0.0, 9.0), (-3.0, 1.0, 8.0))]
    for f, m in pts:
        lp.add_point("fixed", f)
        lp.add_point("moving", m)
    lp.add_point("fixed", (7, 7, 7))                      # incomplete: not exported
    # both sides in one file: CSV row per pair, or markups with F-/M- labels
    assert lp.export_file(tmp_path / "pairs.csv", "both") == 2
    rows = (tmp_path / "pairs.csv").read_text().splitlines()
    assert rows[0] == "name,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z"
    assert [float(v) for v in rows[2].split(",")[1:]] == [-4.0, 0.0, 9.0, -3.0, 1.0, 8.0]
    assert lp.export_file(tmp_path / "pairs.mrk.json", "both") == 2
    back = io.read_landmarks(tmp_path / "pairs.mrk.json")
    assert back.names == ["F-1", "F-2", "M-1", "M-2"]
    np.testing.assert_allclose(back.points[2], pts[0][1], atol=1e-9)
    # delete all asks first; No keeps everything, Yes deletes, Undo (Ctrl+Z too) brings them back
    answers = [QMessageBox.Cancel, QMessageBox.Yes]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: answers.pop(0))
    assert not lp.ask_delete_all() and lp.pair_count() == 3
    assert lp.ask_delete_all() and lp.pair_count() == 0 and lp.undo_button.isEnabled()
    lp.undo_button.click()
    assert lp.pair_count() == 3 and lp.table.rowCount() == 3
    lp.delete_rows([0])
    from PySide6.QtGui import QKeySequence, QShortcut
    undo, = [sc for sc in lp.findChildren(QShortcut) if sc.key() == QKeySequence(QKeySequence.Undo)]
    undo.activated.emit()                                  # Ctrl+Z (QTest key clicks bypass shortcuts here)
    assert lp.pair_count() == 3
