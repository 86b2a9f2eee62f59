"""Does an input look like what a learned model was trained on? Checks against the checkpoint's card.

The bundled learned models were trained on IXI T1 heads **with skull**, 2 mm voxels, MR magnitudes
(non-negative) clipped at the 99th percentile. A model meets skull-stripped, 1 mm, other-contrast,
CT and other-scanner inputs every day; it still returns a result, usually a worse one, so the
differences are named in the result's warnings (:func:`check_inputs`), each with the checkpoint.

What a checkpoint expects (:func:`expectations`) comes from its ``expects`` record when it has one
(``{"data", "modality", "skull", "spacing_mm", "non_negative"}``), else from the training data it
names (``IXI T1`` -> the values above), else nothing is checked.

Features of one image (:func:`image_features`; measured in ``bench/results/stagecheck.md``):

- **skull-stripped**: the non-zero voxels occupy less than ``STRIPPED_MAX_L`` litres (a brain:
  1.10-1.24 L on the 12 skull-stripped MS / BraTS scans of the sample data; a head with skull:
  4.35-7.73 L on all 140 IXI scans, 2.56-3.11 L on the thick-slab ms_longitudinal scans) **and**
  the dark part of the image (below Otsu) is almost all exactly zero (>= ``STRIPPED_ZERO_SHARE``:
  0.958-0.996 stripped; 0.42-0.75 IXI, 0.73-0.83 ms_longitudinal), i.e. a mask replaced
  everything outside the tissue by zero.
- **resolution**: the largest ratio between a voxel size and the trained one (either way).
- **negative intensities**: the share of voxels below ``-NEGATIVE_REL`` x the 99th percentile
  (CT in HU, phase or signed reconstructions); interpolation undershoot at a mask border stays
  far below ``NEGATIVE_SHARE``.
- **modality**: the name's tag (:func:`app.engine.modality.modality_from_name`) and whether the pair
  is multimodal (:func:`app.engine.modality.detect`).

Numpy / SimpleITK only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from .types import Volume

STRIPPED_MAX_L = 2.2
STRIPPED_ZERO_SHARE = 0.9
SPACING_RATIO = 1.5       # warn when a voxel size differs from the trained one by this factor or more
NEGATIVE_REL = 0.05
NEGATIVE_SHARE = 0.01

# training data sets the bundled cards name -> what their images look like
KNOWN_DATA = {
    "IXI T1": {"data": "IXI T1 heads with skull", "modality": "T1", "skull": True, "spacing_mm": 2.0,
               "non_negative": True},
}


def _training_data(training) -> str:
    """The ``data`` string of a checkpoint's training record, following its ``init`` chain."""
    t = training
    while isinstance(t, dict):
        if t.get("data"):
            return str(t["data"])
        init = t.get("init")
        t = init.get("training") if isinstance(init, dict) else None
    return ""


def expectations(ckpt: dict) -> dict:
    """What a checkpoint's training images looked like: ``{"data", "modality", "skull", "spacing_mm",
    "non_negative"}`` (any may be missing), from ``ckpt["expects"]`` or the training data it names."""
    exp = ckpt.get("expects") or (ckpt.get("training") or {}).get("expects")
    if isinstance(exp, dict):
        return dict(exp)
    data = _training_data(ckpt.get("training"))
    for key, val in KNOWN_DATA.items():
        if data.startswith(key):
            return dict(val)
    return {}


def image_features(volume: Volume) -> dict:
    """Cheap features of one scalar image: ``nonzero_l`` (litres of non-zero voxels), ``dark_zero_share``
    (share of exactly-zero voxels among those below the Otsu threshold), ``negative_share`` (below
    ``-NEGATIVE_REL`` x p99), ``min``, ``p99``, ``spacing_mm``. Every voxel of a grid of about 3 mm (every second voxel at least) is used."""
    if volume.is_vector:
        raise ValueError(f"image '{volume.name}' must be scalar, got shape {volume.array.shape}")
    st = [max(2, int(round(3.0 / float(s)))) for s in volume.spacing[::-1]]     # zyx strides
    a = np.asarray(volume.array)[::st[0], ::st[1], ::st[2]]
    # mm^3 that one sampled voxel stands for
    step_vol = float(np.prod(volume.spacing)) * volume.array.size / max(a.size, 1)
    nonzero = a != 0
    p99 = float(np.percentile(a, 99)) if a.size else 0.0
    dark = a < otsu_threshold(a)
    return {"nonzero_l": float(nonzero.sum()) * step_vol / 1e6,
            "dark_zero_share": float((a[dark] == 0).mean()) if dark.any() else 0.0,
            "negative_share": float((a < -NEGATIVE_REL * abs(p99)).mean()) if a.size else 0.0,
            "min": float(a.min()) if a.size else 0.0, "p99": p99,
            "spacing_mm": [float(s) for s in volume.spacing]}


def otsu_threshold(a: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of the values of ``a`` (maximum between-class variance, ``bins`` bins)."""
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return hi
    h, edges = np.histogram(a, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(h).astype(float)
    w1 = w0[-1] - w0
    s0 = np.cumsum(h * centres)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def looks_skull_stripped(feat: dict) -> bool:
    return feat["nonzero_l"] < STRIPPED_MAX_L and feat["dark_zero_share"] >= STRIPPED_ZERO_SHARE


@dataclass
class InputCheck:
    """What differs between the inputs and the checkpoint's training data.

    expects : :func:`expectations` of the checkpoint. features : ``{"fixed": ..., "moving": ...}``
    (:func:`image_features`). warnings : one line per difference, naming the checkpoint.
    """

    checkpoint: str
    expects: dict
    features: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "expects": dict(self.expects), "features": self.features,
                "warnings": list(self.warnings)}


def check_inputs(fixed: Volume, moving: Volume, ckpt: dict, checkpoint_name: str,
                 modality: Optional[dict] = None) -> InputCheck:
    """Compare the pair with what checkpoint ``ckpt`` was trained on.

    Parameters
    ----------
    fixed, moving : Volume
        The pair as given (each on its own grid).
    ckpt : dict
        The loaded checkpoint (its ``expects`` / ``training`` records are read).
    checkpoint_name : str
        Named in every warning (e.g. ``"weakly.pt"``).
    modality : dict, optional
        :meth:`app.engine.modality.ModalityDecision.to_dict` of the pair (a multimodal pair is named).
    """
    from .modality import modality_from_name
    exp = expectations(ckpt)
    out = InputCheck(checkpoint_name, exp)
    if not exp:
        return out
    trained = exp.get("data") or "its training data"
    diffs: list[str] = []
    for role, vol in (("fixed", fixed), ("moving", moving)):
        f = image_features(vol)
        out.features[role] = f
        what = []
        if exp.get("skull") and looks_skull_stripped(f):
            what.append(f"looks skull-stripped ({f['nonzero_l']:.2f} L of non-zero voxels, "
                        f"{100 * f['dark_zero_share']:.0f} % of the background exactly 0)")
        sp = exp.get("spacing_mm")
        if sp:
            ratio = max(max(s / sp, sp / s) for s in f["spacing_mm"])
            if ratio >= SPACING_RATIO:
                vox = " x ".join(f"{s:.2g}" for s in f["spacing_mm"])
                what.append(f"has {vox} mm voxels (trained on {sp:g} mm)")
        if exp.get("non_negative") and f["negative_share"] >= NEGATIVE_SHARE:
            what.append(f"has negative intensities ({100 * f['negative_share']:.0f} % of voxels, min {f['min']:.0f}: "
                        "CT in HU or a signed image?)")
        tag = modality_from_name(vol.name)
        if exp.get("modality") and tag and tag != exp["modality"]:
            what.append(f"is named as {tag} (trained on {exp['modality']})")
        if what:
            diffs.append(f"the {role} image {' and '.join(what)}")
    if modality and modality.get("multimodal"):
        diffs.append(f"the pair looks multimodal ({modality.get('reason', '')}); the model was trained on "
                     f"{exp.get('modality') or 'one'}-{exp.get('modality') or 'modality'} pairs")
    if diffs:
        out.warnings.append(f"input unlike the training data of {checkpoint_name} ({trained}): " + "; ".join(diffs)
                            + ". The result may be worse than for such data; check it.")
    return out
