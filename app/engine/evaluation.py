"""Register pairs and measure them: the one code path the CLI and the GUI share.

Metric conventions (Learn2Reg): Dice per label over the non-zero labels present in the *fixed*
label map (mean ignores nothing: an absent label scores 0); HD95 in mm per label; TRE in mm
between ``T(fixed landmark)`` and the moving landmark (``T`` maps fixed points to moving points,
so no inversion is needed); folding = fraction of fixed-grid voxels where the Jacobian determinant
of the full transform is <= 0 and SDlogJ = std of log(det), both with a 2-voxel border crop as in
Learn2Reg. HD95 and SDlogJ follow ``metric_style`` ("regstation" by default, or "learn2reg"; see
:func:`transform_metrics`). "before" uses the identity transform in
physical space (the images as they lie in the scanner's world coordinates).
"""
from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import metrics as M
from .jsonsafe import to_jsonable
from .spatial import jacobian_map, resample, transform_to_field
from .types import (Cancelled, LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult,
                    Transform, Volume, check_cancel, params_to_dict)

SUMMARY_KEYS = ("dice_mean", "hd95_mean", "tre_mean_mm", "fold_fraction", "sdlogj", "runtime_s")


def _on_fixed_grid(labels: Optional[LabelMap], fixed: Volume) -> Optional[LabelMap]:
    if labels is None or labels.same_grid(fixed):
        return labels
    return resample(labels, fixed, None, "nearest")


def transform_metrics(fixed: Volume, moving: Volume, transform: Transform, *,
                      field: Optional[Volume] = None, fixed_labels: Optional[LabelMap] = None,
                      moving_labels: Optional[LabelMap] = None, fixed_points: Optional[Landmarks] = None,
                      moving_points: Optional[Landmarks] = None, warped_labels: Optional[LabelMap] = None,
                      with_hd95: bool = True, metric_style: str = "regstation") -> dict[str, Any]:
    """Evaluate one transform (fixed points -> moving points) on one pair.

    ``metric_style`` picks the HD95 and SDlogJ definitions (:data:`app.engine.metrics.METRIC_STYLES`):
    ``"regstation"`` (default) or ``"learn2reg"`` (as Learn2Reg's evaluation code; see
    :func:`~app.engine.metrics.hd95_per_label` and :func:`~app.engine.metrics.jacobian_stats`).

    Returns a JSON-safe dict with ``dice_mean``, ``dice_per_label`` ({label id (str): Dice}),
    ``hd95_mean``, ``hd95_per_label``, ``tre_mean_mm``, ``tre_per_point_mm`` (and median/max),
    ``fold_fraction``, ``sdlogj``; label and landmark metrics are None when the inputs are absent.
    """
    out: dict[str, Any] = {"dice_mean": None, "dice_per_label": {}, "hd95_mean": None, "hd95_per_label": {},
                           "tre_mean_mm": None, "tre_median_mm": None, "tre_max_mm": None, "tre_per_point_mm": []}
    if fixed_labels is not None and moving_labels is not None:
        fl = _on_fixed_grid(fixed_labels, fixed)
        wl = warped_labels if warped_labels is not None else resample(moving_labels, fixed, transform, "nearest")
        dice = M.dice_per_label(fl.array, wl.array)
        out["dice_per_label"] = {str(int(k)): round(float(v), 6) for k, v in dice.items()}
        out["dice_mean"] = to_jsonable(float(M.summarize_dice(dice))) if dice else None
        if with_hd95:
            hd = M.hd95_per_label(fl.array, wl.array, fixed.spacing, style=metric_style)
            out["hd95_per_label"] = {str(int(k)): to_jsonable(float(v)) for k, v in hd.items()}
            vals = [v for v in hd.values() if np.isfinite(v)]
            out["hd95_mean"] = float(np.mean(vals)) if vals else None
    if fixed_points is not None and moving_points is not None:
        if len(fixed_points) != len(moving_points):
            raise ValueError(f"fixed and moving landmarks differ in count: {len(fixed_points)} vs {len(moving_points)}")
        t = M.tre(transform.transform_points(fixed_points.points), moving_points.points)
        out.update(tre_mean_mm=float(t["mean"]), tre_median_mm=float(t["median"]), tre_max_mm=float(t["max"]),
                   tre_per_point_mm=[round(float(v), 6) for v in t["per_point"]])
    if transform.kind == "identity":
        out.update(fold_fraction=0.0, sdlogj=0.0)
    else:
        fld = field if field is not None else transform_to_field(transform, fixed)
        js = M.jacobian_stats(jacobian_map(fld).array, border=2, style=metric_style)
        out.update(fold_fraction=float(js["fold_fraction"]), sdlogj=to_jsonable(float(js["sdlogj"])))
    return out


def register_and_measure(paradigm_key: str, fixed: Volume, moving: Volume, params=None, *,
                         fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                         fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                         checkpoint=None, device: str = "auto", progress: Optional[ProgressFn] = None,
                         cancel: Optional[threading.Event] = None,
                         with_hd95: bool = True, error_map: Optional[str] = None,
                         guide_fixed_points: Optional[Landmarks] = None,
                         guide_moving_points: Optional[Landmarks] = None, guide_method: str = "optimise",
                         metric_style: str = "regstation"
                         ) -> tuple[RegistrationResult, dict[str, Any]]:
    """Run paradigm or pipeline ``paradigm_key`` (``"A"`` or ``"A+B"``, :mod:`app.engine.pipeline`) on
    one pair and measure it before and after.

    ``params`` is a Params instance (single paradigm), a dict of overrides (strings are parsed;
    ``B.name`` for a pipeline's stage B), a list of one per stage, or None (defaults).
    ``guide_fixed_points`` / ``guide_moving_points``: landmark pairs the result must honour
    (:func:`app.engine.guidance.guided_correction` after the registration, by ``guide_method``
    'optimise' (image-aware, the default) or 'rbf'; kept apart from the evaluation landmarks). ``error_map``: 'dissimilarity', 'consistency' or 'tta' adds the estimated error map
    (:mod:`app.engine.errormap`) to the result and its summary to the metrics.
    Raises ValueError on bad input, :class:`~app.engine.types.Cancelled` when cancelled.
    """
    if fixed_points is not None and moving_points is not None and len(fixed_points) != len(moving_points):
        raise ValueError(f"fixed and moving landmarks differ in count: {len(fixed_points)} vs {len(moving_points)}")
    if metric_style not in M.METRIC_STYLES:
        raise ValueError(f"metric_style must be one of {', '.join(M.METRIC_STYLES)}, got {metric_style!r}")
    from .pipeline import make_stage_params, register_pipeline, stages_of
    keys = stages_of(paradigm_key)
    stage_params = make_stage_params(keys, params)
    fixed_labels = _on_fixed_grid(fixed_labels, fixed)
    check_cancel(cancel)
    t0 = time.perf_counter()
    result = register_pipeline(keys, fixed, moving, stage_params, fixed_labels=fixed_labels,
                               moving_labels=moving_labels, fixed_points=fixed_points, moving_points=moving_points,
                               checkpoint=checkpoint, progress=progress, cancel=cancel, device=device)
    guided = None
    if guide_fixed_points is not None or guide_moving_points is not None:
        if guide_fixed_points is None or guide_moving_points is None:
            raise ValueError("guided correction needs both guide landmark files (fixed and moving)")
        from .guidance import GUIDE_METHODS, guided_correction
        if guide_method not in GUIDE_METHODS:
            raise ValueError(f"guide method must be one of {', '.join(GUIDE_METHODS)}, got {guide_method!r}")
        if progress:
            progress(Progress("guidance", message=f"honouring {len(guide_fixed_points)} guide pairs ({guide_method})",
                              fraction=1.0))
        tg = time.perf_counter()
        t_new, f_new, guided = guided_correction(fixed, result.transform, guide_fixed_points, guide_moving_points,
                                                 field=result.field, method=guide_method, moving=moving,
                                                 progress=progress, cancel=cancel, device=device)
        result.transform, result.field = t_new, f_new
        result.warped = resample(moving, fixed, t_new, "linear")
        result.warped_labels = None
        result.timings = {**result.timings, "guidance": time.perf_counter() - tg}
    elapsed = time.perf_counter() - t0
    check_cancel(cancel)
    if progress:
        progress(Progress("evaluate", message="measuring Dice, HD95, TRE, Jacobian", fraction=1.0))
    kw = dict(fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_points=fixed_points,
              moving_points=moving_points, with_hd95=with_hd95, metric_style=metric_style)
    if moving_labels is not None and result.warped_labels is None:
        result.warped_labels = resample(moving_labels, fixed, result.transform, "nearest")
    after = transform_metrics(fixed, moving, result.transform, field=result.field,
                              warped_labels=result.warped_labels, **kw)
    before = transform_metrics(fixed, moving, Transform.identity(), **kw)
    m = dict(after)
    m["runtime_s"] = float(result.timings.get("total", elapsed))
    m["device"] = result.device
    m["paradigm"] = paradigm_key
    m["params"] = dict(result.params) if len(keys) > 1 else params_to_dict(stage_params[0])
    m["checkpoint"] = result.checkpoint_id
    if len(keys) > 1:
        m["stages"] = [{k: s[k] for k in ("paradigm", "checkpoint", "timings")} for s in result.stages]
    m["metric_style"] = metric_style
    m["before"] = before
    # the result's self-checks (stage check of learned results, inputs vs the checkpoint's training
    # data): a flagged result carries an earlier stage's transform and must not pass as a success
    m["warnings"] = list(result.warnings)
    m["flagged"] = bool(result.flagged)
    if result.checks:
        m["checks"] = result.checks
    if guided is not None:
        m["guidance"] = guided
    if error_map:
        from .errormap import estimate_error_map
        vol, info = estimate_error_map(paradigm_key, fixed, moving, result, stage_params, method=error_map,
                                       checkpoint=checkpoint, progress=progress, cancel=cancel, device=device)
        result.error_map = vol
        m.update(info)
    return result, m


# --------------------------------------------------------------------------- batches
def load_pair(row: dict, *, fixed: Optional[Volume] = None, fixed_labels: Optional[LabelMap] = None) -> dict:
    """Read one PAIRS.csv row (paths) into Volumes / LabelMaps / Landmarks.

    ``fixed`` (and ``fixed_labels``, on the fixed grid) may be given already read, e.g. an atlas
    shared by many pairs (:mod:`app.engine.cohort` keeps the last one per worker); the row's
    ``fixed`` / ``fixed_labels`` paths are then not read again.
    """
    from . import io
    if fixed is None:
        fixed = io.read_volume(row["fixed"])
        fixed_labels = None
    moving = io.read_volume(row["moving"])
    out = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": None,
           "fixed_points": None, "moving_points": None}
    if row.get("fixed_labels") and fixed_labels is None:
        out["fixed_labels"] = io.read_labels(row["fixed_labels"], reference=fixed)
    if row.get("moving_labels"):
        out["moving_labels"] = io.read_labels(row["moving_labels"])
    if row.get("fixed_landmarks") and row.get("moving_landmarks"):
        # read together: a point undefined on one side drops its pair on both
        out["fixed_points"], out["moving_points"] = io.read_landmark_pair(row["fixed_landmarks"],
                                                                          row["moving_landmarks"])
    elif row.get("fixed_landmarks"):
        out["fixed_points"] = io.read_landmarks(row["fixed_landmarks"])
    elif row.get("moving_landmarks"):
        out["moving_points"] = io.read_landmarks(row["moving_landmarks"])
    fp, mp = out["fixed_points"], out["moving_points"]
    if fp is not None and mp is not None and len(fp) != len(mp):
        raise ValueError(f"landmark files {row['fixed_landmarks']} and {row['moving_landmarks']} "
                         f"hold {len(fp)} and {len(mp)} points; corresponding landmarks need equal counts")
    gf, gm = row.get("guide_fixed_landmarks"), row.get("guide_moving_landmarks")
    if gf or gm:   # guide pairs (a guided correction after the registration), only with both files
        if not (gf and gm):
            raise ValueError("a row with guide landmarks needs both guide_fixed_landmarks and guide_moving_landmarks")
        out["guide_fixed_points"], out["guide_moving_points"] = io.read_landmark_pair(gf, gm)
    return out


def _flat_row(name_fixed: str, name_moving: str, m: dict) -> dict:
    row = {"fixed": name_fixed, "moving": name_moving}
    for k in SUMMARY_KEYS:
        row[k] = m.get(k)
    row["device"] = m.get("device")
    for k in SUMMARY_KEYS[:-1]:
        row[f"before_{k}"] = m["before"].get(k)
    for k in ("error_map_mean_mm", "error_map_p95_mm"):
        if k in m:
            row[k] = m[k]
    # the result's self-checks: flagged = a stage made the pair worse and an earlier stage was kept
    row["flagged"] = bool(m.get("flagged", False))
    row["warnings"] = " | ".join(m.get("warnings") or [])
    return row


def summarize(rows: list[dict]) -> dict:
    """Mean (and std) of each metric over pairs, ignoring missing values; ``before`` likewise."""
    def agg(key, src):
        vals = [r[key] for r in src if r.get(key) is not None]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)
    s: dict[str, Any] = {"pairs": len(rows)}
    for k in SUMMARY_KEYS:
        s[k], s[f"{k}_std"] = agg(k, rows)
    s["before"] = {}
    for k in SUMMARY_KEYS[:-1]:
        s["before"][k], s["before"][f"{k}_std"] = agg(f"before_{k}", rows)
    s["device"] = rows[0].get("device") if rows else None
    s["flagged"] = sum(1 for r in rows if r.get("flagged") in (True, "True", "true", 1))
    s["with_warnings"] = sum(1 for r in rows if r.get("warnings"))
    return s


def evaluate_pairs(pairs: list[dict], paradigm_key: str, params=None, *, checkpoint=None,
                   device: str = "auto", out_dir: str | os.PathLike | None = None,
                   progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                   on_pair: Optional[Callable[[int, dict], None]] = None,
                   metric_style: str = "regstation", workers: int = 1,
                   dask_scheduler: Optional[str] = None, threads: Optional[int] = None,
                   resume: bool = False) -> tuple[list[dict], dict]:
    """Register and measure every pair; optionally write results.csv/json and summary.json.

    ``pairs`` are PAIRS.csv rows (dicts of paths). Returns (rows, summary) in manifest order. A pair
    that fails becomes a row whose ``error`` column holds the message (the batch goes on); the
    summary is computed over the pairs that succeeded and counts the failed ones (``failed``).
    Full per-pair metrics (per-label Dice, per-point TRE) are kept in results.json; results.csv
    holds the flat columns. ``metric_style``: see :func:`register_and_measure`. ``workers`` /
    ``dask_scheduler`` / ``threads`` / ``resume``: see :func:`app.engine.cohort.run_batch`, which does
    the work.
    """
    from .cohort import run_batch

    def on_result(rec, counts):
        if on_pair:
            on_pair(rec["index"], rec["row"])

    return run_batch(pairs, paradigm_key, params, checkpoint=checkpoint, device=device, out_dir=out_dir,
                     mode="evaluate", workers=workers, dask_scheduler=dask_scheduler, threads=threads,
                     resume=resume, measure_options={"metric_style": metric_style}, progress=progress,
                     cancel=cancel, on_result=on_result)


def write_json(obj, path) -> None:
    from .io import atomic_path
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(to_jsonable(obj), indent=1, allow_nan=False))


def _columns(rows: list[dict]) -> list[str]:
    """Every key of the rows in order of first appearance, ``error`` last."""
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["fixed", "moving"]
    return [c for c in cols if c != "error"] + (["error"] if "error" in cols else [])


def write_evaluation(out_dir, rows: list[dict], full: list[dict], summary: dict) -> None:
    from .io import atomic_path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_columns(rows), restval="")
            w.writeheader()
            w.writerows(rows)
    write_json(full, out / "results.json")
    write_json(summary, out / "summary.json")


def write_registration(out_dir, result: RegistrationResult, metrics: dict) -> list[Path]:
    """Write DIR/warped.nii.gz, DIR/transform.h5, DIR/field.nii.gz (deformable only), DIR/metrics.json
    (and DIR/warped_labels.nii.gz, DIR/error_map.nii.gz when the result has them).

    Each file is written under a temporary name and renamed, so a failure leaves no partial file.
    """
    from . import io
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "warped.nii.gz", out / "transform.h5", out / "metrics.json"]
    io.write_volume(result.warped, written[0])
    io.write_transform(result.transform, written[1])
    if result.field is not None:
        io.write_field(result.field, out / "field.nii.gz")
        written.append(out / "field.nii.gz")
    if result.warped_labels is not None:
        io.write_labels(result.warped_labels, out / "warped_labels.nii.gz")
        written.append(out / "warped_labels.nii.gz")
    if result.error_map is not None:
        io.write_volume(result.error_map, out / "error_map.nii.gz")
        written.append(out / "error_map.nii.gz")
    m = dict(metrics)
    m["history"] = [{k: v for k, v in h.items()} for h in result.history][-2000:]
    m["timings"] = result.timings
    write_json(m, written[2])
    return written
