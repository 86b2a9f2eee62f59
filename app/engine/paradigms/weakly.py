"""Weakly supervised registration: the unsupervised two-stage model trained with label overlap too.

    warped(x) = moving(T(x)),   T(x) = A(x + u(x))   (fixed physical points -> moving points)

Same networks and pipeline as :mod:`.unsupervised`; during training a soft Dice loss on warped
segmentations (random subsets of the 148 DLMUSE labels) is added to the image similarity (``dual``
supervision) and the smoothness penalty. Labels are needed only in training: at inference the
model sees the two images alone (moving labels, when given, are just warped along).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar, Optional

from ..types import LabelMap, Landmarks, ProgressFn, RegistrationResult, Transform, Volume
from .base import param
from .unsupervised import UnsupervisedTrainConfig


@dataclass
class WeaklyParams:
    stages: str = param("affine+deformable", "run the learned affine stage only, or affine then deformable",
                        choices=("affine", "affine+deformable"))


@dataclass
class WeaklyTrainConfig(UnsupervisedTrainConfig):
    """The two-stage training options plus the label loss (``main.py train --paradigm weakly``)."""

    dual: bool = param(True, "image similarity in addition to the label Dice loss")
    w_dice: float = param(1.0, "weight of the Dice loss on warped labels", range=(0.0, 1e4))
    dice_labels: int = param(32, "labels drawn at random per step for the Dice loss", range=(1, 256))


class WeaklyRegistrar:
    """Learned affine + deformable registration trained with images and label maps."""

    key: ClassVar[str] = "weakly"
    Params: ClassVar[type] = WeaklyParams
    description: ClassVar[str] = ("Weakly supervised: learned affine + U-Net deformable trained with "
                                  "label Dice + local NCC (labels only needed for training)")
    learned: ClassVar[bool] = True
    TrainConfig: ClassVar[type] = WeaklyTrainConfig
    trainer: ClassVar[str] = "app.engine.training.twostage:TwoStageTrainer"
    network_kinds: ClassVar[tuple[str, ...]] = ("two_stage",)

    def register(self, fixed: Volume, moving: Volume, params: Optional[WeaklyParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (labels are not used to register; moving labels are warped);
        ``initial`` as in :meth:`UnsupervisedRegistrar.register`."""
        from ._learned import register_two_stage
        params = params or WeaklyParams()
        return register_two_stage(self.key, fixed, moving, params, checkpoint=checkpoint,
                                  deformable=params.stages != "affine", moving_labels=moving_labels,
                                  initial=initial, kinds=self.network_kinds, progress=progress, cancel=cancel, device=device)
