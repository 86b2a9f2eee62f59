"""The workspace: one Qt-free model of everything a review session holds.

* ``state`` (:class:`ViewerState`): the image layers, the result on screen, cursor, overlays;
* ``landmarks`` (:class:`LandmarkPairs`): corresponding points, with undo;
* ``runs`` (:class:`RunHistory`): every registration of the session and the current one;
* ``guides`` (:class:`LandmarkPairs`): guide pairs for a landmark-guided correction
  (:func:`app.engine.guidance.guided_correction`), kept apart from the evaluation landmarks: they
  never enter a registration's inputs nor the TRE of the runs.

The workspace keeps them consistent (napari style: plain callbacks, no Qt):

* the current run is the result the views show (``runs.current`` -> ``state.set_result``);
* the landmark glyphs follow the pairs, and every run's TRE (before and after) is recomputed
  from its transform whenever the pairs change (the transforms are in memory);
* a run's estimated error map (:mod:`app.engine.errormap`) lives on its result; it is shown as an
  overlay of the current run (:meth:`set_error_map`) and goes with the run;
* replacing or closing the fixed or moving image makes its labels, its landmarks and guides and
  every run (with its error map) stale: :meth:`stale_if_replaced` lists them, :meth:`clear_dependents` drops them (the window
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
        self.guides = LandmarkPairs()
        self.runs = RunHistory()
        self.runs.events.current.connect(self._on_current_run)
        self.runs.events.cleared.connect(lambda: self.state.set_result(None))
        self.runs.events.added.connect(lambda i: self._update_tre(i))
        self.landmarks.events.changed.connect(self._on_landmarks_change)
        self.guides.events.changed.connect(self._on_guides_change)
        self.state.events.layers.connect(self._on_layer_change)

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

    def _on_guides_change(self, select=None) -> None:
        g = self.guides
        self.state.set_guides(g.all_points("fixed"), g.all_points("moving"))

    # ------------------------------------------------------------------ error maps
    def set_error_map(self, index: int, volume, info: Optional[dict] = None) -> None:
        """Attach an estimated error map (Volume, mm on the fixed grid) and its summary (the info
        dict of :func:`app.engine.errormap.estimate_error_map`) to run ``index``; the overlay
        shows it when that run is current."""
        run = self.runs[index]
        if run.result is None:
            raise ValueError(f"run {run.name!r} has no result to attach an error map to")
        if volume is not None and self.state.fixed is not None and volume.shape != self.state.fixed.shape:
            raise ValueError(f"error map {volume.shape} is not on the fixed grid {self.state.fixed.shape}")
        run.result.error_map = volume
        self.runs.update_metrics(index, dict(info or {}))
        if index == self.runs.current:
            self.state.error_map_changed()

    def _on_layer_change(self, name: str) -> None:
        if name in ("fixed", "moving"):
            self.drop_error_maps()      # estimated on the old image: runs kept anyway lose them

    def drop_error_maps(self) -> None:
        """Forget every run's error map and its summary (their image changed)."""
        dropped = False
        for i, run in enumerate(self.runs.runs):
            had = run.result is not None and getattr(run.result, "error_map", None) is not None
            if had:
                run.result.error_map = None
            keys = [k for k in run.metrics if k.startswith("error_map_")]
            for k in keys:
                del run.metrics[k]
            if had or keys:
                dropped = True
                self.runs.events.changed.emit(i)
        if dropped:
            self.state.error_map_changed()

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
        n = self.guides.point_count(role)
        if n:
            out.append(f"{n} {role} guide point{'s' if n != 1 else ''}")
        if len(self.runs):
            k = len(self.runs)
            out.append(f"{k} registration run{'s' if k != 1 else ''} and their metrics")
        return out

    def clear_dependents(self, role: str) -> None:
        """Drop the label map, the landmarks and guides of image ``role`` and every run."""
        if role not in ("fixed", "moving"):
            return
        if getattr(self.state, f"{role}_labels") is not None:
            self.state.set_layer(f"{role}_labels", None)
        self.landmarks.clear_side(role)
        self.guides.clear_side(role)
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
        self.guides.clear()
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
