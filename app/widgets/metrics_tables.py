"""The metrics panel's tables: what the numbers look like and which table shows which.

Cells: :class:`NumberItem` (sorts by its number, empty cells last, shown formatted), the rows of
the summary (:data:`SUMMARY_ROWS`, then the run's runtime / device / paradigm / checkpoint) and
how a flagged or warned run is marked (:data:`CHECK_STYLES`, :data:`CHECK_COLOURS`,
:data:`CHECK_MARK`).

:class:`MetricsTablesMixin` is combined into :class:`app.widgets.metrics_panel.MetricsPanel`. It
fills the Summary and Per label tabs for the selected run, the Compare runs and Dice per label ×
run tabs across all runs, and the lines above and below them: the run's self-check verdict and the
link to its largest estimated error.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QTableWidgetItem

from app.viewer.runs import run_verdict

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


class MetricsTablesMixin:
    """Fills the metrics tables and the verdict / error lines (see the module docstring)."""

    # ================================================================ tables
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
