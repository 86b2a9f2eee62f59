"""The live view of a registration run: loss curves per stage, the agent's pose, a live preview.

A Qt view of what a :class:`app.workers.RegistrationRun` reports; it holds no engine state. The
registration panel owns one and feeds it the run's loss history, progress reports and result.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

CURVE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
NO_LOSS_STAGES = ("done", "evaluate", "load", "resample")
POSE_NAMES = ("tx mm", "ty mm", "tz mm", "rx deg", "ry deg", "rz deg")   # Progress.pose (the agent)


def normalise_curve(ys: list[float]) -> list[float]:
    """A stage's losses scaled to [0, 1] by its own range (stages differ by orders of magnitude:
    a demons stage next to a Mattes MI stage would otherwise be a flat line); a constant curve
    is drawn at 0.5."""
    if not ys:
        return []
    lo, hi = min(ys), max(ys)
    if not hi > lo:
        return [0.5] * len(ys)
    return [(y - lo) / (hi - lo) for y in ys]


class RunPlot(QWidget):
    """Loss per stage (each scaled to its own range) against the running iteration, the agent's six
    pose parameters per step, and a live preview of the moving image through the current estimate
    (``Progress.preview``, hidden until a run sends one)."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.loss_plot = pg.PlotWidget()
        self.loss_plot.setBackground("w")
        self.loss_plot.setMinimumHeight(130)
        self.loss_plot.setLabel("left", "loss (scaled)")
        self.loss_plot.setLabel("bottom", "iteration (all stages)")
        self.loss_plot.showGrid(x=True, y=True, alpha=0.25)
        self.loss_plot.setMouseEnabled(x=False, y=False)
        self.loss_plot.getPlotItem().setMenuEnabled(False)
        self.loss_plot.getAxis("left").enableAutoSIPrefix(False)
        # live preview: the moving image through the current estimate, from paradigms that report one
        # (the agent sends an axial slice of its working grid every few steps)
        self.preview_caption = QLabel("")
        self.preview_view = pg.GraphicsLayoutWidget()
        self.preview_view.setBackground("k")
        self.preview_view.setMinimumHeight(160)
        self.preview_view.setToolTip("The moving image through the current estimate while the run goes on "
                                     "(a slice of the method's working grid)")
        box = self.preview_view.addViewBox(lockAspect=True, enableMouse=False, invertY=True)
        box.setMenuEnabled(False)
        self.preview_image = pg.ImageItem(axisOrder="row-major")
        box.addItem(self.preview_image)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.loss_plot, 2)
        lay.addWidget(self.preview_caption)
        lay.addWidget(self.preview_view, 2)
        self._curves: dict[str, tuple] = {}     # stage -> (item, xs, ys)
        self._pose_curves: list = []             # six (item, xs, ys): the agent's pose per step
        self._loss_seen = 0
        self._x = 0
        self._preview_steps = 0
        self.reset()

    # ------------------------------------------------------------------ data (tests, exports)
    def loss_curve_data(self) -> tuple[list[float], list[float]]:
        """All plotted loss points (x = running iteration over stages, y = loss)."""
        xs, ys = [], []
        for _, cx, cy in self._curves.values():
            xs += cx
            ys += cy
        order = sorted(range(len(xs)), key=xs.__getitem__)
        return [xs[i] for i in order], [ys[i] for i in order]

    def pose_curve_data(self) -> list[tuple[list[float], list[float]]]:
        """The agent's plotted pose: six (steps, values) for tx, ty, tz (mm), rx, ry, rz (degrees)."""
        return [(list(xs), list(ys)) for _, xs, ys in self._pose_curves]

    def stage_curves(self) -> dict[str, tuple]:
        """stage -> (plot item, xs, raw losses)."""
        return dict(self._curves)

    def preview_count(self) -> int:
        """How many live previews the current (or last) run showed."""
        return self._preview_steps

    # ------------------------------------------------------------------ updates
    def reset(self) -> None:
        """Empty plot and no preview: a new run starts."""
        for item, _, _ in self._curves.values():
            self.loss_plot.removeItem(item)
        for item, _, _ in self._pose_curves:
            self.loss_plot.removeItem(item)
        self._pose_curves = []
        self.loss_plot.setLabel("left", "loss (scaled)")
        self.loss_plot.setTitle(None)
        self._curves = {}
        self._loss_seen = 0
        self._x = 0
        self.reset_preview()

    def add_losses(self, history: list) -> None:
        """Plot the entries of a run's whole loss ``history`` [(stage, iteration, loss), ...] not seen yet."""
        new = history[self._loss_seen:]
        if not new:
            return
        self._loss_seen = len(history)
        touched = set()
        for stage, _it, loss in new:
            if stage in NO_LOSS_STAGES:
                continue
            if stage not in self._curves:
                colour = CURVE_COLOURS[len(self._curves) % len(CURVE_COLOURS)]
                item = self.loss_plot.plot([], [], pen=pg.mkPen(colour, width=1.5), name=stage)
                self._curves[stage] = (item, [], [])
                self._update_title()
            _, xs, ys = self._curves[stage]
            self._x += 1
            xs.append(float(self._x))
            ys.append(float(loss))
            touched.add(stage)
        for stage in touched:
            item, xs, ys = self._curves[stage]
            item.setData(xs, normalise_curve(ys))

    def add_pose(self, step: int, pose, redraw: bool = True) -> None:
        """One agent step: the six pose parameters (mm, degrees) against the step number."""
        if not self._pose_curves:
            for i in range(len(POSE_NAMES)):
                pen = pg.mkPen(CURVE_COLOURS[i], width=1.5, style=Qt.SolidLine if i < 3 else Qt.DashLine)
                self._pose_curves.append((self.loss_plot.plot([], [], pen=pen), [], []))
            self.loss_plot.setLabel("left", "pose (mm, deg)" if not self._curves else "loss (scaled) · pose (mm, deg)")
            self._update_title()
        for (item, xs, ys), v in zip(self._pose_curves, pose):
            xs.append(float(step))
            ys.append(float(v))
            if redraw:
                item.setData(xs, ys)

    def set_poses(self, steps: list[dict]) -> None:
        """Replace the pose curves by a whole trajectory (``history`` records with ``iteration`` and
        ``pose``): progress reports are throttled, the result has every step."""
        for _, xs, ys in self._pose_curves:
            xs.clear()
            ys.clear()
        for h in steps:
            self.add_pose(h["iteration"], h["pose"], redraw=False)
        for item, xs, ys in self._pose_curves:
            item.setData(xs, ys)

    def finish(self) -> None:
        """The run ended: say so when there was nothing to plot (a learned model's one pass)."""
        if not self._curves and not self._pose_curves:
            self.loss_plot.setTitle('<span style="color:#666">one network pass: no loss curve</span>', size="9pt")

    def show_preview(self, preview, step) -> None:
        """Show a 2D preview (rows, columns) of the current warp; anything else is ignored."""
        a = np.asarray(preview, dtype=np.float32)
        finite = a[np.isfinite(a)] if a.ndim == 2 else a[:0]
        if finite.size == 0:
            return
        lo, hi = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
        self.preview_image.setImage(np.nan_to_num(a, nan=lo), levels=(lo, hi if hi > lo else lo + 1.0))
        self._preview_steps += 1
        self.preview_caption.setText(f"Live: moving image through the current estimate, step {step}")
        self.preview_caption.show()
        self.preview_view.show()

    def reset_preview(self) -> None:
        self._preview_steps = 0
        self.preview_image.clear()
        self.preview_caption.hide()
        self.preview_view.hide()

    def _update_title(self) -> None:
        # stage names in their curve colours above the plot: a legend would cover the curves
        spans = [f'<span style="color:{item.opts["pen"].color().name()}">{stage}</span>'
                 for stage, (item, _, _) in self._curves.items()]
        spans += [f'<span style="color:{item.opts["pen"].color().name()}">{name}</span>'
                  for name, (item, _, _) in zip(POSE_NAMES, self._pose_curves)]
        self.loss_plot.setTitle(" · ".join(spans), size="9pt")
