"""The main window's interaction with the views: the mouse mode (cursor, window/level, picking
landmarks or guide pairs), clicks in the views, the cursor read-out in the status bar, the
overlay actions and flicker kept in step with the state, and the view layout (four-up, runs
A | B, fixed | moving).

:class:`InteractionMixin` is combined into :class:`app.widgets.main_window.MainWindow`. Picking
is shared by two panels (landmarks and the trust panel's guide pairs): starting one ends the
other, and picking on the moving image shows the moving image until the pick ends.
"""
from __future__ import annotations

import numpy as np

from app.viewer.slice_geometry import nearest_voxel


class InteractionMixin:
    """Mouse modes, picking, the cursor read-out and the view layout (see the module docstring)."""

    # ------------------------------------------------------------------ picking landmarks and guides
    def _on_guide_pick_change(self, which) -> None:
        """The guide panel's pick buttons: picking guides stops picking landmarks and back (the
        fixed | moving layout then places guide pairs too)."""
        sbs = getattr(self, "side_by_side", None)
        if sbs is not None:
            sbs.set_pick_guides(which in ("fixed", "moving"))
        if which in ("fixed", "moving"):
            lp = self.landmark_panel
            if lp is not None:
                was = lp.blockSignals(True)     # no round trip through 'cursor' (it would end this pick)
                lp.pick_target = None
                lp.blockSignals(was)
            self._apply_interaction("pick", which)
            self._trust_dock.raise_()
        elif self.state.interaction == "pick" and (self.landmark_panel is None or self.landmark_panel.pick_target is None):
            self._apply_interaction("cursor", None)

    def _on_point_selected(self, xyz) -> None:
        p = np.asarray(xyz, float).reshape(3)
        self.state.set_landmarks(selected=p)
        self.state.set_cursor(p)

    def _on_view_clicked(self, xyz) -> None:
        gp = self.guide_panel
        if gp is not None and gp.pick_target in ("fixed", "moving"):
            gp.add_point(gp.pick_target, np.asarray(xyz, float))
            return
        lp = self.landmark_panel
        if lp is not None and lp.pick_target in ("fixed", "moving"):
            lp.add_point(lp.pick_target, np.asarray(xyz, float))

    def set_interaction(self, mode: str, pick_target: str | None = None) -> None:
        """'cursor', 'window' or 'pick' (then ``pick_target`` 'fixed' / 'moving')."""
        if mode == "pick" and pick_target not in ("fixed", "moving"):
            raise ValueError(f"picking needs pick_target 'fixed' or 'moving', got {pick_target!r}")
        target = pick_target if mode == "pick" else None
        if self.landmark_panel is not None and self.landmark_panel.pick_target != target:
            self.landmark_panel.pick_target = target   # emits pick_target_changed -> _apply_interaction
        self._apply_interaction(mode, target)

    def _on_pick_target_change(self, which) -> None:
        """The landmark panel's own pick buttons changed the pick target."""
        if which in ("fixed", "moving"):
            self._apply_interaction("pick", which)
        elif self.state.interaction == "pick":
            self._apply_interaction("cursor", None)

    def _apply_interaction(self, mode: str, target: str | None) -> None:
        gp = getattr(self, "guide_panel", None)
        if gp is not None and gp.pick_target is not None and (mode != "pick" or gp.pick_target != target
                                                             or (self.landmark_panel is not None
                                                                 and self.landmark_panel.pick_target is not None)):
            was = gp.blockSignals(True)
            gp.pick_target = None
            gp.blockSignals(was)
            if getattr(self, "side_by_side", None) is not None:
                self.side_by_side.set_pick_guides(False)
        if mode == "pick" and self._landmark_dock is not None and (gp is None or gp.pick_target is None):
            self._landmark_dock.raise_()
        # picking on the moving image shows the moving image; the overlay comes back afterwards
        if mode == "pick" and target == "moving":
            if self.view_layout == "four_up":
                self.statusBar().showMessage("Placing moving points on the moving image; to see both images at "
                                             "once use View > Layout > Fixed | moving (Ctrl+Shift+3)", 8000)
            if self._pick_restore is None:
                o = self.state.overlay
                self._pick_restore = {"mode": o.mode, "source": o.source, "opacity": o.opacity}
            self.state.set_overlay(mode="blend", source="moving", opacity=1.0)
        elif self._pick_restore is not None:
            self.state.set_overlay(**self._pick_restore)
            self._pick_restore = None
        self.state.set_interaction(mode)
        action = {"cursor": self.act_cursor, "window": self.act_window}.get(mode) or (
            self.act_pick_moving if target == "moving" else self.act_pick_fixed)
        action.setChecked(True)

    def _on_interaction_change(self, mode: str) -> None:
        if mode == "cursor":
            self.act_cursor.setChecked(True)
        elif mode == "window":
            self.act_window.setChecked(True)

    # ------------------------------------------------------------------ read-out, overlay actions, flicker
    def _on_cursor_change(self, xyz) -> None:
        self._update_readout()

    def _on_overlay_change(self, changed: set) -> None:
        o = self.state.overlay
        if "mode" in changed:
            self.mode_actions[o.mode].setChecked(True)
        for k, a in self.toggle_actions.items():
            a.blockSignals(True)
            a.setChecked(getattr(o, k))
            a.blockSignals(False)
        if o.mode == "flicker":
            self._flicker.setInterval(o.flicker_ms)
            if not self._flicker.isActive():
                self._flicker.start()
        else:
            self._flicker.stop()
            self.state.set_flicker_phase(0)

    def _update_readout(self) -> None:
        st = self.state
        if not st.has_data():
            self.cursor_label.setText("no image loaded")
            return
        p = st.cursor
        vals = st.values_at(p)
        ijk = nearest_voxel(st.reference, p)
        parts = [f"LPS ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) mm",
                 "voxel " + (f"[{ijk[0]}, {ijk[1]}, {ijk[2]}]" if ijk else "outside")]
        for k in ("fixed", "moving", "warped"):
            if getattr(st, k) is not None:
                parts.append(f"{k}: {_fmt(vals[k])}")
        from app.viewer.colour_table import label_name
        labs = self.workspace.label_at(p)
        for k, title in (("fixed", "fixed label"), ("warped", "warped label" if st.result is not None else "moving label")):
            v = labs[k]
            if v is not None:
                name = label_name(v, st.label_table)
                parts.append(f"{title}: {int(v)}" + (f" {name}" if name else ""))
        if st.result is not None and ijk:
            try:
                parts.append(f"det J: {self.workspace.jacobian_at(p):.3f}")
            except Exception:  # noqa: BLE001 - a transform that cannot be evaluated there
                pass
        err = st.error_at(p)
        if err is not None:
            parts.append(f"est. error: {err:.2f} mm")
        agree = st.similarity_at(p)
        if agree is not None:
            parts.append(f"dsm P(match): {agree:.2f}")
        self.cursor_label.setText("   |   ".join(parts))

    # ------------------------------------------------------------------ layout
    @property
    def view_layout(self) -> str:
        if self.central_stack.currentWidget() is not self.side_by_side:
            return "four_up"
        return self.side_by_side.mode

    def set_view_layout(self, layout: str) -> None:
        """'four_up', 'runs' (two runs side by side, linked cursors) or 'landmarks' (fixed |
        moving side by side: a click places the point of the image clicked)."""
        if layout not in ("four_up", "runs", "landmarks"):
            raise ValueError(f"layout must be 'four_up', 'runs' or 'landmarks', got {layout!r}")
        if layout == "four_up":
            self.central_stack.setCurrentIndex(0)
        else:
            self.side_by_side.set_mode(layout)
            self.central_stack.setCurrentWidget(self.side_by_side)
            if layout == "landmarks" and self._landmark_dock is not None:
                self._landmark_dock.raise_()
            if layout == "runs" and self._metrics_dock is not None:
                self._metrics_dock.raise_()
        self.layout_actions[layout].setChecked(True)

    def reset_views(self) -> None:
        for v in self.slice_views.values():
            v.fit()
            v.render()
        self.view3d.reset_camera()


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.4g}"
