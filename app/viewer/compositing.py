"""Colour composition of one slice view: window/level, overlay modes, Jacobian map, estimated
registration-error map, learned-similarity (dsm) disagreement map (numpy only).

All inputs are 2D arrays on the pixels of one :class:`~app.viewer.slice_geometry.PlaneGrid`
(row 0 = bottom of the screen); the output is an RGBA ``uint8`` image of the same shape.
"""
from __future__ import annotations

import numpy as np

OVERLAY_MODES = ("none", "blend", "checkerboard", "difference", "flicker")

GRID_RGB = (1.0, 0.85, 0.1)            # deformation grid lines (drawn by the slice view)
FOLDING_RGB = np.array([1.0, 0.0, 1.0])
JACOBIAN_RANGE = (0.25, 4.0)     # det shown from strong compression to strong expansion (log scale)
JACOBIAN_ALPHA = 0.55

ERROR_ALPHA = 0.75               # opacity of the error map at its top value (it fades to 0 at 0 mm)
# "inferno" control points (perceptually uniform, dark = small error, bright yellow = large)
_INFERNO = np.array([
    [0.001, 0.000, 0.014], [0.258, 0.039, 0.406], [0.578, 0.148, 0.404],
    [0.865, 0.317, 0.226], [0.988, 0.645, 0.040], [0.988, 0.998, 0.645]])

DISAGREE_ALPHA = 0.7             # opacity of the dsm disagreement map at 1 (it fades to 0 where patches agree)
# green (patches correspond) -> yellow -> red (the network sees no correspondence)
_DISAGREE = np.array([[0.10, 0.62, 0.32], [0.99, 0.85, 0.10], [0.84, 0.10, 0.11]])

# CIE-Lab "cool to warm" control points (Moreland), det = 0.25 ... 1 ... 4 on a log scale
_COOLWARM = np.array([
    [0.230, 0.299, 0.754], [0.552, 0.690, 0.996], [0.865, 0.865, 0.865],
    [0.958, 0.604, 0.482], [0.706, 0.016, 0.150]])


def window_level(values: np.ndarray, window: float, level: float) -> np.ndarray:
    """Map intensities to [0, 1]: ``level - window/2`` -> 0, ``level + window/2`` -> 1 (float32)."""
    w = max(float(window), 1e-12)
    out = (np.asarray(values, np.float32) - (level - w / 2)) / w
    return np.clip(out, 0.0, 1.0, out=out)


def auto_window(array: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """(window, level) spanning the given percentiles of ``array`` (subsampled for speed)."""
    a = np.asarray(array)
    step = max(1, int(round((a.size / 2e6) ** (1 / 3))))
    sub = a[::step, ::step, ::step] if a.ndim == 3 else a
    sub = sub[np.isfinite(sub)] if np.issubdtype(sub.dtype, np.floating) else sub.ravel()
    if sub.size == 0:
        return 1.0, 0.5
    lo, hi = np.percentile(sub, [lo_pct, hi_pct])
    if hi <= lo:
        lo, hi = float(sub.min()), float(sub.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(hi - lo), float((hi + lo) / 2)


def jacobian_table(n: int = 256) -> np.ndarray:
    """(n, 3) RGB in [0, 1] for det from JACOBIAN_RANGE[0] to [1], evenly spaced in log(det)."""
    x = np.linspace(0, 1, len(_COOLWARM))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, _COOLWARM[:, c]) for c in range(3)], 1)


def jacobian_rgb(det: np.ndarray) -> np.ndarray:
    """Colours ``(..., 3)`` of Jacobian determinants; folding (det <= 0) in FOLDING_RGB."""
    table = jacobian_table()
    lo, hi = np.log(JACOBIAN_RANGE[0]), np.log(JACOBIAN_RANGE[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log(np.maximum(det, 1e-12)) - lo) / (hi - lo)
    idx = np.clip(np.round(t * (len(table) - 1)), 0, len(table) - 1).astype(int)
    rgb = table[idx]
    rgb[det <= 0] = FOLDING_RGB
    return rgb


def error_table(n: int = 256) -> np.ndarray:
    """(n, 3) RGB in [0, 1] for an estimated error from 0 mm to the colour bar's top, evenly spaced."""
    x = np.linspace(0, 1, len(_INFERNO))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, _INFERNO[:, c]) for c in range(3)], 1)


def error_rgba(error_mm: np.ndarray, max_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Colours ``(..., 3)`` and opacities ``(...)`` of estimated errors (mm) on a linear scale from
    0 to ``max_mm``: the opacity grows with the error (``ERROR_ALPHA * e / max_mm``), so
    well-registered regions show the anatomy and the worst ones stand out. NaN is transparent."""
    top = max(float(max_mm), 1e-6)
    e = np.asarray(error_mm, np.float64)
    t = np.clip(np.nan_to_num(e / top, nan=0.0), 0.0, 1.0)
    table = error_table()
    rgb = table[np.round(t * (len(table) - 1)).astype(int)]
    alpha = ERROR_ALPHA * t
    alpha[~np.isfinite(e)] = 0.0
    return rgb, alpha


def disagreement_table(n: int = 256) -> np.ndarray:
    """(n, 3) RGB in [0, 1] for a dsm disagreement ``1 - P(correspond)`` from 0 to 1, evenly spaced."""
    x = np.linspace(0, 1, len(_DISAGREE))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, _DISAGREE[:, c]) for c in range(3)], 1)


def disagreement_rgba(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colours ``(..., 3)`` and opacities ``(...)`` of the dsm agreement map ``prob`` (P that the fixed
    and warped patches correspond, in [0, 1]): drawn as the disagreement ``1 - prob``, whose opacity
    grows with it (``DISAGREE_ALPHA * (1 - prob)``) so that agreeing regions show the anatomy. NaN
    (no patch scored there) is transparent."""
    p = np.asarray(prob, np.float64)
    t = np.clip(1.0 - np.nan_to_num(p, nan=1.0), 0.0, 1.0)
    table = disagreement_table()
    rgb = table[np.round(t * (len(table) - 1)).astype(int)]
    alpha = DISAGREE_ALPHA * t
    alpha[~np.isfinite(p)] = 0.0
    return rgb, alpha


def checker_mask(u_mm: np.ndarray, v_mm: np.ndarray, square_mm: float) -> np.ndarray:
    """True on the 'odd' squares of a checkerboard anchored at u = v = 0 (so all views agree).

    Parameters
    ----------
    u_mm : (nu,) pixel-centre u coordinates; v_mm : (nv,) pixel-centre v coordinates.
    Returns (nv, nu) bool.
    """
    s = max(float(square_mm), 1e-6)
    cu = np.floor(np.asarray(u_mm) / s).astype(np.int64)
    cv = np.floor(np.asarray(v_mm) / s).astype(np.int64)
    return ((cv[:, None] + cu[None, :]) % 2) == 1


def compose(base: np.ndarray | None, base_inside: np.ndarray, *, overlay: np.ndarray | None = None,
            overlay_inside: np.ndarray | None = None, mode: str = "none", opacity: float = 0.5,
            checker: np.ndarray | None = None, false_colour: bool = False, flicker_phase: int = 0,
            jacobian: np.ndarray | None = None,
            jacobian_inside: np.ndarray | None = None,
            labels_rgb: np.ndarray | None = None, labels_mask: np.ndarray | None = None,
            labels_opacity: float = 0.4, error: np.ndarray | None = None,
            error_inside: np.ndarray | None = None, error_max_mm: float = 1.0,
            agreement: np.ndarray | None = None, agreement_inside: np.ndarray | None = None) -> np.ndarray:
    """Compose one view's image.

    Parameters
    ----------
    base : (nv, nu) float in [0, 1] or None
        The fixed image after window/level.
    base_inside : (nv, nu) bool
        Pixels inside the fixed grid; the others are transparent (alpha 0).
    overlay, overlay_inside : (nv, nu) float in [0, 1] / bool, optional
        The moving or warped image after window/level.
    mode : one of OVERLAY_MODES
    opacity : float in [0, 1]
        Overlay weight in 'blend'.
    checker : (nv, nu) bool
        Where 'checkerboard' shows the overlay.
    false_colour : bool
        'blend' in green (fixed) / magenta (overlay) instead of grey.
    flicker_phase : int
        'flicker' shows the fixed image in phase 0 and the overlay in phase 1.
    jacobian, jacobian_inside : (nv, nu) float / bool, optional
        Jacobian determinant, shown as a heat map (log scale) with folding highlighted.
    labels_rgb, labels_mask : (nv, nu, 3) float in [0, 1] / (nv, nu) bool, optional
        A filled colour label map, blended with ``labels_opacity`` where ``labels_mask``.
    error, error_inside : (nv, nu) float (mm) / bool, optional
        Estimated registration error, drawn over everything else (:func:`error_rgba`, scale 0 to
        ``error_max_mm``).
    agreement, agreement_inside : (nv, nu) float in [0, 1] / bool, optional
        The dsm agreement map (P that the patches correspond), drawn as its disagreement
        (:func:`disagreement_rgba`) under the error map.

    Returns
    -------
    (nv, nu, 4) uint8 RGBA.
    """
    if mode not in OVERLAY_MODES:
        raise ValueError(f"unknown overlay mode '{mode}'; use one of {', '.join(OVERLAY_MODES)}")
    nv, nu = base_inside.shape
    b = np.zeros((nv, nu), np.float32) if base is None else base
    rgb = np.repeat(b[..., None], 3, axis=2)
    if overlay is not None and mode != "none":
        ov = overlay
        ins = np.ones_like(base_inside) if overlay_inside is None else overlay_inside
        if mode == "blend":
            a = float(np.clip(opacity, 0, 1))
            if false_colour:
                g = np.clip(2 * (1 - a), 0, 1) * b
                m = np.clip(2 * a, 0, 1) * np.where(ins, ov, 0)
                rgb = np.stack([m, g, m], -1)
            else:
                mix = np.where(ins, (1 - a) * b + a * ov, (1 - a) * b)
                rgb = np.repeat(mix[..., None], 3, axis=2)
        elif mode == "checkerboard":
            sel = np.ones_like(base_inside) if checker is None else checker
            val = np.where(sel, np.where(ins, ov, 0), b)
            rgb = np.repeat(val[..., None], 3, axis=2)
        elif mode == "difference":
            d = np.abs(np.where(ins, ov, 0) - b)
            rgb = np.repeat(d[..., None], 3, axis=2)
        elif mode == "flicker" and flicker_phase % 2 == 1:
            val = np.where(ins, ov, 0)
            rgb = np.repeat(val[..., None], 3, axis=2)
    if jacobian is not None:
        jin = np.ones_like(base_inside) if jacobian_inside is None else jacobian_inside
        jrgb = jacobian_rgb(jacobian)
        alpha = np.where(jin, JACOBIAN_ALPHA, 0.0)
        alpha = np.where(jin & (jacobian <= 0), 1.0, alpha)[..., None]
        rgb = rgb * (1 - alpha) + jrgb * alpha
    if labels_rgb is not None:
        a = float(np.clip(labels_opacity, 0, 1))
        m = (np.ones_like(base_inside) if labels_mask is None else labels_mask)[..., None] * a
        rgb = rgb * (1 - m) + labels_rgb * m
    if agreement is not None:
        argb, aalpha = disagreement_rgba(agreement)
        if agreement_inside is not None:
            aalpha = np.where(agreement_inside, aalpha, 0.0)
        rgb = rgb * (1 - aalpha[..., None]) + argb * aalpha[..., None]
    if error is not None:
        ergb, ealpha = error_rgba(error, error_max_mm)
        if error_inside is not None:
            ealpha = np.where(error_inside, ealpha, 0.0)
        rgb = rgb * (1 - ealpha[..., None]) + ergb * ealpha[..., None]
    out = np.empty((nv, nu, 4), np.uint8)
    out[..., :3] = np.clip(np.round(rgb * 255), 0, 255)
    out[..., 3] = np.where(base_inside, 255, 0)
    return out


def label_edges(labels: np.ndarray, origin_uv, spacing_uv) -> np.ndarray:
    """Boundaries between different labels of a 2D label slice, as line segments on pixel edges.

    Parameters
    ----------
    labels : (nv, nu) int
        Label ids on the plane pixels (0 = background).
    origin_uv, spacing_uv : (2,) float
        Plane coordinates (mm) of pixel (0, 0)'s centre and the pixel size.

    Returns
    -------
    (M, 2, 2) float: M segments, each two (u, v) points in mm.
    """
    lab = np.asarray(labels)
    (u0, v0), (du, dv) = origin_uv, spacing_uv
    segs = []
    # neighbours along u: a vertical edge at u between columns c and c+1
    r, c = np.nonzero(lab[:, 1:] != lab[:, :-1])
    if r.size:
        u = u0 + (c + 0.5) * du
        segs.append(np.stack([np.stack([u, v0 + (r - 0.5) * dv], -1),
                              np.stack([u, v0 + (r + 0.5) * dv], -1)], 1))
    r, c = np.nonzero(lab[1:, :] != lab[:-1, :])
    if r.size:
        v = v0 + (r + 0.5) * dv
        segs.append(np.stack([np.stack([u0 + (c - 0.5) * du, v], -1),
                              np.stack([u0 + (c + 0.5) * du, v], -1)], 1))
    if not segs:
        return np.zeros((0, 2, 2))
    return np.concatenate(segs, 0)
