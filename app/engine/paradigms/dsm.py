"""Deep similarity metric (``dsm``): a learned patch similarity maximised by a conventional optimiser.

The first generation of deep registration (Cheng et al. 2016, Simonovsky et al. 2016): a small 3D
CNN (:class:`app.engine.nn.dsm_net.DsmNet`) scores whether a fixed patch and a moving patch show the
same place, whatever their contrasts; :func:`app.engine.optimise.optimise` maximises the mean score
of random patches (Adam, new patches every iteration) over a rigid, then optionally an affine model,
coarse to fine. Direction, as everywhere::

    warped(x) = moving(T(x)),   T = T0 . R [. A]      (fixed physical points -> moving points)

``T0`` is the centre-of-mass translation (or a pipeline's ``initial``). The fixed image is resampled
once onto an isotropic working grid of the checkpoint's finest spacing (same origin and direction),
the moving image is sampled on its own grid through the model (one interpolation); the final warped
image resamples the original moving image once.

:func:`app.engine.nn.dsm_net.similarity_map` shows where the network thinks the images disagree.
Training: :mod:`app.engine.training.dsm`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from ..training.config import LoopConfig
from ..types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                     check_cancel, params_to_dict)
from .base import param, parse_number_list, validate_params


@dataclass
class DsmParams:
    """Parameters of :class:`DsmRegistrar`."""

    stages: str = param("rigid", "models optimised in turn", choices=("rigid", "rigid+affine"))
    similarity: str = param("dsm", "dsm: the learned similarity; mi: mutual information with the same optimiser, "
                            "patches' grid and stages (the baseline it is measured against; no checkpoint)",
                            choices=("dsm", "mi"))
    levels: str = param("4,2,1", "pyramid shrink factors of the working grid, coarse to fine (8, 4, 2 mm for the "
                        "bundled 2 mm checkpoint: its 8 mm patches cover most of the head)")
    iterations: str = param("150,60,30", "Adam iterations per level (one number, or one per level); 150 at 8 mm: "
                            "with 60 there both dsm and MI ran out of steps beyond 60 deg of misalignment")
    coarse_learning_rate: float = param(3.0, "Adam step (mm) of the first (coarsest) level when there are several; "
                                        "0: learning_rate. A larger step there lets the coarse level travel "
                                        "farther in its iterations (a wider capture range at the same cost)",
                                        range=(0.0, 20.0))
    affine_iterations: int = param(30, "Adam iterations of the affine stage (finest level)", range=(1, 5000))
    patches: int = param(96, "random patches scored per iteration", range=(8, 65536))
    coarse_patches: int = param(32, "patches scored per iteration at the first (coarsest) level when there are "
                                "several; 0: patches. At 8 mm a 17-voxel patch covers most of the head, so a few "
                                "patches tell as much as many, and each iteration there is cheaper",
                                range=(0, 65536))
    coarse_restarts: int = param(3, "runs of the first (coarsest) level at most (1: one run): a run after the first "
                                 "starts from the start turned by restart_deg about a new axis (about the fixed centre "
                                 "of mass), with new patches; the run whose result scores best on a fixed lattice of "
                                 "patches is kept. dsm stops as soon as a run scores below restart_loss (the network's "
                                 "P says the images correspond); mi, whose value has no such scale, makes every run. "
                                 "3 (vs 1) on held-out cases at 90-105 deg: dsm 3/10 (0/10), mi 6/10 (2/10); ~26 CPU s "
                                 "at small angles, ~40 where the coarse level does not land "
                                 "(bench/results/multimodal_restarts_*.md). Needs several levels and "
                                 "coarse_learning_rate > 0 (the coarsest level is run on its own)", range=(1, 16))
    restart_deg: float = param(30.0, "rotation (degrees) of the start of each coarse restart", range=(0.0, 180.0))
    restart_loss: float = param(0.02, "dsm: mean -log P(correspond) on the coarse lattice below which the coarse "
                                "level is taken as landed (no restart); calibrated on the training subjects: ~0.004-"
                                "0.03 at the truth of T1 / T2 / FLAIR / T1POST pairs, 0.05-1.3 where the search stopped "
                                "far away", range=(0.0, 10.0))
    patch_sampling: str = param("random", "patch centres: random ones drawn anew every iteration, or a regular "
                                "lattice over the fixed foreground (at most `patches`, the same every iteration: "
                                "a deterministic landscape, full Adam steps)", choices=("random", "lattice"))
    learning_rate: float = param(1.0, "Adam step (mm; rotations scaled to mm at the head's radius)",
                                 range=(1e-3, 20.0))
    prealign: str = param("center_of_mass", "start: centres of mass onto each other, or as the images lie",
                          choices=("center_of_mass", "none"))
    seed: int = param(0, "seed of the patch sampling", range=(0, 2**31 - 1))
    similarity_map: bool = param(True, "also compute the network's agreement map at the result (P that the fixed "
                                 "and warped patches correspond, on the fixed grid; shown as an overlay)")


@dataclass
class DsmTrainConfig(LoopConfig):
    """Training options of ``dsm`` (``main.py train --paradigm dsm``); trainer
    :class:`app.engine.training.dsm.DsmTrainer`."""

    steps: int = param(3000, "total optimisation steps", range=(1, 10_000_000))
    batch_size: int = param(48, "patch pairs per step", range=(1, 4096))
    lr: float = param(1e-3, "Adam learning rate", range=(1e-7, 1.0))
    val_every: int = param(250, "validate every N steps (0: only at the end)", range=(0, 10_000_000))
    ckpt_every: int = param(250, "write the checkpoint every N steps (0: only at the end)", range=(0, 10_000_000))
    patch: int = param(17, "patch size (voxels, odd)", range=(5, 65))
    channels: str = param("8,16,32", "channels of the three conv blocks")
    spacing_mm: str = param("2,4", "isotropic spacings the patches are cut at (mm), one per pyramid level")
    max_offset: int = param(8, "largest displacement of a negative patch (voxels per axis)", range=(3, 32))
    target_sigma: str = param("1", "width (voxels) of the soft target exp(-msd / 2 sigma^2), one number or one "
                              "per spacing: wider at a coarse spacing grades the score over larger misalignments")
    target_shape: str = param("gaussian", "fall-off of the soft target with the misalignment, one or one per spacing: "
                              "gaussian exp(-msd / 2 sigma^2), or cauchy 1 / (1 + msd / 2 sigma^2) (the same peak, "
                              "a heavy tail: the score keeps ranking large misalignments, a wider basin)")
    rotate_fraction: float = param(0.0, "share of displaced samples whose moving patch is also rotated about "
                                   "its centre (target from the mean squared displacement of its voxels)",
                                   range=(0.0, 1.0))
    max_rotation_deg: float = param(45.0, "largest rotation of a rotated moving patch (degrees)",
                                    range=(0.0, 180.0))
    frame_fraction: float = param(0.0, "share of samples cut in a randomly rotated frame: both patches sampled "
                                  "along rotated axes (the same anatomy seen at another head orientation, as a "
                                  "fixed image in any pose shows it; the target is unchanged by the frame)",
                                  range=(0.0, 1.0))
    max_frame_deg: float = param(180.0, "largest rotation of the sampling frame (degrees)", range=(0.0, 180.0))
    pose_weight: float = param(0.0, "weight of the whole-image pose ranking term (0: off): at the coarsest spacing, "
                               "the mean score of the same fixed patches must be higher at a pose nearer the truth "
                               "on a straight path from a random rigid misalignment (the landscape the coarse "
                               "rigid search climbs; single-patch targets do not see its local minima)",
                               range=(0.0, 100.0))
    pose_pairs: int = param(2, "pose pairs (near, far) per step", range=(1, 64))
    pose_patches: int = param(24, "fixed patch centres shared by the two poses of a pair", range=(1, 512))
    pose_max_deg: float = param(120.0, "largest rotation of a far pose (degrees, random axis)", range=(1.0, 180.0))
    pose_max_mm: float = param(60.0, "largest translation of a far pose (mm)", range=(0.0, 500.0))
    pose_temperature: float = param(0.05, "scale of the logistic ranking loss on the difference of mean "
                                    "log-scores (near - far)", range=(1e-4, 10.0))
    pose_hard: str = param("", "JSON of hard poses (python -m app.engine.training.dsm_poses): where the coarse "
                           "rigid search of a network stopped short on training subjects; their pose pairs lie "
                           "on the path from that stop to the truth (empty: random poses only)")
    pose_hard_fraction: float = param(0.5, "share of the pose pairs drawn from pose_hard", range=(0.0, 1.0))
    multimodal_root: str = param("/work/shared/data/multimodal", "folder of aligned multimodal subjects")
    train_subjects: str = param("ms_cross_sectional_patient07,brats_tcga_du_7294",
                                "aligned subjects trained on (comma separated folder names)")
    val_subjects: str = param("ms_cross_sectional_patient19", "held-out aligned subjects for validation")
    ixi_subjects: int = param(8, "IXI training T1 images given random intensity remappings as a second "
                                 "modality (0: none)", range=(0, 10_000))
    synthetic_fraction: float = param(0.3, "share of samples from the remapped IXI images", range=(0.0, 1.0))
    ixi_strip: float = param(0.0, "share of the remapped IXI samples cut from the skull-stripped image (the "
                             "subject's brain labels, dilated by 2 mm): brains of many shapes, as skull-stripped "
                             "multimodal scans show them (the aligned training subjects are two brains)",
                             range=(0.0, 1.0))
    aug_intensity: bool = param(True, "random gamma per patch")


class DsmRegistrar:
    """Rigid (and affine) registration maximising a learned multimodal patch similarity."""

    key: ClassVar[str] = "dsm"
    Params: ClassVar[type] = DsmParams
    description: ClassVar[str] = ("Deep similarity metric (multimodal): a CNN scores whether patches correspond; "
                                  "the torch optimiser maximises it over rigid -> affine")
    learned: ClassVar[bool] = True
    TrainConfig: ClassVar[type] = DsmTrainConfig
    trainer: ClassVar[str] = "app.engine.training.dsm:DsmTrainer"
    network_kinds: ClassVar[tuple[str, ...]] = ("dsm",)

    def register(self, fixed: Volume, moving: Volume, params: Optional[DsmParams] = None, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult:
        """Register ``moving`` onto ``fixed`` (labels are only carried along).

        ``checkpoint`` None: the bundled ``resources/checkpoints/dsm.pt``; one of another paradigm is
        refused; a 2D image or a vector image is refused (ValueError). A pair that looks like one
        modality gets a warning through ``progress`` (the network was trained on multimodal pairs).
        Every stage (start, prealigned, rigid, affine) is measured on the fixed grid
        (:func:`app.engine.stagecheck.guard_learned`): one that made the pair worse is dropped, the
        better earlier stage's transform is the result, a warning names it (``result.checks``).
        """
        import torch  # noqa: F401  (the optimiser needs it; keeps the module import cheap)
        from .. import checkpoints, modality
        from ..datasets import center_of_mass
        from ..nn import dsm_net  # noqa: F401  (registers the "dsm" similarity)
        from ..optimise import optimise
        from ..spatial import resample
        from ..training.dsm import to_isotropic
        from ._learned import load_model

        p = params if params is not None else DsmParams()
        validate_params(p)
        for v, name in ((fixed, "fixed"), (moving, "moving")):
            if v.is_vector or min(v.shape) < 4:
                raise ValueError(f"{name} image '{v.name}' has shape {v.array.shape}: dsm registers scalar 3D "
                                 f"volumes (not 2D images, thin slabs or vector images)")
        levels = list(parse_number_list(p.levels, int, "levels"))
        iters = list(parse_number_list(p.iterations, int, "iterations"))
        if min(levels) < 1 or max(levels) > 32 or min(iters) < 0:
            raise ValueError(f"levels must be shrink factors 1..32 and iterations >= 0, got {p.levels!r} / "
                             f"{p.iterations!r}")
        if len(iters) == 1:
            iters = iters * len(levels)
        if len(iters) != len(levels):
            raise ValueError(f"iterations gives {len(iters)} numbers for {len(levels)} levels")
        t_start = time.perf_counter()
        check_cancel(cancel)

        def say(text: str, fraction: float) -> None:
            if progress:
                progress(Progress("setup", 0, 0, float("nan"), fraction, text))

        if p.similarity == "dsm":
            ckpt = load_model(self.key, checkpoint, kinds=self.network_kinds)
            spacing = float(min(ckpt["preprocessing"].get("spacing_mm", [2.0])))
            opts = {"net": ckpt["model"], "patches": p.patches, "seed": p.seed, "sampling": p.patch_sampling}
        else:
            ckpt, spacing, opts = None, 2.0, {}
        decision = modality.detect(fixed, moving, "auto", initial)
        warnings = []
        if p.similarity == "dsm" and not decision.multimodal and decision.source in ("names", "intensity"):
            warnings.append(f"this pair looks like one modality ({decision.reason}); the dsm checkpoint was "
                            "trained on multimodal pairs: iterative or instance suit it better")
        if p.similarity == "dsm":
            off = modality.untrained_modality_warning(fixed.name, moving.name, modality.checkpoint_modalities(ckpt))
            if off:
                warnings.append(off)
        fixed_w = to_isotropic(fixed, spacing)
        if p.similarity == "dsm":
            # a level whose grid cannot hold a patch is dropped (small fields of view, e.g. a spine crop)
            patch = ckpt["model"].patch
            keep = [i for i, f in enumerate(levels) if min(round(s / f) for s in fixed_w.shape) >= patch + 2]
            if not keep:
                raise ValueError(f"the fixed image ({fixed_w.shape} voxels of {spacing:g} mm) is smaller than one "
                                 f"{patch}-voxel patch of the dsm network")
            if len(keep) < len(levels):
                warnings.append(f"levels {[levels[i] for i in range(len(levels)) if i not in keep]} dropped: "
                                "the image is too small for the network's patches there")
            levels, iters = [levels[i] for i in keep], [iters[i] for i in keep]
        say("dsm: " + ("; ".join(warnings) if warnings else f"multimodal pair ({decision.reason})"), 0.0)
        if initial is not None:
            start = initial
        elif p.prealign == "center_of_mass":
            import SimpleITK as sitk
            shift = np.asarray(center_of_mass(moving)) - np.asarray(center_of_mass(fixed))
            start = Transform(sitk.TranslationTransform(3, tuple(float(s) for s in shift)), "rigid")
        else:
            start = Transform.identity()
        prealigned = start
        timings = {"prepare": time.perf_counter() - t_start}
        stages = p.stages.split("+")
        n_aff = p.affine_iterations if "affine" in stages else 0
        # the coarsest level may take larger steps (coarse_learning_rate) and restarts; then the others from its result
        split = 1 if p.coarse_learning_rate > 0 and len(levels) > 1 else 0
        n_runs = p.coarse_restarts if split else 1
        total = sum(iters) + (n_runs - 1) * sum(iters[:split]) + n_aff
        t0 = time.perf_counter()
        history = []
        coarse_opts = {**opts, "patches": p.coarse_patches} if opts and p.coarse_patches else opts
        restarts = []
        if split:
            r, restarts = self._coarse_search(p, fixed_w, moving, start, levels[0], iters[0], coarse_opts,
                                              n_runs, total, progress, cancel, device)
            history += list(r.history)
            start = r.transform
        done = sum(iters[:split]) * n_runs
        if levels[split:]:
            r = optimise(fixed_w, moving, "rigid", initial=start, similarity=p.similarity, sim_options=opts,
                         levels=levels[split:], iterations=iters[split:], optimizer="adam", lr=p.learning_rate,
                         percentile=99.0, progress=progress, cancel=cancel, device=device, stage="rigid",
                         fraction=(done / total, (done + sum(iters[split:])) / total))
            history += list(r.history)
        timings["rigid"] = time.perf_counter() - t0
        transform = r.transform
        rigid = transform
        if n_aff:
            t0 = time.perf_counter()
            r = optimise(fixed_w, moving, "affine", initial=transform, similarity=p.similarity, sim_options=opts,
                         levels=(1,), iterations=(n_aff,), optimizer="adam", lr=p.learning_rate * 0.5,
                         percentile=99.0, progress=progress, cancel=cancel, device=device, stage="affine",
                         fraction=((total - n_aff) / total, 1.0))
            history += r.history
            transform = r.transform
            timings["affine"] = time.perf_counter() - t0
        check_cancel(cancel)
        # never worse than its start (issue 11): every stage measured on the fixed grid, the better kept
        # (app.engine.stagecheck). similarity=mi has no checkpoint: an empty one has no expectations, so the
        # input check is a no-op and only the stage check runs (the bundled dsm checkpoint names none either)
        from ..stagecheck import guard_learned
        checked = [("start", initial if initial is not None else Transform.identity())]
        checked += [("prealigned", prealigned)] if initial is None and p.prealign == "center_of_mass" else []
        checked += [("rigid", rigid)] + ([("affine", transform)] if n_aff else [])
        kept, checks, more = guard_learned(fixed, moving, checked, ckpt if ckpt is not None else {},
                                           checkpoints.checkpoint_id(ckpt).split("@")[0] if ckpt is not None
                                           else "no checkpoint (similarity=mi)")
        warnings += more
        transform = dict(checked)[kept]
        timings["checks"] = checks["seconds"]
        t0 = time.perf_counter()
        warped = resample(moving, fixed, transform, "linear")
        warped_labels = resample(moving_labels, fixed, transform, "nearest") if moving_labels is not None else None
        timings["resample"] = time.perf_counter() - t0
        sim_map = None
        if p.similarity == "dsm" and p.similarity_map:
            t0 = time.perf_counter()
            sim_map = agreement_map(ckpt["model"], fixed, moving, transform, spacing)
            timings["similarity_map"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        if progress:
            progress(Progress("done", total, total, history[-1]["loss"] if history else float("nan"), 1.0,
                              "dsm registration finished"))
        return RegistrationResult(transform=transform, warped=warped, field=None, history=history,
                                  timings=timings, device=r.device, paradigm=self.key,
                                  params={**params_to_dict(p), "modality": decision.to_dict(),
                                          "warnings": warnings, "coarse_runs": restarts},
                                  checkpoint_id=checkpoints.checkpoint_id(ckpt) if ckpt is not None else None,
                                  warped_labels=warped_labels, warnings=list(warnings), similarity_map=sim_map,
                                  checks=checks)

    def _coarse_search(self, p: DsmParams, fixed_w: Volume, moving: Volume, start: Transform, shrink: int,
                       iterations: int, opts: dict, n_runs: int, total: int, progress, cancel, device):
        """The first (coarsest) pyramid level, restarted up to ``n_runs`` times; returns (the kept
        optimisation result, one record per run: start rotation, lattice loss, seconds; empty for one run).

        Run k > 0 starts from ``start . R_k`` (``x -> start(R_k x)``, any ``start``: a pipeline's affine or
        deformable one too): ``R_k`` turns the fixed image by ``restart_deg`` about a seeded random axis
        through the fixed centre of mass (the same axes for dsm and mi), and draws new patches (dsm:
        ``seed + k``). Every result is scored with the same similarity on a fixed lattice of patch centres
        (:func:`app.engine.optimise_probes.similarity_profile`: like with like; through the result's matrix
        when it is linear, else on the moving image resampled through it); the lowest loss is kept (a NaN
        loss counts as the worst). dsm stops once a run's loss is below ``restart_loss``: its score is a
        probability of correspondence, so a low loss says the level landed; mi makes every run.
        """
        from ..datasets import center_of_mass
        from ..optimise import optimise
        from ..optimise_probes import similarity_profile
        from ..spatial import resample
        from ..synthetic import about_centre, axis_angle_matrix, matrix_to_transform

        def run(k: int, init: Transform, o: dict):
            done = k * iterations
            return optimise(fixed_w, moving, "rigid", initial=init, similarity=p.similarity, sim_options=o,
                            levels=(shrink,), iterations=(iterations,), optimizer="adam", lr=p.coarse_learning_rate,
                            percentile=99.0, progress=progress, cancel=cancel, device=device, stage="rigid",
                            fraction=(done / total, (done + iterations) / total))

        if n_runs == 1:
            return run(0, start, opts), []
        lattice = {**opts, "sampling": "lattice"} if opts else {}

        def score(t: Transform) -> float:
            m = linear_matrix(t)
            if m is not None:
                loss = similarity_profile(fixed_w, moving, [m], similarity=p.similarity, sim_options=lattice,
                                          level=shrink, device=device)[0]
            else:
                warped = resample(moving, fixed_w, t, "linear")
                loss = similarity_profile(fixed_w, warped, [np.eye(4)], similarity=p.similarity,
                                          sim_options=lattice, level=shrink, device=device)[0]
            return float(loss) if np.isfinite(loss) else float("inf")

        centre = np.asarray(center_of_mass(fixed_w), float)
        rng = np.random.default_rng(p.seed + 7919)
        best, best_loss, runs = None, np.inf, []
        for k in range(n_runs):
            check_cancel(cancel)
            t_run = time.perf_counter()
            init, o = start, opts
            axis = rng.normal(size=3)           # drawn for every run: the axes do not depend on when dsm stops
            if k > 0:
                turn = about_centre(axis_angle_matrix(axis / np.linalg.norm(axis), p.restart_deg), centre)
                s0 = linear_matrix(start)
                # warped(x) = moving(start(R_k x)): one matrix when the start is linear (the model folds it in)
                init = (Transform(matrix_to_transform(s0 @ turn).itk) if s0 is not None
                        else start.then(Transform(matrix_to_transform(turn).itk)))
                o = {**opts, "seed": int(opts["seed"]) + k} if opts else opts
            r = run(k, init, o)
            loss = score(r.transform)
            runs.append({"run": k, "start_deg": 0.0 if k == 0 else float(p.restart_deg), "lattice_loss": loss,
                         "seconds": round(time.perf_counter() - t_run, 2)})
            if best is None or loss < best_loss:
                best, best_loss = r, loss
            if p.similarity == "dsm" and loss < p.restart_loss:
                break
        kept = next(i for i, x in enumerate(runs) if x["lattice_loss"] == best_loss)
        for i, rec in enumerate(runs):
            rec["kept"] = i == kept
        if progress:
            progress(Progress("setup", 0, 0, best_loss, (n_runs * iterations) / total,
                              f"dsm: {len(runs)} coarse run(s), kept run {kept} (lattice loss {best_loss:.4f})"))
        return best, runs


def linear_matrix(t: Transform):
    """The 4x4 matrix (fixed -> moving points, LPS mm) of ``t`` when every part of it is linear (a
    composite of linear transforms included), else None (a displacement or B-spline part)."""
    import SimpleITK as sitk
    from ..synthetic import transform_to_matrix
    from ..types import _infer_kind
    parts = ([t.itk.GetNthTransform(i) for i in range(t.itk.GetNumberOfTransforms())]
             if isinstance(t.itk, sitk.CompositeTransform) else [t.itk])
    if all(_infer_kind(q) in ("identity", "rigid", "affine") for q in parts):
        return transform_to_matrix(Transform(t.itk, "affine"))
    return None


def agreement_map(net, fixed: Volume, moving: Volume, transform: Transform, spacing_mm: float,
                  stride: int = 4) -> Volume:
    """The network's agreement map of a result, on the fixed grid.

    ``fixed`` and ``moving`` warped through ``transform`` (fixed -> moving points) are brought onto
    the isotropic working grid of ``spacing_mm`` (as the optimiser saw them: clipped at the 99th
    percentile, scaled to [0, 1]), :func:`app.engine.nn.dsm_net.similarity_map` scores patches every
    ``stride`` voxels, and the map is resampled (nearest) onto the fixed grid.

    Returns
    -------
    Volume ``(z, y, x)`` on the fixed grid (its spacing, origin, direction; LPS), P(correspond) in
    [0, 1]; NaN where no patch of the working grid fits (the image border) and on the fixed
    background (working-grid intensity <= 5 % of its [min, p99] range).
    """
    import SimpleITK as sitk
    from ..datasets import normalize_intensity
    from ..nn.dsm_net import similarity_map
    from ..spatial import resample
    from ..training.dsm import to_isotropic

    fixed_w = to_isotropic(fixed, spacing_mm)
    warped_w = resample(moving, fixed_w, transform, "linear")
    f_n = normalize_intensity(fixed_w.array)
    # background patches carry nothing to compare and cost most of the time: score the foreground
    # (the optimiser's patch rule: fixed > 0.05 after normalisation)
    prob = similarity_map(net, f_n, normalize_intensity(warped_w.array), stride, mask=f_n > 0.05)
    r = net.patch // 2
    valid = np.zeros(prob.shape, bool)
    valid[tuple(slice(r, n - r) for n in prob.shape)] = True
    # a scored block reaches past the head's edge: keep the map on the fixed foreground only (decided on
    # the smoothed working grid: the native grid's interpolation ringing can put its minimum far below 0)
    prob = np.where(valid & np.isfinite(prob) & (f_n > 0.05), prob, -1.0).astype(np.float32)
    img = fixed_w.with_array(prob).to_sitk(sitk.sitkFloat32)
    on_fixed = sitk.Resample(img, fixed.to_sitk(sitk.sitkFloat32), sitk.Transform(), sitk.sitkNearestNeighbor,
                             -1.0, sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(on_fixed)
    a[a < 0] = np.nan
    return fixed.with_array(a.astype(np.float32), f"dsm agreement ({fixed.name})")
