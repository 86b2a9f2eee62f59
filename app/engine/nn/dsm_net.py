"""Deep similarity metric: a small 3D CNN that scores whether two patches correspond.

:class:`DsmNet` takes a fixed patch and a moving patch as two channels ``(B, 2, P, P, P)`` (the
same physical neighbourhood sampled from each image, intensities in [0, 1]) and returns a logit
``(B,)``: high when the patches show the same anatomy at the same place, whatever the two contrasts.
Trained on aligned multimodal images (corresponding vs displaced patches;
:mod:`app.engine.training.dsm`), it becomes a similarity :class:`DsmSimilarity` registered as
``"dsm"`` in :mod:`app.engine.nn.similarity`, which :func:`app.engine.optimise.optimise` maximises
over a rigid / affine model.

Patch geometry: patches are cut on the *fixed working grid* (isotropic, the checkpoint's spacing),
at voxel centres ``c`` (z, y, x indices) with offsets ``-r..r`` along each axis, from the fixed image
and from the moving image already warped onto that grid, so both patches cover the same physical
points ``grid.index_to_physical(c + offset)`` (:func:`extract_patches`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DsmNet(nn.Module):
    """Two-channel 3D CNN -> correspondence logit.

    The raw pair is extended inside ``forward`` by both patches standardised (zero mean, unit
    variance per patch) and their voxelwise product (5 channels into the first convolution).

    Parameters
    ----------
    patch : int
        Patch size P (odd, voxels).
    channels : tuple of int
        Channels of the three conv blocks (the last two have stride 2).
    """

    def __init__(self, patch: int = 17, channels=(8, 16, 32)):
        super().__init__()
        if patch < 5 or patch % 2 == 0:
            raise ValueError(f"patch must be an odd size >= 5, got {patch}")
        ch = [int(c) for c in channels]
        if len(ch) != 3 or min(ch) < 1:
            raise ValueError(f"channels must be three positive widths, got {channels!r}")
        self.config = {"kind": "dsm", "patch": int(patch), "channels": ch}
        self.patch = int(patch)
        self.features = nn.Sequential(
            nn.Conv3d(5, ch[0], 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv3d(ch[0], ch[1], 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.Conv3d(ch[1], ch[2], 3, stride=2, padding=1), nn.LeakyReLU(0.1),
        )
        self.head = nn.Sequential(nn.Linear(ch[2], ch[2]), nn.LeakyReLU(0.1), nn.Linear(ch[2], 1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``pair`` (B, 2, P, P, P): channel 0 fixed, channel 1 moving, in [0, 1] -> logits (B,)."""
        if pair.ndim != 5 or pair.shape[1] != 2 or tuple(pair.shape[2:]) != (self.patch,) * 3:
            raise ValueError(f"DsmNet expects (B, 2, {self.patch}, {self.patch}, {self.patch}), "
                             f"got {tuple(pair.shape)}")
        # per-patch standardised channels and their product (local correlation terms): contrast-free
        # evidence of correspondence that plain convolutions of the raw pair learn only slowly
        mu = pair.mean(dim=(2, 3, 4), keepdim=True)
        sd = pair.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-3)
        z = (pair - mu) / sd
        x = torch.cat([pair, z, z[:, :1] * z[:, 1:]], 1)
        h = self.features(x)
        return self.head(h.mean(dim=(2, 3, 4))).squeeze(1)


def patch_offsets(patch: int, device=None) -> torch.Tensor:
    """Integer offsets ``-r..r`` (r = patch // 2) as a (P,) long tensor."""
    r = patch // 2
    return torch.arange(-r, r + 1, device=device)


def extract_patches(image: torch.Tensor, centres_zyx: torch.Tensor, patch: int) -> torch.Tensor:
    """Cubic patches of ``image`` around voxel ``centres_zyx``.

    Parameters
    ----------
    image : (1, 1, D, H, W) or (D, H, W) tensor
    centres_zyx : (N, 3) long tensor of voxel indices (z, y, x); each centre must lie at least
        ``patch // 2`` voxels from every border.
    patch : int (odd)

    Returns
    -------
    (N, P, P, P) tensor; element ``[n, a, b, c]`` is ``image[z_n + a - r, y_n + b - r, x_n + c - r]``
    (differentiable with respect to ``image``).
    """
    img = image.reshape(image.shape[-3:])
    c = centres_zyx.long()
    r = patch // 2
    lo = c.min(0).values if len(c) else torch.zeros(3, dtype=torch.long)
    hi = c.max(0).values if len(c) else torch.zeros(3, dtype=torch.long)
    if len(c) and (int(lo.min()) < r or any(int(hi[i]) > img.shape[i] - 1 - r for i in range(3))):
        raise ValueError(f"patch centres must lie {r} voxels inside a grid of shape {tuple(img.shape)}")
    off = patch_offsets(patch, img.device)
    z = (c[:, 0, None] + off)[:, :, None, None]
    y = (c[:, 1, None] + off)[:, None, :, None]
    x = (c[:, 2, None] + off)[:, None, None, :]
    return img[z, y, x]


def sample_centres(mask: torch.Tensor, n: int, patch: int, generator: Optional[torch.Generator] = None
                   ) -> torch.Tensor:
    """``n`` random voxel centres (N, 3) zyx inside ``mask`` (D, H, W bool) and ``patch // 2`` from
    the borders (with replacement; falls back to the whole interior when the mask is empty there)."""
    r = patch // 2
    m = mask.reshape(mask.shape[-3:]).clone()
    if min(m.shape) <= 2 * r:
        raise ValueError(f"the grid {tuple(m.shape)} is smaller than a patch of {patch} voxels")
    inner = torch.zeros_like(m)
    inner[r:m.shape[0] - r, r:m.shape[1] - r, r:m.shape[2] - r] = True
    cand = torch.nonzero(m & inner)
    if len(cand) == 0:
        cand = torch.nonzero(inner)
    idx = torch.randint(len(cand), (n,), generator=generator, device="cpu").to(cand.device)
    return cand[idx]


def lattice_centres(mask: torch.Tensor, n: int, patch: int) -> torch.Tensor:
    """A regular lattice of at most ``n`` voxel centres (N, 3) zyx inside ``mask`` (D, H, W bool) and
    ``patch // 2`` from the borders: the smallest stride whose lattice (centred on the grid) has no
    more than ``n`` points in the mask; falls back to the grid's centre voxel when none is in it."""
    r = patch // 2
    m = mask.reshape(mask.shape[-3:])
    if min(m.shape) <= 2 * r:
        raise ValueError(f"the grid {tuple(m.shape)} is smaller than a patch of {patch} voxels")
    inner = torch.zeros_like(m)
    inner[r:m.shape[0] - r, r:m.shape[1] - r, r:m.shape[2] - r] = True
    ok = m & inner
    for stride in range(1, max(m.shape) + 1):
        axes = []
        for ax, size in enumerate(m.shape):
            span = size - 2 * r                      # valid centres r .. size - r - 1
            k = (span - 1) // stride
            start = r + (span - 1 - k * stride) // 2
            axes.append(torch.arange(start, size - r, stride, device=m.device))
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        pts = torch.stack([zz.reshape(-1), yy.reshape(-1), xx.reshape(-1)], 1)
        keep = pts[ok[pts[:, 0], pts[:, 1], pts[:, 2]]]
        if len(keep) <= n:
            if len(keep):
                return keep
            break
    return torch.tensor([[s // 2 for s in m.shape]], device=m.device)


class DsmSimilarity:
    """The learned similarity as a *loss* for the optimiser (lower is better).

    ``loss(fixed, warped) = mean over patches of softplus(-logit)`` (the binary cross-entropy of
    "corresponds"), over ``patches`` patch centres inside the fixed foreground: drawn anew at random
    at every call (``sampling='random'``: stochastic, use Adam), or a regular lattice covering the
    foreground (``'lattice'``: the same centres at every call, a deterministic landscape whose
    gradient keeps its direction between iterations, so Adam takes full steps).

    Parameters
    ----------
    net : DsmNet (or a path to a dsm checkpoint)
    patches : patch centres per call (at most, for the lattice)
    foreground : fixed intensity (in [0, 1]) above which a voxel may be a centre
    seed : seed of the centre sampling
    sampling : 'random' or 'lattice'
    """

    name = "dsm"
    labels = False

    def __init__(self, net=None, patches: int = 256, foreground: float = 0.1, seed: int = 0,
                 sampling: str = "random"):
        if sampling not in ("random", "lattice"):
            raise ValueError(f"dsm patch sampling must be 'random' or 'lattice', got {sampling!r}")
        self.sampling = sampling
        self._lattice: dict = {}
        if net is None or isinstance(net, (str,)) or hasattr(net, "__fspath__"):
            from ..paradigms._learned import load_model
            net = load_model("dsm", net, kinds=("dsm",))["model"]
        if not isinstance(net, DsmNet):
            raise ValueError(f"the dsm similarity needs a DsmNet, got {type(net).__name__}")
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.patches = int(patches)
        self.foreground = float(foreground)
        self.generator = torch.Generator().manual_seed(int(seed))

    def bind(self, fixed, moving):
        self.net.to(fixed.device)
        return self

    def scores(self, fixed: torch.Tensor, warped: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Logits (N,) at ``centres`` (N, 3 zyx) of images (1, 1, D, H, W) on one grid."""
        p = self.net.patch
        pair = torch.stack([extract_patches(fixed, centres, p), extract_patches(warped, centres, p)], 1)
        return self.net(pair.to(next(self.net.parameters()).dtype))

    def __call__(self, fixed, warped, mask=None):
        fg = fixed.detach().reshape(fixed.shape[-3:]) > self.foreground
        if mask is not None:
            fg = fg & (mask.reshape(mask.shape[-3:]) > 0)
        if self.sampling == "lattice":
            # the fixed image of a level does not change during an optimisation: one lattice per level
            key = (tuple(fg.shape), int(fg.sum()))
            if key not in self._lattice:
                self._lattice[key] = lattice_centres(fg, self.patches, self.net.patch)
            centres = self._lattice[key]
        else:
            centres = sample_centres(fg, self.patches, self.net.patch, self.generator)
        return F.softplus(-self.scores(fixed, warped, centres)).mean()


def similarity_map(net: DsmNet, fixed: np.ndarray, warped: np.ndarray, stride: int = 4,
                   mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Where the network thinks the images disagree: P(correspond) on a strided grid, upsampled.

    Parameters
    ----------
    fixed, warped : (D, H, W) arrays in [0, 1] on the same (working) grid.
    stride : voxels between evaluated centres.
    mask : (D, H, W) bool, optional
        Only centres inside it are scored (the others' blocks are NaN): a foreground mask saves
        the cost of scoring background patches.

    Returns
    -------
    (D, H, W) float32 array of probabilities in [0, 1] (nearest upsampling of the strided grid;
    0 where no patch fits, NaN for centres outside ``mask``).
    """
    if fixed.shape != warped.shape or fixed.ndim != 3:
        raise ValueError(f"fixed and warped must be 3D arrays of one shape, got {fixed.shape} and {warped.shape}")
    if mask is not None and np.shape(mask) != fixed.shape:
        raise ValueError(f"mask must have the images' shape {fixed.shape}, got {np.shape(mask)}")
    p, r = net.patch, net.patch // 2
    axes = [np.arange(r, s - r, stride) for s in fixed.shape]
    out = np.zeros(fixed.shape, np.float32)
    if any(len(a) == 0 for a in axes):
        return out
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    keep = np.ones(zz.size, bool) if mask is None else np.asarray(mask, bool)[zz, yy, xx].ravel()
    centres = torch.as_tensor(np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)[keep])
    dev = next(net.parameters()).device
    f_t = torch.as_tensor(fixed, dtype=torch.float32, device=dev)
    w_t = torch.as_tensor(warped, dtype=torch.float32, device=dev)
    probs = [torch.zeros(0)]
    with torch.no_grad():
        for chunk in torch.split(centres.to(dev), 512):
            pair = torch.stack([extract_patches(f_t, chunk, p), extract_patches(w_t, chunk, p)], 1)
            probs.append(torch.sigmoid(net.eval()(pair)).cpu())
    prob = np.full(zz.size, np.nan, np.float32)
    prob[keep] = torch.cat(probs).numpy()
    prob = prob.reshape(zz.shape)
    # nearest evaluated centre along each axis (voxels farther than a patch radius stay 0)
    near = [np.clip(np.round((np.arange(n) - r) / stride).astype(int), 0, len(a) - 1) for n, a in zip(fixed.shape, axes)]
    full = prob[np.ix_(*near)]
    inside = [np.abs(np.arange(n) - a[i]) <= r for n, a, i in zip(fixed.shape, axes, near)]
    out[np.ix_(*[np.nonzero(m)[0] for m in inside])] = full[np.ix_(*[np.nonzero(m)[0] for m in inside])]
    return out


def _register() -> None:
    from .similarity import register_similarity
    register_similarity("dsm", DsmSimilarity)


_register()
