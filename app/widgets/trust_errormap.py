"""The trust panel's error map: estimate where the current run is likely wrong, in mm at every
fixed voxel, and move the cursor to the worst region.

Compute queues :func:`app.viewer.trust.error_map_for_run` on the panel's engine thread
(``dissimilarity``: seconds; ``consistency`` re-registers the reverse direction, so it shows
progress and can be cancelled). The answer goes to the run it was computed for
(:meth:`Workspace.set_error_map`) unless that run or its images changed meanwhile; then it is
dropped, never shown stale.

:class:`ErrorMapMixin` is combined into :class:`app.widgets.trust_panel.TrustPanel`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from app.viewer import trust


class ErrorMapMixin:
    """The error-map job and "go to the worst region" (see the module docstring)."""

    # ================================================================ error map
    def compute_error_map(self, method: Optional[str] = None) -> bool:
        """Queue the current run's error map (``method``: the combo's by default); False when there
        is nothing to estimate or a computation is already running."""
        if method is not None:
            if method not in trust.GUI_METHODS:
                raise ValueError(f"error map method must be one of {', '.join(trust.GUI_METHODS)}, got {method!r}")
            self.method_combo.setCurrentIndex(self.method_combo.findData(method))
        method = self.method_combo.currentData()
        ws, st = self.workspace, self.state
        run = ws.runs.current_run
        if self.error_job is not None or run is None or run.result is None or st.fixed is None or st.moving is None:
            return False
        try:
            spec, params = trust.run_spec(run)
        except ValueError as e:
            if method == "consistency":
                self._fail(str(e))
                return False
            spec, params = "", None
        result, fixed, moving = run.result, st.fixed, st.moving
        self.last_error = None
        self.error_label.setText(f"Estimating the error of '{run.name}' ({method})…")
        self.progress_bar.setRange(0, 0 if method == "dissimilarity" else 1000)
        self.error_job = self.engine.submit(
            trust.error_map_for_run, spec, fixed, moving, result, params, method=method,
            checkpoint=self._checkpoint_for(spec), device=self._device(), name=f"error map ({method})",
            engine_callbacks=True, context=self, on_progress=self._on_error_progress,
            on_done=lambda out: self._on_error_done(out, result, fixed, moving),
            on_error=lambda msg: self._on_error_failed(msg), on_cancelled=self._on_error_cancelled)
        self.busy_changed.emit(True)
        self._update()
        return True

    def _on_error_progress(self, p) -> None:
        frac = getattr(p, "fraction", None)
        if frac is not None and self.progress_bar.maximum() > 0:
            self.progress_bar.setValue(int(round(1000 * min(max(float(frac), 0.0), 1.0))))
        msg = getattr(p, "message", "") or ""
        if msg:
            self.error_label.setText(msg)

    def _end_error_job(self) -> None:
        self.error_job = None
        self.progress_bar.setRange(0, 1000)
        self.busy_changed.emit(self.correct_job is not None)

    def _on_error_done(self, out, result, fixed, moving) -> None:
        self._end_error_job()
        vol, info = out
        ws = self.workspace
        index = next((i for i, r in enumerate(ws.runs.runs) if r.result is result), None)
        if index is None or ws.state.fixed is not fixed or ws.state.moving is not moving:
            # the run was deleted or its image replaced while the map was computed: never show it
            self.error_label.setText("The error map was dropped: its run or images changed meanwhile.")
            self._update()
            return
        ws.set_error_map(index, vol, info)
        if index == ws.runs.current:
            self.state.set_overlay(error_map=True)
        self._update()

    def _on_error_failed(self, message: str) -> None:
        self._end_error_job()
        self._fail(f"Error map failed: {message}")

    def _on_error_cancelled(self) -> None:
        self._end_error_job()
        self._update()
        self.error_label.setText("Error map cancelled.")

    def _fail(self, message: str) -> None:
        self.last_error = message
        self._update()
        self.error_label.setText(message)

    def goto_worst(self) -> Optional[np.ndarray]:
        """Move the cursor to the current run's ``error_map_peak_mm`` (emits ``goto_requested``)."""
        run = self.workspace.runs.current_run
        peak = None if run is None else run.metrics.get("error_map_peak_mm")
        if peak is None:
            return None
        p = np.asarray(peak, float).reshape(3)
        self.goto_requested.emit(p)
        return p
