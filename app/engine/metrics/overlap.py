"""Label overlap (Dice, Jaccard) and surface distances (HD95, ASSD) per label, in mm."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._validate import _spacing_zyx


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
