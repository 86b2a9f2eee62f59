"""The metrics panel's copy and export: the table shown (or any of its tables) as
tab-separated text on the clipboard or as a CSV file, header first, in the table's current sort
order, empty cells written empty.

:class:`MetricsExportMixin` is combined into :class:`app.widgets.metrics_panel.MetricsPanel`.
"""
from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Slot
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog, QTableWidget

from .metrics_tables import _DASH


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


class MetricsExportMixin:
    """Copy / export of the panel's tables (see the module docstring)."""

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
