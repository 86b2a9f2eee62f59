"""The trust panel's landmark-guided correction: refine the current run so that every complete
guide pair's fixed point maps onto its moving partner, and add the result as a new run
(``"<run> + correction (N guides)"``).

Correct queues :func:`app.viewer.trust.correct_run` on the panel's engine thread ('optimise':
image-aware, with progress; 'rbf': a smooth bump, seconds). The corrected run is dropped if the
images changed meanwhile.

:class:`GuidedCorrectionMixin` is combined into :class:`app.widgets.trust_panel.TrustPanel`.
"""
from __future__ import annotations

from typing import Optional

from app.viewer import trust


class GuidedCorrectionMixin:
    """The guided-correction job (see the module docstring)."""

    # ================================================================ guided correction
    def correct(self, method: Optional[str] = None) -> bool:
        """Queue the correction of the current run by the complete guide pairs (``method`` 'rbf' or
        'optimise': the combo's by default); the corrected run is added when it is done. False when
        there is nothing to correct or a correction is running."""
        if method is not None:
            i = self.guide_method_combo.findData(method)
            if i < 0:
                raise ValueError(f"guide method must be 'rbf' or 'optimise', got {method!r}")
            self.guide_method_combo.setCurrentIndex(i)
        method = self.guide_method_combo.currentData()
        ws, st = self.workspace, self.state
        run = ws.runs.current_run
        gf, gm = ws.guides.fixed_landmarks(), ws.guides.moving_landmarks()
        if self.correct_job is not None or run is None or run.result is None or not len(gf) \
                or st.fixed is None or st.moving is None:
            return False
        inputs = ws.registration_inputs()
        fixed, moving, result = st.fixed, st.moving, run.result
        name = trust.correction_name(run.name, len(gf))
        self.correct_label.setText(f"Correcting '{run.name}' with {len(gf)} guide pair{'s' if len(gf) != 1 else ''}"
                                   f" ({method})…")
        self.progress_bar.setRange(0, 0 if method == "rbf" else 1000)
        self.progress_bar.setValue(0)
        self.correct_job = self.engine.submit(
            trust.correct_run, fixed, moving, result, gf, gm, sigma_mm=float(self.sigma_spin.value()), method=method,
            device=self._device(), on_progress=self._on_correct_progress,
            fixed_labels=inputs["fixed_labels"], moving_labels=inputs["moving_labels"],
            fixed_points=inputs["fixed_points"], moving_points=inputs["moving_points"],
            base_metrics=dict(run.metrics), base_name=run.name, name="guided correction", engine_callbacks=True,
            context=self, on_done=lambda out: self._on_correct_done(out, name, fixed, moving),
            on_error=self._on_correct_failed, on_cancelled=self._on_correct_cancelled)
        self.busy_changed.emit(True)
        self._update()
        return True

    def _on_correct_progress(self, p) -> None:
        frac = getattr(p, "fraction", None)
        if frac is not None and self.progress_bar.maximum() > 0:
            self.progress_bar.setValue(int(round(1000 * min(max(float(frac), 0.0), 1.0))))
        if getattr(p, "iteration", None):
            self.correct_label.setText(f"Correcting: optimiser iteration {p.iteration}"
                                       + (f", loss {p.loss:.4f}" if getattr(p, "loss", None) is not None else ""))

    def _end_correct_job(self) -> None:
        self.correct_job = None
        self.progress_bar.setRange(0, 1000)
        self.busy_changed.emit(self.error_job is not None)

    def _on_correct_done(self, out, name: str, fixed, moving) -> None:
        self._end_correct_job()
        if self.state.fixed is not fixed or self.state.moving is not moving:
            self.correct_label.setText("The correction was dropped: the images changed meanwhile.")
            self._update()
            return
        result, metrics = out
        self._add_run(result, metrics, name)
        self._update()

    def _on_correct_failed(self, message: str) -> None:
        self._end_correct_job()
        self.last_error = f"Correction failed: {message}"
        self._update()
        self.correct_label.setText(self.last_error)

    def _on_correct_cancelled(self) -> None:
        self._end_correct_job()
        self._update()
        self.correct_label.setText("Correction cancelled.")
