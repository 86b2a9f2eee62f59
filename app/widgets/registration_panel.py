"""Registration panel: paradigm, checkpoint, parameters, device, Run / Cancel, progress, loss curve.

The run itself happens on the window's long-lived :class:`app.workers.Engine` thread (a
:class:`app.workers.RegistrationRun`); this panel only reacts to its signals on the GUI thread.
torch is never imported here: the checkpoint list / validation and the CUDA check are jobs on
the same engine thread, and only when a learned paradigm (or one declaring ``uses_torch =
True``) is chosen.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import QElapsedTimer, Qt, QThread, QTimer, Signal, Slot
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app import workers
from app.engine import cards, paradigms
from app.viewer.runs import run_verdict

from .params_form import ParamsForm
from .run_plot import RunPlot, normalise_curve  # noqa: F401  (normalise_curve: re-exported)

_ERROR_STYLE = "color: #b00020;"
MAX_STAGES = 3               # paradigm + two "then" stages
REGISTRATION_SHARE = 0.9      # of the progress bar; the metrics stage fills the rest


_BUNDLED_DIR = cards.CHECKPOINT_DIR  # app.engine.cards does not import torch: the panel opens fast


def _probe_checkpoints(key: str, chosen: Optional[str]) -> dict:
    """Worker thread: list the checkpoints of ``key`` and validate ``chosen`` (or the first).

    Returns {"paths": [str], "chosen": str | None, "card": str, "error": str | None}.
    """
    out = {"paths": [], "chosen": None, "card": "", "error": None}
    try:
        from app.engine import checkpoints as C
    except ImportError as e:
        out["error"] = f"checkpoint support is not available ({e})"
        return out
    try:
        paths = [str(p) for p in C.list_checkpoints(key)]
    except Exception as e:  # noqa: BLE001 - a bad folder must not break the panel
        paths = []
        out["error"] = f"could not list checkpoints: {workers.error_message(e)}"
    if chosen and chosen not in paths:
        paths.append(chosen)
    out["paths"] = paths
    chosen = chosen or (paths[0] if paths else None)
    out["chosen"] = chosen
    if chosen is None:
        out["error"] = out["error"] or (f"no checkpoint for '{key}' was found; use Open… to pick one "
                                        f"(train one with: main.py train --paradigm {key})")
        return out
    try:
        out["card"] = format_card(C.read_card(chosen))
    except Exception as e:  # noqa: BLE001
        out["card"] = f"(no card: {workers.error_message(e)})"
    try:
        C.load_checkpoint(chosen, key)
    except (ValueError, OSError) as e:
        out["error"] = workers.error_message(e)
    return out


def _probe_cuda() -> bool:
    import torch
    return bool(torch.cuda.is_available())


def format_card(card: dict, max_chars: int = 4000) -> str:
    """A checkpoint card (dict) as readable text: title, summary, then ``key: value`` lines."""
    if not isinstance(card, dict):
        return str(card)[:max_chars]
    lines = []
    if card.get("title"):
        lines.append(str(card["title"]))
    if card.get("summary"):
        lines.append(str(card["summary"]))
    for k, v in card.items():
        if k in ("title", "summary"):
            continue
        if isinstance(v, dict):
            lines.append(f"{k}:")
            for kk, vv in v.items():
                s = json.dumps(vv, default=str) if isinstance(vv, (dict, list)) else str(vv)
                lines.append(f"  {kk}: {s}")
        else:
            s = json.dumps(v, default=str) if isinstance(v, list) else str(v)
            lines.append(f"{k}: {s}")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[:max_chars] + "\n…"


class RegistrationPanel(QWidget):
    """Choose and run a registration; follow it live.

    Signals
    -------
    run_started()
    run_finished(object result, object metrics)
        :class:`~app.engine.types.RegistrationResult` and the metrics dict of
        :func:`app.engine.evaluation.register_and_measure`.
    run_failed(str)
        One-line message (also shown in the panel; the panel opens no dialog).
    run_cancelled()
    """

    run_started = Signal()
    run_finished = Signal(object, object)
    run_failed = Signal(str)
    run_cancelled = Signal()

    def __init__(self, parent: Optional[QWidget] = None, *, keys: Optional[list[str]] = None,
                 progress_interval_s: float = 0.05, engine: Optional[workers.Engine] = None):
        super().__init__(parent)
        self._engine = engine
        self._probe_job: Optional[workers.Job] = None
        self._provider: Optional[Callable[[], dict]] = None
        self._registrars: dict = {}
        self._saved_params: dict[str, object] = {}
        self._worker: Optional[workers.RegistrationRun] = None
        self._progress_interval_s = progress_interval_s
        self._checkpoint: Optional[str] = None
        self._checkpoint_error: Optional[str] = None
        self._probing = False
        self._probe_gen = 0
        self._cuda: Optional[bool] = None        # None: not checked yet
        self._cuda_probing = False
        self._registrar_error: Optional[str] = None
        self.form: Optional[ParamsForm] = None       # the first stage's form
        self.forms: list[ParamsForm] = []

        # -- paradigm
        self.paradigm_combo = QComboBox()
        self.paradigm_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        for k in (keys if keys is not None else paradigms.available()):
            self.paradigm_combo.addItem(k, k)
            self.paradigm_combo.setItemData(self.paradigm_combo.count() - 1,
                                            paradigms.description(k), Qt.ToolTipRole)
        # "then": a pipeline A+B(+C), each stage starting from the previous transform
        self.then_combos: list[QComboBox] = []
        for _ in range(MAX_STAGES - 1):
            c = QComboBox()
            c.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            c.addItem("none", None)
            for k in (keys if keys is not None else paradigms.available()):
                c.addItem(k, k)
            c.setToolTip("Run another paradigm after this one, starting from its transform "
                         "(one composite transform, one resampling at the end)")
            self.then_combos.append(c)
        self.then_combo = self.then_combos[0]
        self.description_label = QLabel()
        self.description_label.setWordWrap(True)
        self.description_label.setStyleSheet("color: #555;")

        # -- checkpoint (learned paradigms)
        self.checkpoint_combo = QComboBox()
        self.checkpoint_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.checkpoint_combo.setMinimumContentsLength(12)
        self.open_checkpoint_button = QPushButton("Open…")
        self.open_checkpoint_button.setToolTip("Pick a checkpoint file (.pt)")
        self.card_text = QPlainTextEdit()
        self.card_text.setReadOnly(True)
        self.card_text.setMaximumHeight(96)
        self.card_text.setPlaceholderText("checkpoint card")
        self.checkpoint_status = QLabel()
        self.checkpoint_status.setWordWrap(True)
        self.checkpoint_group = QGroupBox("Checkpoint")
        cg = QVBoxLayout(self.checkpoint_group)
        row = QHBoxLayout()
        row.addWidget(self.checkpoint_combo, 1)
        row.addWidget(self.open_checkpoint_button)
        cg.addLayout(row)
        cg.addWidget(self.checkpoint_status)
        cg.addWidget(self.card_text)

        # -- parameters
        self.params_group = QGroupBox("Parameters")
        self.params_scroll = QScrollArea()
        self.params_scroll.setWidgetResizable(True)
        self.params_scroll.setFrameShape(QScrollArea.NoFrame)
        self.params_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.params_scroll.setMinimumHeight(120)
        self.defaults_button = QPushButton("Defaults")
        self.defaults_button.setToolTip("Reset every parameter of this paradigm to its default")
        pg = QVBoxLayout(self.params_group)
        pg.addWidget(self.params_scroll, 1)
        prow = QHBoxLayout()
        prow.addStretch(1)
        prow.addWidget(self.defaults_button)
        pg.addLayout(prow)

        # -- device, run, progress
        self.device_combo = QComboBox()
        self.device_combo.addItem("auto", "auto")
        self.device_combo.addItem("cpu", "cpu")
        self.device_combo.setToolTip("auto = CUDA when available, else CPU")
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%p%")
        self.stage_label = QLabel("Idle")
        self.stage_label.setWordWrap(True)
        self.elapsed_label = QLabel("")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.run_plot = RunPlot()

        top = QFormLayout()
        top.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        top.addRow("Paradigm", self.paradigm_combo)
        self._then_rows = []
        for c in self.then_combos:
            lab = QLabel("then")
            top.addRow(lab, c)
            self._then_rows.append((lab, c))
        top.addRow(self.description_label)
        buttons = QHBoxLayout()
        buttons.addWidget(QLabel("Device"))
        buttons.addWidget(self.device_combo)
        buttons.addStretch(1)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        times = QHBoxLayout()
        times.addWidget(self.stage_label, 1)
        times.addWidget(self.elapsed_label, 0, Qt.AlignRight | Qt.AlignTop)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.checkpoint_group)
        lay.addWidget(self.params_group, 5)
        lay.addLayout(buttons)
        lay.addWidget(self.progress_bar)
        lay.addLayout(times)
        lay.addWidget(self.status_label)
        lay.addWidget(self.run_plot, 4)

        self._clock = QElapsedTimer()
        self._tick = QTimer(self)
        self._tick.setInterval(200)
        self._tick.timeout.connect(self._on_tick)

        self.paradigm_combo.currentIndexChanged.connect(self._on_paradigm_change)
        for c in self.then_combos:
            c.currentIndexChanged.connect(self._on_paradigm_change)
        self.checkpoint_combo.activated.connect(self._on_checkpoint_change)
        self.open_checkpoint_button.clicked.connect(self._on_open_checkpoint)
        self.defaults_button.clicked.connect(self._on_defaults)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self._on_paradigm_change()

    # ================================================================ public API
    def set_inputs_provider(self, fn: Callable[[], dict]) -> None:
        """``fn()`` returns dict(fixed, moving, fixed_labels, moving_labels, fixed_points,
        moving_points) at the moment Run is pressed (None for what is absent)."""
        self._provider = fn

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def stage_keys(self) -> list[str]:
        """The paradigm, then each "then" stage: ``["unsupervised", "instance"]``."""
        first = self.paradigm_combo.currentData()
        if first is None:
            return []
        out = [first]
        for c in self.then_combos:
            k = c.currentData()
            if k is None:
                break
            out.append(k)
        return out

    @property
    def paradigm_key(self) -> Optional[str]:
        """The registry key, ``"A+B"`` for a pipeline (:mod:`app.engine.pipeline`)."""
        keys = self.stage_keys()
        return "+".join(keys) if keys else None

    @property
    def is_pipeline(self) -> bool:
        return len(self.stage_keys()) > 1

    def set_paradigm(self, key: str) -> None:
        """Choose a paradigm, or a pipeline ``"A+B"`` (up to :data:`MAX_STAGES` stages)."""
        keys = [k.strip() for k in str(key).split("+")]
        if len(keys) > MAX_STAGES:
            raise ValueError(f"the panel runs pipelines of up to {MAX_STAGES} stages, got {key!r}")
        for k in keys:
            if self.paradigm_combo.findData(k) < 0:
                raise ValueError(f"paradigm '{k}' is not in the list: {self._keys()}")
        combos = [self.paradigm_combo] + self.then_combos
        for c in combos:
            c.blockSignals(True)
        try:
            for i, c in enumerate(combos):
                c.setCurrentIndex(c.findData(keys[i]) if i < len(keys) else 0)
        finally:
            for c in combos:
                c.blockSignals(False)
        self._on_paradigm_change()

    @property
    def device(self) -> str:
        return self.device_combo.currentData()

    def set_device(self, device: str) -> None:
        i = self.device_combo.findData(device)
        if i < 0:
            raise ValueError(f"device '{device}' is not offered here: "
                             f"{[self.device_combo.itemData(j) for j in range(self.device_combo.count())]}")
        self.device_combo.setCurrentIndex(i)

    @property
    def checkpoint(self) -> Optional[str]:
        return self._checkpoint

    @property
    def checkpoint_error(self) -> Optional[str]:
        return self._checkpoint_error

    def set_checkpoint(self, path) -> None:
        """Choose a checkpoint file for the current (learned) paradigm; it is validated in the
        background and Run stays disabled until it fits."""
        self._checkpoint = str(path) if path else None
        self._start_checkpoint_probe()

    def _learned_stage(self) -> tuple[Optional[int], Optional[str]]:
        """(index, key) of the learned stage (the checkpoint row is its), or (None, None)."""
        for i, k in enumerate(self.stage_keys()):
            if getattr(self._registrars.get(k), "learned", False):
                return i, k
        return None, None

    @property
    def is_learned(self) -> bool:
        return self._learned_stage()[1] is not None

    def params(self):
        """The forms' validated values: a Params instance, or one per stage for a pipeline
        (ValueError when a field is invalid)."""
        if self.form is None:
            raise ValueError("no paradigm is available")
        if len(self.forms) > 1:
            return [f.values() for f in self.forms]
        return self.form.values()

    def set_params(self, params) -> None:
        """A Params instance or dict for the first stage, or a list with one per stage."""
        if self.form is None:
            return
        if isinstance(params, (list, tuple)):
            for f, p in zip(self.forms, params):
                f.set_values(p)
        else:
            self.form.set_values(params)
        self._on_form_changed()

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
    def engine(self) -> workers.Engine:
        """The engine thread this panel queues its work on (the window's, else the default)."""
        if self._engine is None:
            self._engine = workers.default_engine()
        return self._engine

    @property
    def worker(self) -> Optional[workers.RegistrationRun]:
        """The running worker (None when idle)."""
        return self._worker

    # ================================================================ paradigm / checkpoint
    def _keys(self) -> list[str]:
        return [self.paradigm_combo.itemData(i) for i in range(self.paradigm_combo.count())]

    def _show_then_rows(self) -> None:
        # a "then" row appears once the row above it names a stage
        show = self.paradigm_combo.currentData() is not None
        for lab, c in self._then_rows:
            lab.setVisible(show)
            c.setVisible(show)
            show = show and c.currentData() is not None

    @Slot()
    def _on_paradigm_change(self, *_):
        for f, k in zip(self.forms, self._form_keys):
            try:
                self._saved_params[k] = f.raw_values()
            except Exception:  # noqa: BLE001
                pass
        self._show_then_rows()
        keys = self.stage_keys()
        self._form_keys = []
        self._registrar_error = None
        self._probe_gen += 1            # a checkpoint probe still running belongs to the old paradigm
        self._probing = False
        if self._probe_job is not None:
            self._probe_job.cancel()
        old = self.params_scroll.takeWidget()
        if old is not None:
            old.deleteLater()
        self.form, self.forms = None, []
        if not keys:
            self.description_label.setText("No registration paradigm is registered.")
            self.checkpoint_group.setVisible(False)
            self._update_enabled()
            return
        try:
            regs = []
            for k in keys:
                reg = self._registrars.get(k) or paradigms.get(k)
                self._registrars[k] = reg
                regs.append(reg)
            learned = [k for k, r in zip(keys, regs) if getattr(r, "learned", False)]
            if len(learned) > 1:
                raise ValueError(f"this panel runs pipelines with one learned stage (checkpoint) at most; "
                                 f"{' and '.join(learned)} are both learned")
            box = QWidget()
            lay = QVBoxLayout(box)
            lay.setContentsMargins(0, 0, 0, 0)
            for i, (k, reg) in enumerate(zip(keys, regs)):
                form = ParamsForm(reg.Params)
                if k in self._saved_params:
                    form.set_values(self._saved_params[k])
                form.changed.connect(self._on_form_changed)
                if len(keys) > 1:
                    head = QLabel(f"<b>Stage {i + 1}: {k}</b>")
                    head.setToolTip(getattr(reg, "description", "") or paradigms.description(k))
                    lay.addWidget(head)
                lay.addWidget(form)
                self.forms.append(form)
            lay.addStretch(1)
            self.form = self.forms[0]
            self._form_keys = list(keys)
            self.params_scroll.setWidget(box)
            if len(keys) == 1:
                desc = getattr(regs[0], "description", "") or paradigms.description(keys[0])
            else:
                desc = (f"Pipeline: {', then '.join(keys)}. Each stage starts from the previous one's transform; "
                        f"the moving image is resampled once, through the whole chain.")
            self.description_label.setText(desc)
        except Exception as e:  # noqa: BLE001 - a broken paradigm module is a message
            self.form, self.forms = None, []
            self._registrar_error = (f"{'pipeline' if len(keys) > 1 else 'paradigm'} '{'+'.join(keys)}' cannot be "
                                     f"used: {workers.error_message(e)}")
            self.description_label.setText(self._registrar_error)
            self.description_label.setStyleSheet(_ERROR_STYLE)
            self.checkpoint_group.setVisible(False)
            self._update_enabled()
            return
        self.description_label.setStyleSheet("color: #555;")
        learned = self.is_learned
        self.checkpoint_group.setVisible(learned)
        if learned:
            self.checkpoint_group.setTitle(f"Checkpoint ({self._learned_stage()[1]})" if len(keys) > 1 else "Checkpoint")
        self._checkpoint = None
        self._checkpoint_error = None
        if learned:
            self._start_checkpoint_probe()
        if learned or any(getattr(r, "uses_torch", False) for r in regs):
            self._ensure_cuda_probe()
        self._update_enabled()

    _form_keys: list = []


    def _start_checkpoint_probe(self) -> None:
        key = self._learned_stage()[1]
        if key is None:
            return
        self._probe_gen += 1
        gen = self._probe_gen
        self._probing = True
        self._checkpoint_error = "checking the checkpoint…"
        self.checkpoint_status.setStyleSheet("")
        self.checkpoint_status.setText("Checking checkpoints…")
        self._update_enabled()
        if self._probe_job is not None:
            self._probe_job.cancel()        # superseded: skipped if it has not started yet
        self._probe_job = self.engine.submit(
            _probe_checkpoints, key, self._checkpoint or self._bundled_default(), name="probe_checkpoints", context=self,
            on_done=lambda out: self._on_probe_done(gen, out),
            on_error=lambda msg: self._on_probe_done(gen, {"error": msg, "paths": [], "chosen": None, "card": ""}))

    def _bundled_default(self) -> Optional[str]:
        """The bundled checkpoint matching the form: ``<key>.pt``, or ``<key>_diffeomorphic.pt`` when
        the paradigm has a ``diffeomorphic`` option and it is on (None when there is none)."""
        idx, key = self._learned_stage()
        if key is None:
            return None
        variant = ""
        if idx < len(self.forms):
            try:
                variant = "diffeomorphic" if getattr(self.forms[idx].values(), "diffeomorphic", False) else ""
            except Exception:  # noqa: BLE001 - a half-typed value: keep the plain default
                variant = ""
        path = cards.bundled_path(key, variant)
        return str(path) if path.is_file() else None

    @Slot()
    def _on_form_changed(self) -> None:
        """Follow the form's ``diffeomorphic`` option with the bundled checkpoint of that variant,
        unless the user picked a checkpoint of their own."""
        if not self.is_learned or self.is_running:
            return
        want, cur = self._bundled_default(), self._checkpoint
        if want and cur != want and (cur is None or Path(cur).parent == _BUNDLED_DIR):
            self.set_checkpoint(want)

    def _on_probe_done(self, gen: int, out: dict) -> None:
        if gen != self._probe_gen:
            return      # the user chose something else meanwhile
        self._probing = False
        self.checkpoint_combo.blockSignals(True)
        self.checkpoint_combo.clear()
        for p in out.get("paths", []):
            self.checkpoint_combo.addItem(Path(p).name, p)
            self.checkpoint_combo.setItemData(self.checkpoint_combo.count() - 1, p, Qt.ToolTipRole)
        chosen = out.get("chosen")
        if chosen is not None:
            self.checkpoint_combo.setCurrentIndex(max(0, self.checkpoint_combo.findData(chosen)))
        self.checkpoint_combo.blockSignals(False)
        self._checkpoint = chosen
        self._checkpoint_error = out.get("error")
        self.card_text.setPlainText(out.get("card", ""))
        if self._checkpoint_error:
            self.checkpoint_status.setStyleSheet(_ERROR_STYLE)
            self.checkpoint_status.setText(self._checkpoint_error)
        else:
            self.checkpoint_status.setStyleSheet("")
            self.checkpoint_status.setText(f"{Path(chosen).name} fits '{self._learned_stage()[1]}'")
        self._update_enabled()

    @Slot()
    def _on_checkpoint_change(self, *_):
        self.set_checkpoint(self.checkpoint_combo.currentData())

    @Slot()
    def _on_open_checkpoint(self):
        start = str(Path(self._checkpoint).parent) if self._checkpoint else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open checkpoint", start, "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def _ensure_cuda_probe(self) -> None:
        if self._cuda is not None or self._cuda_probing:
            return
        self._cuda_probing = True

        def done(ok):
            self._cuda_probing = False
            self._cuda = bool(ok)
            if self._cuda and self.device_combo.findData("cuda") < 0:
                self.device_combo.addItem("cuda", "cuda")

        def failed(msg):
            self._cuda_probing = False
            self._cuda = False

        self.engine.submit(_probe_cuda, name="probe_cuda", context=self, on_done=done, on_error=failed,
                           on_cancelled=lambda: failed("cancelled"))

    @Slot()
    def _on_defaults(self):
        for f in self.forms:
            f.reset()

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

    # ================================================================ state
    def _show_status(self, text: str, error: bool = False, warning: bool = False) -> None:
        self.status_label.setStyleSheet(_ERROR_STYLE if error or warning else "")
        self.status_label.setText(text)
        self.status_label.setVisible(bool(text))

    def _update_enabled(self) -> None:
        running = self.is_running
        ok = self.form is not None and not self._registrar_error
        if ok and self.is_learned:
            ok = not self._probing and not self._checkpoint_error
        self.run_button.setEnabled(ok and not running)
        self.cancel_button.setEnabled(running and not (self._worker and self._worker.cancel_requested))
        self.paradigm_combo.setEnabled(not running)
        for c in self.then_combos:
            c.setEnabled(not running)
        self.checkpoint_combo.setEnabled(not running)
        self.open_checkpoint_button.setEnabled(not running)
        self.defaults_button.setEnabled(not running)
        self.device_combo.setEnabled(not running)
        for f in self.forms:
            f.setEnabled(not running)
