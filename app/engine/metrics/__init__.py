"""Similarity and evaluation metrics on plain arrays.

Conventions (see ``types.py``):

* Image and label arrays are indexed ``(z, y, x)`` as ``SimpleITK.GetArrayFromImage`` returns
  them. Displacement fields are ``(z, y, x, 3)`` with the components in **xyz**, in mm.
* ``spacing`` is always given in ITK order **(x, y, z)** in mm, so the spacing along array
  axis 0 (z) is ``spacing[2]``. Internally it is reversed to ``(z, y, x)`` before it is used
  as ``sampling`` for array operations.
* Points are ``(N, 3)`` arrays of LPS millimetres, xyz.

Definitions follow the Learn2Reg evaluation (Dice and HD95 per label, SDlogJ, TRE in mm);
where a choice had to be made the docstring says which one. HD95 and SDlogJ come in two styles
(:data:`METRIC_STYLES`): ``"regstation"`` (default; HD95 as MONAI computes it over surface voxels,
SDlogJ = std log det J) and ``"learn2reg"`` (HD95 over area-weighted marching-cubes surfels as
DeepMind's surface-distance package used by Learn2Reg, SDlogJ = std log(det J + 3) as Learn2Reg's
script); see :func:`hd95_per_label` and :func:`jacobian_stats`. Entropies and mutual information
are in nats.

Modules: :mod:`.similarity` (image similarity), :mod:`.overlap` (Dice, Jaccard, HD95, ASSD),
:mod:`.deformation` (TRE, Jacobian determinant, folding, SDlogJ); everything is re-exported here.
"""
from __future__ import annotations

from .deformation import jacobian_determinant, jacobian_stats, tre
from .overlap import (METRIC_STYLES, assd_per_label, dice_per_label, hd95_per_label, jaccard_per_label,
                      summarize_dice)
from .similarity import local_ncc, mattes_mi, mse, mutual_information, ncc, psnr, ssim

__all__ = [
    "mse", "ncc", "local_ncc", "mutual_information", "mattes_mi", "ssim", "psnr",
    "dice_per_label", "jaccard_per_label", "hd95_per_label", "assd_per_label",
    "tre", "jacobian_determinant", "jacobian_stats", "summarize_dice", "METRIC_STYLES",
]
