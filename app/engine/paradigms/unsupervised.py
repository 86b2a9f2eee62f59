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

from ..training.config import LoopConfig
from ..types import LabelMap, Landmarks, ProgressFn, RegistrationResult, Transform, Volume
from .base import param


@dataclass
class UnsupervisedParams:
    diffeomorphic: bool = param(False, "use the diffeomorphic (scaling and squaring) model when the bundled "
                                       "checkpoint is used")
    stages: str = param("affine+deformable", "run the learned affine stage only, or affine then deformable",
                        choices=("affine", "affine+deformable"))


@dataclass
class UnsupervisedTrainConfig(LoopConfig):
    """Training options of the two-stage model (``main.py train --paradigm unsupervised``);
    the trainer is :class:`app.engine.training.twostage.TwoStageTrainer`."""

    stage: str = param("joint", "what to train: the affine net, the deformable net (affine frozen), both, or "
                                "'refine': a 2 mm residual net on top of init's frozen stages",
                       choices=("affine", "deformable", "joint", "refine"))
    diffeomorphic: bool = param(False, "deformable stage predicts a stationary velocity (scaling and squaring)")
    grid: str = param("45x60x60", "working grid z x y x x (voxels)")
    spacing_mm: float = param(4.0, "working grid spacing (isotropic, mm)", range=(0.25, 32.0))
    affine_kind: str = param("flow", "affine stage: 'flow' (coarse U-Net flow + least-squares affine fit) or "
                                     "'regression' (CNN regressing the 12 parameters)", choices=("flow", "regression"))
    affine_iterations: int = param(0, "recursive applications of the affine net (training draws 1..N at random); "
                                      "0: the affine checkpoint's own number (init / init_affine), else 1",
                                   range=(0, 8))
    init_affine: str = param("", "checkpoint whose affine stage replaces the one from init")
    affine_channels: str = param("8,16,32,32,32", "regression affine net: channels per stride-2 level")
    affine_pool: int = param(2, "affine net: average-pool its inputs by this factor first", range=(1, 4))
    w_affine_dense: float = param(1.0, "flow affine net: weight of the similarity of its dense (pooled) warp "
                                       "(+ w_smooth x its smoothness), which teaches the flow quickly", range=(0.0, 1e4))
    enc: str = param("8,16,32,32", "U-Net encoder channels per level")
    dec: str = param("32,32,16", "U-Net decoder channels (coarsest first, down to out_level)")
    out_level: int = param(1, "field resolution level of the U-Net (0 = working grid, 1 = half)", range=(0, 4))
    int_steps: int = param(7, "scaling-and-squaring steps (diffeomorphic)", range=(0, 12))
    similarity: str = param("lncc", "image similarity", choices=("lncc", "mse", "mi"))
    lncc_window: int = param(5, "local NCC window (voxels of the working grid, odd)", range=(1, 21))
    w_sim: float = param(1.0, "weight of the image similarity", range=(0.0, 1e4))
    w_affine_sim: float = param(1.0, "joint stage: weight of the affine-stage similarity", range=(0.0, 1e4))
    w_smooth: float = param(1.0, "weight of the gradient-L2 regulariser (voxels^2)", range=(0.0, 1e4))
    w_adv: float = param(0.0, "deformable stage: weight of the adversarial deformation regulariser (a discriminator "
                              "trained to tell the predicted fields from smooth random ones, Hu et al. 2018); 0: off",
                         range=(0.0, 1e4))
    adv_lr: float = param(1e-4, "Adam learning rate of the discriminator (w_adv > 0)", range=(1e-7, 1.0))
    aug_rot_deg: float = param(10.0, "augmentation: max rotation per axis (degrees)", range=(0.0, 180.0))
    aug_scale: float = param(0.1, "augmentation: max relative scaling", range=(0.0, 0.5))
    aug_trans_mm: float = param(10.0, "augmentation: max translation per axis (mm)", range=(0.0, 100.0))
    aug_intensity: bool = param(True, "augmentation: random gamma, scale and noise")
    refine_enc: str = param("8,16,32,32", "refine stage: encoder channels (level 0 on the working grid, inputs "
                                          "folded from the 2x finer grid)")
    refine_dec: str = param("32,32,16,16", "refine stage: decoder channels, coarsest first (as many as refine_enc)")
    refine_warm: bool = param(True, "refine stage: start the refinement U-Net from init's deformable U-Net when "
                                    "their channels match (heads at zero)")
    refine_int_steps: int = param(6, "refine stage: scaling-and-squaring steps (diffeomorphic)", range=(0, 12))
    refine_crop: int = param(64, "refine stage: side of the random block of the fine grid trained per step "
                                 "(voxels, a multiple of 16; 0: whole grid)", range=(0, 1024))
    aug_skullstrip: float = param(0.0, "refine stage: probability of skull stripping each image (brain mask from "
                                       "the labels, random margin 1-6 mm)", range=(0.0, 1.0))
    aug_contrast: bool = param(False, "refine stage: random monotone intensity remap (half of the images)")
    aug_blur: float = param(0.0, "refine stage: probability of a random resolution loss (Gaussian blur "
                                 "0.5-1.5 voxels)", range=(0.0, 1.0))
    self_pairs: float = param(0.0, "affine/joint stages: fraction of pairs made of a subject and its own randomly "
                                   "transformed copy, whose known transform also supervises the affine stage "
                                   "(self-supervised: no labels)", range=(0.0, 1.0))
    w_selfsup: float = param(1.0, "weight of the self-supervised affine error (mean squared point error, cm^2)",
                             range=(0.0, 1e4))


class UnsupervisedRegistrar:
    """Learned affine + deformable registration trained on image pairs only."""

    key: ClassVar[str] = "unsupervised"
    Params: ClassVar[type] = UnsupervisedParams
    description: ClassVar[str] = ("Unsupervised end-to-end: learned affine + U-Net deformable (optionally "
                                  "diffeomorphic), trained with local NCC + smoothness")
    learned: ClassVar[bool] = True
    TrainConfig: ClassVar[type] = UnsupervisedTrainConfig
    trainer: ClassVar[str] = "app.engine.training.twostage:TwoStageTrainer"
    network_kinds: ClassVar[tuple[str, ...]] = ("two_stage",)

    def register(self, fixed: Volume, moving: Volume, params: Optional[UnsupervisedParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed``; labels and landmarks are only carried along (labels are
        warped when given). ``checkpoint`` None: the bundled one (``diffeomorphic`` picks which).
        ``initial`` (fixed -> moving points): the network sees the moving image resampled through it and
        the result is ``initial`` then the network's transform."""
        from ._learned import register_two_stage
        params = params or UnsupervisedParams()
        return register_two_stage(self.key, fixed, moving, params, checkpoint=checkpoint,
                                  variant="diffeomorphic" if params.diffeomorphic else "",
                                  deformable=params.stages != "affine", moving_labels=moving_labels,
                                  initial=initial, kinds=self.network_kinds, progress=progress, cancel=cancel, device=device)
