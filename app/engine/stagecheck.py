"""Never silently worse than the input: a similarity check of every stage of a learned result.

A learned registration runs in stages: the pair as the network received it (``start``: identity
or the given initial transform), the centre-of-mass prealignment, the affine net, the deformable
net (and any refinement stage after it). Each stage should make the pair at least as similar as
its input. On inputs unlike the training data (skull-stripped, 1 mm, another contrast) a stage
can make it worse, so :func:`check_stages` measures every stage's transform on the **fixed grid**
(binned to about 4 mm, the learned models' working resolution, so that it costs a few tens of
milliseconds) inside a fixed-image foreground mask:

- the image similarity: local NCC (signed, 3-voxel windows of the binned grid, i.e. about 12 mm)
  for one modality; normalised mutual information ``(H(f) + H(m)) / H(f, m)`` (32 bins) for a
  multimodal pair (:func:`app.engine.modality.detect`);
- the foreground overlap: Dice of the fixed foreground and the warped moving foreground (each
  above 10 % of its bright tissue's level). Coarse MI barely sees a brain shrunk or pushed out
  of the skull-stripped fixed brain (T1 vs T2 of two MS patients: ``weakly`` lowered the
  brain-mask Dice from 0.897 to 0.849 while NMI rose by 0.005); the overlap does.

Every candidate is ``T: fixed physical points -> moving physical points`` (LPS mm), sampled as
``moving(T(x))`` at the binned fixed grid's points ``x``. Stages are taken in order: a stage is
accepted when neither measure is worse, by more than its margin, than the best of the stages
accepted before it; otherwise it "made the pair worse than its input" and is named. The result
keeps the last accepted stage (a later stage is preferred within the margins).

Margins (``MARGINS``) were measured, not guessed (``bench/bench_stagecheck.py``,
``bench/results/stagecheck.md``): on the 20 IXI test pairs, where the bundled models help, the
affine and deformable stages gain at least 0.07 and 0.17 local NCC (no false alarm in 40 runs);
a 1 mm shift of a good result costs 0.005-0.018 local NCC (median 0.010), and 0.010-0.034 NMI
(median 0.025) on aligned multimodal pairs: a margin of 0.01 is "worse by about a 1 mm error".
The foreground overlap gains at least 0.019 at the deformable stage there, and the affine stage
moves it by -0.004 at worst (heads with skull: a 1 mm shift costs only 0.001-0.003), while on
skull-stripped brains a 1 mm shift costs 0.011 (0.010-0.012 on the aligned MS / BraTS scans):
an overlap margin of 0.01 is "worse by about a 1 mm error of the brain outline". Cost: 0.10 s of
CPU per IXI pair for the whole check (inputs, modality, four stages; 40 runs, one thread;
0.094 s after the fixed image's local moments were computed once per check).

Numpy / SimpleITK only (no torch, no Qt).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .types import Transform, Volume

TARGET_MM = 4.0          # spacing of the binned fixed grid the check runs on (the networks' working grid's)
LNCC_WINDOW = 3          # voxels of that grid per axis (about 12 mm)
MI_BINS = 32
# similarity drop that counts as worse (measured: see the module docstring)
MARGINS = {"lncc": 0.01, "nmi": 0.01, "overlap": 0.01}
FOREGROUND = 0.1         # foreground: above 10 % of the bright tissue's level (images scaled by _range)


@dataclass
class StageCheck:
    """The similarity of every stage of a result, and which stage was kept.

    metric : 'lncc' or 'nmi'.
    values : stage name -> similarity (higher is better), in stage order.
    kept : the stage whose transform the result carries.
    margin : drop of ``metric`` that counts as worse.
    worse : one line per stage that made the pair worse than the stages accepted before it.
    modality : the :class:`app.engine.modality.ModalityDecision` as a dict (why this metric).
    seconds : cost of the check.
    overlap : stage name -> Dice of the fixed foreground and the warped moving foreground.
    overlap_margin : drop of ``overlap`` that counts as worse.
    """

    metric: str
    values: dict
    kept: str
    margin: float
    worse: list = field(default_factory=list)
    modality: dict = field(default_factory=dict)
    seconds: float = 0.0
    overlap: dict = field(default_factory=dict)
    overlap_margin: float = 0.0

    @property
    def last(self) -> str:
        return list(self.values)[-1]

    @property
    def flagged(self) -> bool:
        """True when the full result was not kept (a stage made the pair worse)."""
        return self.kept != self.last

    def message(self) -> str:
        """One line for people: what was kept and why ('' when the last stage was kept)."""
        if not self.flagged:
            return ""
        vals = ", ".join(f"{k} {v:.3f}" for k, v in self.values.items())
        ovl = ", ".join(f"{k} {v:.3f}" for k, v in self.overlap.items())
        return (f"stage check: {'; '.join(self.worse)}; kept the {self.kept} stage's transform "
                f"({self.metric} on the fixed grid: {vals}; foreground overlap: {ovl}; margins {self.margin:g}, "
                f"{self.overlap_margin:g})")

    def to_dict(self) -> dict:
        return {"metric": self.metric, "values": {k: round(float(v), 5) for k, v in self.values.items()},
                "overlap": {k: round(float(v), 5) for k, v in self.overlap.items()},
                "overlap_margin": self.overlap_margin,
                "kept": self.kept, "last": self.last, "flagged": self.flagged, "margin": self.margin,
                "worse": list(self.worse), "modality": dict(self.modality), "seconds": round(self.seconds, 4)}


def _factors(spacing: Sequence[float], target_mm: float) -> list[int]:
    return [max(1, int(round(target_mm / float(s)))) for s in spacing]


def binned(volume: Volume, target_mm: float = TARGET_MM) -> sitk.Image:
    """``volume`` averaged over blocks of about ``target_mm`` (ITK BinShrink: the block centres
    keep their physical positions), float32."""
    img = volume.to_sitk(sitk.sitkFloat32)
    f = _factors(volume.spacing, target_mm)
    return sitk.BinShrink(img, f) if max(f) > 1 else img


def foreground_mask(fixed01: np.ndarray) -> np.ndarray:
    """Fixed-image foreground on the binned grid, ``(z, y, x)`` bool, from the image scaled to [0, 1]
    (:func:`_range`): above 10 % of the bright tissue's level, dilated by one voxel so that the
    object's border (which alignment moves most) is included. Dark tissue inside the object (CSF)
    stays in through the local windows' dilation as far as it matters for alignment."""
    from scipy.ndimage import binary_dilation
    return binary_dilation(fixed01 > FOREGROUND, iterations=1)


def _range(a: np.ndarray) -> tuple[float, float]:
    """(p1 of the image, p99 of its brighter half): background -> 0, bright tissue -> 1."""
    if a.size == 0:
        return 0.0, 1.0
    lo, mid = np.percentile(a, [1, 50])
    hi = float(np.percentile(a[a >= mid], 99))
    return float(lo), (hi if hi > lo else float(lo) + 1.0)


def local_ncc(f: np.ndarray, m: np.ndarray, mask: np.ndarray, window: int = LNCC_WINDOW) -> float:
    """Mean signed local NCC of two arrays ``(z, y, x)`` over ``mask``; windows where either image
    is constant count as 0 (no evidence of alignment).

    Unlike :func:`app.engine.metrics.similarity.local_ncc`, which leaves flat windows out of the
    mean, a fixed-image region where the warped moving image is empty (its object shrunk or moved
    away) lowers the value here: that is exactly the failure this check must see."""
    return _FixedMoments(f, mask, window)(m)


class _FixedMoments:
    """:func:`local_ncc` against one fixed array, its local moments computed once."""

    def __init__(self, f: np.ndarray, mask: np.ndarray, window: int = LNCC_WINDOW):
        from scipy.ndimage import uniform_filter
        self.f = f.astype(np.float32)
        self.mask = mask
        self.size = (1, window, window, window)
        self.mf, ff = uniform_filter(np.stack([self.f, self.f * self.f]), self.size)
        self.vf = np.clip(ff - self.mf * self.mf, 0, None)

    def __call__(self, m: np.ndarray) -> float:
        from scipy.ndimage import uniform_filter
        if not self.mask.any():
            return 0.0
        m = m.astype(np.float32)
        mm, mm2, fm = uniform_filter(np.stack([m, m * m, self.f * m]), self.size)
        vm = np.clip(mm2 - mm * mm, 0, None)
        cr = fm - self.mf * mm
        den = np.sqrt(self.vf * vm)
        ok = den > 1e-6
        cc = np.where(ok, cr / np.where(ok, den, 1.0), 0.0)
        return float(cc[self.mask].mean())


def normalised_mi(f: np.ndarray, m: np.ndarray, mask: np.ndarray, bins: int = MI_BINS) -> float:
    """Studholme's normalised mutual information ``(H(f) + H(m)) / H(f, m)`` over ``mask``
    (:func:`app.engine.metrics.similarity.mutual_information`; 1: independent, 2: one determines the other)."""
    from .metrics.similarity import mutual_information
    if not mask.any():
        return 1.0
    v = mutual_information(f, m, bins=bins, normalized=True, mask=mask)
    return v if np.isfinite(v) else 1.0


def check_stages(fixed: Volume, moving: Volume, stages: Sequence[tuple[str, Optional[Transform]]], *,
                 multimodal: Optional[bool] = None, modality: Optional[dict] = None,
                 margin: Optional[float] = None, overlap_margin: Optional[float] = None) -> StageCheck:
    """Measure every stage's transform on the fixed grid and choose the one to keep.

    Parameters
    ----------
    fixed, moving : Volume
        The pair, each on its own grid (LPS mm).
    stages : sequence of (name, Transform)
        In the order they were estimated, first the start (the pair as the network received it);
        each transform maps fixed physical points to moving physical points (None: identity).
    multimodal : bool, optional
        Use normalised MI instead of local NCC. None: :func:`app.engine.modality.detect`, with the
        last stage's transform as the rough alignment.
    modality : dict, optional
        A :meth:`ModalityDecision.to_dict` to record (when ``multimodal`` was decided by the caller).
    margin : float, optional
        Similarity drop that counts as worse (default ``MARGINS[metric]``).
    overlap_margin : float, optional
        Drop of the foreground overlap (Dice of the fixed and warped moving foregrounds) that
        counts as worse (default ``MARGINS["overlap"]``).

    Returns
    -------
    StageCheck
    """
    if not stages:
        raise ValueError("check_stages needs at least one stage (name, transform)")
    names = [n for n, _ in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    t0 = time.perf_counter()
    if multimodal is None:
        from .modality import detect
        decision = detect(fixed, moving, transform=stages[-1][1])
        multimodal, modality = decision.multimodal, decision.to_dict()
    metric = "nmi" if multimodal else "lncc"
    margin = MARGINS[metric] if margin is None else float(margin)
    overlap_margin = MARGINS["overlap"] if overlap_margin is None else float(overlap_margin)
    fb = binned(fixed)
    mb = binned(moving)
    fa = sitk.GetArrayFromImage(fb)
    f_lo, f_hi = _range(fa)
    fa = np.clip((fa - f_lo) / (f_hi - f_lo), 0.0, 1.0)
    mask = foreground_mask(fa)
    if mask.any():      # only the mask's bounding box (+ half a window) is resampled and filtered
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - LNCC_WINDOW, 0)
        hi = np.minimum(idx.max(0) + LNCC_WINDOW + 1, mask.shape)
        fb = sitk.RegionOfInterest(fb, [int(v) for v in (hi - lo)[::-1]], [int(v) for v in lo[::-1]])
        fa = fa[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        mask = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    m_lo, m_hi = _range(sitk.GetArrayViewFromImage(mb))
    f_fg = fa > FOREGROUND
    lncc = None if multimodal else _FixedMoments(fa, mask)
    values: dict[str, float] = {}
    overlap: dict[str, float] = {}
    for name, tx in stages:
        itk = (tx or Transform.identity()).itk
        w = sitk.GetArrayFromImage(sitk.Resample(mb, fb, itk, sitk.sitkLinear, m_lo, sitk.sitkFloat32))
        w = np.clip((w - m_lo) / (m_hi - m_lo), 0.0, 1.0)
        values[name] = normalised_mi(fa, w, mask) if multimodal else lncc(w)
        w_fg = w > FOREGROUND
        total = int(f_fg.sum()) + int(w_fg.sum())
        overlap[name] = 2.0 * float((f_fg & w_fg).sum()) / total if total else 1.0
    # a stage is accepted when it is not worse, by either measure, than every stage accepted before
    # it; the last accepted one is kept (a later stage is preferred within the margins)
    accepted = [names[0]]
    worse = []
    for name in names[1:]:
        ref_s = max(accepted, key=values.get)
        ref_o = max(accepted, key=overlap.get)
        why = []
        if values[name] < values[ref_s] - margin:
            why.append(f"{metric} {values[ref_s]:.3f} at {ref_s} -> {values[name]:.3f}")
        if overlap[name] < overlap[ref_o] - overlap_margin:
            why.append(f"foreground overlap {overlap[ref_o]:.3f} at {ref_o} -> {overlap[name]:.3f}")
        if why:
            worse.append(f"the {name} stage made the pair less similar than its input ({'; '.join(why)})")
        else:
            accepted.append(name)
    kept = accepted[-1]
    return StageCheck(metric, values, kept, margin, worse, dict(modality or {}), time.perf_counter() - t0,
                      overlap, overlap_margin)


def guard_learned(fixed: Volume, moving: Volume, stages: Sequence[tuple[str, Optional[Transform]]], ckpt: dict,
                  checkpoint_name: str) -> tuple[str, dict, list[str]]:
    """The checks of a learned result in one call (what :mod:`app.engine.paradigms._learned` runs).

    The modality is decided once (:func:`app.engine.modality.detect`, the last stage as the rough
    alignment); the inputs are compared with the checkpoint's training data
    (:func:`app.engine.expectations.check_inputs`); every stage is measured (:func:`check_stages`).

    Returns
    -------
    (kept stage name, checks dict for :attr:`RegistrationResult.checks`, warnings)
    """
    from .expectations import check_inputs
    from .modality import detect
    t0 = time.perf_counter()
    decision = detect(fixed, moving, transform=stages[-1][1]).to_dict()
    inputs = check_inputs(fixed, moving, ckpt, checkpoint_name, modality=decision)
    check = check_stages(fixed, moving, stages, multimodal=decision["multimodal"], modality=decision)
    warnings = list(inputs.warnings) + ([check.message()] if check.flagged else [])
    checks = {"stage_check": check.to_dict(), "input_check": inputs.to_dict(),
              "seconds": round(time.perf_counter() - t0, 4)}
    return check.kept, checks, warnings
