"""The registration panel's run control: start and cancel a run, and follow it live (progress
bar, stage and elapsed time, loss curve, agent pose and previews, the final status line).

:class:`RunControlMixin` is combined into :class:`app.widgets.registration_panel.RegistrationPanel`.
The run itself is a :class:`app.workers.RegistrationRun` on the panel's engine thread; the
handlers here react to its signals on the GUI thread and re-emit them as the panel's
``run_started`` / ``run_finished`` / ``run_failed`` / ``run_cancelled``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from PySide6.QtCore import QElapsedTimer, QThread, Slot

from app import workers
from app.viewer.runs import run_verdict

REGISTRATION_SHARE = 0.9      # of the progress bar; the metrics stage fills the rest


class RunControlMixin:
    """Run / Cancel and the live view of a run (see the module docstring)."""

    # ================================================================ public API
    def set_inputs_provider(self, fn: Callable[[], dict]) -> None:
        """``fn()`` returns dict(fixed, moving, fixed_labels, moving_labels, fixed_points,
        moving_points) at the moment Run is pressed (None for what is absent)."""
        self._provider = fn

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def loss_curve_data(self) -> tuple[list[float], list[float]]:
        """All plotted loss points (x = running iteration over stages, y = loss)."""
        return self.run_plot.loss_curve_data()

    def pose_curve_data(self) -> list[tuple[list[float], list[float]]]:
        """The agent's plotted pose: six (steps, values) for tx, ty, tz (mm), rx, ry, rz (degrees)."""
        return self.run_plot.pose_curve_data()

    def preview_count(self) -> int:
        """How many live previews the current (or last) run showed."""
        return self.run_plot.preview_count()

    def run(self) -> bool:
        """Start a run with the current inputs and settings. Returns False (and emits
        ``run_failed``) when it cannot start."""
        if self.is_running:
            return False
        key = self.paradigm_key
        try:
            if key is None or self._registrar_error:
                raise ValueError(self._registrar_error or "no registration paradigm is available")
            if self.is_learned and self._checkpoint_error:
                raise ValueError(self._checkpoint_error)
            params = self.params()
            inputs = dict(self._provider() if self._provider is not None else {})
            if inputs.get("fixed") is None or inputs.get("moving") is None:
                raise ValueError("load a fixed and a moving image first")
        except Exception as e:  # noqa: BLE001 - a bad setting is a message, not a crash
            self._show_status(workers.error_message(e), error=True)
            self.run_failed.emit(workers.error_message(e))
            return False
        for k, p in zip(self.stage_keys(), params if isinstance(params, list) else [params]):
            self._saved_params[k] = p
        w = workers.RegistrationRun(key, inputs, params, checkpoint=self._checkpoint if self.is_learned else None,
                                    device=self.device, min_interval_s=self._progress_interval_s)
        w.progress.connect(self._on_worker_progress)
        w.finished.connect(self._on_worker_finished)
        w.failed.connect(self._on_worker_failed)
        w.cancelled.connect(self._on_worker_cancelled)
        self._worker = w
        self.run_plot.reset()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.stage_label.setText(f"Starting {key}…")
        self._show_status("")
        self._clock.start()
        self._tick.start()
        self._on_tick()
        self._update_enabled()
        w.start(self.engine)
        self.run_started.emit()
        return True

    def cancel(self) -> None:
        """Ask the running registration to stop (it ends with ``run_cancelled``)."""
        if self._worker is not None:
            self._worker.cancel()
            self.cancel_button.setEnabled(False)
            self.stage_label.setText("Cancelling…")

    def shutdown(self, timeout_ms: int = 10000) -> bool:
        """Cancel a running registration and wait until the engine has let go of it."""
        w = self._worker
        if w is None:
            return True
        w.cancel()
        deadline = QElapsedTimer()
        deadline.start()
        from PySide6.QtWidgets import QApplication
        while w.is_running and deadline.elapsed() < timeout_ms:
            QApplication.processEvents()
            QThread.msleep(5)
        return not w.is_running

    @property
    def worker(self) -> Optional[workers.RegistrationRun]:
        """The running worker (None when idle)."""
        return self._worker

    # ================================================================ worker signals
    @Slot(object)
    def _on_worker_progress(self, p) -> None:
        frac = p.fraction
        if frac is None and p.total:
            frac = p.iteration / p.total
        if p.stage == "evaluate":
            # the metrics stage (Dice, HD95, TRE, Jacobian) reports no fraction: a busy bar
            # after the registration's share, until the run ends
            self.progress_bar.setRange(0, 0)
        elif frac is not None and math.isfinite(frac):
            self.progress_bar.setRange(0, 1000)
            self.progress_bar.setValue(int(round(REGISTRATION_SHARE * 1000 * min(max(frac, 0.0), 1.0))))
        text = str(p.stage)
        if p.total:
            text += f" · iteration {p.iteration}/{p.total}"
        elif p.iteration:
            text += f" · iteration {p.iteration}"
        if p.loss is not None and math.isfinite(p.loss):
            text += f" · loss {p.loss:.5g}"
        if p.message:
            text += f"\n{p.message}"
        self.stage_label.setText(text)
        self._update_loss_plot()
        if getattr(p, "pose", None) is not None and p.stage != "done":
            self.run_plot.add_pose(p.iteration, p.pose)
        if getattr(p, "preview", None) is not None:
            self.run_plot.show_preview(p.preview, p.iteration)

    @Slot(object, object)
    def _on_worker_finished(self, result, metrics) -> None:
        self._update_loss_plot()
        # progress is throttled: the whole trajectory comes from the result
        steps = [h for h in getattr(result, "history", []) if h.get("stage") == "agent" and "pose" in h]
        if steps:
            self.run_plot.set_poses(steps)
        self.run_plot.finish()
        secs = self._run_ended()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(1000)
        dev = (metrics or {}).get("device") or getattr(result, "device", "?")
        rt = (metrics or {}).get("runtime_s")
        level, head, warnings = run_verdict(metrics if metrics else {"warnings": getattr(result, "warnings", [])})
        self.stage_label.setText({"ok": "Finished", "warning": "Finished with warnings",
                                  "flagged": "Finished: FLAGGED (worse than its input)"}[level])
        self.elapsed_label.setText(f"{secs:.1f} s")
        reg = f"registration {rt:.1f} s + metrics, " if isinstance(rt, (int, float)) else ""
        text = f"{reg[:1].upper() + reg[1:]}total {secs:.1f} s, on {dev}"
        if level != "ok":
            text = f"{head}\n{text}"
        self._show_status(text, warning=level != "ok")
        self.run_finished.emit(result, metrics)

    @Slot(str)
    def _on_worker_failed(self, message: str) -> None:
        self._update_loss_plot()
        self._run_ended()
        self._reset_progress()
        self.stage_label.setText("Failed")
        self._show_status(message, error=True)
        self.run_failed.emit(message)

    @Slot()
    def _on_worker_cancelled(self) -> None:
        self._update_loss_plot()
        self._run_ended()
        self._reset_progress()
        self.stage_label.setText("Cancelled")
        self._show_status("Cancelled; nothing was changed")
        self.run_cancelled.emit()

    def _reset_progress(self) -> None:
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)

    def _run_ended(self) -> float:
        secs = self._clock.elapsed() / 1000.0 if self._clock.isValid() else 0.0
        self._tick.stop()
        self._worker = None
        self._update_enabled()
        return secs

    @Slot()
    def _on_tick(self) -> None:
        if self._clock.isValid():
            self.elapsed_label.setText(f"{self._clock.elapsed() / 1000.0:.1f} s")

    # ================================================================ loss curve
    def _update_loss_plot(self) -> None:
        if self._worker is not None:
            self.run_plot.add_losses(self._worker.loss_history())
