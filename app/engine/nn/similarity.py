"""The one registry of similarities, as losses: name -> ``loss(fixed, warped[, mask]) -> scalar``.

Every entry is a *loss* (lower is better) on images ``(B, C, D, H, W)`` (or 2D ``(B, C, H, W)``) of
the same shape, with an optional ``mask`` ``(B or 1, 1, *spatial)`` of voxel weights in [0, 1]:

============  =========================================================================  ===========
name          what                                                                       range
============  =========================================================================  ===========
``mse``       mean squared difference, divided by ``var(fixed) + var(moving)``           [0, ~2]
              (about ``1 - r``, so one regulariser weight means the same on any scale)
``ncc``       negative global normalised cross-correlation (Pearson's r)                 [-1, 1]
``lncc``      negative local squared NCC in a cubic ``window`` (VoxelMorph)              [-1, 0]
``mi``        negative mutual information, Gaussian Parzen windows (Mattes-style,        <= 0
              differentiable; intensities expected in [0, 1])
``dice``      ``1 -`` soft Dice of one-hot label maps ``(B, K, ...)`` (warped trilinearly) [0, 1]
============  =========================================================================  ===========

A learned metric (e.g. the ``dsm`` paradigm's network) registers itself with
:func:`register_similarity`; :func:`app.engine.optimise.optimise` and the trainers then take it by
name. A loss object may offer ``bind(fixed, moving) -> loss``: the optimiser calls it once with the
full-resolution images before optimising (``mse`` fixes its variance scale there).

Use::

    sim = get_similarity("lncc", window=5)
    loss = sim(fixed_t, warped_t)                 # scalar tensor, differentiable
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from . import losses as L

#: The built-in entries, in display order (:func:`available` also lists registered ones).
SIMILARITIES: tuple[str, ...] = ("mse", "ncc", "lncc", "mi", "dice")


class Similarity:
    """Base of the built-in entries: a callable loss with a name and a ``bind`` hook.

    Attributes
    ----------
    name : str
    labels : bool
        True when the inputs are one-hot label maps rather than intensity images.
    """

    name: str = ""
    labels: bool = False

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, fixed: torch.Tensor, moving: torch.Tensor) -> "Similarity":
        """Adapt to one pair (full-resolution images) before optimising; returns the loss to use."""
        return self

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class MSE(Similarity):
    """Mean squared difference divided by the images' variances.

    Parameters
    ----------
    normalise : bool
        Divide by ``var(fixed) + var(moving)`` (measured once by :meth:`bind`, or per call on the
        detached inputs when not bound). False gives the plain mean squared difference.
    scale : float, optional
        A fixed multiplier instead of the variance normalisation.
    """

    name = "mse"

    def __init__(self, normalise: bool = True, scale: Optional[float] = None):
        self.normalise = bool(normalise)
        self.scale = None if scale is None else float(scale)

    def bind(self, fixed, moving):
        if self.scale is not None or not self.normalise:
            return self
        # relative to the images' variances: about 1 - correlation, so that one smoothness weight
        # means roughly the same for every similarity and every intensity scale
        return MSE(normalise=True, scale=1.0 / max(float(fixed.var() + moving.var()), 1e-8))

    def __call__(self, fixed, warped, mask=None):
        loss = L.mse(fixed, warped, mask)
        if self.scale is not None:
            return loss * self.scale
        if self.normalise:
            return loss / (fixed.detach().var() + warped.detach().var()).clamp_min(1e-8)
        return loss


class NCC(Similarity):
    """Negative global normalised cross-correlation, ``-r`` in [-1, 1]."""

    name = "ncc"

    def __call__(self, fixed, warped, mask=None):
        return L.ncc(fixed, warped, mask)


class LNCC(Similarity):
    """Negative local squared NCC over a cubic ``window`` (voxels, odd), in [-1, 0]."""

    name = "lncc"

    def __init__(self, window: int = 5):
        if int(window) != window or window < 1 or window % 2 == 0:
            raise ValueError(f"lncc window must be an odd integer >= 1, got {window!r}")
        self.window = int(window)
        self._moments = None        # (fixed tensor, its version, (mean, variance)) of the last fixed image

    def __call__(self, fixed, warped, mask=None):
        # an optimisation compares one fixed image many times: its local moments are computed once
        # (kept while the same, unmodified, gradient-free tensor comes back)
        if fixed.requires_grad or fixed.is_inference():   # inference tensors keep no version counter
            return L.lncc(fixed, warped, self.window, mask=mask)
        c = self._moments
        if c is None or c[0] is not fixed or c[1] != fixed._version:
            with torch.no_grad():
                c = self._moments = (fixed, fixed._version, L.lncc_moments(fixed, self.window))
        return L.lncc(fixed, warped, self.window, mask=mask, a_moments=c[2])


class MI(Similarity):
    """Negative mutual information with Gaussian Parzen windows (differentiable, Mattes-style).

    Parameters
    ----------
    bins : histogram bins per image (>= 2)
    sigma_ratio : Parzen window width as a fraction of the bin spacing
    value_range : intensity range of the histograms (inputs are clamped to it)
    max_samples : voxels used per batch element (an evenly strided subset), None for all
    """

    name = "mi"

    def __init__(self, bins: int = 32, sigma_ratio: float = 0.5, value_range=(0.0, 1.0),
                 max_samples: Optional[int] = 65536):
        if int(bins) < 2:
            raise ValueError(f"mi needs at least 2 bins, got {bins!r}")
        self.bins = int(bins)
        self.sigma_ratio = float(sigma_ratio)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.max_samples = max_samples

    def __call__(self, fixed, warped, mask=None):
        return L.mutual_information(fixed, warped, self.bins, self.sigma_ratio, self.value_range,
                                    self.max_samples, mask=mask)


class Dice(Similarity):
    """``1 -`` mean soft Dice over batch and label channels; inputs are one-hot ``(B, K, ...)``."""

    name = "dice"
    labels = True

    def __init__(self, eps: float = 1e-5):
        self.eps = float(eps)

    def __call__(self, fixed, warped, mask=None):
        return L.dice_loss(fixed, warped, self.eps, mask=mask)


_REGISTRY: dict[str, Callable[..., Callable]] = {"mse": MSE, "ncc": NCC, "lncc": LNCC, "mi": MI, "dice": Dice}


def available() -> tuple[str, ...]:
    """Every registered name: the built-ins first, then those added by :func:`register_similarity`."""
    return tuple(_REGISTRY)


def register_similarity(name: str, factory: Callable[..., Callable]) -> None:
    """Add (or replace) an entry: ``factory(**options)`` returns ``loss(fixed, warped[, mask])``.

    The loss must return a scalar tensor, lower is better, differentiable in ``warped``. It may
    offer ``bind(fixed, moving)`` (see the module docstring) and a ``labels = True`` attribute
    when it compares one-hot label maps.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a similarity name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"similarity '{name}': the factory must be callable, got {factory!r}")
    _REGISTRY[name.strip()] = factory


def get_similarity(name: str, **options) -> Callable:
    """The similarity ``name`` as a loss ``(fixed, warped[, mask]) -> scalar`` (lower is better).

    Parameters
    ----------
    name : one of :func:`available` (built-ins: :data:`SIMILARITIES`)
    **options : passed to the entry's factory, e.g. ``window=5`` (lncc), ``bins=32`` (mi),
        ``normalise=False`` (mse)

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones) or an option the entry does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown similarity {name!r}; available: {', '.join(_REGISTRY)}")
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        try:
            accepted = ", ".join(p for p in inspect.signature(factory).parameters if p != "self") or "none"
        except (TypeError, ValueError):
            accepted = "see its documentation"
        raise ValueError(f"similarity {name!r} does not take options {sorted(options)}; "
                         f"it accepts: {accepted}") from None
    except ValueError:
        pass    # a builtin without an inspectable signature: let the call decide
    return factory(**options)


def uses_labels(loss) -> bool:
    """Whether ``loss`` compares one-hot label maps (``dice``) rather than images."""
    return bool(getattr(loss, "labels", False))
