"""Metrics panel: per-run summary and per-label tables, run history and a side-by-side comparison.

The panel keeps only JSON-safe metrics (the dict of
:func:`app.engine.evaluation.register_and_measure`, arrays dropped) and never the images, so a
session can store it with :meth:`MetricsPanel.to_dict`.

This module holds the panel's widgets and its run history (a view of
:class:`app.viewer.runs.RunHistory`: select, rename, delete, save and restore). The tables, their
cells and the verdict / error lines are in :mod:`app.widgets.metrics_tables`; copy and CSV export
in :mod:`app.widgets.metrics_export`.
"""
from __future__ import annotations

from typing import Optional

from PySide6.QtCore import Qt, Signal, Slot

from app.viewer.runs import RunHistory, json_safe, run_verdict  # noqa: F401 - json_safe re-exported
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .metrics_export import MetricsExportMixin, table_rows  # noqa: F401 - table_rows re-exported
from .metrics_tables import (  # noqa: F401 - the cells and rows are re-exported
    CHECK_COLOURS,
    CHECK_MARK,
    CHECK_STYLES,
    SUMMARY_ROWS,
    MetricsTablesMixin,
    NumberItem,
    _num,
)


class MetricsPanel(MetricsTablesMixin, MetricsExportMixin, QWidget):
    """Metrics of the registration runs of this session.

    Signals
    -------
    run_selected(int)
        The user picked run ``index`` in the history (show its warped layer).
    goto_requested(object)
        ``(3,)`` LPS mm: the user asked to see where the run's largest estimated errors are.
    """

    run_selected = Signal(int)
    goto_requested = Signal(object)

    def __init__(self, parent: Optional[QWidget] = None, model: Optional[RunHistory] = None):
        super().__init__(parent)
        self.model = model if model is not None else RunHistory()
        self.label_names: dict[str, str] = {}
        self.data_dir = lambda: ""     # where file dialogs start (the window points it next to the data)

        self.history = QListWidget()
        self.history.setSelectionMode(QAbstractItemView.SingleSelection)
        self.history.setToolTip("Registration runs; select one to show its result")
        self.history.setMinimumHeight(48)
        self.rename_button = QPushButton("Rename…")
        self.rename_button.setToolTip("Give the selected run a name of your own")
        self.delete_run_button = QPushButton("Delete")
        self.delete_run_button.setToolTip("Forget the selected run")

        self.summary_table = self._make_table(["Before", "After"], sortable=False)
        self.summary_table.verticalHeader().setVisible(True)
        self.label_table = self._make_table(["Label", "Dice\nbefore", "Dice\nafter", "Δ Dice",
                                             "HD95\nbefore", "HD95\nafter"], sortable=True)
        self.label_table.horizontalHeader().setSortIndicator(0, Qt.AscendingOrder)
        for c, tip in enumerate(["label id", "Dice before registration", "Dice after registration",
                                 "after - before", "95th percentile Hausdorff distance before (mm)",
                                 "95th percentile Hausdorff distance after (mm)"]):
            self.label_table.horizontalHeaderItem(c).setToolTip(tip)
        self.compare_table = self._make_table([], sortable=False)
        self.compare_table.verticalHeader().setVisible(True)
        self.label_mean = QLabel("")

        per_label = QWidget()
        pl = QVBoxLayout(per_label)
        pl.setContentsMargins(0, 0, 0, 0)
        pl.addWidget(self.label_mean)
        pl.addWidget(self.label_table)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.summary_table, "Summary")
        self.tabs.addTab(per_label, "Per label")
        self.tabs.addTab(self.compare_table, "Compare runs")
        self.dice_compare_table = self._make_table([], sortable=False)
        self.dice_compare_table.verticalHeader().setVisible(True)
        self.tabs.addTab(self.dice_compare_table, "Dice per label × run")

        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the table shown to the clipboard (tab-separated)")
        self.export_button = QPushButton("Export CSV…")
        self.export_button.setToolTip("Save the table shown as CSV")
        self.info_label = QLabel("No runs yet")
        self.info_label.setWordWrap(True)
        # where the current run's largest estimated errors are, with a link that moves the cursor
        self.error_link = QLabel("")
        self.error_link.setWordWrap(True)
        self.error_link.setTextFormat(Qt.RichText)
        self.error_link.setTextInteractionFlags(Qt.LinksAccessibleByMouse | Qt.LinksAccessibleByKeyboard)
        self.error_link.linkActivated.connect(lambda _=None: self.goto_worst_error())
        self.error_link.hide()
        # the current run's self-checks (stage check, inputs unlike the training data): visible, not a tooltip
        self.check_label = QLabel("")
        self.check_label.setWordWrap(True)
        self.check_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.check_label.hide()

        hist = QWidget()
        hl = QVBoxLayout(hist)
        hl.setContentsMargins(0, 0, 0, 0)
        hrow = QHBoxLayout()
        hrow.addWidget(QLabel("Runs"))
        hrow.addStretch(1)
        hrow.addWidget(self.rename_button)
        hrow.addWidget(self.delete_run_button)
        hl.addLayout(hrow)
        hl.addWidget(self.history)
        split = QSplitter(Qt.Vertical)
        split.addWidget(hist)
        results = QWidget()
        rl = QVBoxLayout(results)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.check_label)
        rl.addWidget(self.tabs, 1)
        split.addWidget(results)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 4)
        split.setChildrenCollapsible(False)
        split.setSizes([90, 400])
        buttons = QHBoxLayout()
        buttons.addWidget(self.info_label, 1)
        buttons.addWidget(self.copy_button)
        buttons.addWidget(self.export_button)
        lay = QVBoxLayout(self)
        lay.addWidget(split, 1)
        lay.addWidget(self.error_link)
        lay.addLayout(buttons)

        self.history.currentRowChanged.connect(self._on_history_change)
        self.rename_button.clicked.connect(self._on_rename)
        self.delete_run_button.clicked.connect(self._on_delete)
        ev = self.model.events
        for e in (ev.added, ev.removed, ev.renamed, ev.changed, ev.cleared):
            e.connect(self._on_model_change)
        ev.current.connect(self._on_current_change)
        self._rebuild()
        self.copy_button.clicked.connect(self.copy_to_clipboard)
        self.export_button.clicked.connect(self._on_export)
        self._update_buttons()

    @staticmethod
    def _make_table(headers: list[str], sortable: bool) -> QTableWidget:
        t = QTableWidget(0, len(headers))
        t.setHorizontalHeaderLabels(headers)
        t.setEditTriggers(QAbstractItemView.NoEditTriggers)
        t.setSelectionBehavior(QAbstractItemView.SelectRows)
        t.setAlternatingRowColors(True)
        t.verticalHeader().setVisible(False)
        t.verticalHeader().setDefaultSectionSize(22)
        # equal columns that share the panel's width; a scroll bar only when too narrow
        t.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        t.horizontalHeader().setMinimumSectionSize(56)
        t.verticalHeader().setSectionResizeMode(QHeaderView.Fixed)
        t.setSortingEnabled(sortable)
        t.setWordWrap(False)
        return t

    # ================================================================ runs (a view of RunHistory)
    @property
    def _runs(self) -> list:
        return self.model.runs

    def add_run(self, name: Optional[str], result=None, metrics: Optional[dict] = None, *, select: bool = True) -> int:
        """Add a finished run to the model; returns its index (see :meth:`RunHistory.add`)."""
        return self.model.add(result, metrics, name, select=select)

    def _alive(self) -> bool:
        import shiboken6
        if shiboken6.isValid(self):
            return True
        ev = self.model.events
        for e in (ev.added, ev.removed, ev.renamed, ev.changed, ev.cleared):
            e.disconnect(self._on_model_change)
        ev.current.disconnect(self._on_current_change)
        return False

    def _on_model_change(self, *_) -> None:
        if self._alive():
            self._rebuild()

    def _on_current_change(self, index) -> None:
        if not self._alive():
            return
        was = self.history.blockSignals(True)
        self.history.setCurrentRow(-1 if index is None else index)
        self.history.blockSignals(was)
        self._show_run(self._current_run())
        self._update_buttons()
        if index is not None:
            self.run_selected.emit(index)

    def _rebuild(self) -> None:
        was = self.history.blockSignals(True)
        self.history.clear()
        for run in self._runs:
            self._add_history_item(run)
        cur = self.model.current
        self.history.setCurrentRow(-1 if cur is None else cur)
        self.history.blockSignals(was)
        self._fill_compare()
        self._fill_dice_compare()
        self._show_run(self._current_run())
        self._update_buttons()

    def _add_history_item(self, run) -> None:
        m = run["metrics"]
        text = f"{run['name']}  ·  {run['time']}"
        d = _num(m.get("dice_mean"))
        if d is not None:
            text += f"  ·  Dice {d:.3f}"
        t = _num(m.get("tre_mean_mm"))
        if t is not None:
            text += f"  ·  TRE {t:.2f} mm"
        level, head, _ = run_verdict(m)
        if level != "ok":
            text = CHECK_MARK + text + ("  ·  FLAGGED" if level == "flagged" else "  ·  warnings")
        it = QListWidgetItem(text)
        if level != "ok":
            it.setForeground(QBrush(QColor(CHECK_COLOURS[level])))
        stages = " → ".join(str(s.get("paradigm")) for s in run.stages) if hasattr(run, "stages") else ""
        it.setToolTip(f"{run['name']} ({stages or m.get('paradigm') or '?'}) at {run['time']} "
                      f"on {m.get('device') or '?'}" + (f"\n{head}" if head else ""))
        self.history.addItem(it)

    def runs(self) -> list[dict]:
        """``[{"name", "time", "metrics"}, ...]`` (copies)."""
        return [{"name": r["name"], "time": r["time"], "metrics": dict(r["metrics"])} for r in self._runs]

    @property
    def current_index(self) -> int:
        return -1 if self.model.current is None else self.model.current

    def select_run(self, index: int) -> None:
        """Show run ``index`` (emits ``run_selected`` when it changes)."""
        self.history.setCurrentRow(index)

    def rename_current(self, name: str) -> None:
        if self.model.current is not None:
            self.model.rename(self.model.current, name)

    def delete_current(self) -> None:
        if self.model.current is not None:
            self.model.remove(self.model.current)

    @Slot()
    def _on_rename(self) -> None:
        run = self._current_run()
        if run is None:
            return
        from PySide6.QtWidgets import QInputDialog
        name, ok = QInputDialog.getText(self, "Rename run", "Name", text=run["name"])
        if ok and name.strip():
            self.rename_current(name)

    @Slot()
    def _on_delete(self) -> None:
        run = self._current_run()
        if run is None:
            return
        from PySide6.QtWidgets import QMessageBox
        if QMessageBox.question(self, "Delete run", f"Forget the run '{run['name']}' and its metrics?",
                                QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel) == QMessageBox.Yes:
            self.delete_current()

    def clear(self) -> None:
        self.model.clear()

    def set_label_names(self, names: dict) -> None:
        """Optional ``{label id: name}`` shown beside the ids in the per-label tables."""
        self.label_names = {str(k): str(v) for k, v in (names or {}).items()}
        self._show_run(self._current_run())
        self._fill_dice_compare()

    def to_dict(self) -> dict:
        """JSON-safe state: runs (name, time, metrics) and the selected run."""
        return {"runs": json_safe(self.runs()), "current": self.current_index,
                "label_names": dict(self.label_names)}

    def from_dict(self, d: dict) -> None:
        """Restore :meth:`to_dict` output (runs without results; emits no ``run_selected``)."""
        self.blockSignals(True)
        try:
            self.model.clear()
            self.label_names = {str(k): str(v) for k, v in (d.get("label_names") or {}).items()}
            for r in d.get("runs", []):
                self.model.add(None, r.get("metrics") or {}, str(r.get("name") or "") or None,
                               select=False, time=str(r.get("time", "")))
            cur = d.get("current")
            if isinstance(cur, int) and 0 <= cur < len(self._runs):
                self.model.set_current(cur)
            elif self._runs:
                self.model.set_current(len(self._runs) - 1)
        finally:
            self.blockSignals(False)
        self._update_buttons()

    def _current_run(self):
        return self.model.current_run

    @Slot(int)
    def _on_history_change(self, row: int) -> None:
        if 0 <= row < len(self._runs):
            self.model.set_current(row)        # -> _on_current_change -> run_selected

    def _update_buttons(self) -> None:
        has = bool(self._runs)
        self.rename_button.setEnabled(self.model.current is not None)
        self.delete_run_button.setEnabled(self.model.current is not None)
        self.copy_button.setEnabled(has)
        self.export_button.setEnabled(has)
