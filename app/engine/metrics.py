"""Similarity and evaluation metrics on plain arrays.

Conventions (see ``types.py``):

* Image and label arrays are indexed ``(z, y, x)`` as ``SimpleITK.GetArrayFromImage`` returns
  them. Displacement fields are ``(z, y, x, 3)`` with the components in **xyz**, in mm.
* ``spacing`` is always given in ITK order **(x, y, z)** in mm, so the spacing along array
  axis 0 (z) is ``spacing[2]``. Internally it is reversed to ``(z, y, x)`` before it is used
  as ``sampling`` for array operations.
* Points are ``(N, 3)`` arrays of LPS millimetres, xyz.

Definitions follow the Learn2Reg evaluation (Dice and HD95 per label, SDlogJ, TRE in mm);
where a choice had to be made the docstring says which one (MONAI conventions for surface
distances). Entropies and mutual information are in nats.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
from scipy import ndimage

__all__ = [
    "mse", "ncc", "local_ncc", "mutual_information", "mattes_mi", "ssim", "psnr",
    "dice_per_label", "jaccard_per_label", "hd95_per_label", "assd_per_label",
    "tre", "jacobian_determinant", "jacobian_stats", "summarize_dice",
]


# ---------------------------------------------------------------------------- validation
def _pair(a, b, mask=None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Validate two images of the same shape and an optional mask; return float64 arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"images are empty (shape {a.shape})")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {a.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError(f"mask of shape {mask.shape} selects no voxel")
    return a, b, mask


def _masked(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray]):
    if mask is None:
        return a.ravel(), b.ravel()
    return a[mask], b[mask]


def _spacing_zyx(spacing, ndim: int = 3) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers in xyz order (mm), "
                         f"got {spacing!r}")
    return s[::-1].copy()


# ---------------------------------------------------------------------------- similarity
def mse(a, b, mask=None) -> float:
    """Mean squared difference.

    Parameters
    ----------
    a, b : np.ndarray
        Images of the same shape (any dimensionality, usually ``(z, y, x)``).
    mask : np.ndarray of bool, optional
        Same shape; only voxels where it is True are used.

    Returns
    -------
    float
        ``mean((a - b)**2)`` in squared intensity units.
    """
    a, b, mask = _pair(a, b, mask)
    x, y = _masked(a, b, mask)
    return float(np.mean((x - y) ** 2))


def ncc(a, b, mask=None) -> float:
    """Global normalised cross-correlation (Pearson correlation coefficient).

    Parameters
    ----------
    a, b : np.ndarray
        Images of the same shape.
    mask : np.ndarray of bool, optional
        Same shape; only voxels where it is True are used.

    Returns
    -------
    float
        Correlation in ``[-1, 1]``; NaN when either image is constant over the mask
        (the correlation is undefined there).
    """
    a, b, mask = _pair(a, b, mask)
    x, y = _masked(a, b, mask)
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(x, y) / denom, -1.0, 1.0))


def local_ncc(a, b, window: int = 9, mask=None) -> float:
    """Mean of the windowed (local) normalised cross-correlation.

    At every voxel the Pearson correlation of ``a`` and ``b`` inside a cubic box of
    ``window`` voxels per side is computed with box filters
    (``scipy.ndimage.uniform_filter``, reflecting at the borders); the result is the mean
    over voxels. Unlike VoxelMorph's loss, which averages the *squared* local correlation,
    this keeps the sign, so anti-correlated images give negative values.

    Parameters
    ----------
    a, b : np.ndarray
        Images of the same shape, usually ``(z, y, x)``.
    window : int
        Box side in voxels (>= 2; the same along every axis).
    mask : np.ndarray of bool, optional
        Same shape; only the centres of windows where it is True enter the mean.

    Returns
    -------
    float
        Mean local correlation in ``[-1, 1]``. Windows where either image is flat (local
        variance below ``1e-10`` times its global variance) have no correlation and are left
        out of the mean; NaN if no window is left.
    """
    a, b, mask = _pair(a, b, mask)
    window = int(window)
    if window < 2:
        raise ValueError(f"window must be an integer >= 2 voxels, got {window}")
    # centring first keeps the E[x^2] - E[x]^2 differences well conditioned
    a = a - a.mean()
    b = b - b.mean()
    f = functools.partial(ndimage.uniform_filter, size=window, mode="reflect")
    mu_a, mu_b = f(a), f(b)
    var_a = f(a * a) - mu_a * mu_a
    var_b = f(b * b) - mu_b * mu_b
    cov = f(a * b) - mu_a * mu_b
    tol_a = 1e-10 * max(float(a.var()), np.finfo(float).tiny)
    tol_b = 1e-10 * max(float(b.var()), np.finfo(float).tiny)
    valid = (var_a > tol_a) & (var_b > tol_b)
    if mask is not None:
        valid &= mask
    if not valid.any():
        return float("nan")
    cc = cov[valid] / np.sqrt(var_a[valid] * var_b[valid])
    return float(np.mean(np.clip(cc, -1.0, 1.0)))


def _bin_index(v: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over ``[min, max]`` of ``v``: integer indices in ``[0, bins)``."""
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.intp)
    idx = np.floor((v - lo) * (bins / (hi - lo))).astype(np.intp)
    return np.minimum(idx, bins - 1)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def _mi_from_joint(joint: np.ndarray, normalized: bool) -> float:
    p = joint / joint.sum()
    h_a = _entropy(p.sum(axis=1))
    h_b = _entropy(p.sum(axis=0))
    h_ab = _entropy(p.ravel())
    if normalized:
        return (h_a + h_b) / h_ab if h_ab > 0 else float("nan")
    return max(h_a + h_b - h_ab, 0.0)


def _check_bins(bins) -> int:
    if int(bins) != bins or int(bins) < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    return int(bins)


def mutual_information(a, b, bins: int = 32, normalized: bool = False, mask=None) -> float:
    """Histogram mutual information, or Studholme's normalised MI.

    Each image is binned into ``bins`` equal-width bins spanning its own ``[min, max]``
    (over the mask); the joint histogram gives the probabilities.

    Parameters
    ----------
    a, b : np.ndarray
        Images of the same shape.
    bins : int
        Number of bins per image (>= 2).
    normalized : bool
        False: ``MI = H(A) + H(B) - H(A, B)`` in nats (0 for independent images, ``H(A)``
        for identical ones). True: ``NMI = (H(A) + H(B)) / H(A, B)`` in ``[1, 2]``
        (2 for identical images; NaN when both images are constant, where it is undefined).
    mask : np.ndarray of bool, optional
        Same shape; only voxels where it is True are used.

    Returns
    -------
    float
    """
    bins = _check_bins(bins)
    a, b, mask = _pair(a, b, mask)
    x, y = _masked(a, b, mask)
    ia, ib = _bin_index(x, bins), _bin_index(y, bins)
    joint = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins)
    return float(_mi_from_joint(joint.astype(np.float64), normalized))


def _cubic_bspline_weights(u: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cubic B-spline weights of the 4 bins ``floor(t) - 1 .. floor(t) + 2``; ``u`` = frac(t)."""
    u2, u3 = u * u, u * u * u
    return ((1 - u) ** 3 / 6.0,
            (3 * u3 - 6 * u2 + 4) / 6.0,
            (-3 * u3 + 3 * u2 + 3 * u + 1) / 6.0,
            u3 / 6.0)


def mattes_mi(a, b, bins: int = 32, mask=None) -> float:
    """Mutual information with Mattes' Parzen-window joint histogram (Mattes et al. 2003).

    This is the estimator itself, not a smoothed-histogram approximation: every voxel
    (over the mask) contributes to the joint histogram with a zero-order (box) Parzen
    window along ``a`` (the fixed image) and a cubic B-spline window along ``b`` (the
    moving image), as ITK's ``MattesMutualInformationImageToImageMetric`` does. Unlike
    ITK, all voxels are used (no random sampling) and the moving bins are padded only by
    the B-spline support, so values are close to, not equal to, ITK's.

    Parameters
    ----------
    a, b : np.ndarray
        Fixed and moving images of the same shape.
    bins : int
        Number of intensity bins per image (>= 2).
    mask : np.ndarray of bool, optional
        Same shape; only voxels where it is True are used.

    Returns
    -------
    float
        MI in nats (>= 0; higher is more similar). ITK reports its negative.
    """
    bins = _check_bins(bins)
    a, b, mask = _pair(a, b, mask)
    x, y = _masked(a, b, mask)
    ia = _bin_index(x, bins)
    lo, hi = float(y.min()), float(y.max())
    t = (y - lo) * ((bins - 1) / (hi - lo)) if hi > lo else np.zeros_like(y)
    t0 = np.floor(t)
    weights = _cubic_bspline_weights(t - t0)
    # moving bins floor(t)-1 .. floor(t)+2 go to columns floor(t) .. floor(t)+3; t <= bins-1
    nb = bins + 3
    base = ia * nb + t0.astype(np.intp)
    joint = np.zeros(bins * nb)
    for k, w in enumerate(weights):
        joint += np.bincount(base + k, weights=w, minlength=bins * nb)
    return float(_mi_from_joint(joint.reshape(bins, nb), normalized=False))


def _data_range(a: np.ndarray, b: Optional[np.ndarray], data_range) -> float:
    if data_range is not None:
        dr = float(data_range)
        if not dr > 0:
            raise ValueError(f"data_range must be positive, got {data_range!r}")
        return dr
    lo, hi = float(a.min()), float(a.max())
    if b is not None:
        lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
    return hi - lo if hi > lo else 1.0


def ssim(a, b, data_range=None) -> float:
    """Mean structural similarity (Wang et al. 2004) with a 3D Gaussian window.

    Local means, variances and covariance use a Gaussian window of sigma 1.5 voxels
    (truncated at 3.5 sigma, reflecting at the borders, population statistics); the
    constants are ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2``. The mean is taken over all
    voxels.

    Parameters
    ----------
    a, b : np.ndarray
        Images of the same shape (2D or 3D; the window has the same dimensionality).
    data_range : float, optional
        Dynamic range ``L`` of the intensities. Default: ``max - min`` over both images
        (1 if both are the same constant).

    Returns
    -------
    float
        SSIM in ``[-1, 1]``; 1 for identical images.
    """
    a, b, _ = _pair(a, b)
    L = _data_range(a, b, data_range)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    g = functools.partial(ndimage.gaussian_filter, sigma=1.5, truncate=3.5, mode="reflect")
    mu_a, mu_b = g(a), g(b)
    var_a = g(a * a) - mu_a * mu_a
    var_b = g(b * b) - mu_b * mu_b
    cov = g(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def psnr(a, b, data_range=None) -> float:
    """Peak signal-to-noise ratio of ``b`` against the reference ``a``.

    Parameters
    ----------
    a, b : np.ndarray
        Reference and test images of the same shape.
    data_range : float, optional
        Peak value ``L``. Default: ``max(a) - min(a)`` of the reference (1 if it is
        constant).

    Returns
    -------
    float
        ``10 * log10(L^2 / MSE)`` in dB; ``inf`` for identical images.
    """
    a, b, _ = _pair(a, b)
    L = _data_range(a, None, data_range)
    err = float(np.mean((a - b) ** 2))
    if err == 0.0:
        return float("inf")
    return float(10.0 * np.log10(L * L / err))


# ---------------------------------------------------------------------------- label overlap
def _label_maps(fixed_labels, warped_labels):
    f = np.asarray(fixed_labels)
    w = np.asarray(warped_labels)
    if f.shape != w.shape:
        raise ValueError(f"label maps must have the same shape, got fixed {f.shape} and "
                         f"warped {w.shape}")
    if f.size == 0:
        raise ValueError(f"label maps are empty (shape {f.shape})")
    for name, v in (("fixed_labels", f), ("warped_labels", w)):
        if v.dtype.kind == "f":
            if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
                raise ValueError(f"{name} must hold integer label ids; got non-integer "
                                 f"values in an array of dtype {v.dtype}")
        elif v.dtype.kind not in "iub":
            raise ValueError(f"{name} must be an integer label map, got dtype {v.dtype}")
    if f.dtype.kind in "fb":
        f = f.astype(np.int64)
    if w.dtype.kind in "fb":
        w = w.astype(np.int64)
    return f, w


def _compact(fixed_labels, warped_labels, labels):
    """Map the requested labels to ``1..K`` (everything else to 0) in both label maps.

    Returns ``(label_ids (K,), fixed_index, warped_index)``; ``label_ids[k - 1]`` is the
    label that index ``k`` stands for. Default labels: the non-zero labels of the fixed map.
    """
    f, w = _label_maps(fixed_labels, warped_labels)
    if labels is None:
        ids = np.unique(f)
        ids = ids[ids != 0]
    else:
        ids = np.unique(np.asarray(list(labels), dtype=np.int64).reshape(-1))
    k = ids.size
    if k == 0:
        return ids, None, None

    def index(v):
        lo, hi = int(v.min()), int(v.max())
        if lo >= 0 and hi < 1 << 20:
            # small non-negative ids (the usual case): one lookup table, no sorting
            lut = np.zeros(hi + 1, dtype=np.intp)
            inside = ids[ids <= hi]
            lut[inside[inside >= 0]] = np.searchsorted(ids, inside[inside >= 0]) + 1
            return lut[v]
        pos = np.searchsorted(ids, v)
        hit = ids[np.minimum(pos, k - 1)] == v
        return np.where(hit, pos + 1, 0).astype(np.intp)

    return ids, index(f), index(w)


def _overlap_counts(fixed_labels, warped_labels, labels):
    ids, fi, wi = _compact(fixed_labels, warped_labels, labels)
    if ids.size == 0:
        return ids, None, None, None
    n = ids.size + 1
    count_f = np.bincount(fi.ravel(), minlength=n)
    count_w = np.bincount(wi.ravel(), minlength=n)
    inter = np.bincount(fi[fi == wi].ravel(), minlength=n)
    return ids, count_f[1:], count_w[1:], inter[1:]


def dice_per_label(fixed_labels, warped_labels, labels=None) -> dict[int, float]:
    """Dice overlap ``2|F ∩ W| / (|F| + |W|)`` per label.

    Parameters
    ----------
    fixed_labels, warped_labels : np.ndarray of int
        Label maps of the same shape, ``(z, y, x)``; 0 is background.
    labels : sequence of int, optional
        Labels to score. Default: the non-zero labels present in ``fixed_labels``.

    Returns
    -------
    dict[int, float]
        Label -> Dice in ``[0, 1]``. A label present on one side only gives 0; a
        requested label absent from both gives NaN.
    """
    ids, cf, cw, inter = _overlap_counts(fixed_labels, warped_labels, labels)
    if ids.size == 0:
        return {}
    denom = cf + cw
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * inter / denom, np.nan)
    return {int(i): float(v) for i, v in zip(ids, d)}


def jaccard_per_label(fixed_labels, warped_labels, labels=None) -> dict[int, float]:
    """Jaccard index ``|F ∩ W| / |F ∪ W|`` per label.

    Parameters and return value as :func:`dice_per_label` (``J = D / (2 - D)``).
    """
    ids, cf, cw, inter = _overlap_counts(fixed_labels, warped_labels, labels)
    if ids.size == 0:
        return {}
    union = cf + cw - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union > 0, inter / union, np.nan)
    return {int(i): float(v) for i, v in zip(ids, j)}


# ---------------------------------------------------------------------------- surface distances
def _surface(mask: np.ndarray) -> np.ndarray:
    # voxels of the mask with a face neighbour outside it (MONAI / DeepMind convention);
    # border_value=0 makes the array border count as outside
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_surface_distances(fixed_labels, warped_labels, spacing, labels):
    """Per label, the surface distances (mm) fixed->warped and warped->fixed.

    Each label is processed on the bounding box of its union in both maps, grown by one
    voxel: every surface voxel of both masks lies in the box, so the Euclidean distance
    transform there is exact. Returns ``{label: (d_fw, d_wf)}``, ``None`` where the label
    is missing from either map.
    """
    sampling = _spacing_zyx(spacing)
    ids, fi, wi = _compact(fixed_labels, warped_labels, labels)
    if fi is not None and fi.ndim != 3:
        raise ValueError(f"label maps must be 3D (z, y, x), got shape {fi.shape}")
    out = {}
    if ids.size == 0:
        return out
    boxes_f = ndimage.find_objects(fi, max_label=ids.size)
    boxes_w = ndimage.find_objects(wi, max_label=ids.size)
    for k, label in enumerate(ids, start=1):
        bf, bw = boxes_f[k - 1], boxes_w[k - 1]
        if bf is None or bw is None:
            out[int(label)] = None
            continue
        box = tuple(slice(max(min(sf.start, sw.start) - 1, 0), min(max(sf.stop, sw.stop) + 1, n))
                    for sf, sw, n in zip(bf, bw, fi.shape))
        sf_ = _surface(fi[box] == k)
        sw_ = _surface(wi[box] == k)
        d_to_w = ndimage.distance_transform_edt(~sw_, sampling=sampling)
        d_to_f = ndimage.distance_transform_edt(~sf_, sampling=sampling)
        out[int(label)] = (d_to_w[sf_], d_to_f[sw_])
    return out


def hd95_per_label(fixed_labels, warped_labels, spacing, labels=None,
                   percentile: float = 95.0) -> dict[int, float]:
    """Robust Hausdorff distance (mm) per label.

    Surfaces are the mask voxels with a face neighbour outside the mask. The result is
    the MONAI / Learn2Reg convention: ``max(P95(d(F->W)), P95(d(W->F)))``, the larger of
    the two directed 95th percentiles of surface-to-surface distances (not the percentile
    of the pooled set).

    Parameters
    ----------
    fixed_labels, warped_labels : np.ndarray of int
        Label maps of the same shape, ``(z, y, x)``; 0 is background.
    spacing : (3,) float
        Voxel size in mm, **xyz** order (``spacing[2]`` is along array axis 0).
    labels : sequence of int, optional
        Labels to score. Default: the non-zero labels present in ``fixed_labels``.
    percentile : float
        Percentile in ``[0, 100]``; 100 gives the classic (maximum) Hausdorff distance
        between the surfaces.

    Returns
    -------
    dict[int, float]
        Label -> distance in mm; NaN where the label is missing from either map (use
        :func:`summarize_dice`, which ignores NaN, to average).
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    res = {}
    for label, d in _directed_surface_distances(fixed_labels, warped_labels, spacing,
                                                labels).items():
        if d is None:
            res[label] = float("nan")
        else:
            res[label] = float(max(np.percentile(d[0], percentile),
                                   np.percentile(d[1], percentile)))
    return res


def assd_per_label(fixed_labels, warped_labels, spacing, labels=None) -> dict[int, float]:
    """Average symmetric surface distance (mm) per label.

    ``ASSD = (sum d(F->W) + sum d(W->F)) / (|dF| + |dW|)``: the mean of the pooled
    surface-to-surface distances of both directions (MONAI ``symmetric=True``).

    Parameters and NaN convention as :func:`hd95_per_label`.
    """
    res = {}
    for label, d in _directed_surface_distances(fixed_labels, warped_labels, spacing,
                                                labels).items():
        if d is None:
            res[label] = float("nan")
        else:
            res[label] = float((d[0].sum() + d[1].sum()) / (d[0].size + d[1].size))
    return res


def summarize_dice(d: dict) -> float:
    """Mean of the values of a per-label dict, ignoring NaN.

    Works for any per-label metric (Dice, Jaccard, HD95, ASSD). Returns NaN for an empty
    dict or one holding only NaN.
    """
    v = np.asarray([float(x) for x in d.values()], dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


# ---------------------------------------------------------------------------- landmarks
def tre(fixed_points, moving_points_mapped) -> dict:
    """Target registration error between corresponding points.

    Parameters
    ----------
    fixed_points : (N, 3) array
        Reference points, LPS mm, xyz.
    moving_points_mapped : (N, 3) array
        The corresponding points after mapping into the same space, LPS mm, xyz.

    Returns
    -------
    dict
        ``{"per_point": list of N floats (mm), "mean", "median", "max", "std"}`` (mm; the
        std is the population std). Summary values are NaN when ``N == 0``.
    """
    p = np.asarray(fixed_points, dtype=np.float64)
    q = np.asarray(moving_points_mapped, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"points must be (N, 3) arrays, got fixed {p.shape} and "
                         f"mapped moving {q.shape}")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"point counts differ: {p.shape[0]} fixed points vs "
                         f"{q.shape[0]} mapped moving points")
    d = np.linalg.norm(p - q, axis=1)
    if d.size == 0:
        nan = float("nan")
        return {"per_point": [], "mean": nan, "median": nan, "max": nan, "std": nan}
    return {"per_point": [float(x) for x in d], "mean": float(d.mean()),
            "median": float(np.median(d)), "max": float(d.max()), "std": float(d.std())}


# ---------------------------------------------------------------------------- Jacobian
def jacobian_determinant(field_zyx3, spacing, direction=None) -> np.ndarray:
    """Jacobian determinant of ``T(x) = x + u(x)`` for a displacement field in mm.

    Derivatives are central differences (``np.gradient``; one-sided at the borders) with
    respect to the voxel index, converted to physical coordinates by
    ``du/dx_world = (du/d index) @ inv(direction @ diag(spacing))``.

    Parameters
    ----------
    field_zyx3 : (Z, Y, X, 3) array
        Displacement ``u`` in mm, components xyz (LPS), on the grid; every grid axis
        needs at least 2 voxels.
    spacing : (3,) float
        Voxel size in mm, **xyz** order.
    direction : (3, 3) array, optional
        Columns are the world directions of the index axes x, y, z. Default identity.

    Returns
    -------
    (Z, Y, X) np.ndarray of float64
        ``det(I + du/dx)``; ``<= 0`` marks folding.
    """
    u = np.asarray(field_zyx3, dtype=np.float64)
    if u.ndim != 4 or u.shape[3] != 3 or min(u.shape[:3]) < 2:
        raise ValueError(f"field must be (z, y, x, 3) with at least 2 voxels per axis, "
                         f"got shape {u.shape}")
    s_xyz = _spacing_zyx(spacing)[::-1]
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be a 3x3 matrix, got shape {d.shape}")
    m = d @ np.diag(s_xyz)
    if abs(np.linalg.det(m)) < 1e-12:
        raise ValueError(f"direction is singular: {d.tolist()}")
    m_inv = np.linalg.inv(m)
    # grads[a] = du/d(index along array axis a); array axes are (z, y, x) = index (k, j, i)
    gz, gy, gx = np.gradient(u, axis=(0, 1, 2))
    g_index = np.stack([gx, gy, gz], axis=-1)        # (..., 3 components, 3 index axes i j k)
    jac = g_index @ m_inv                             # (..., 3, 3) du_c / dx_world_a
    jac[..., 0, 0] += 1.0
    jac[..., 1, 1] += 1.0
    jac[..., 2, 2] += 1.0
    return (jac[..., 0, 0] * (jac[..., 1, 1] * jac[..., 2, 2] - jac[..., 1, 2] * jac[..., 2, 1])
            - jac[..., 0, 1] * (jac[..., 1, 0] * jac[..., 2, 2] - jac[..., 1, 2] * jac[..., 2, 0])
            + jac[..., 0, 2] * (jac[..., 1, 0] * jac[..., 2, 1] - jac[..., 1, 1] * jac[..., 2, 0]))


def jacobian_stats(jac_det, mask=None, border: int = 0) -> dict:
    """Summary statistics of a Jacobian determinant map (Learn2Reg style).

    Parameters
    ----------
    jac_det : np.ndarray
        Determinants, ``(z, y, x)`` (from :func:`jacobian_determinant`).
    mask : np.ndarray of bool, optional
        Same shape; statistics use only voxels where it is True.
    border : int
        Voxels cropped from every face before the statistics (Learn2Reg crops 2, where
        the differences are one-sided); 0 keeps everything.

    Returns
    -------
    dict
        ``fold_fraction``: fraction of voxels with ``det <= 0``;
        ``sdlogj``: std of ``log(clip(det, 1e-9, 1e9))`` over all voxels (folded voxels
        enter clipped at 1e-9, as in Learn2Reg);
        ``jac_min``, ``jac_max``: extremes of ``det``.
    """
    j = np.asarray(jac_det, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != j.shape:
            raise ValueError(f"mask shape {mask.shape} does not match jac_det shape {j.shape}")
    border = int(border)
    if border < 0 or any(n <= 2 * border for n in j.shape):
        raise ValueError(f"border {border} must be >= 0 and leave voxels in shape {j.shape}")
    if border:
        crop = (slice(border, -border),) * j.ndim
        j = j[crop]
        mask = None if mask is None else mask[crop]
    v = j.ravel() if mask is None else j[mask.astype(bool)]
    if v.size == 0:
        raise ValueError(f"no voxel left for Jacobian statistics (shape {j.shape}, "
                         f"border {border}, mask selects none)")
    return {"fold_fraction": float(np.mean(v <= 0)),
            "sdlogj": float(np.std(np.log(np.clip(v, 1e-9, 1e9)))),
            "jac_min": float(v.min()), "jac_max": float(v.max())}
