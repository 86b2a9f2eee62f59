"""Registration panel: paradigm, checkpoint, parameters, device, Run / Cancel, progress, loss curve.

The run itself happens on the window's long-lived :class:`app.workers.Engine` thread (a
:class:`app.workers.RegistrationRun`); this panel only reacts to its signals on the GUI thread.
torch is never imported here: the checkpoint list / validation and the CUDA check are jobs on
the same engine thread, and only when a learned paradigm (or one declaring ``uses_torch =
True``) is chosen.

This module builds the panel and holds the choice of what runs: the paradigm or pipeline
("then" stages), one parameters form per stage, the device, and which controls are enabled. Its
other rooms are mixins combined into :class:`RegistrationPanel`:

- :mod:`app.widgets.registration_checkpoint`: the learned stage's checkpoint (listing,
  validation, card, bundled variant) and the CUDA check;
- :mod:`app.widgets.registration_run`: Run / Cancel and the live view of a run.
"""
from __future__ import annotations

from typing import Callable, Optional

from PySide6.QtCore import QElapsedTimer, Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import (
    QComboBox,
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
from app.engine import paradigms

from .params_form import ParamsForm
from .registration_checkpoint import _BUNDLED_DIR, _ERROR_STYLE, CheckpointMixin, format_card
from .registration_run import REGISTRATION_SHARE, RunControlMixin
from .run_plot import RunPlot, normalise_curve  # noqa: F401  (normalise_curve: re-exported)

__all__ = ["RegistrationPanel", "format_card", "normalise_curve", "MAX_STAGES", "REGISTRATION_SHARE",
           "_BUNDLED_DIR"]

MAX_STAGES = 3               # paradigm + two "then" stages


class RegistrationPanel(CheckpointMixin, RunControlMixin, QWidget):
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

    @property
    def engine(self) -> workers.Engine:
        """The engine thread this panel queues its work on (the window's, else the default)."""
        if self._engine is None:
            self._engine = workers.default_engine()
        return self._engine

    # ================================================================ paradigm, pipeline, forms
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

    @Slot()
    def _on_defaults(self):
        for f in self.forms:
            f.reset()

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
