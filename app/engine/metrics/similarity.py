"""Image similarity on plain arrays: MSE, NCC, local NCC, MI (histogram and Mattes), SSIM, PSNR.

Arrays may have any dimensionality (usually ``(z, y, x)``); entropies and MI are in nats."""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
from scipy import ndimage

from ._validate import _masked, _pair


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
