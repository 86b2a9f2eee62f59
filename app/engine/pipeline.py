"""Pipelines of paradigms: ``A+B+C`` runs A, then B starting from A's transform, then C.

Every paradigm's ``register`` accepts ``initial``, a :class:`~app.engine.types.Transform` mapping
fixed physical points to moving physical points (LPS mm); a stage that gets one estimates its own
transform ``S`` on the moving image as ``initial`` leaves it and returns the whole chain
``initial.then(S)``, i.e. ``T(x) = initial(S(x))``. So after the last stage

    warped(x) = moving(T_C(x)),   T_C = T_A.then(S_B).then(S_C)

is one composite transform, and the final warped image (and warped labels) resample the *original*
moving image once through it: nothing is interpolated twice.

Parameters of a pipeline: ``B.name=value`` sets ``name`` for stage ``B`` (every stage with key
``B``; ``2.name`` for the second stage alone); a plain ``name=value`` sets it for every stage whose
parameters declare ``name`` (an error if none does). A single paradigm is a pipeline of one stage,
so the plain form keeps working there.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Optional

from . import paradigms
from .spatial import resample
from .types import (LabelMap, Landmarks, Progress, ProgressFn, RegistrationResult, Transform, Volume,
                    check_cancel, params_to_dict)


def stages_of(spec: str) -> list[str]:
    """``"unsupervised+instance"`` -> ``["unsupervised", "instance"]``; ValueError for an unknown key."""
    keys = [k.strip() for k in str(spec).split("+")]
    if not keys or any(not k for k in keys):
        raise ValueError(f"a paradigm or pipeline looks like 'iterative' or 'unsupervised+instance', got {spec!r}")
    for k in keys:
        if k not in paradigms.REGISTRY:
            raise ValueError(f"unknown paradigm '{k}' in {spec!r}; available: {', '.join(paradigms.available())}")
    return keys


def is_pipeline(spec: str) -> bool:
    return "+" in str(spec)


def split_params(keys: list[str], overrides: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distribute ``--param`` overrides over the stages (see the module docstring).

    Returns one overrides dict per stage; raises ValueError for a prefix that names no stage or a
    name that no stage declares.
    """
    fields = [{f.name for f in dataclasses.fields(paradigms.registrar_class(k).Params)} for k in keys]
    out: list[dict[str, Any]] = [{} for _ in keys]
    for name, value in (overrides or {}).items():
        prefix, _, plain = str(name).rpartition(".")
        if prefix:
            if prefix.isdigit():
                idx = [int(prefix) - 1] if 1 <= int(prefix) <= len(keys) else []
            else:
                idx = [i for i, k in enumerate(keys) if k == prefix]
            if not idx:
                raise ValueError(f"parameter {name!r}: '{prefix}' is not a stage of {'+'.join(keys)} "
                                 f"(use a stage's key or its position 1..{len(keys)})")
            for i in idx:
                if plain not in fields[i]:
                    raise ValueError(f"unknown parameter '{plain}' for stage {i + 1} ({keys[i]}); "
                                     f"known: {', '.join(sorted(fields[i]))}")
                out[i][plain] = value
        else:
            idx = [i for i, f in enumerate(fields) if plain in f]
            if not idx:
                if len(keys) == 1:
                    out[0][plain] = value    # make_params names the known parameters
                    continue
                raise ValueError(f"unknown parameter '{plain}' for {'+'.join(keys)}: no stage declares it")
            for i in idx:
                out[i][plain] = value
    return out


def make_stage_params(keys: list[str], params) -> list:
    """Params instances per stage from ``params``: a dict of (prefixed) overrides, a list with one
    Params instance or overrides dict per stage, or None (defaults)."""
    if isinstance(params, (list, tuple)):
        if len(params) != len(keys):
            raise ValueError(f"{len(params)} parameter sets for {len(keys)} stages ({'+'.join(keys)})")
        per = list(params)
    elif params is None or isinstance(params, dict):
        per = split_params(keys, params)
    elif len(keys) == 1:
        per = [params]
    else:
        raise ValueError(f"a pipeline ({'+'.join(keys)}) takes a dict of NAME or STAGE.NAME overrides")
    out = []
    for k, p in zip(keys, per):
        cls = paradigms.registrar_class(k).Params
        if p is None or isinstance(p, dict):
            out.append(paradigms.make_params(cls, p or {}))
        else:
            paradigms.validate_params(p)
            out.append(p)
    return out


def _stage_progress(progress: Optional[ProgressFn], i: int, n: int, key: str) -> Optional[ProgressFn]:
    if progress is None or n == 1:
        return progress

    def relay(p: Progress) -> None:
        if p.stage == "done":
            return
        frac = None if p.fraction is None else (i + max(0.0, min(1.0, p.fraction))) / n
        msg = f"stage {i + 1}/{n} ({key}): {p.message}" if p.message else f"stage {i + 1}/{n} ({key})"
        progress(dataclasses.replace(p, fraction=frac, message=msg))
    return relay


def register_pipeline(spec, fixed: Volume, moving: Volume, params=None, *,
                      fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                      fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                      checkpoint=None, initial: Optional[Transform] = None,
                      progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
                      device: str = "auto") -> RegistrationResult:
    """Run the stages of ``spec`` (``"A+B"`` or a list of keys) one after the other.

    Parameters
    ----------
    spec : str or list of str
        Paradigm keys joined by ``+``.
    fixed, moving : Volume
        Scalar 3D images ``(z, y, x)``, each on its own physical grid (LPS mm).
    params : dict, list or Params, optional
        See :func:`make_stage_params`.
    checkpoint : path or dict, optional
        A path goes to the learned stages (an error if there are several: then pass
        ``{key: path}``); a dict maps stage keys to checkpoints.
    initial : Transform, optional
        Where the first stage starts (fixed -> moving points).
    labels, landmarks, progress, cancel, device
        As in every paradigm's ``register``; every stage sees them (labels only to mask or guide),
        the moving labels are warped once, through the final transform.

    Returns
    -------
    RegistrationResult of the whole chain: ``transform`` fixed -> moving points, ``warped`` the
    original moving image resampled once through it, ``paradigm`` the spec, ``params``
    ``{"1:A": {...}, "2:B": {...}}``, ``stages`` one record per stage (paradigm, params, checkpoint,
    timings), ``history`` every stage's records with ``"pipeline_stage"`` added, ``timings`` per
    stage and ``total``.
    """
    keys = stages_of(spec) if isinstance(spec, str) else list(spec)
    per = make_stage_params(keys, params)
    learned = [k for k in keys if getattr(paradigms.registrar_class(k), "learned", False)]
    if isinstance(checkpoint, dict):
        ckpts = {k: checkpoint.get(k) for k in keys}
    elif checkpoint and len(set(learned)) > 1:
        raise ValueError(f"one checkpoint for several learned stages ({', '.join(learned)}): pass one per stage")
    else:
        ckpts = {k: (checkpoint if k in learned or len(keys) == 1 else None) for k in keys}
    t_start = time.perf_counter()
    transform = initial
    history: list[dict] = []
    warnings: list[str] = []
    checks: dict[str, dict] = {}
    stages: list[dict] = []
    timings: dict[str, float] = {}
    result: Optional[RegistrationResult] = None
    for i, (key, p) in enumerate(zip(keys, per)):
        check_cancel(cancel)
        last = i == len(keys) - 1
        t0 = time.perf_counter()
        start = {"initial": transform} if transform is not None else {}
        result = paradigms.get(key).register(
            fixed, moving, p, fixed_labels=fixed_labels, moving_labels=moving_labels if last else None,
            fixed_points=fixed_points, moving_points=moving_points, checkpoint=ckpts.get(key),
            progress=_stage_progress(progress, i, len(keys), key), cancel=cancel, device=device, **start)
        transform = result.transform
        seconds = time.perf_counter() - t0
        timings[f"{i + 1}:{key}"] = seconds
        history += [{**h, "pipeline_stage": i + 1} for h in result.history]
        warnings += [f"stage {i + 1} ({key}): {w}" for w in getattr(result, "warnings", [])]
        if getattr(result, "checks", None):
            checks[f"{i + 1}:{key}"] = result.checks
        stages.append({"paradigm": key, "params": dict(result.params) or params_to_dict(p),
                       "checkpoint": result.checkpoint_id,
                       "timings": dict(result.timings), "device": result.device})
    check_cancel(cancel)
    assert result is not None
    if len(keys) == 1:
        result.stages = stages
        return result
    if moving_labels is not None and result.warped_labels is None:
        result.warped_labels = resample(moving_labels, fixed, transform, "nearest")
    timings["total"] = time.perf_counter() - t_start
    if progress:
        progress(Progress("done", fraction=1.0, message=f"{'+'.join(keys)} finished"))
    return dataclasses.replace(
        result, history=history, timings=timings, paradigm="+".join(keys),
        params={f"{i + 1}:{k}": s["params"] for i, (k, s) in enumerate(zip(keys, stages))},
        checkpoint_id=";".join(s["checkpoint"] for s in stages if s["checkpoint"]) or None,
        device=",".join(sorted({s["device"] for s in stages})), stages=stages, warnings=warnings, checks=checks)
