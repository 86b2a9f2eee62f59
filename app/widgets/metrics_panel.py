"""Metrics panel: per-run summary and per-label tables, run history and a side-by-side comparison.

The panel keeps only JSON-safe metrics (the dict of
:func:`app.engine.evaluation.register_and_measure`, arrays dropped) and never the images, so a
session can store it with :meth:`MetricsPanel.to_dict`.
"""
from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtCore import Qt, Signal, Slot

from app.viewer.runs import RunHistory, json_safe, run_verdict  # noqa: F401 - json_safe re-exported
from PySide6.QtGui import QBrush, QColor, QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

# (label, metrics key, unit scale, format) of the summary rows
SUMMARY_ROWS: list[tuple[str, str, float, str]] = [
    ("Dice mean", "dice_mean", 1.0, "{:.3f}"),
    ("HD95 mean (mm)", "hd95_mean", 1.0, "{:.2f}"),
    ("TRE mean (mm)", "tre_mean_mm", 1.0, "{:.2f}"),
    ("TRE median (mm)", "tre_median_mm", 1.0, "{:.2f}"),
    ("TRE max (mm)", "tre_max_mm", 1.0, "{:.2f}"),
    ("Folding (%)", "fold_fraction", 100.0, "{:.3f}"),
    ("SDlogJ", "sdlogj", 1.0, "{:.4f}"),
    # estimated registration error (app.engine.errormap) and landmark-guided correction
    ("Est. error mean (mm)", "error_map_mean_mm", 1.0, "{:.2f}"),
    ("Est. error p95 (mm)", "error_map_p95_mm", 1.0, "{:.2f}"),
    ("Guide TRE uncorrected (mm)", "guide_tre_uncorrected_mm", 1.0, "{:.2f}"),
    ("Guide TRE (mm)", "guide_tre_mm", 1.0, "{:.2f}"),
]
_INFO_ROWS = [("Runtime (s)", "runtime_s"), ("Device", "device"), ("Paradigm", "paradigm"),
              ("Checkpoint", "checkpoint")]
_DASH = "–"
# how a run's self-check verdict (app.viewer.runs.run_verdict) looks: flagged runs are never plain
CHECK_STYLES = {"flagged": "background: #fde2e1; color: #8b0000; border: 1px solid #d9534f; padding: 4px;",
                "warning": "background: #fff4d6; color: #6b4500; border: 1px solid #e0a800; padding: 4px;"}
CHECK_COLOURS = {"flagged": "#b00020", "warning": "#8a5a00"}
CHECK_MARK = "⚠ "


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    f = _num(v)
    return _DASH if f is None else fmt.format(f * scale)


class NumberItem(QTableWidgetItem):
    """A table cell that sorts by its number (empty cells last), shown formatted."""

    def __init__(self, value, fmt: str = "{:.3f}", scale: float = 1.0):
        self.number = _num(value)
        if self.number is not None:
            self.number *= scale
        super().__init__(_DASH if self.number is None else fmt.format(self.number))
        self.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
        self.setFlags(self.flags() & ~Qt.ItemIsEditable)

    def __lt__(self, other):
        a = self.number
        b = getattr(other, "number", None)
        if a is None:
            return False
        if b is None:
            return True
        return a < b


def _text_item(text: str) -> QTableWidgetItem:
    it = QTableWidgetItem(text)
    it.setFlags(it.flags() & ~Qt.ItemIsEditable)
    return it


def table_rows(table: QTableWidget) -> list[list[str]]:
    """Header + visible cell texts of ``table`` (in its current sort order)."""
    cols = table.columnCount()
    head = [(table.horizontalHeaderItem(c).text() if table.horizontalHeaderItem(c) else "") for c in range(cols)]
    vhead = not table.verticalHeader().isHidden()
    rows = [([""] if vhead else []) + head]
    for r in range(table.rowCount()):
        row = []
        if vhead:
            h = table.verticalHeaderItem(r)
            row.append(h.text() if h else str(r + 1))
        for c in range(cols):
            it = table.item(r, c)
            t = it.text() if it is not None else ""
            row.append("" if t == _DASH else t)
        rows.append(row)
    return rows


class MetricsPanel(QWidget):
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

    # ================================================================ tables
    def _current_run(self):
        return self.model.current_run

    @Slot(int)
    def _on_history_change(self, row: int) -> None:
        if 0 <= row < len(self._runs):
            self.model.set_current(row)        # -> _on_current_change -> run_selected

    def goto_worst_error(self) -> Optional[np.ndarray]:
        """Emit ``goto_requested`` with the current run's ``error_map_peak_mm`` (LPS mm)."""
        run = self._current_run()
        peak = None if run is None else run["metrics"].get("error_map_peak_mm")
        if peak is None:
            return None
        p = np.asarray(peak, float).reshape(3)
        self.goto_requested.emit(p)
        return p

    def _show_error_link(self, run) -> None:
        m = {} if run is None else run["metrics"]
        p95, peak = _num(m.get("error_map_p95_mm")), m.get("error_map_peak_mm")
        if p95 is None:
            self.error_link.hide()
            return
        text = f"Estimated error: 95 % of the head below {p95:.2f} mm"
        if peak is not None:
            xyz = ", ".join(f"{float(v):.1f}" for v in peak)
            text += f"; largest around LPS ({xyz}) mm — <a href='#peak'>go there</a>"
        self.error_link.setText(text)
        self.error_link.show()

    def _show_checks(self, run) -> None:
        level, head, warnings = run_verdict(None if run is None else run["metrics"])
        if level == "ok":
            self.check_label.hide()
            self.check_label.setText("")
            return
        lines = [CHECK_MARK + head] + [f"• {w}" for w in warnings if w not in head]
        self.check_label.setText("\n".join(lines))
        self.check_label.setStyleSheet(CHECK_STYLES[level])
        self.check_label.setProperty("level", level)
        self.check_label.show()

    def _show_run(self, run: Optional[dict]) -> None:
        self._fill_summary(run)
        self._fill_labels(run)
        self._show_error_link(run)
        self._show_checks(run)
        if run is None:
            self.info_label.setText("No runs yet" if not self._runs else "")
        else:
            m = run["metrics"]
            rt = _num(m.get("runtime_s"))
            par = m.get("paradigm") or ""
            name = run["name"] if par in run["name"] else f"{run['name']} ({par or '?'})"
            text = f"{name} · {m.get('device') or '?'}" + (f" · {rt:.1f} s" if rt is not None else "")
            stages = getattr(run, "stages", [])
            if len(stages) > 1:     # a pipeline: one run, its stages listed with their times
                parts = []
                for i, st in enumerate(stages):
                    secs = _num((st.get("timings") or {}).get("total"))
                    parts.append(f"{i + 1}. {st.get('paradigm')}" + (f" ({secs:.1f} s)" if secs is not None else ""))
                text += "\nstages: " + " → ".join(parts)
            self.info_label.setText(text)

    def _fill_summary(self, run: Optional[dict]) -> None:
        t = self.summary_table
        t.setRowCount(0)
        if run is None:
            return
        m = run["metrics"]
        before = m.get("before") or {}
        rows = SUMMARY_ROWS + [(lab, key, 1.0, None) for lab, key in _INFO_ROWS]
        t.setRowCount(len(rows))
        t.setVerticalHeaderLabels([r[0] for r in rows])
        for r, (_, key, scale, fmt) in enumerate(rows):
            if fmt is None:
                v = m.get(key)
                t.setItem(r, 0, _text_item(""))
                t.setItem(r, 1, NumberItem(v, "{:.2f}") if isinstance(v, (int, float)) and not isinstance(v, bool)
                          else _text_item(_DASH if v in (None, "") else str(v)))
            else:
                t.setItem(r, 0, NumberItem(before.get(key), fmt, scale))
                t.setItem(r, 1, NumberItem(m.get(key), fmt, scale))

    def _fill_labels(self, run: Optional[dict]) -> None:
        t = self.label_table
        t.setSortingEnabled(False)
        t.setRowCount(0)
        self.label_mean.setText("")
        if run is None:
            t.setSortingEnabled(True)
            return
        m = run["metrics"]
        before = m.get("before") or {}
        da, db = m.get("dice_per_label") or {}, before.get("dice_per_label") or {}
        ha, hb = m.get("hd95_per_label") or {}, before.get("hd95_per_label") or {}
        labels = sorted(set(da) | set(db), key=lambda s: (_num(s) is None, _num(s) or 0, s))
        t.setRowCount(len(labels))
        for r, lab in enumerate(labels):
            name = self.label_names.get(str(lab))
            item = NumberItem(lab, "{:.0f}") if _num(lab) is not None else _text_item(str(lab))
            if name:
                item.setText(f"{item.text()}  {name}")
            t.setItem(r, 0, item)
            t.setItem(r, 1, NumberItem(db.get(lab)))
            t.setItem(r, 2, NumberItem(da.get(lab)))
            a, b = _num(da.get(lab)), _num(db.get(lab))
            t.setItem(r, 3, NumberItem(None if a is None or b is None else a - b, "{:+.3f}"))
            t.setItem(r, 4, NumberItem(hb.get(lab), "{:.2f}"))
            t.setItem(r, 5, NumberItem(ha.get(lab), "{:.2f}"))
        t.setSortingEnabled(True)
        if labels:
            self.label_mean.setText(f"{len(labels)} labels · mean Dice {_fmt(before.get('dice_mean'))} → "
                                    f"{_fmt(m.get('dice_mean'))} · mean HD95 {_fmt(before.get('hd95_mean'), '{:.2f}')}"
                                    f" → {_fmt(m.get('hd95_mean'), '{:.2f}')} mm")
        else:
            self.label_mean.setText("No label maps were given for this run")

    def _fill_compare(self) -> None:
        t = self.compare_table
        t.clear()
        runs = self._runs
        if not runs:
            t.setRowCount(0)
            t.setColumnCount(0)
            return
        headers = ["Before"] + [r["name"] for r in runs]
        rows = SUMMARY_ROWS + [(lab, key, 1.0, None) for lab, key in _INFO_ROWS]
        t.setColumnCount(len(headers))
        t.setHorizontalHeaderLabels(headers)
        t.setRowCount(len(rows))
        t.setVerticalHeaderLabels([r[0] for r in rows])
        for r, (_, key, scale, fmt) in enumerate(rows):
            if fmt is None:
                t.setItem(r, 0, _text_item(""))
            else:
                # the unregistered pair is the same for every run; take the latest run that
                # measured it (landmarks placed after the first run still get a Before)
                vals = [(run["metrics"].get("before") or {}).get(key) for run in runs]
                have = [v for v in vals if v is not None]
                t.setItem(r, 0, NumberItem(have[-1] if have else None, fmt, scale))
            for c, run in enumerate(runs, start=1):
                v = run["metrics"].get(key)
                if fmt is not None:
                    t.setItem(r, c, NumberItem(v, fmt, scale))
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    t.setItem(r, c, NumberItem(v, "{:.2f}"))
                else:
                    t.setItem(r, c, _text_item(_DASH if v in (None, "") else str(v)))
        for c, run in enumerate(runs, start=1):
            t.horizontalHeaderItem(c).setToolTip(f"{run['name']} at {run['time']}")

    def _fill_dice_compare(self) -> None:
        """Rows: labels; columns: Before, then every run's Dice."""
        t = self.dice_compare_table
        t.clear()
        runs = self._runs
        per = [run["metrics"].get("dice_per_label") or {} for run in runs]
        labels = sorted(set().union(*per) if per else set(), key=lambda s: (_num(s) is None, _num(s) or 0, s))
        if not runs or not labels:
            t.setRowCount(0)
            t.setColumnCount(0)
            return
        t.setColumnCount(len(runs) + 1)
        t.setHorizontalHeaderLabels(["Before"] + [r["name"] for r in runs])
        t.setRowCount(len(labels))
        t.setVerticalHeaderLabels([f"{lab} {self.label_names.get(str(lab), '')}".strip() for lab in labels])
        befores = [(run["metrics"].get("before") or {}).get("dice_per_label") or {} for run in runs]
        for r, lab in enumerate(labels):
            have = [b.get(lab) for b in befores if b.get(lab) is not None]
            t.setItem(r, 0, NumberItem(have[-1] if have else None))
            for c, d in enumerate(per, start=1):
                t.setItem(r, c, NumberItem(d.get(lab)))

    # ================================================================ copy / export
    def current_table(self) -> QTableWidget:
        i = self.tabs.currentIndex()
        return [self.summary_table, self.label_table, self.compare_table, self.dice_compare_table][i]

    def table_text(self, table: Optional[QTableWidget] = None, sep: str = "\t") -> str:
        """The table (default: the one shown) as delimited text, header first."""
        buf = _io.StringIO()
        w = csv.writer(buf, delimiter=sep, lineterminator="\n")
        for row in table_rows(table or self.current_table()):
            w.writerow(row)
        return buf.getvalue()

    @Slot()
    def copy_to_clipboard(self) -> str:
        text = self.table_text()
        QGuiApplication.clipboard().setText(text)
        return text

    def export_csv(self, path, table: Optional[QTableWidget] = None) -> Path:
        """Write the table shown (or ``table``) as CSV; returns the path."""
        from app.engine.io import atomic_path
        path = Path(path)
        text = self.table_text(table, sep=",")
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        return path

    @Slot()
    def _on_export(self) -> None:
        name = ["summary", "per_label", "compare", "dice_per_label_runs"][self.tabs.currentIndex()]
        path, _ = QFileDialog.getSaveFileName(self, "Export metrics", str(Path(self.data_dir()) / f"metrics_{name}.csv"),
                                              "CSV (*.csv)")
        if not path:
            return
        try:
            self.export_csv(path)
            self.info_label.setText(f"Saved {Path(path).name}")
        except Exception as e:  # noqa: BLE001 - a failed export is a message
            self.info_label.setText(f"Export failed: {e}")

    def _update_buttons(self) -> None:
        has = bool(self._runs)
        self.rename_button.setEnabled(self.model.current is not None)
        self.delete_run_button.setEnabled(self.model.current is not None)
        self.copy_button.setEnabled(has)
        self.export_button.setEnabled(has)
