"""The registration panel plots an agent's six pose parameters per step (``gui``).

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest tests/test_gui_agent.py
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import paradigms
from app.engine.paradigms.base import param
from app.engine.types import Progress, RegistrationResult, Transform, Volume, params_to_dict

pytestmark = pytest.mark.gui


@dataclass
class StepParams:
    steps: int = param(30, "actions", range=(1, 1000))


class FakeAgentRegistrar:
    """Steps +1 mm along x per action and reports the pose, like the agent paradigm."""

    key: ClassVar[str] = "fake_agent"
    learned: ClassVar[bool] = False
    description: ClassVar[str] = "Fake agent: reports a pose per step"
    Params: ClassVar[type] = StepParams

    def register(self, fixed, moving, params, *, progress=None, cancel=None, **_):
        history = []
        for i in range(1, params.steps + 1):
            pose = (float(i), 0.0, 0.0, 0.0, -0.5 * i, 0.0)
            history.append({"stage": "agent", "iteration": i, "action": "+tx", "pose": list(pose)})
            if progress:
                preview = np.full((6, 8), float(i), np.float32) if i % 5 == 0 else None
                if preview is not None:
                    preview[:, : min(i // 5, 8)] = -1.0        # the dark part grows with the step
                progress(Progress("agent", i, params.steps, fraction=i / params.steps, pose=pose, preview=preview))
            time.sleep(0.002)
        history.append({"stage": "agent_end", "iteration": params.steps, "converged": True})
        t = Transform(sitk.TranslationTransform(3, (float(params.steps), 0.0, 0.0)), "rigid")
        from app.engine.spatial import resample
        return RegistrationResult(t, resample(moving, fixed, t), history=history, timings={"total": 0.01},
                                  device="cpu", paradigm=self.key, params=params_to_dict(params))


def test_the_panel_plots_the_six_pose_parameters_per_step(qtbot, monkeypatch):
    from app import workers
    from app.widgets.registration_panel import RegistrationPanel
    monkeypatch.setitem(paradigms.REGISTRY, "fake_agent", f"{__name__}:FakeAgentRegistrar")
    panel = RegistrationPanel()
    qtbot.addWidget(panel)
    panel.set_paradigm("fake_agent")
    img = Volume(np.random.default_rng(0).random((10, 10, 10)).astype(np.float32), name="f")
    panel.set_inputs_provider(lambda: {"fixed": img, "moving": img})
    panel.set_params(StepParams(steps=30))
    with qtbot.waitSignal(panel.run_finished, timeout=60000):
        assert panel.run()
    curves = panel.pose_curve_data()
    assert len(curves) == 6
    xs, tx = curves[0]
    assert xs == [float(i) for i in range(1, 31)] and tx == xs          # every step, even if progress was throttled
    assert curves[4][1] == [-0.5 * i for i in range(1, 31)]
    assert panel.loss_curve_data() == ([], [])
    # the live preview showed the moving image through the pose as it went
    assert not panel.run_plot.preview_view.isHidden() and panel.preview_count() >= 1
    shown = panel.run_plot.preview_image.image
    assert shown.shape == (6, 8) and shown.min() == -1.0 and shown.max() % 5 == 0
    assert "step" in panel.run_plot.preview_caption.text()
    qtbot.waitUntil(lambda: not workers.default_engine().busy, timeout=10000)
    # a new run starts without the old preview; a bad preview (not 2D) is ignored, not a crash
    panel.run_plot.show_preview(np.zeros((2, 2, 2)), 1)
    panel.run_plot.reset_preview()
    assert panel.run_plot.preview_view.isHidden() and panel.preview_count() == 0
