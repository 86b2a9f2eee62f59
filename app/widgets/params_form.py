"""A form built from a paradigm's Params dataclass.

Each dataclass field becomes one editor: ``int`` -> QSpinBox, ``float`` -> QDoubleSpinBox
(limited to the field's ``range`` metadata), ``bool`` -> QCheckBox, ``str`` with ``choices`` ->
QComboBox, other ``str`` and tuples of numbers (shown as ``4,2,1``) -> QLineEdit. The field's
``help`` metadata is the tooltip.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

_INT_MAX = 2**31 - 1
_FLOAT_MAX = 1e12


def _field_type(params_cls: type, f: dataclasses.Field) -> type:
    """The field's runtime type (annotations may be strings); Optional[X] -> X."""
    try:
        hints = typing.get_type_hints(params_cls)
        t = hints.get(f.name, f.type)
    except Exception:  # noqa: BLE001 - unresolvable annotation: fall back to the default's type
        t = f.type
    if typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else str
    if isinstance(t, str):
        t = {"int": int, "float": float, "bool": bool, "str": str}.get(t, None)
    if not isinstance(t, type):
        default = f.default if f.default is not dataclasses.MISSING else None
        t = type(default) if default is not None else str
    return t


def _decimals(*values: float) -> int:
    """Enough decimals to show every value in ``values`` exactly (2..8)."""
    d = 2
    for v in values:
        if v is None or not math.isfinite(v) or v == 0:
            continue
        for k in range(2, 9):
            if abs(round(v, k) - v) <= 1e-12 * max(1.0, abs(v)):
                d = max(d, k)
                break
        else:
            d = 8
    return d


def pretty_name(name: str) -> str:
    """``linear_iterations`` -> ``Linear iterations``."""
    s = name.replace("_", " ").strip()
    return s[:1].upper() + s[1:]


class ParamsForm(QWidget):
    """Editors for every field of a Params dataclass.

    Parameters
    ----------
    params_cls : type
        A dataclass whose fields carry ``help``/``range``/``choices`` metadata
        (see :func:`app.engine.paradigms.base.param`).
    params : instance of ``params_cls``, optional
        Initial values (defaults otherwise).

    Signals
    -------
    changed()
        A value was edited by the user.
    """

    changed = Signal()

    def __init__(self, params_cls: type, params=None, parent: Optional[QWidget] = None):
        super().__init__(parent)
        if not dataclasses.is_dataclass(params_cls):
            raise ValueError(f"ParamsForm needs a Params dataclass, got {params_cls!r}")
        self.params_cls = params_cls
        self.editors: dict[str, QWidget] = {}
        self._types: dict[str, type] = {}
        self._labels: dict[str, QLabel] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        layout.setRowWrapPolicy(QFormLayout.DontWrapRows)
        for f in dataclasses.fields(params_cls):
            if not f.init:
                continue
            t = _field_type(params_cls, f)
            ed = self._make_editor(f, t)
            tip = f.metadata.get("help", "")
            rng = f.metadata.get("range")
            if rng is not None:
                tip = f"{tip} [{rng[0]:g} .. {rng[1]:g}]" if tip else f"[{rng[0]:g} .. {rng[1]:g}]"
            ed.setToolTip(tip)
            ed.setObjectName(f"param_{f.name}")
            lab = QLabel(pretty_name(f.name))
            lab.setToolTip(tip)
            lab.setBuddy(ed)
            layout.addRow(lab, ed)
            self.editors[f.name] = ed
            self._types[f.name] = t
            self._labels[f.name] = lab
        self.set_values(params if params is not None else self._defaults())

    # ---------------------------------------------------------------- editors
    def _make_editor(self, f: dataclasses.Field, t: type) -> QWidget:
        rng = f.metadata.get("range")
        choices = f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else None
        if t is bool:
            ed = QCheckBox()
            ed.toggled.connect(self._on_edit)
        elif t is int:
            ed = QSpinBox()
            lo, hi = (rng if rng is not None else (-_INT_MAX, _INT_MAX))
            ed.setRange(max(int(lo), -_INT_MAX), min(int(hi), _INT_MAX))
            ed.setStepType(QAbstractSpinBox.AdaptiveDecimalStepType)
            ed.setAccelerated(True)
            ed.valueChanged.connect(self._on_edit)
        elif t is float:
            ed = QDoubleSpinBox()
            lo, hi = (rng if rng is not None else (-_FLOAT_MAX, _FLOAT_MAX))
            ed.setDecimals(_decimals(float(lo), float(hi), default if isinstance(default, (int, float)) else None))
            ed.setRange(max(float(lo), -_FLOAT_MAX), min(float(hi), _FLOAT_MAX))
            ed.setStepType(QAbstractSpinBox.AdaptiveDecimalStepType)
            ed.setAccelerated(True)
            ed.valueChanged.connect(self._on_edit)
        elif choices:
            ed = QComboBox()
            # a long choice must not widen the dock (and the window) when the paradigm changes
            ed.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            ed.setMinimumContentsLength(8)
            for c in choices:
                ed.addItem(str(c), c)
            ed.currentIndexChanged.connect(self._on_edit)
        else:
            ed = QLineEdit()
            ed.setMinimumWidth(60)
            ed.textEdited.connect(self._on_edit)
        return ed

    def _on_edit(self, *_):
        self.changed.emit()

    def _defaults(self):
        return self.params_cls()

    # ---------------------------------------------------------------- values
    def raw_values(self) -> dict[str, Any]:
        """The editors' values, unvalidated (strings of free-text fields as typed)."""
        out = {}
        for name, ed in self.editors.items():
            if isinstance(ed, QCheckBox):
                out[name] = ed.isChecked()
            elif isinstance(ed, QSpinBox):
                out[name] = int(ed.value())
            elif isinstance(ed, QDoubleSpinBox):
                out[name] = float(ed.value())
            elif isinstance(ed, QComboBox):
                out[name] = ed.currentData()
            else:
                out[name] = ed.text()
        return out

    def values(self):
        """A validated ``params_cls`` instance. Raises ValueError naming the bad field."""
        from app.engine.paradigms.base import make_params
        return make_params(self.params_cls, self.raw_values())

    def set_values(self, params) -> None:
        """Show ``params`` (an instance or a dict of field values; unknown keys are ignored).
        Numbers outside a field's range are clamped to it; a choice not offered is added."""
        vals = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})
        for name, v in vals.items():
            ed = self.editors.get(name)
            if ed is None or v is None:
                continue
            was = ed.blockSignals(True)
            try:
                if isinstance(ed, QCheckBox):
                    ed.setChecked(bool(v))
                elif isinstance(ed, QSpinBox):
                    ed.setValue(int(max(min(int(v), ed.maximum()), ed.minimum())))
                elif isinstance(ed, QDoubleSpinBox):
                    ed.setValue(float(v))
                elif isinstance(ed, QComboBox):
                    i = ed.findData(v)
                    if i < 0:
                        ed.addItem(str(v), v)
                        i = ed.count() - 1
                    ed.setCurrentIndex(i)
                elif isinstance(v, (tuple, list)):
                    from app.engine.paradigms.base import format_number_list
                    ed.setText(format_number_list(v))       # a tuple field: "4,2,1", parsed back by values()
                else:
                    ed.setText(str(v))
            finally:
                ed.blockSignals(was)

    def reset(self) -> None:
        """Back to the dataclass defaults."""
        self.set_values(self._defaults())
        self.changed.emit()

    def set_enabled_fields(self, enabled: bool) -> None:
        for ed in self.editors.values():
            ed.setEnabled(enabled)
