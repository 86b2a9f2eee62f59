"""A learned result flagged by its stage check is visible as such on the run (``gui``).

A fake learned paradigm returns what ``_learned`` returns when a stage made the pair worse (its
warnings and ``checks``); the run goes through the real worker and ``register_and_measure``:

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest tests/test_gui_stagecheck.py
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import paradigms
from app.engine.types import RegistrationResult, Transform, Volume, params_to_dict
from app.viewer.runs import run_verdict

pytestmark = pytest.mark.gui

CHECK = {"metric": "lncc", "values": {"start": 0.24, "prealigned": 0.27, "affine": 0.30, "deformable": 0.12},
         "kept": "affine", "last": "deformable", "flagged": True, "margin": 0.01,
         "worse": ["the deformable stage made the pair less similar than its input (lncc 0.300 at affine -> 0.120)"]}
WARNINGS = ["input unlike the training data of weakly.pt (IXI T1 heads with skull): the fixed image looks "
            "skull-stripped", "stage check: the deformable stage made the pair less similar than its input; "
            "kept the affine stage's transform"]


class FlaggedRegistrar:
    key: ClassVar[str] = "flagged_learned"
    learned: ClassVar[bool] = False
    description: ClassVar[str] = "Fake learned result whose deformable stage was rejected"

    from app.engine.paradigms.weakly import WeaklyParams as Params

    def register(self, fixed, moving, params, *, initial=None, progress=None, cancel=None, device="auto", **_):
        from app.engine.spatial import resample
        t = Transform(sitk.TranslationTransform(3, (1.5, 0.0, 0.0)), "rigid")
        return RegistrationResult(t, resample(moving, fixed, t), timings={"total": 0.01}, device="cpu",
                                  paradigm=self.key, params=params_to_dict(params), warnings=list(WARNINGS),
                                  checks={"stage_check": dict(CHECK), "input_check": {"warnings": WARNINGS[:1]}})


@pytest.fixture
def flagged(monkeypatch):
    monkeypatch.setitem(paradigms.REGISTRY, "flagged_learned", f"{__name__}:FlaggedRegistrar")
    yield
    from app import workers
    workers.default_engine().cancel_all()
    workers.default_engine().wait_idle(10000)


def test_verdict_levels():
    assert run_verdict({}) == ("ok", "", [])
    level, head, w = run_verdict({"warnings": ["x"]})
    assert level == "warning" and "1 warning" in head and w == ["x"]
    level, head, _ = run_verdict({"warnings": WARNINGS, "checks": {"stage_check": CHECK}})
    assert level == "flagged" and "Worse than its input" in head and "kept the affine stage" in head
    # a pipeline keys its checks by stage
    level, head, _ = run_verdict({"checks": {"1:iterative": {}, "2:weakly": {"stage_check": CHECK}}})
    assert level == "flagged" and head.startswith("stage 2:weakly: Worse than its input")


def test_a_flagged_run_is_not_shown_as_a_plain_success(qtbot, tmp_path, flagged):
    from app.widgets.main_window import MainWindow
    w = MainWindow(confirm_close=False, autosave_dir=tmp_path / "autosave")
    qtbot.addWidget(w)
    w.resize(1280, 860)
    w.show()
    from app.engine import io
    a = np.zeros((16, 16, 16), np.float32)
    a[4:12, 4:12, 4:12] = 100
    io.write_volume(Volume(a, (1.5, 1.5, 1.5), name="fixed"), tmp_path / "fixed.nii.gz")
    io.write_volume(Volume(np.roll(a, 1, 2), (1.5, 1.5, 1.5), name="moving"), tmp_path / "moving.nii.gz")
    assert w.load_pair(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz")
    panel = w.registration_panel
    panel.set_paradigm("flagged_learned")
    with qtbot.waitSignal(panel.run_finished, timeout=60000) as sig:
        assert panel.run()
    _, m = sig.args
    assert m["flagged"] is True and m["warnings"] == WARNINGS and m["checks"]["stage_check"]["kept"] == "affine"
    # the registration panel says so
    assert "FLAGGED" in panel.stage_label.text()
    assert "Worse than its input" in panel.status_label.text() and panel.status_label.isVisible()
    # the metrics panel: a visible banner with the verdict and every warning, the run marked in the history
    mp = w.metrics_panel
    qtbot.waitUntil(lambda: mp.check_label.isVisible(), timeout=5000)
    text = mp.check_label.text()
    assert "Worse than its input" in text and "kept the affine stage" in text and "skull-stripped" in text
    assert mp.check_label.property("level") == "flagged"
    item = mp.history.item(mp.history.count() - 1).text()
    assert item.startswith("⚠") and "FLAGGED" in item
    # the status bar: not "Registration finished" alone, and it stays
    msg = w.statusBar().currentMessage()
    assert msg.startswith("Registration finished: ") and "Worse than its input" in msg
    # ...with a lasting marker beside the cursor readout while the run is on screen
    assert w.run_check_label.isVisible() and w.run_check_label.property("level") == "flagged"
    assert "FLAGGED" in w.run_check_label.text() and "skull-stripped" in w.run_check_label.toolTip()
    # a plain run afterwards hides the banner and the marker; selecting the flagged run shows them again
    mp.add_run("plain", None, {"dice_mean": 0.5})
    assert not mp.check_label.isVisible() and not w.run_check_label.isVisible()
    mp.select_run(0)
    assert mp.check_label.isVisible() and w.run_check_label.isVisible()
    w.close()
