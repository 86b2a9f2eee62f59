"""Training / optimisation losses. Every function returns a scalar *loss* (lower is better).

Images are ``(B, C, *spatial)`` with 2 or 3 spatial dimensions; displacements are
``(B, ndim, *spatial)`` in voxels. Nothing here hard-codes a device: tensors stay where they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> int:
    if a.shape != b.shape:
        raise ValueError(f"{name}: inputs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (4, 5):
        raise ValueError(f"{name}: expected (B, C, H, W) or (B, C, D, H, W), got {tuple(a.shape)}")
    return a.dim() - 2


def _check_mask(mask: torch.Tensor | None, a: torch.Tensor, name: str) -> None:
    if mask is None:
        return
    if mask.dim() != a.dim() or mask.shape[2:] != a.shape[2:] or mask.shape[1] not in (1, a.shape[1]) \
            or mask.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"{name}: mask must be (B or 1, 1 or C, *spatial) for images {tuple(a.shape)}, "
                         f"got {tuple(mask.shape)}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x``, weighted by ``mask`` (broadcast) when given."""
    if mask is None:
        return torch.mean(x)
    w = mask.to(x.dtype).expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two images (B, C, [D,] H, W) of the same shape.

    ``mask`` (B or 1, 1, *spatial), optional: voxel weights in [0, 1] (a weighted mean).
    """
    _check_pair(a, b, "mse")
    _check_mask(mask, a, "mse")
    return _masked_mean((a - b) ** 2, mask)


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Negative global normalised cross-correlation (Pearson's r) of each batch element, averaged.

    The loss is ``-r`` in [-1, 1] (-1: ``b`` is an increasing affine function of ``a``).

    Parameters
    ----------
    a, b : torch.Tensor (B, C, [D,] H, W)
    mask : torch.Tensor (B or 1, 1, *spatial), optional: voxel weights in [0, 1].
    """
    _check_pair(a, b, "ncc")
    _check_mask(mask, a, "ncc")
    bsz = a.shape[0]
    fa, fb = a.reshape(bsz, -1), b.reshape(bsz, -1)
    w = (torch.ones_like(fa) if mask is None
         else mask.to(a.dtype).expand_as(a).reshape(bsz, -1))
    wsum = w.sum(1, keepdim=True).clamp_min(1e-12)
    da = fa - (w * fa).sum(1, keepdim=True) / wsum
    db = fb - (w * fb).sum(1, keepdim=True) / wsum
    cov = (w * da * db).sum(1)
    r = cov / torch.sqrt((w * da * da).sum(1) * (w * db * db).sum(1) + eps)
    return -r.mean()


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of ``x`` over the cubic (square in 2D) ``window`` centred on every voxel.

    Windows that reach past the border average the voxels inside the image only (as
    ``avg_pool3d(..., stride=1, padding=window // 2, count_include_pad=False)``, within float
    rounding). Computed separably, one axis at a time, as sums of ``window`` shifted slices: about
    five times faster than ``avg_pool3d`` on the CPU for a 5-voxel window, forward and backward.

    Parameters
    ----------
    x : torch.Tensor (B, C, [D,] H, W)
    window : odd int >= 1, voxels

    Returns
    -------
    torch.Tensor, same shape and dtype as ``x``.
    """
    if x.dim() not in (4, 5):
        raise ValueError(f"box_mean: expected (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    if int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"box_mean: window must be an odd integer >= 1, got {window!r}")
    half = int(window) // 2
    if half == 0:
        return x
    for ax in range(2, x.dim()):
        n = x.shape[ax]
        pad = [0] * (2 * (x.dim() - 2))
        pad[2 * (x.dim() - 1 - ax)] = pad[2 * (x.dim() - 1 - ax) + 1] = half   # F.pad lists the last axis first
        xp = F.pad(x, pad)
        s = xp.narrow(ax, 0, n)
        for k in range(1, int(window)):
            s = s + xp.narrow(ax, k, n)
        idx = torch.arange(n, device=x.device)
        count = (torch.clamp(idx + half, max=n - 1) - torch.clamp(idx - half, min=0) + 1).to(x.dtype)
        shape = [1] * x.dim()
        shape[ax] = n
        x = s / count.view(shape)
    return x


def lncc_moments(a: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance of ``a`` (B, 1, [D,] H, W) over a cubic ``window`` (see :func:`lncc`).

    For an image compared many times (the fixed image of an optimisation), compute these once
    and pass them to :func:`lncc` as ``a_moments``.
    """
    mu = box_mean(a, window)
    return mu, (box_mean(a * a, window) - mu * mu).clamp_min(0)


def lncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5,
         mask: torch.Tensor | None = None,
         a_moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Negative mean local (squared) normalised cross-correlation, as in VoxelMorph.

    For every voxel, ``cc = cov(a, b)**2 / (var(a) var(b) + eps)`` over a cubic ``window`` (voxels,
    odd; windows at the border average the voxels inside the image, :func:`box_mean`); the loss is
    ``-mean(cc)`` in [-1, 0] (-1: perfectly correlated everywhere).

    Parameters
    ----------
    a, b : torch.Tensor (B, 1, [D,] H, W)
    window : odd int >= 1
    mask : torch.Tensor (B or 1, 1, [D,] H, W), optional
        Voxel weights in [0, 1]: the loss is the weighted mean of the local ``cc`` map.
    a_moments : (mean, variance) of ``a``, optional
        :func:`lncc_moments` ``(a, window)`` computed beforehand (same shape as ``a``); saves two of
        the five box filters when ``a`` does not change between calls.
    """
    _check_pair(a, b, "lncc")
    _check_mask(mask, a, "lncc")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"lncc window must be an odd number >= 1, got {window}")
    if a_moments is None:
        mu_a, var_a = lncc_moments(a, window)
    else:
        mu_a, var_a = a_moments
        if mu_a.shape != a.shape or var_a.shape != a.shape:
            raise ValueError(f"lncc: a_moments must have the shape of a {tuple(a.shape)}, got "
                             f"{tuple(mu_a.shape)} and {tuple(var_a.shape)}")
    mu_b = box_mean(b, window)
    cross = box_mean(a * b, window) - mu_a * mu_b
    var_b = (box_mean(b * b, window) - mu_b * mu_b).clamp_min(0)
    cc = cross * cross / (var_a * var_b + eps)
    return -_masked_mean(cc, mask)


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5,
                       value_range: tuple[float, float] = (0.0, 1.0), max_samples: int | None = 65536,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mutual information (nats) with Gaussian Parzen windows (differentiable).

    Parameters
    ----------
    a, b : torch.Tensor (B, C, [D,] H, W), intensities expected in ``value_range`` (clamped).
    bins : number of histogram bins per image.
    sigma_ratio : Parzen window width as a fraction of the bin spacing.
    max_samples : voxels used per batch element (a fixed, evenly strided subset) to bound memory.
    mask : (B or 1, 1, *spatial), optional: voxel weights in [0, 1] of the joint histogram.

    Returns
    -------
    Scalar ``-MI`` averaged over the batch (MI >= 0, so the loss is <= 0).
    """
    _check_pair(a, b, "mutual_information")
    _check_mask(mask, a, "mutual_information")
    if bins < 2:
        raise ValueError(f"mutual_information needs at least 2 bins, got {bins}")
    lo, hi = value_range
    bsz = a.shape[0]
    fa = a.reshape(bsz, -1)
    fb = b.reshape(bsz, -1)
    fw = None if mask is None else mask.to(a.dtype).expand_as(a).reshape(bsz, -1)
    if max_samples is not None and fa.shape[1] > max_samples:
        stride = fa.shape[1] // max_samples
        fa, fb = fa[:, ::stride], fb[:, ::stride]
        fw = None if fw is None else fw[:, ::stride]
    centres = torch.linspace(lo, hi, bins, dtype=a.dtype, device=a.device)
    sigma = sigma_ratio * (hi - lo) / (bins - 1)

    def weights(x):
        x = x.clamp(lo, hi).unsqueeze(-1)                         # (B, N, 1)
        w = torch.exp(-0.5 * ((x - centres) / sigma) ** 2)         # (B, N, bins)
        return w / (w.sum(-1, keepdim=True) + 1e-12)

    wa, wb = weights(fa), weights(fb)
    if fw is None:
        joint = torch.einsum("bni,bnj->bij", wa, wb) / fa.shape[1]     # (B, bins, bins)
    else:
        joint = torch.einsum("bni,bnj->bij", wa * fw.unsqueeze(-1), wb)
        joint = joint / fw.sum(1).clamp_min(1e-12).view(-1, 1, 1)
    pa = joint.sum(2, keepdim=True)
    pb = joint.sum(1, keepdim=True)
    eps = 1e-10
    mi = torch.sum(joint * (torch.log(joint + eps) - torch.log(pa * pb + eps)), dim=(1, 2))
    return -mi.mean()


def dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean soft Dice`` over batch and channels.

    Parameters
    ----------
    fixed_onehot, warped_onehot : torch.Tensor (B, K, [D,] H, W)
        One channel per label (no background channel needed), values in [0, 1]; the warped one is
        usually a one-hot map warped with trilinear interpolation (soft).
    mask : (B or 1, 1, *spatial), optional: voxel weights in [0, 1] (both maps are multiplied by it).
    """
    _check_pair(fixed_onehot, warped_onehot, "dice_loss")
    _check_mask(mask, fixed_onehot, "dice_loss")
    if mask is not None:
        w = mask.to(fixed_onehot.dtype)
        fixed_onehot, warped_onehot = fixed_onehot * w, warped_onehot * w
    dims = tuple(range(2, fixed_onehot.dim()))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    denom = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice.mean()


def _check_disp(disp: torch.Tensor, name: str) -> int:
    if disp.dim() not in (4, 5) or disp.shape[1] != disp.dim() - 2:
        raise ValueError(f"{name}: displacement must be (B, 2, H, W) or (B, 3, D, H, W), got {tuple(disp.shape)}")
    return disp.dim() - 2


def gradient_l2(disp: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean over axes of the mean squared forward difference.

    ``disp`` (B, nd, *spatial) in voxels. For a linear field ``u = c * x`` along one axis it equals
    ``c**2 * (number of components with that slope) / nd``.
    """
    nd = _check_disp(disp, "gradient_l2")
    total = 0.0
    for ax in range(2, 2 + nd):
        d = torch.diff(disp, dim=ax)
        total = total + torch.mean(d * d)
    return total / nd


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Thin-plate bending energy ``sum_ij mean((d2 u / dx_i dx_j)^2)``.

    Second derivatives by central differences in voxel units over the interior voxels (one voxel
    cropped at each face); mixed terms count twice (ij and ji). Each mean runs over batch,
    components and voxels, so a field whose only non-zero component is ``x_k**2`` gives ``4 / nd``.

    ``disp`` (B, nd, *spatial) with every spatial size >= 3.
    """
    nd = _check_disp(disp, "bending_energy")
    if min(disp.shape[2:]) < 3:
        raise ValueError(f"bending_energy needs at least 3 voxels per axis, got {tuple(disp.shape[2:])}")
    inner = tuple(slice(1, -1) for _ in range(nd))

    def d1(x, ax):
        # central first difference along spatial axis ax (0-based), same size (edges cropped later)
        return (torch.roll(x, -1, 2 + ax) - torch.roll(x, 1, 2 + ax)) / 2

    def d2(x, ax):
        return torch.roll(x, -1, 2 + ax) - 2 * x + torch.roll(x, 1, 2 + ax)

    total = 0.0
    for i in range(nd):
        t = d2(disp, i)[(slice(None), slice(None)) + inner]
        total = total + torch.mean(t * t)
        for j in range(i + 1, nd):
            # valid on the interior: each central difference reads one neighbour per axis
            m = d1(d1(disp, i), j)
            m = m[(slice(None), slice(None)) + inner]
            total = total + 2 * torch.mean(m * m)
    return total
