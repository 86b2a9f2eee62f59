"""Unsupervised end-to-end registration (VoxelMorph / DLIR style), learned affine + deformable.

    warped(x) = moving(T(x)),   T(x) = A(x + u(x))   (fixed physical points -> moving points)

A strided CNN regresses the affine ``A`` from the pair (after a centre-of-mass prealignment,
applied recursively to its own result a few times), a small U-Net predicts the displacement ``u``
(or a stationary velocity integrated by scaling and squaring, ``diffeomorphic``) on a 4 mm working
grid. Training used images only: local NCC + smoothness, and for the affine stage also
self-supervision on randomly transformed copies of a subject. Native-space pairs need no
conventional prealignment. The bundled checkpoints' cards (``resources/checkpoints/*.md``) give
their measured Dice, folding and run time.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar, Optional

from ..types import LabelMap, Landmarks, ProgressFn, RegistrationResult, Volume
from .base import param


@dataclass
class UnsupervisedParams:
    diffeomorphic: bool = param(False, "use the diffeomorphic (scaling and squaring) model when the bundled "
                                       "checkpoint is used")
    stages: str = param("affine+deformable", "run the learned affine stage only, or affine then deformable",
                        choices=("affine", "affine+deformable"))


class UnsupervisedRegistrar:
    """Learned affine + deformable registration trained on image pairs only."""

    key: ClassVar[str] = "unsupervised"
    Params: ClassVar[type] = UnsupervisedParams
    description: ClassVar[str] = ("Unsupervised end-to-end: learned affine + U-Net deformable (optionally "
                                  "diffeomorphic), trained with local NCC + smoothness")
    learned: ClassVar[bool] = True

    def register(self, fixed: Volume, moving: Volume, params: Optional[UnsupervisedParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed``; labels and landmarks are only carried along (labels are
        warped when given). ``checkpoint`` None: the bundled one (``diffeomorphic`` picks which)."""
        from ._learned import register_two_stage
        params = params or UnsupervisedParams()
        return register_two_stage(self.key, fixed, moving, params, checkpoint=checkpoint,
                                  variant="diffeomorphic" if params.diffeomorphic else "",
                                  deformable=params.stages != "affine", moving_labels=moving_labels,
                                  progress=progress, cancel=cancel, device=device)
