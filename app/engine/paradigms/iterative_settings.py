"""What the ``iterative`` paradigm runs for a pair: the settings chosen from its parameters and the
modality decision (:func:`app.engine.modality.detect`).

A multimodal pair gets Mattes MI, no histogram matching, no Otsu fixed mask, 13 rotated rigid
starts, a B-spline deformable stage (mesh at most 6, without the full-resolution level) and the
early stop of its affine / B-spline stages; one modality gets the parameters as given
(``deformable='auto'`` -> diffeomorphic demons). :func:`choose_settings` makes the choice (the dict
kept in ``result.params['chosen']``), :func:`_run_params` turns it into the parameters the stages
read, :func:`describe_settings` into one line for people. Measured on ``bench/bench_multimodal.py``
(``bench/results/multimodal.md``).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .iterative_run import _parse_levels

if TYPE_CHECKING:
    from .. import modality
    from .iterative import IterativeParams

MULTIMODAL_RIGID_STARTS = 13
MULTIMODAL_BSPLINE_MESH = 6   # finest B-spline mesh of deformable='auto' on a multimodal pair (at most)
_DEMONS_KEYS = ("demons", "symmetric_demons", "fast_symmetric_demons", "diffeomorphic_demons")


def choose_settings(p: IterativeParams, decision: "modality.ModalityDecision", has_labels: bool) -> dict:
    """The settings a run uses for its pair, from the parameters and the modality decision.

    One modality: the parameters as given (``deformable='auto'`` -> diffeomorphic demons). A
    multimodal pair: Mattes MI for the rigid/affine/B-spline stages, no histogram matching, no Otsu
    fixed mask (measured: it lets the affine stage inflate the scale, and it narrows the capture
    range; a labels mask is kept), B-spline for ``deformable='auto'``. An explicit demons choice is
    kept with a warning (demons compare raw intensities).

    Returns
    -------
    dict with ``multimodal``, ``source``, ``reason``, ``evidence`` (the decision), ``metric``,
    ``histogram_match``, ``mask`` ('otsu', 'labels' or 'none'), ``deformable``, ``early_stop`` (the
    affine / B-spline stages stop after their coarsest level when it does not improve: see
    ``IterativeParams.early_stop``), ``notes`` (lines for people) and ``guards`` (filled by the run: one
    record per guarded stage).
    """
    multi = bool(decision.multimodal)
    notes: list[str] = []
    metric = p.metric
    if multi and metric != "mattes":
        notes.append(f"metric {metric} compares intensities directly: Mattes MI used for the multimodal pair")
        metric = "mattes"
    if not p.use_mask:
        mask = "none"
    elif p.mask_from_labels and has_labels:
        mask = "labels"
    elif multi:
        mask = "none"
    else:
        mask = "otsu"
    deformable = p.deformable
    dlevels = p.deformable_levels
    mesh = p.bspline_mesh
    if deformable == "auto":
        deformable = "bspline" if multi else "diffeomorphic_demons"
        coarse = [f for f in _parse_levels(dlevels, "deformable_levels") if f > 1]
        if multi and coarse:
            # measured (2 mm T2 -> T1, bench_multimodal): the full-resolution level of an 8-node mesh
            # took 5x the time of the coarser two together for no gain (0.77 vs 1.14 mm)
            dlevels = ",".join(str(f) for f in coarse)
        if multi:
            # measured (2 mm, brats flair -> t1, the one bench case whose B-spline is kept): 6 nodes gained more
            # over all voxels than 8 (12.2 vs 11.7 %), ended closer to the truth (1.16-1.34 vs 1.40-1.75 mm) and
            # cost 0.6x (Mattes MI with a B-spline costs samples x control points per evaluation)
            mesh = min(mesh, MULTIMODAL_BSPLINE_MESH)
    elif multi and deformable in _DEMONS_KEYS and "deformable" in p.stages:
        notes.append(f"warning: {deformable} compares raw intensities and does not suit a multimodal pair "
                     "(deformable=bspline or auto does)")
    # measured (2 mm, bench_multimodal, training subjects): one start from the centres of mass fails
    # beyond ~20 degrees on multimodal pairs (5-18 mm at 30 degrees); 13 starts aligned all 9 cases
    starts = p.rigid_starts or (MULTIMODAL_RIGID_STARTS if multi else 1)
    # measured (bench_multimodal, 2 mm): on same-subject pairs the affine and B-spline stages ended worse than
    # their start over all voxels in 13 of 14 runs and were dropped after their finest level; their coarsest
    # level already said so. One modality: unchanged (off) unless asked
    early = p.early_stop == "on" or (p.early_stop == "auto" and multi)
    return {**decision.to_dict(), "metric": metric, "histogram_match": bool(p.histogram_match and not multi),
            "mask": mask, "deformable": deformable, "deformable_levels": dlevels, "rigid_starts": int(starts),
            "bspline_mesh": int(mesh), "early_stop": bool(early), "notes": notes, "guards": []}


def _run_params(p: IterativeParams, chosen: dict) -> IterativeParams:
    """The parameters a run works with: ``p`` with the chosen settings filled in."""
    return dataclasses.replace(p, metric=chosen["metric"], deformable=chosen["deformable"],
                               rigid_starts=chosen["rigid_starts"],
                               early_stop="on" if chosen.get("early_stop") else "off",
                               bspline_mesh=chosen.get("bspline_mesh", p.bspline_mesh),
                               deformable_levels=chosen["deformable_levels"],
                               histogram_match=chosen["histogram_match"], use_mask=chosen["mask"] != "none",
                               mask_from_labels=chosen["mask"] == "labels")


def describe_settings(chosen: dict) -> str:
    """One line for progress messages and the GUI: the decision and what it chose."""
    kind = "multimodal pair" if chosen["multimodal"] else "one modality"
    parts = [f"metric {chosen['metric']}", "histogram matching" if chosen["histogram_match"] else
             "no histogram matching", {"none": "no fixed mask", "otsu": "Otsu fixed mask",
                                       "labels": "fixed labels mask"}[chosen["mask"]],
             f"deformable {chosen['deformable']} (levels {chosen['deformable_levels']}"
             + (f", mesh {chosen['bspline_mesh']})" if chosen["deformable"] == "bspline" and "bspline_mesh" in chosen
                else ")")]
    if chosen.get("rigid_starts", 1) > 1:
        parts.insert(0, f"{chosen['rigid_starts']} rigid starts")
    if chosen.get("early_stop"):
        parts.append("early stop of affine / B-spline stages that do not improve")
    text = f"{kind} ({chosen['reason']}): " + ", ".join(parts)
    return "; ".join([text] + list(chosen["notes"]))
