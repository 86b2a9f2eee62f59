"""Overlay controls: mode, source, opacity, checker size, flicker, label contours, deformation
grid, Jacobian map, estimated error map and window/level presets. Reads and writes :class:`ViewerState` only."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.viewer.compositing import auto_window
from app.viewer.viewer_state import ViewerState

MODES = [("none", "Fixed only"), ("blend", "Blend"), ("checkerboard", "Checkerboard"),
         ("difference", "Difference"), ("flicker", "Flicker")]

# name -> (window, level) in image units, or a (low, high) percentile rule ('pct', lo, hi)
WL_PRESETS: dict[str, tuple] = {
    "Auto (0.5-99.5 %)": ("pct", 0.5, 99.5),
    "Full range": ("pct", 0.0, 100.0),
    "MR brain (1-99 %)": ("pct", 1.0, 99.0),
    "MR high contrast (5-95 %)": ("pct", 5.0, 95.0),
    "CT brain": (80.0, 40.0),
    "CT soft tissue": (400.0, 40.0),
    "CT bone": (1800.0, 400.0),
    "CT lung": (1500.0, -600.0),
}


class OverlayPanel(QWidget):
    """Controls for what is drawn over the fixed image."""

    def __init__(self, state: ViewerState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state

        self.mode_combo = QComboBox()
        for key, text in MODES:
            self.mode_combo.addItem(text, key)
        self.source_combo = QComboBox()
        self.source_combo.addItem("Warped (after a run)", "warped")
        self.source_combo.addItem("Moving (as loaded)", "moving")
        self.opacity_slider = QSlider(Qt.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_label = QLabel()
        self.opacity_label.setMinimumWidth(34)
        self.false_colour_box = QCheckBox("Green / magenta")
        self.checker_spin = QDoubleSpinBox()
        self.checker_spin.setRange(2.0, 200.0)
        self.checker_spin.setSingleStep(2.0)
        self.checker_spin.setSuffix(" mm")
        self.flicker_spin = QSpinBox()
        self.flicker_spin.setRange(100, 5000)
        self.flicker_spin.setSingleStep(100)
        self.flicker_spin.setSuffix(" ms")

        over = QGroupBox("Overlay")
        f = QFormLayout(over)
        f.addRow("Mode", self.mode_combo)
        f.addRow("Compare with", self.source_combo)
        row = QHBoxLayout()
        row.addWidget(self.opacity_slider, 1)
        row.addWidget(self.opacity_label)
        f.addRow("Opacity", row)
        f.addRow("", self.false_colour_box)
        f.addRow("Checker size", self.checker_spin)
        f.addRow("Flicker", self.flicker_spin)

        self.contours_fixed_box = QCheckBox("Fixed label contours")
        self.contours_warped_box = QCheckBox("Warped label contours")
        labels = QGroupBox("Labels")
        lv = QVBoxLayout(labels)
        lv.addWidget(self.contours_fixed_box)
        lv.addWidget(self.contours_warped_box)
        self.fill_combo = QComboBox()
        for key, text in (("none", "No fill"), ("fixed", "Fixed labels"), ("warped", "Warped / moving labels")):
            self.fill_combo.addItem(text, key)
        self.fill_combo.setToolTip("Filled colour label map (colours and names from File > Open label "
                                   "colour table, else a fixed palette)")
        self.fill_opacity = QSlider(Qt.Horizontal)
        self.fill_opacity.setRange(0, 100)
        self.fill_opacity.setToolTip("Opacity of the filled labels")
        frow = QHBoxLayout()
        frow.addWidget(QLabel("Fill"))
        frow.addWidget(self.fill_combo, 1)
        frow.addWidget(self.fill_opacity, 1)
        lv.addLayout(frow)
        self.fill_combo.currentIndexChanged.connect(lambda *_: self._set(label_fill=self.fill_combo.currentData()))
        self.fill_opacity.valueChanged.connect(lambda v: self._set(label_opacity=v / 100.0))

        self.grid_box = QCheckBox("Deformation grid")
        self.grid_spin = QSpinBox()
        self.grid_spin.setRange(2, 40)
        self.grid_spin.setSuffix(" vox")
        self.jacobian_box = QCheckBox("Jacobian map (magenta = folding)")
        self.jacobian_box.setToolTip("log-scale heat map of det J: blue = compression, red = expansion, "
                                     "magenta = folding (det <= 0)")
        self.error_map_box = QCheckBox("Estimated error map (mm)")
        self.error_map_box.setToolTip("Where the current run is likely wrong (compute it in the Trust panel); "
                                      "dark = small, bright yellow = large estimated error")
        self.similarity_map_box = QCheckBox("dsm disagreement map (1 - P match)")
        self.similarity_map_box.setToolTip("dsm runs: where the learned similarity thinks the fixed and warped "
                                           "patches do not correspond; green/transparent = agree, red = disagree")
        deform = QGroupBox("Deformation")
        dv = QFormLayout(deform)
        grow = QHBoxLayout()
        grow.addWidget(self.grid_box)
        grow.addWidget(self.grid_spin)
        dv.addRow(grow)
        dv.addRow(self.jacobian_box)
        dv.addRow(self.error_map_box)
        dv.addRow(self.similarity_map_box)

        self.preset_combo = QComboBox()
        for name in WL_PRESETS:
            self.preset_combo.addItem(name)
        self.preset_target = QComboBox()
        self.preset_target.addItem("Fixed and moving", ("fixed", "moving"))
        self.preset_target.addItem("Fixed", ("fixed",))
        self.preset_target.addItem("Moving / warped", ("moving",))
        self.apply_preset_button = QPushButton("Apply")
        self.window_label = QLabel()
        self.window_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        wl = QGroupBox("Window / level")
        wf = QFormLayout(wl)
        wf.addRow("Preset", self.preset_combo)
        prow = QHBoxLayout()
        prow.addWidget(self.preset_target, 1)
        prow.addWidget(self.apply_preset_button)
        wf.addRow("Apply to", prow)
        wf.addRow(self.window_label)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        for g in (over, labels, deform, wl):
            lay.addWidget(g)
        lay.addStretch(1)

        self.mode_combo.currentIndexChanged.connect(
            lambda i: self._set(mode=self.mode_combo.itemData(i)))
        self.source_combo.currentIndexChanged.connect(
            lambda i: self._set(source=self.source_combo.itemData(i)))
        self.opacity_slider.valueChanged.connect(lambda v: self._set(opacity=v / 100.0))
        self.false_colour_box.toggled.connect(lambda on: self._set(false_colour=on))
        self.checker_spin.valueChanged.connect(lambda v: self._set(checker_mm=float(v)))
        self.flicker_spin.valueChanged.connect(lambda v: self._set(flicker_ms=int(v)))
        self.contours_fixed_box.toggled.connect(lambda on: self._set(contours_fixed=on))
        self.contours_warped_box.toggled.connect(lambda on: self._set(contours_warped=on))
        self.grid_box.toggled.connect(lambda on: self._set(grid=on))
        self.grid_spin.valueChanged.connect(lambda v: self._set(grid_every_vox=int(v)))
        self.jacobian_box.toggled.connect(lambda on: self._set(jacobian=on))
        self.error_map_box.toggled.connect(lambda on: self._set(error_map=on))
        self.similarity_map_box.toggled.connect(lambda on: self._set(similarity_map=on))
        self.apply_preset_button.clicked.connect(self.apply_preset)
        self.preset_combo.activated.connect(lambda i: self.apply_preset())

        state.events.overlay.connect(self._on_overlay_change)
        state.events.layers.connect(self._on_layers_change)
        state.events.window.connect(self._on_window_change)
        self._on_overlay_change(set())
        self._on_layers_change("")

    # ------------------------------------------------------------------ write to the model
    def _set(self, **changes) -> None:
        self.state.set_overlay(**changes)

    def apply_preset(self, name: str | None = None) -> None:
        """Apply a window/level preset (by name; the selected one by default) to the chosen layers."""
        name = name or self.preset_combo.currentText()
        if name not in WL_PRESETS:
            raise ValueError(f"unknown window/level preset '{name}'; use one of {', '.join(WL_PRESETS)}")
        rule = WL_PRESETS[name]
        for layer in self.preset_target.currentData():
            vol = getattr(self.state, layer)
            if vol is None:
                continue
            if rule[0] == "pct":
                win, lev = auto_window(vol.array, rule[1], rule[2])
            else:
                win, lev = rule
            self.state.set_window(layer, win, lev)

    # ------------------------------------------------------------------ read from the model
    def _on_overlay_change(self, changed: set) -> None:
        o = self.state.overlay
        widgets = (self.mode_combo, self.source_combo, self.opacity_slider, self.false_colour_box,
                   self.checker_spin, self.flicker_spin, self.contours_fixed_box, self.contours_warped_box,
                   self.grid_box, self.grid_spin, self.jacobian_box, self.fill_combo, self.fill_opacity,
                   self.error_map_box, self.similarity_map_box)
        for w in widgets:
            w.blockSignals(True)
        try:
            self.mode_combo.setCurrentIndex(self.mode_combo.findData(o.mode))
            self.source_combo.setCurrentIndex(self.source_combo.findData(o.source))
            self.opacity_slider.setValue(int(round(o.opacity * 100)))
            self.opacity_label.setText(f"{o.opacity * 100:.0f} %")
            self.false_colour_box.setChecked(o.false_colour)
            self.checker_spin.setValue(o.checker_mm)
            self.flicker_spin.setValue(o.flicker_ms)
            self.contours_fixed_box.setChecked(o.contours_fixed)
            self.contours_warped_box.setChecked(o.contours_warped)
            self.grid_box.setChecked(o.grid)
            self.grid_spin.setValue(o.grid_every_vox)
            self.jacobian_box.setChecked(o.jacobian)
            self.error_map_box.setChecked(o.error_map)
            self.similarity_map_box.setChecked(o.similarity_map)
            self.fill_combo.setCurrentIndex(self.fill_combo.findData(o.label_fill))
            self.fill_opacity.setValue(int(round(o.label_opacity * 100)))
        finally:
            for w in widgets:
                w.blockSignals(False)
        blend = o.mode == "blend"
        self.opacity_slider.setEnabled(blend)
        self.false_colour_box.setEnabled(blend)
        self.checker_spin.setEnabled(o.mode == "checkerboard")
        self.flicker_spin.setEnabled(o.mode == "flicker")

    def _on_layers_change(self, name: str) -> None:
        st = self.state
        has_result = st.result is not None
        self.grid_box.setEnabled(has_result)
        self.grid_spin.setEnabled(has_result)
        self.jacobian_box.setEnabled(has_result)
        self.error_map_box.setEnabled(st.error_map is not None)
        self.similarity_map_box.setEnabled(st.similarity_map is not None)
        self.contours_fixed_box.setEnabled(st.fixed_labels is not None)
        self.contours_warped_box.setEnabled(st.moving_labels is not None or
                                            (has_result and st.result.warped_labels is not None))
        self.contours_warped_box.setText("Warped label contours" if has_result else "Moving label contours")
        self._on_window_change("")

    def _on_window_change(self, layer: str) -> None:
        parts = []
        for name in ("fixed", "moving"):
            if getattr(self.state, name) is not None:
                win, lev = self.state.window_of(name)
                parts.append(f"{name}: W {win:.4g}  L {lev:.4g}")
        self.window_label.setText("\n".join(parts) or "no image")
