"""Trust panel: where is the current run likely wrong (estimated error map), and fix it by pointing
(landmark-guided correction). A view of the :class:`~app.viewer.workspace.Workspace`:

* **Error map**: Compute queues :func:`app.viewer.trust.error_map_for_run` on the window's engine
  thread (``dissimilarity``: seconds; ``consistency`` re-registers the reverse direction, so it
  shows progress and can be cancelled). The answer goes to the run it was computed for
  (:meth:`Workspace.set_error_map`), unless that run or its images changed meanwhile (then it is
  dropped: never a stale map). "Show" toggles the overlay (``ViewerState.overlay.error_map``);
  "Go to the worst region" moves the cursor to ``error_map_peak_mm``.
* **Guided correction**: guide pairs are placed with the landmark pair tools
  (:class:`~app.widgets.landmark_panel.LandmarkPanel` on ``workspace.guides``, a list apart from
  the evaluation landmarks); Correct queues :func:`app.viewer.trust.correct_run` for the current
  run and adds the result as a new run, ``"<run> + correction (N guides)"``.

Signals
-------
goto_requested(object)   (3,) LPS mm: the window moves the cursor there
busy_changed(bool)       a job of this panel is queued or running

This module holds the panel's widgets, how they follow the workspace, and the summary texts; the
error-map job is in :mod:`app.widgets.trust_errormap`, the correction job in
:mod:`app.widgets.trust_correction`.
"""
from __future__ import annotations

from typing import Callable, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.viewer import trust
from app.viewer.workspace import Workspace

from .landmark_panel import LandmarkPanel
from .trust_correction import GuidedCorrectionMixin
from .trust_errormap import ErrorMapMixin

METHOD_TEXT = {"dissimilarity": "Dissimilarity (fast)", "consistency": "Inverse consistency (re-registers)"}
GUIDE_METHOD_TEXT = {"optimise": "Image-aware (optimiser)", "rbf": "Smooth bump (RBF, fast)"}


class TrustPanel(ErrorMapMixin, GuidedCorrectionMixin, QWidget):
    """Error map and landmark-guided correction of the current run.

    Parameters
    ----------
    workspace : Workspace
    engine : app.workers.Engine, optional
        Where the jobs run (the window's); the application's default engine otherwise.
    add_run : callable, optional
        ``add_run(result, metrics, name)`` records a corrected run (the window's, which also marks
        the session unsaved); ``workspace.add_run`` by default.
    checkpoint_for : callable, optional
        ``checkpoint_for(paradigm key) -> path or None``: the checkpoint to re-register a learned
        paradigm with (consistency); None uses the paradigm's default.
    device : callable, optional
        ``device() -> str`` for re-registration ('auto' by default).
    """

    goto_requested = Signal(object)
    busy_changed = Signal(bool)

    def __init__(self, workspace: Workspace, engine=None, *, add_run: Optional[Callable] = None,
                 checkpoint_for: Optional[Callable] = None, device: Optional[Callable] = None,
                 parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.workspace = workspace
        self.state = workspace.state
        if engine is None:
            from app.workers import default_engine
            engine = default_engine()
        self.engine = engine
        self._add_run = add_run or (lambda res, m, name: workspace.add_run(res, m, name))
        self._checkpoint_for = checkpoint_for or (lambda key: None)
        self._device = device or (lambda: "auto")
        self.error_job = None
        self.correct_job = None
        self.last_error: Optional[str] = None

        # -- error map
        self.method_combo = QComboBox()
        for m in trust.GUI_METHODS:
            self.method_combo.addItem(METHOD_TEXT[m], m)
        self.method_combo.setToolTip("Dissimilarity: local 1 - LNCC of fixed and warped, scaled to mm (seconds).\n"
                                     "Inverse consistency: registers moving -> fixed with the same paradigm and "
                                     "combines |R(T(x)) - x| with the dissimilarity (a registration's time).")
        self.compute_button = QPushButton("Compute")
        self.compute_button.setToolTip("Estimate the registration error (mm) of the current run at every fixed voxel")
        self.cancel_button = QPushButton("Cancel")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumHeight(10)
        self.progress_bar.hide()
        self.show_box = QCheckBox("Show error map")
        self.show_box.setToolTip("Overlay the estimated error (mm) on the views; the value under the cursor "
                                 "is in the status bar")
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.goto_button = QPushButton("Go to the worst region")
        self.goto_button.setToolTip("Move the cursor to the centre of the region with the largest estimated errors")

        eg = QGroupBox("Error map")
        ef = QVBoxLayout(eg)
        row = QHBoxLayout()
        row.addWidget(self.method_combo, 1)
        row.addWidget(self.compute_button)
        row.addWidget(self.cancel_button)
        ef.addLayout(row)
        ef.addWidget(self.progress_bar)
        row = QHBoxLayout()
        row.addWidget(self.show_box)
        row.addStretch(1)
        row.addWidget(self.goto_button)
        ef.addLayout(row)
        ef.addWidget(self.error_label)

        # -- guided correction
        self.guide_panel = LandmarkPanel(model=workspace.guides)
        self.guide_panel.pick_fixed_button.setText("Guide in Fixed")
        self.guide_panel.pick_moving_button.setText("Guide in Moving")
        self.guide_panel.setToolTip("Guide pairs: where the run is wrong, click the fixed point, then its true "
                                    "partner in the moving image. They are not evaluation landmarks.")
        self.sigma_spin = QDoubleSpinBox()
        self.sigma_spin.setRange(2.0, 200.0)
        self.sigma_spin.setValue(20.0)
        self.sigma_spin.setSingleStep(5.0)
        self.sigma_spin.setSuffix(" mm")
        self.sigma_spin.setToolTip("Reach of the correction (Gaussian RBF width); narrowed between close guides "
                                   "and widened where a guide's residual would fold the field")
        self.guide_method_combo = QComboBox()
        for m in ("optimise", "rbf"):          # image-aware first: it kept Dice on IXI pairs, the RBF did not
            self.guide_method_combo.addItem(GUIDE_METHOD_TEXT[m], m)
        self.guide_method_combo.setToolTip(
            "Image-aware: the optimiser refines the run around the guides with local NCC, smoothness and the guides "
            "as a landmark term, then a small RBF snaps the rest (tens of seconds on a CPU).\nSmooth bump: a "
            "Gaussian-RBF field on top of the run moves each guide onto its partner without looking at the images "
            "(seconds; it can drag nearby structures off). bench/results/guidance.md compares them.")
        self.correct_button = QPushButton("Correct")
        self.correct_button.setToolTip("A new run: the current run's transform refined to map every fixed guide "
                                       "onto its moving partner, the rest of the field kept")
        self.correct_label = QLabel()
        self.correct_label.setWordWrap(True)
        cg = QGroupBox("Landmark-guided correction")
        cl = QVBoxLayout(cg)
        cl.addWidget(self.guide_panel, 1)
        form = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.sigma_spin)
        row.addStretch(1)
        row.addWidget(self.correct_button)
        form.addRow("Reach", row)
        form.addRow("Method", self.guide_method_combo)
        cl.addLayout(form)
        cl.addWidget(self.correct_label)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(eg)
        lay.addWidget(cg, 1)

        self.compute_button.clicked.connect(lambda: self.compute_error_map())
        self.cancel_button.clicked.connect(self.cancel)
        self.show_box.toggled.connect(lambda on: self.state.set_overlay(error_map=on))
        self.goto_button.clicked.connect(self.goto_worst)
        self.correct_button.clicked.connect(lambda: self.correct())
        self.guide_panel.landmarks_changed.connect(self._update)
        ev = workspace.runs.events
        for e in (ev.added, ev.removed, ev.changed, ev.cleared, ev.current, ev.renamed):
            e.connect(self._on_runs_change)
        self.state.events.overlay.connect(self._on_overlay_change)
        self.state.events.layers.connect(self._on_layers_change)
        self._on_overlay_change({"error_map"})
        self._update()

    # ================================================================ model -> view
    def _alive(self) -> bool:
        import shiboken6
        if shiboken6.isValid(self):
            return True
        ev = self.workspace.runs.events
        for e in (ev.added, ev.removed, ev.changed, ev.cleared, ev.current, ev.renamed):
            e.disconnect(self._on_runs_change)
        self.state.events.overlay.disconnect(self._on_overlay_change)
        self.state.events.layers.disconnect(self._on_layers_change)
        return False

    def _on_runs_change(self, *_) -> None:
        if self._alive():
            run = self.workspace.runs.current_run
            self.guide_panel.set_transform(None if run is None or run.result is None else run.result.transform)
            self._update()

    def _on_layers_change(self, name) -> None:
        if self._alive():
            self._update()

    def _on_overlay_change(self, changed: set) -> None:
        if not self._alive() or "error_map" not in changed:
            return
        was = self.show_box.blockSignals(True)
        self.show_box.setChecked(self.state.overlay.error_map)
        self.show_box.blockSignals(was)

    def _update(self) -> None:
        run = self.workspace.runs.current_run
        has = run is not None and run.result is not None and self.state.fixed is not None
        err_busy = self.error_job is not None
        cor_busy = self.correct_job is not None
        self.compute_button.setEnabled(has and not err_busy)
        self.method_combo.setEnabled(not err_busy)
        self.guide_method_combo.setEnabled(not cor_busy)
        self.cancel_button.setEnabled(err_busy or cor_busy)
        self.progress_bar.setVisible(err_busy or cor_busy)
        m = run.metrics if run is not None else {}
        peak = m.get("error_map_peak_mm")
        self.goto_button.setEnabled(has and peak is not None)
        if err_busy:
            pass                        # progress text is written by _on_error_progress
        elif run is None:
            self.error_label.setText("Run a registration first; then estimate where it is likely wrong.")
        elif run.result is not None and run.result.error_map is not None:
            self.error_label.setText(error_summary(m))
        elif m.get("error_map_p95_mm") is not None:
            self.error_label.setText(error_summary(m) + "\n(map not in memory: Compute to show it)")
        else:
            self.error_label.setText(f"No error map for '{run.name}' yet.")
        n = self.workspace.guides.pair_count(complete_only=True)
        self.correct_button.setEnabled(has and n > 0 and not cor_busy)
        self.correct_button.setText(f"Correct ({n} guide{'s' if n != 1 else ''})" if n else "Correct")
        if not cor_busy:
            g = m.get("guidance") or {}
            if run is not None and g:
                self.correct_label.setText(guidance_summary(m))
            elif has and n == 0:
                self.correct_label.setText("Place guide pairs where the run is wrong, then Correct.")
            else:
                self.correct_label.setText("")

    # ================================================================ jobs
    def cancel(self) -> None:
        """Cancel the running error map (and correction)."""
        for job in (self.error_job, self.correct_job):
            if job is not None:
                job.cancel()

    def shutdown(self) -> None:
        self.cancel()


def _f(v, fmt="{:.2f}") -> str:
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return "–"


def error_summary(m: dict) -> str:
    """One paragraph on where a run's largest estimated errors are (mm, LPS)."""
    peak = m.get("error_map_peak_mm")
    text = (f"Estimated error ({m.get('error_map_method') or '?'}): mean {_f(m.get('error_map_mean_mm'))} mm, "
            f"95th percentile {_f(m.get('error_map_p95_mm'))} mm over the head.")
    if peak is not None:
        text += " Largest errors around LPS (" + ", ".join(_f(v, "{:.1f}") for v in peak) + ") mm."
    if m.get("error_map_note"):
        text += f"\n{m['error_map_note']}"
    return text


def guidance_summary(m: dict) -> str:
    """One line on a corrected run: guides, guide TRE before -> after, reach."""
    g = m.get("guidance") or {}
    n = g.get("guides")
    widths = [float(v) for v in (g.get("widths_mm") or ([g["sigma_mm"]] if g.get("sigma_mm") else []))]
    reach = "" if not widths else (f"reach {min(widths):.0f} mm, " if max(widths) - min(widths) < 0.5
                                   else f"reach {min(widths):.0f}-{max(widths):.0f} mm, ")
    how = {"optimise": " (image-aware)", "rbf": " (RBF)"}.get(g.get("method"), "")
    return (f"Corrected from '{m.get('corrected_from') or '?'}' with {n} guide pair{'s' if n != 1 else ''}{how}: "
            f"guide TRE {_f(g.get('guide_tre_before_mm'))} → {_f(g.get('guide_tre_after_mm'))} mm "
            f"({reach}folding {_f(100 * float(g.get('fold_fraction') or 0), '{:.3f}')} %).")
