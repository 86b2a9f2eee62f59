"""The optimiser's view without optimising: the loss at given transforms, the torch warp of a result.

:func:`similarity_profile` evaluates a similarity at a list of linear transforms through
:func:`app.engine.optimise.optimise`'s own pipeline (normalisation, pyramid level, sampling), e.g. to
plot a similarity's landscape; :func:`warp_moving` warps the moving image with a result's model and
the optimiser's torch sampler, to check the exported transform against ``SimpleITK.Resample``.

Every name is re-exported by :mod:`app.engine.optimise`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .nn import resolve_device
from .nn.geometry import grid_matrix, sample_through
from .nn.similarity import get_similarity
from .optimise_grids import _downsample, _level_scale, _sampler, _tensor, _working
from .optimise_inputs import _check_image
from .optimise_models import _is_linear
from .types import Volume

if TYPE_CHECKING:                       # only an annotation: optimise.py imports this module
    from .optimise import OptimiseResult

def similarity_profile(fixed: Volume, moving: Volume, matrices, *, similarity: str,
                       sim_options: Optional[dict] = None, level: int = 1, percentile: Optional[float] = 99.0,
                       device="cpu") -> np.ndarray:
    """The similarity loss :func:`optimise` would see at each of the given linear transforms.

    The landscape of a similarity (e.g. a 1D sweep of rotation) evaluated through the optimiser's own
    pipeline: intensities clipped to ``[min, percentile]`` and scaled to [0, 1], the fixed grid
    box-averaged by the shrink factor ``level`` (the moving image by the same factor on its own
    grid), the moving image sampled once through each transform (zeros outside). A stochastic
    similarity is rebuilt for every transform from the same ``sim_options`` (``dsm``: the same seed,
    so the same patch centres at every transform: the profile compares like with like).

    Parameters
    ----------
    fixed, moving : Volume (z, y, x), each on its own grid (LPS)
    matrices : (N, 4, 4) array-like
        Homogeneous physical maps (xyz LPS mm), fixed points -> moving points.
    similarity : a name of :mod:`app.engine.nn.similarity` (``'mi'``, ``'dsm'``, ...)
    level : shrink factor of the fixed grid (one pyramid level of :func:`optimise`)

    Returns
    -------
    (N,) float64 losses (lower is better).
    """
    mats = np.asarray(matrices, float).reshape(-1, 4, 4)
    if not np.all(np.isfinite(mats)):
        raise ValueError("similarity_profile: the matrices contain NaN or infinite values")
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    if int(level) < 1:
        raise ValueError(f"level must be a shrink factor >= 1, got {level!r}")
    dev = resolve_device(device)
    from .datasets import normalize_intensity
    norm = (lambda a: normalize_intensity(a, percentile)) if percentile is not None else (lambda a: a)
    f_t = _tensor(norm(fixed.array), dev)
    m_t = _tensor(norm(moving.array), dev)
    full, mfull = tuple(f_t.shape[2:]), tuple(m_t.shape[2:])
    lshape = tuple(max(4, int(round(s / level))) for s in full)
    mshape = tuple(max(4, int(round(s / level))) for s in mfull)
    f_l, m_l = _downsample(f_t, lshape), _downsample(m_t, mshape)
    gf_l = grid_matrix(fixed) @ _level_scale(full, lshape)
    gm_l_inv = np.linalg.inv(grid_matrix(moving) @ _level_scale(mfull, mshape))
    out = np.empty(len(mats))
    with torch.no_grad():
        for i, m in enumerate(mats):
            sim = get_similarity(similarity, **(sim_options or {}))
            if hasattr(sim, "bind"):
                sim = sim.bind(f_t, m_t)
            k = torch.as_tensor(gm_l_inv @ m @ gf_l, dtype=torch.float64, device=dev)
            warped = sample_through(m_l, k[None], lshape, padding_mode="zeros")
            out[i] = float(sim(f_l, warped))
    return out


def warp_moving(result: OptimiseResult, fixed: Volume, moving: Volume, padding_mode: str = "itk") -> Volume:
    """``moving`` warped onto ``fixed``'s grid by ``result``'s model with the optimiser's torch sampler.

    The same sampling path as the optimisation at full resolution (intensities unchanged), for
    checking the exported :attr:`OptimiseResult.transform` against ``SimpleITK.Resample``. Field
    models sample the working image (``moving`` resampled through the initial transform), so with a
    non-identity initial transform or a moving grid other than the fixed one this interpolates twice.

    Returns
    -------
    Volume on ``fixed``'s grid, ``(z, y, x)`` float32.
    """
    model = result.model
    linear = _is_linear(model)
    dev = next(iter(model.buffers())).device
    work, mgrid, pre = _working(linear, fixed, moving, result.initial, result.folded)
    with torch.no_grad():
        gf = torch.as_tensor(grid_matrix(fixed), dtype=torch.float64, device=dev)
        gm_inv = torch.as_tensor(np.linalg.inv(grid_matrix(mgrid)), dtype=torch.float64, device=dev)
        warp, _ = _sampler(model, fixed.shape, gm_inv, torch.as_tensor(pre, device=dev), gf, padding_mode)
        out = warp(_tensor(work.array, dev))
    return fixed.with_array(out[0, 0].float().cpu().numpy(), name=moving.name)
