"""The workspace: one Qt-free model of everything a review session holds.

* ``state`` (:class:`ViewerState`): the image layers, the result on screen, cursor, overlays;
* ``landmarks`` (:class:`LandmarkPairs`): corresponding points, with undo;
* ``runs`` (:class:`RunHistory`): every registration of the session and the current one.

The workspace keeps them consistent (napari style: plain callbacks, no Qt):

* the current run is the result the views show (``runs.current`` -> ``state.set_result``);
* the landmark glyphs follow the pairs, and every run's TRE (before and after) is recomputed
  from its transform whenever the pairs change (the transforms are in memory);
* replacing or closing the fixed or moving image makes its labels, its landmarks and every run
  stale: :meth:`stale_if_replaced` lists them, :meth:`clear_dependents` drops them (the window
  asks the user first).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .landmarks import LandmarkPairs
from .runs import RunHistory
from .viewer_state import LAYERS, ViewerState

_TRE_KEYS = ("tre_mean_mm", "tre_median_mm", "tre_max_mm", "tre_per_point_mm")


class Workspace:
    """Layers, landmark pairs, run history and the current run, kept in step."""

    def __init__(self, state: Optional[ViewerState] = None):
        self.state = state if state is not None else ViewerState()
        self.landmarks = LandmarkPairs()
        self.runs = RunHistory()
        self.runs.events.current.connect(self._on_current_run)
        self.runs.events.cleared.connect(lambda: self.state.set_result(None))
        self.runs.events.added.connect(lambda i: self._update_tre(i))
        self.landmarks.events.changed.connect(self._on_landmarks_change)

    # ------------------------------------------------------------------ runs
    def add_run(self, result, metrics: Optional[dict] = None, name: Optional[str] = None, select: bool = True) -> int:
        """Record a finished run (and show it when ``select``); returns its index."""
        return self.runs.add(result, metrics, name, select=select)

    def _on_current_run(self, index) -> None:
        run = None if index is None else self.runs[index]
        self.state.set_result(None if run is None else run.result)

    def _update_tre(self, i: int) -> None:
        run = self.runs[i]
        if run.result is None:
            return
        after = self.landmarks.tre_summary(run.result.transform)
        before = self.landmarks.tre_summary(None)
        if not after and not any(run.metrics.get(k) is not None for k in _TRE_KEYS):
            return                      # no landmarks now, none measured then: nothing to say
        empty = dict.fromkeys(_TRE_KEYS)
        self.runs.update_metrics(i, {**empty, **after, "before": {**empty, **before}})

    def recompute_tre(self) -> None:
        """TRE before / after of every run from the current landmark pairs."""
        for i in range(len(self.runs)):
            self._update_tre(i)

    def _on_landmarks_change(self, select=None) -> None:
        lm = self.landmarks
        self.state.set_landmarks(lm.all_points("fixed"), lm.all_points("moving"), self.state.selected_point)
        self.recompute_tre()

    # ------------------------------------------------------------------ stale data
    def stale_if_replaced(self, role: str) -> list[str]:
        """What replacing or closing layer ``role`` makes stale, as phrases for the user (empty
        when nothing depends on it): the image's label map, its landmarks, every run."""
        st = self.state
        if role not in ("fixed", "moving") or getattr(st, role) is None:
            return []
        out = []
        if getattr(st, f"{role}_labels") is not None:
            out.append(f"the {role} labels")
        n = self.landmarks.point_count(role)
        if n:
            out.append(f"{n} {role} landmark{'s' if n != 1 else ''}")
        if len(self.runs):
            k = len(self.runs)
            out.append(f"{k} registration run{'s' if k != 1 else ''} and their metrics")
        return out

    def clear_dependents(self, role: str) -> None:
        """Drop the label map and the landmarks of image ``role`` and every run."""
        if role not in ("fixed", "moving"):
            return
        if getattr(self.state, f"{role}_labels") is not None:
            self.state.set_layer(f"{role}_labels", None)
        self.landmarks.clear_side(role)
        self.runs.clear()

    def set_layer(self, role: str, volume, path=None, *, keep_dependents: bool = False) -> None:
        """Replace (or close, with None) layer ``role``. For the fixed or moving image, what
        depends on the old one is cleared unless ``keep_dependents``; when kept, no run stays on
        screen (each was computed on the old image)."""
        if role not in LAYERS:
            raise ValueError(f"unknown layer '{role}'; use one of {', '.join(LAYERS)}")
        if role in ("fixed", "moving") and getattr(self.state, role) is not None:
            if keep_dependents:
                self.runs.set_current(None)
            else:
                self.clear_dependents(role)
        self.state.set_layer(role, volume, path)

    def clear(self) -> None:
        """Close every layer, landmark and run."""
        self.runs.clear()
        self.landmarks.clear()
        for role in ("moving_labels", "fixed_labels", "moving", "fixed"):
            self.state.set_layer(role, None)

    # ------------------------------------------------------------------ inputs
    def registration_inputs(self) -> dict:
        """What a registration runs on: the layers and the complete landmark pairs (None when
        there are none)."""
        st = self.state
        fp, mp = self.landmarks.fixed_landmarks(), self.landmarks.moving_landmarks()
        have = len(fp) > 0
        return {"fixed": st.fixed, "moving": st.moving, "fixed_labels": st.fixed_labels,
                "moving_labels": st.moving_labels, "fixed_points": fp if have else None,
                "moving_points": mp if have else None}

    def label_at(self, xyz) -> dict:
        """Label values of the fixed labels and of the moving labels after the current run
        (warped) at an LPS point: ``{"fixed": int or None, "warped": int or None}``."""
        from .slice_geometry import sample_point
        st = self.state
        wl = st.warped_labels() if st.moving_labels is not None else None
        return {"fixed": sample_point(st.fixed_labels, xyz), "warped": sample_point(wl, xyz)}

    def jacobian_at(self, xyz) -> Optional[float]:
        """Jacobian determinant of the current run's transform at an LPS point (central
        differences, 0.5 mm steps); None without a run."""
        res = self.state.result
        if res is None:
            return None
        p = np.asarray(xyz, float).reshape(3)
        h = 0.5
        J = np.zeros((3, 3))
        for a in range(3):
            e = np.zeros(3)
            e[a] = h
            q = res.transform.transform_points(np.stack([p + e, p - e]))
            J[:, a] = (q[0] - q[1]) / (2 * h)
        return float(np.linalg.det(J))
