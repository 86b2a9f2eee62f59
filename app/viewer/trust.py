"""Trust what you see (Qt-free): the workstation's calls for a run's error map and for a
landmark-guided correction. They run on the engine thread (:mod:`app.workers`); the widgets only
queue them and put the answers into the workspace.

* :func:`error_map_for_run` estimates where a run is likely wrong
  (:func:`app.engine.errormap.estimate_error_map`) with the paradigm and parameters it was run with;
* :func:`correct_run` makes a run's transform honour guide pairs
  (:func:`app.engine.guidance.guided_correction`) and measures the corrected transform like any run
  (:func:`app.engine.evaluation.transform_metrics`), so that it can be listed and compared as a new run.

Transforms map fixed physical points to moving physical points (LPS mm), as everywhere.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from app.engine.types import LabelMap, Landmarks, RegistrationResult, Volume

GUI_METHODS = ("dissimilarity", "consistency")     # the fast default, and the one that re-registers


def run_spec(run) -> tuple[str, object]:
    """(paradigm or pipeline key, parameters as :func:`app.engine.pipeline.make_stage_params` takes
    them) of a run: a pipeline gives one dict per stage, a single paradigm its dict."""
    m = run.metrics or {}
    spec = m.get("paradigm") or getattr(run.result, "paradigm", "") or ""
    if not spec:
        raise ValueError(f"run {run.name!r} does not say which paradigm made it; it cannot be re-registered")
    keys = spec.split("+")
    if len(keys) > 1:
        stages = run.stages
        if len(stages) != len(keys):
            return spec, None
        return spec, [dict(s.get("params") or {}) for s in stages]
    return spec, dict(m.get("params") or getattr(run.result, "params", {}) or {})


def error_map_for_run(spec: str, fixed: Volume, moving: Volume, result: RegistrationResult, params=None, *,
                      method: str = "dissimilarity", checkpoint=None, device: str = "auto", progress=None,
                      cancel: Optional[threading.Event] = None) -> tuple[Volume, dict]:
    """Engine thread: the estimated error map of ``result`` (see
    :func:`app.engine.errormap.estimate_error_map`). ``consistency`` re-registers the reverse
    direction with ``spec`` and ``params``; parameters that no longer parse fall back to the
    paradigm's defaults (said in the info as ``error_map_note``).

    Returns
    -------
    (Volume ``(z, y, x)`` mm on the fixed grid, info dict: ``error_map_mean_mm``, ``error_map_p95_mm``,
    ``error_map_peak_mm`` (LPS xyz of the worst region), ``error_map_method``, ...)
    """
    from app.engine.errormap import estimate_error_map
    note = None
    if method == "consistency" and params is not None:
        from app.engine.pipeline import make_stage_params, stages_of
        try:
            make_stage_params(stages_of(spec), params)
        except (ValueError, TypeError) as e:
            note = f"run parameters not reusable ({e}); the reverse registration used the defaults"
            params = None
    vol, info = estimate_error_map(spec, fixed, moving, result, params, method=method, checkpoint=checkpoint,
                                   progress=progress, cancel=cancel, device=device)
    if note:
        info["error_map_note"] = note
    return vol, info


def correction_name(run_name: str, n_guides: int) -> str:
    """``"<run> + correction (3 guides)"``."""
    return f"{run_name} + correction ({n_guides} guide{'s' if n_guides != 1 else ''})"


def correct_run(fixed: Volume, moving: Volume, result: RegistrationResult, guide_fixed: Landmarks,
                guide_moving: Landmarks, *, sigma_mm: float = 20.0, method: str = "rbf",
                fixed_labels: Optional[LabelMap] = None,
                moving_labels: Optional[LabelMap] = None, fixed_points: Optional[Landmarks] = None,
                moving_points: Optional[Landmarks] = None, base_metrics: Optional[dict] = None,
                base_name: str = "", progress=None, cancel: Optional[threading.Event] = None,
                device: str = "auto") -> tuple[RegistrationResult, dict]:
    """Engine thread: ``result`` corrected to map every fixed guide onto its moving partner, as a
    new result with its own metrics.

    Parameters
    ----------
    fixed, moving : Volume
        The pair ``result`` registered.
    result : RegistrationResult
        Its transform maps fixed points to moving points; the correction is composed on top of it
        (:func:`app.engine.guidance.guided_correction`).
    guide_fixed, guide_moving : Landmarks
        Matched guide pairs, ``(N, 3)`` LPS mm each; apart from the evaluation landmarks
        ``fixed_points`` / ``moving_points``, which only measure the TRE.
    sigma_mm : float
        Reach of the correction (for 'optimise': of the final snap).
    method : 'rbf' or 'optimise'
        Gaussian-RBF field only (seconds), or image-aware: the engine's optimiser with the guides as a
        landmark term, then the RBF snap (:mod:`app.engine.guidance`).
    progress, cancel, device
        Progress callback (once per optimiser iteration for 'optimise'), cancel Event, torch device.
    base_metrics : dict, optional
        The uncorrected run's metrics: its paradigm, parameters and 'before' are carried over.

    Returns
    -------
    (RegistrationResult with the corrected transform, its dense field, the moving image resampled
    once through it; metrics dict as :func:`app.engine.evaluation.register_and_measure`'s plus
    ``guidance`` (guides, guide TRE before/after, widths, folding), ``guide_tre_mm`` (after) and
    ``guide_tre_uncorrected_mm``, ``corrected_from``)
    """
    from app.engine.evaluation import _on_fixed_grid, transform_metrics
    from app.engine.guidance import guided_correction
    from app.engine.spatial import resample
    from app.engine.types import check_cancel
    if len(guide_fixed) == 0 or len(guide_fixed) != len(guide_moving):
        raise ValueError(f"a correction needs complete guide pairs; got {len(guide_fixed)} fixed and "
                         f"{len(guide_moving)} moving guide points")
    check_cancel(cancel)
    if progress is not None:
        from app.engine.types import Progress
        progress(Progress("guidance", message=f"honouring {len(guide_fixed)} guide pairs ({method})"))
    t0 = time.perf_counter()
    transform, field, info = guided_correction(fixed, result.transform, guide_fixed, guide_moving,
                                               sigma_mm=sigma_mm, field=result.field, method=method, moving=moving,
                                               progress=progress, cancel=cancel, device=device)
    check_cancel(cancel)
    warped = resample(moving, fixed, transform, "linear")
    warped_labels = None if moving_labels is None else resample(moving_labels, fixed, transform, "nearest")
    seconds = time.perf_counter() - t0
    base = dict(base_metrics or {})
    check_cancel(cancel)
    m = transform_metrics(fixed, moving, transform, field=field, fixed_labels=_on_fixed_grid(fixed_labels, fixed),
                          moving_labels=moving_labels, fixed_points=fixed_points, moving_points=moving_points,
                          warped_labels=warped_labels, metric_style=base.get("metric_style") or "regstation")
    timings = {"guidance": seconds, "total": seconds}
    used = str(info.get("device", "cpu"))
    new = RegistrationResult(transform=transform, warped=warped, field=field, timings=timings, device=used,
                             paradigm=result.paradigm, params=dict(result.params or {}),
                             checkpoint_id=result.checkpoint_id, warped_labels=warped_labels,
                             stages=list(result.stages or []), warnings=list(result.warnings or []))
    for k in ("paradigm", "params", "checkpoint", "metric_style", "before"):
        if k in base:
            m[k] = base[k]
    m["paradigm"] = m.get("paradigm") or result.paradigm
    m["runtime_s"] = seconds
    m["device"] = used
    m["guidance"] = dict(info, guide_names=[str(n) for n in guide_fixed.names])
    m["guide_tre_mm"] = info["guide_tre_after_mm"]
    m["guide_tre_uncorrected_mm"] = info["guide_tre_before_mm"]
    m["corrected_from"] = base_name
    return new, m
