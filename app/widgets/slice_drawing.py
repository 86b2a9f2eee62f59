"""What a :class:`~app.widgets.slice_view.SliceView` draws on its current plane: the state's volumes
sampled on the plane (cached per slice), composed into one picture (window/level, overlay mode,
Jacobian, estimated error, dsm disagreement, label fill; see :mod:`app.viewer.compositing`), and
the line layers: label contours, the deformed grid, landmark circles, guide squares, the crosshair.

:class:`SliceDrawingMixin` is combined into :class:`~app.widgets.slice_view.SliceView`, whose
:meth:`~app.widgets.slice_view.SliceView.flush` calls these updates for what changed; the actors
they fill are built in :mod:`app.widgets.slice_scene`.
"""
from __future__ import annotations

import numpy as np

from app.viewer import compositing as comp
from app.viewer.slice_geometry import sample
from . import vtk_adapter
from .slice_scene import LANDMARK_RADIUS_MM


class SliceDrawingMixin:
    """Samples, composes and draws the layers of the current plane (see the module docstring)."""

    # ------------------------------------------------------------------ sampling
    def _sampled(self, key: str, volume, order: int):
        """Cached sample of ``volume`` on the current plane."""
        tag = (id(volume), self.plane.offset, self.plane.orientation, order)
        hit = self._samples.get(key)
        if hit is not None and hit[0] == tag:
            return hit[1], hit[2]
        vals, inside = sample(volume, self.plane, order)
        self._samples[key] = (tag, vals, inside)
        return vals, inside

    def _derived(self, key: str, compute):
        """Cached per-plane result-derived array (displacement, Jacobian) for the current slice."""
        tag = (id(self.state.result), self.plane.offset, self.plane.orientation)
        hit = self._samples.get(key)
        if hit is None or hit[0] != tag:
            hit = (tag, compute(self.plane), None)
            self._samples[key] = hit
        return hit[1]

    # ------------------------------------------------------------------ layers
    def _update_image(self) -> None:
        st, ov = self.state, self.state.overlay
        plane = self.plane
        base, base_inside = None, None
        if st.fixed is not None:
            vals, base_inside = self._sampled("fixed", st.fixed, 1)
            base = comp.window_level(vals, *st.window_of("fixed"))
        overlay = overlay_inside = None
        over_vol, over_name = st.overlay_volume()
        if st.fixed is None and st.moving is not None:
            vals, base_inside = self._sampled("moving", st.moving, 1)
            base = comp.window_level(vals, *st.window_of("moving"))
        elif over_vol is not None and ov.mode != "none":
            vals, overlay_inside = self._sampled(over_name, over_vol, 1)
            overlay = comp.window_level(vals, *st.window_of(over_name))
        checker = None
        if ov.mode == "checkerboard":
            (u0, v0), (du, dv), (nu, nv) = plane.origin_uv, plane.spacing_uv, plane.size_uv
            checker = comp.checker_mask(u0 + du * np.arange(nu), v0 + dv * np.arange(nv), ov.checker_mm)
        jac = jac_inside = None
        show_bar = False
        if ov.jacobian and st.result is not None:
            jac = self._derived("jacobian", st.plane_jacobian)
            if jac is not None:
                jac_inside = base_inside
                show_bar = True
        err = err_inside = None
        err_max = 1.0
        if ov.error_map and st.error_map is not None:
            err, err_inside = self._sampled("error_map", st.error_map, 1)
            err_max = st.error_scale_mm()
        agree = agree_inside = None
        if ov.similarity_map and st.similarity_map is not None:
            # nearest: the map is blocky (one value per scored patch) and NaN where none was scored
            agree, agree_inside = self._sampled("similarity_map", st.similarity_map, 0)
        lab_rgb = lab_mask = None
        fill = st.fixed_labels if ov.label_fill == "fixed" else st.warped_labels() if ov.label_fill == "warped" else None
        if fill is not None:
            from app.viewer.colour_table import label_rgb_image
            lab, lab_inside = self._sampled(f"fill_{ov.label_fill}", fill, 0)
            lab_rgb, lab_mask = label_rgb_image(lab, st.label_table)
            lab_mask &= lab_inside
        self.rgba = comp.compose(base, base_inside, overlay=overlay, overlay_inside=overlay_inside,
                                 mode=ov.mode, opacity=ov.opacity, checker=checker,
                                 false_colour=ov.false_colour, flicker_phase=st.flicker_phase,
                                 jacobian=jac, jacobian_inside=jac_inside, labels_rgb=lab_rgb,
                                 labels_mask=lab_mask, labels_opacity=ov.label_opacity,
                                 error=err, error_inside=err_inside, error_max_mm=err_max,
                                 agreement=agree, agreement_inside=agree_inside)
        vtk_adapter.rgba_image(self.rgba, plane.origin_uv, plane.spacing_uv, self.vtk_image)
        self.image_actor.GetMapper().SetInputData(self.vtk_image)
        self.image_actor.VisibilityOn()
        self.scalar_bar.SetVisibility(show_bar)
        self.error_bar.SetVisibility(err is not None)
        if err is not None:
            self.error_lut.SetRange(0.0, err_max)
            # beside the Jacobian bar when both are shown
            self.error_bar.SetPosition(0.78 if show_bar else 0.89, 0.1)
        self.agreement_bar.SetVisibility(agree is not None)
        if agree is not None:   # left of the other bars shown
            self.agreement_bar.SetPosition(0.89 - 0.11 * (int(show_bar) + int(err is not None)), 0.1)

    def _update_contours(self) -> None:
        st, ov = self.state, self.state.overlay
        for key, on, labels, (poly, actor) in (
                ("lab_fixed", ov.contours_fixed, st.fixed_labels, self._contour_fixed),
                ("lab_warped", ov.contours_warped, st.warped_labels() if ov.contours_warped else None,
                 self._contour_warped)):
            if not on or labels is None:
                actor.VisibilityOff()
                continue
            lab, _ = self._sampled(key, labels, 0)
            segs = comp.label_edges(lab, self.plane.origin_uv, self.plane.spacing_uv)
            vtk_adapter.segments_polydata(segs, 0.0, poly)
            actor.VisibilityOn()

    def _update_grid(self) -> None:
        """The deformed grid: lines where the moving-space coordinate ``T(x) . u`` (or ``. v``) is a
        multiple of the grid spacing, i.e. a regular grid in the moving image pulled back onto the
        fixed image through ``T(x) = x + field(x)``."""
        st, plane = self.state, self.plane
        poly, actor = self._grid
        if not st.overlay.grid or st.result is None:
            actor.VisibilityOff()
            return
        disp = self._derived("displacement", st.plane_displacement)
        if disp is None:
            actor.VisibilityOff()
            return
        moved = plane.pixel_points() + disp[0]
        spacing_mm = st.overlay.grid_every_vox * float(min(st.fixed.spacing))
        lines = []
        for axis in (plane.u, plane.v):
            phi = moved @ axis
            k0, k1 = np.ceil(phi.min() / spacing_mm), np.floor(phi.max() / spacing_mm)
            lines.append((phi, np.arange(k0, k1 + 1) * spacing_mm))
        vtk_adapter.contour_lines(lines[0][0], plane.origin_uv, plane.spacing_uv, lines[0][1], self._grid_u)
        vtk_adapter.contour_lines(lines[1][0], plane.origin_uv, plane.spacing_uv, lines[1][1], self._grid_v)
        self._grid_append.Update()
        poly.DeepCopy(self._grid_append.GetOutput())
        actor.VisibilityOn()

    def _update_landmarks(self) -> None:
        st, plane = self.state, self.plane
        tol = max(plane.step / 2, 1.0) + 1e-6

        def circles(points, radius):
            if len(points) == 0:
                return []
            uvs = plane.from_lps(points)
            near = np.abs(uvs[:, 2] - plane.offset) <= tol
            t = np.linspace(0, 2 * np.pi, 25)
            ring = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1) * radius
            return [np.array([c[0], c[1], 0.0]) + ring for c in uvs[near]]

        for pts, (poly, actor), r in ((st.fixed_points, self._lm_fixed, LANDMARK_RADIUS_MM),
                                      (st.moving_points, self._lm_moving, LANDMARK_RADIUS_MM),
                                      (np.zeros((0, 3)) if st.selected_point is None else st.selected_point[None],
                                       self._lm_selected, LANDMARK_RADIUS_MM * 1.7)):
            lines = circles(pts, r)
            if lines:
                # a cross in the middle of each circle marks the exact spot
                lines += [np.array([[c[0, 0] - 2 * r, c[0, 1], 0], [c[0, 0] - r, c[0, 1], 0]]) for c in lines]
                vtk_adapter.polylines_polydata(lines, poly)
                actor.VisibilityOn()
            else:
                actor.VisibilityOff()
        # guide pairs: squares (landmarks are circles), so the two kinds of points never mix up
        for pts, (poly, actor) in ((st.guide_fixed_points, self._guide_fixed),
                                   (st.guide_moving_points, self._guide_moving)):
            if len(pts) == 0:
                actor.VisibilityOff()
                continue
            uvs = plane.from_lps(pts)
            near = np.abs(uvs[:, 2] - plane.offset) <= tol
            r = LANDMARK_RADIUS_MM
            sq = np.array([[-r, -r, 0], [r, -r, 0], [r, r, 0], [-r, r, 0], [-r, -r, 0]])
            lines = [np.array([c[0], c[1], 0.0]) + sq for c in uvs[near]]
            lines += [np.array([[c[0] - r, c[1], 0], [c[0] + r, c[1], 0]]) for c in uvs[near]]
            if lines:
                vtk_adapter.polylines_polydata(lines, poly)
                actor.VisibilityOn()
            else:
                actor.VisibilityOff()

    def _update_crosshair(self) -> None:
        u, v, _ = self.plane.from_lps(self.state.cursor)
        u_min, u_max, v_min, v_max = self.plane.extent_uv
        pad = 0.5 * max(u_max - u_min, v_max - v_min)
        segs = np.array([[[u_min - pad, v], [u_max + pad, v]], [[u, v_min - pad], [u, v_max + pad]]])
        vtk_adapter.segments_polydata(segs, 0.0, self._crosshair[0])
        self._crosshair[1].VisibilityOn()
