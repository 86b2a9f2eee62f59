"""The run history of a session (Qt-free model): every finished registration, its metrics and
which one is on screen.

Events
------
added(index), removed(index), renamed(index), changed(index) (metrics recomputed),
current(index or None), cleared()
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .events import EventGroup


def json_safe(obj, _depth: int = 0):
    """Plain JSON types only: numpy scalars -> Python numbers, NaN/inf -> None, arrays dropped
    (small 1-D arrays become lists), tuples -> lists, keys -> str."""
    if _depth > 8:
        return None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, np.ndarray) and (v.ndim > 1 or v.size > 1000):
                continue
            out[str(k)] = json_safe(v, _depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v, _depth + 1) for v in obj.tolist()] if obj.ndim <= 1 and obj.size <= 1000 else None
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# parameters worth naming a run after, per paradigm (value shown when it differs from "off")
_KEY_OPTIONS = ("stages", "deformable", "metric", "diffeomorphic", "affine", "dual", "adversarial", "model", "mode")


def _options_text(params: dict) -> str:
    bits = []
    for k in _KEY_OPTIONS:
        v = params.get(k)
        if v is None or v is False or v == "" or v == "none":
            continue
        bits.append(k if v is True else str(v))
    return ", ".join(bits[:3])


def describe_run(paradigm: str, params: Optional[dict] = None) -> str:
    """A descriptive run name: the paradigm and its key options, e.g.
    ``"unsupervised (diffeomorphic)"``, ``"iterative (rigid+affine+deformable, diffeomorphic_demons)"``;
    a pipeline lists its stages, ``"unsupervised → instance"``."""
    paradigm = paradigm or "run"
    params = params or {}
    stages = paradigm.split("+")
    if len(stages) > 1:
        parts = []
        for i, key in enumerate(stages):
            opts = _options_text(params.get(f"{i + 1}:{key}") or {})
            parts.append(f"{key} ({opts})" if opts else key)
        return " → ".join(parts)
    opts = _options_text(params)
    return f"{paradigm} ({opts})" if opts else paradigm


def _stage_checks(checks: dict) -> list[tuple[str, dict]]:
    """(prefix, stage check) pairs of a run's ``checks`` (one paradigm's, or a pipeline's by stage)."""
    if not isinstance(checks, dict):
        return []
    if isinstance(checks.get("stage_check"), dict):
        return [("", checks["stage_check"])]
    return [(f"stage {k}: ", v["stage_check"]) for k, v in checks.items()
            if isinstance(v, dict) and isinstance(v.get("stage_check"), dict)]


def run_verdict(metrics: Optional[dict]) -> tuple[str, str, list[str]]:
    """How a finished run should be presented: ``(level, headline, warnings)``.

    level : 'ok' (no warning), 'warning' (the result comes with warnings) or 'flagged' (a stage
        check found a learned stage that made the pair less similar than its input, and an
        earlier stage's transform was kept: never shown as a plain success).
    headline : one line ('' for 'ok').
    warnings : the run's warnings (``metrics["warnings"]``).
    """
    m = metrics or {}
    warnings = [str(w) for w in (m.get("warnings") or [])]
    flagged = [(p, sc) for p, sc in _stage_checks(m.get("checks") or {}) if sc.get("flagged")]
    if flagged or m.get("flagged"):
        if flagged:
            p, sc = flagged[0]
            vals = sc.get("values") or {}
            last = sc.get("last") or (list(vals)[-1] if vals else "last")
            head = (f"{p}Worse than its input: the {last} result made the images less similar "
                    f"({sc.get('metric', '')} {vals.get(last, float('nan')):.3f} vs "
                    f"{max(vals.values()) if vals else float('nan'):.3f}); kept the {sc.get('kept')} stage instead")
        else:
            head = "Worse than its input: an earlier stage was kept"
        return "flagged", head, warnings
    if warnings:
        return "warning", f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''}: check this result", warnings
    return "ok", "", warnings


@dataclass
class Run:
    """One registration: ``result`` (RegistrationResult, None when it could not be restored),
    ``metrics`` (JSON-safe dict of :func:`app.engine.evaluation.register_and_measure`)."""

    name: str
    result: Any
    metrics: dict = field(default_factory=dict)
    time: str = ""

    def __getitem__(self, key: str):        # run["name"], as the dictionaries this replaces
        return getattr(self, key)

    @property
    def stages(self) -> list[dict]:
        """One record per pipeline stage (paradigm, params, checkpoint, timings); one for a
        single paradigm."""
        st = getattr(self.result, "stages", None) or []
        if st:
            return list(st)
        par = self.metrics.get("paradigm") or getattr(self.result, "paradigm", "") or ""
        return [{"paradigm": par, "params": self.metrics.get("params") or getattr(self.result, "params", {}),
                 "checkpoint": self.metrics.get("checkpoint")}]


class RunHistory:
    """Ordered runs and the current one."""

    def __init__(self):
        self.events = EventGroup("added", "removed", "renamed", "changed", "current", "cleared")
        self.runs: list[Run] = []
        self.current: Optional[int] = None

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, i: int) -> Run:
        return self.runs[i]

    @property
    def current_run(self) -> Optional[Run]:
        return None if self.current is None else self.runs[self.current]

    def _unique(self, name: str) -> str:
        names = {r.name for r in self.runs}
        if name not in names:
            return name
        k = 2
        while f"{name} #{k}" in names:
            k += 1
        return f"{name} #{k}"

    def add(self, result=None, metrics: Optional[dict] = None, name: Optional[str] = None, *,
            select: bool = True, time: Optional[str] = None) -> int:
        """Record a run; returns its index. Without ``name`` the run is named after its paradigm
        and key options (:func:`describe_run`), made unique with ``#2``, ``#3``..."""
        m = json_safe(dict(metrics or {}))
        if result is not None:
            m.setdefault("paradigm", getattr(result, "paradigm", "") or None)
            m.setdefault("device", getattr(result, "device", None))
            timings = getattr(result, "timings", None) or {}
            if m.get("runtime_s") is None and timings.get("total") is not None:
                m["runtime_s"] = json_safe(timings.get("total"))
            m.setdefault("checkpoint", getattr(result, "checkpoint_id", None))
            m.setdefault("params", json_safe(getattr(result, "params", {}) or {}))
        if not name:
            name = describe_run(m.get("paradigm") or "", m.get("params") or {})
        run = Run(self._unique(str(name)), result, m, time or _dt.datetime.now().strftime("%H:%M:%S"))
        self.runs.append(run)
        i = len(self.runs) - 1
        self.events.added.emit(i)
        if select:
            self.set_current(i)
        return i

    def remove(self, i: int) -> None:
        if not 0 <= i < len(self.runs):
            raise ValueError(f"no run {i} (there are {len(self.runs)})")
        del self.runs[i]
        cur = self.current
        if cur is not None:
            cur = None if cur == i else cur - 1 if cur > i else cur
            if cur is None and self.runs:
                cur = min(i, len(self.runs) - 1)
        self.current = None
        self.events.removed.emit(i)
        self.set_current(cur)

    def rename(self, i: int, name: str) -> None:
        name = str(name).strip()
        if not name:
            raise ValueError("a run name cannot be empty")
        if self.runs[i].name != name:
            self.runs[i].name = self._unique(name)
            self.events.renamed.emit(i)

    def set_current(self, i: Optional[int]) -> None:
        if i is not None and not 0 <= i < len(self.runs):
            raise ValueError(f"no run {i} (there are {len(self.runs)})")
        if i != self.current:
            self.current = i
            self.events.current.emit(i)

    def update_metrics(self, i: int, changes: dict) -> None:
        """Merge recomputed metrics into run ``i`` (``before`` merged too); emits ``changed``."""
        m = self.runs[i].metrics
        before = changes.get("before")
        m.update(json_safe({k: v for k, v in changes.items() if k != "before"}))
        if before is not None:
            m.setdefault("before", {}).update(json_safe(before))
        self.events.changed.emit(i)

    def clear(self) -> None:
        if self.runs or self.current is not None:
            self.runs.clear()
            self.current = None
            self.events.cleared.emit()
