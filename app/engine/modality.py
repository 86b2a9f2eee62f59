"""Is a pair multimodal? Modality tags from names, and the intensity relation of the two images.

Registration settings that suit one modality (histogram matching, intensity-difference demons,
MSE / NCC) break on pairs of different contrasts (T1 vs T2, FLAIR, PD, CT): the joint intensity
relation is not a monotone increasing one there. Two sources of evidence, in this order:

1. **Modality tags** (:func:`modality_from_name`): a token in each image's name such as ``T1``,
   ``T1W``, ``MPRAGE``, ``T1POST`` / ``T1c`` (contrast-enhanced T1 counts as T1), ``T2``, ``FLAIR``,
   ``PD``, ``CT``. When both images carry a tag, the tags decide.
2. **Intensity relation** (:func:`intensity_relation`): after a rough alignment (the given
   transform, e.g. centres of mass, or the result of the linear stages), the fixed intensities
   inside both foregrounds are explained by the moving ones through the conditional mean
   ``E[fixed | moving bin]`` (correlation ratio ``eta2``) and through the best *increasing* function
   of the moving intensity (isotonic regression of that curve, ``monotone2 <= eta2``). One modality:
   the relation is increasing, ``monotone2 / eta2`` near 1. Inverted or mixed contrasts: well
   below 1. When ``eta2`` is tiny the images are too far apart to tell (``decided`` False).

Everything here is numpy / SimpleITK (no torch).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .types import Volume

# token (lower case) -> modality family; contrast-enhanced T1 is a T1 for registration purposes
_TOKENS = {
    "t1": "T1", "t1w": "T1", "mprage": "T1", "spgr": "T1", "t1post": "T1", "t1c": "T1", "t1ce": "T1",
    "t1gd": "T1", "t1ks": "T1", "t1wks": "T1", "bravo": "T1",
    "t2": "T2", "t2w": "T2", "t2star": "T2", "t2s": "T2",
    "flair": "FLAIR", "t2flair": "FLAIR",
    "pd": "PD", "pdw": "PD",
    "ct": "CT", "cta": "CT",
}
MODALITIES = ("T1", "T2", "FLAIR", "PD", "CT")

# decision thresholds of the intensity relation (bench/results/multimodal.md gives the measurements)
MONOTONE_RATIO = 0.6     # monotone2 / eta2 below this: not one modality
MIN_ETA2 = 0.03          # below: the images are too far apart for the relation to mean anything


def modality_from_name(name: str) -> Optional[str]:
    """The modality family a name's tokens state (``'T1'``, ``'T2'``, ``'FLAIR'``, ``'PD'``, ``'CT'``),
    or None when no token or conflicting tokens are found.

    ``"IXI002-Guys-0828_T1.nii.gz"`` -> 'T1'; ``"study1_T2W.nii.gz"`` -> 'T2'; ``"t1c"`` -> 'T1'.
    """
    tokens = re.split(r"[^a-z0-9]+", str(name or "").lower())
    found = {_TOKENS[t] for t in tokens if t in _TOKENS}
    return found.pop() if len(found) == 1 else None


@dataclass
class ModalityDecision:
    """Whether a pair is treated as multimodal, and why.

    multimodal : the decision.
    source : 'hint' (the user's ``modality`` parameter), 'names' (modality tags), 'intensity'
        (the intensity relation) or 'default' (nothing conclusive: one modality assumed).
    reason : one line for people (progress messages, the GUI).
    evidence : numbers behind it (tags, eta2, monotone2, ratio).
    """

    multimodal: bool
    source: str
    reason: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"multimodal": bool(self.multimodal), "source": self.source, "reason": self.reason,
                "evidence": {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                             for k, v in self.evidence.items()}}


def _normalise(img: sitk.Image) -> sitk.Image:
    a = sitk.GetArrayViewFromImage(img)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return sitk.Clamp(sitk.ShiftScale(sitk.Cast(img, sitk.sitkFloat32), -float(lo), 1.0 / float(hi - lo)),
                      sitk.sitkFloat32, 0.0, 1.0)


def _coarse(img: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Smooth and resample onto an isotropic grid of ``spacing_mm`` (same origin and direction)."""
    size = [max(4, int(round(s * p / spacing_mm))) for s, p in zip(img.GetSize(), img.GetSpacing())]
    # ITK's recursive Gaussian refuses sigma 0: axes already coarser than the grid get a token one
    sig = [max(0.5 * (spacing_mm - p), 0.1 * p) for p in img.GetSpacing()]
    sm = sitk.SmoothingRecursiveGaussian(img, sig)
    return sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [spacing_mm] * 3,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares increasing fit of ``y`` (pool adjacent violators)."""
    vals, wts, cnt = [], [], []
    for yi, wi in zip(y, w):
        vals.append(float(yi))
        wts.append(float(wi))
        cnt.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            c = cnt[-2] + cnt[-1]
            vals[-2:], wts[-2:], cnt[-2:] = [v], [wsum], [c]
    return np.repeat(vals, cnt)


def relation_statistics(fixed_values: np.ndarray, moving_values: np.ndarray, bins: int = 32) -> dict:
    """Correlation ratio and its increasing part for paired samples.

    Parameters
    ----------
    fixed_values, moving_values : (N,) float
        Intensities at the same physical points.
    bins : int
        Moving intensities are binned by quantiles.

    Returns
    -------
    dict with ``eta2`` (variance of the fixed intensities explained by ``E[fixed | moving bin]``),
    ``monotone2`` (explained by the best increasing function of the bin, ``<= eta2``),
    ``decreasing2`` (by the best decreasing one) and ``ratio = monotone2 / eta2``; ``n`` samples.
    """
    a = np.asarray(fixed_values, float).ravel()
    b = np.asarray(moving_values, float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"fixed and moving samples differ in number: {a.shape} vs {b.shape}")
    n = len(a)
    if n < 10 * bins or a.var() <= 0 or b.var() <= 0:
        return {"eta2": 0.0, "monotone2": 0.0, "decreasing2": 0.0, "ratio": 1.0, "n": n}
    edges = np.quantile(b, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, b, side="right") - 1, 0, bins - 1)
    cnt = np.bincount(idx, minlength=bins).astype(float)
    sums = np.bincount(idx, a, minlength=bins)
    ok = cnt > 0
    mu = sums[ok] / cnt[ok]
    w = cnt[ok]
    mean, total = a.mean(), a.var() * n
    eta2 = float((w * (mu - mean) ** 2).sum() / total)
    inc = _isotonic(mu, w)
    dec = -_isotonic(-mu, w)
    mono2 = float((w * (inc - mean) ** 2).sum() / total)
    dec2 = float((w * (dec - mean) ** 2).sum() / total)
    return {"eta2": eta2, "monotone2": mono2, "decreasing2": dec2,
            "ratio": mono2 / eta2 if eta2 > 0 else 1.0, "n": n}


def intensity_relation(fixed: Volume, moving: Volume, transform=None, spacing_mm: float = 3.0,
                       erode_vox: int = 3) -> dict:
    """:func:`relation_statistics` of a pair on a coarse grid, inside both foregrounds.

    Parameters
    ----------
    fixed, moving : Volume
        Scalar 3D images, each on its own grid (LPS mm).
    transform : Transform or SimpleITK.Transform, optional
        Fixed -> moving points. None: the centres of mass are aligned (a translation).
    spacing_mm : float
        Isotropic spacing of the comparison grid (mm); both images are smoothed to it.
    erode_vox : int
        Erode the joint foreground by this many voxels of that grid: the head border (skin, fat,
        background) is bright or dark in most contrasts and would hide the tissue relation.
    """
    f = _coarse(_normalise(fixed.to_sitk(sitk.sitkFloat32)), spacing_mm)
    m = _coarse(_normalise(moving.to_sitk(sitk.sitkFloat32)), spacing_mm)
    if transform is None:
        tx = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(),
                                               sitk.CenteredTransformInitializerFilter.MOMENTS)
    else:
        tx = getattr(transform, "itk", transform)
    m_on_f = sitk.Resample(m, f, tx, sitk.sitkLinear, -1.0, sitk.sitkFloat32)
    m_fg = sitk.Resample(sitk.OtsuThreshold(m, 0, 1), f, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    fg = sitk.And(sitk.OtsuThreshold(f, 0, 1), m_fg)
    if erode_vox > 0:
        fg = sitk.BinaryErode(fg, [int(erode_vox)] * 3)
    a = sitk.GetArrayViewFromImage(f).ravel()
    b = sitk.GetArrayViewFromImage(m_on_f).ravel()
    sel = (sitk.GetArrayViewFromImage(fg).ravel() > 0) & (b >= 0)
    return relation_statistics(a[sel], b[sel])


def detect(fixed: Volume, moving: Volume, hint: str = "auto", transform=None) -> ModalityDecision:
    """Decide whether ``fixed`` and ``moving`` form a multimodal pair.

    Parameters
    ----------
    hint : 'auto', 'same' or 'multi'
        The user's word ('same' / 'multi') is final; 'auto' looks at the names, then the intensities.
    transform : Transform, optional
        A rough fixed -> moving alignment for the intensity relation (default: centres of mass).
    """
    if hint not in ("auto", "same", "multi"):
        raise ValueError(f"modality hint must be 'auto', 'same' or 'multi', got {hint!r}")
    if hint != "auto":
        multi = hint == "multi"
        return ModalityDecision(multi, "hint", f"modality={hint} set by the user")
    tf, tm = modality_from_name(fixed.name), modality_from_name(moving.name)
    if tf and tm:
        multi = tf != tm
        return ModalityDecision(multi, "names", f"names say {tf} vs {tm}", {"fixed": tf, "moving": tm})
    st = intensity_relation(fixed, moving, transform)
    ev = {"fixed": tf, "moving": tm, **{k: st[k] for k in ("eta2", "monotone2", "decreasing2", "ratio")}}
    if st["eta2"] < MIN_ETA2:
        return ModalityDecision(False, "default", f"intensities too far apart to tell (eta2 {st['eta2']:.3f}); "
                                "one modality assumed", ev)
    multi = st["ratio"] < MONOTONE_RATIO
    how = "not" if multi else "is"
    return ModalityDecision(multi, "intensity", f"the intensity relation {how} increasing "
                            f"(monotone share {st['ratio']:.2f}, eta2 {st['eta2']:.2f})", ev)


def checkpoint_modalities(ckpt: dict) -> Optional[list[str]]:
    """The modality families a learned-similarity checkpoint was trained on, or None if it does not say.

    ``preprocessing['trained_modalities']`` (written by the trainer), else the modality tags in the
    text of ``preprocessing['modalities']`` (older checkpoints: "trained on T1 / T1POST / T1c / T2 /
    FLAIR pairs" -> ['FLAIR', 'T1', 'T2']).
    """
    prep = (ckpt or {}).get("preprocessing") or {}
    if prep.get("trained_modalities"):
        return sorted({str(m) for m in prep["trained_modalities"]})
    text = str(prep.get("modalities") or "")
    found = {_TOKENS[t] for t in re.split(r"[^a-z0-9]+", text.lower()) if t in _TOKENS}
    return sorted(found) or None


def untrained_modality_warning(fixed_name: str, moving_name: str, trained: Optional[list[str]]) -> Optional[str]:
    """A warning when a named modality of the pair is not one a checkpoint was trained on, else None.

    Only modalities the names state are checked (:func:`modality_from_name`); an unnamed image or a
    checkpoint that does not say what it was trained on gives no warning.
    """
    if not trained:
        return None
    pair = {"fixed": modality_from_name(fixed_name), "moving": modality_from_name(moving_name)}
    off = {k: v for k, v in pair.items() if v and v not in trained}
    if not off:
        return None
    what = ", ".join(f"{k} image '{n}' is {off[k]}" for k, n in (("fixed", fixed_name), ("moving", moving_name))
                     if k in off)
    return (f"the checkpoint was trained on {' / '.join(trained)} images only; the {what}: its similarity "
            "is untested on that modality (iterative with Mattes MI makes no such assumption)")
