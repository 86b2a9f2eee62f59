"""The paradigm interface: a ``Registrar`` with a typed ``Params`` dataclass.

Each parameter is a dataclass field whose ``metadata`` may carry ``help`` (one line),
``range`` ``(lo, hi)`` for numbers and ``choices`` for strings; the GUI builds its form from
these and the CLI validates ``--param NAME=VALUE`` against them.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import field
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

from ..types import Landmarks, LabelMap, ProgressFn, RegistrationResult, Volume


def param(default, help: str = "", range: tuple | None = None, choices: tuple | None = None):
    """A dataclass field with GUI/CLI metadata (help text, numeric range, choices)."""
    md: dict[str, Any] = {"help": help}
    if range is not None:
        md["range"] = range
    if choices is not None:
        md["choices"] = tuple(choices)
    return field(default=default, metadata=md)


@runtime_checkable
class Registrar(Protocol):
    key: ClassVar[str]
    Params: ClassVar[type]
    description: ClassVar[str]
    learned: ClassVar[bool]

    def register(self, fixed: Volume, moving: Volume, params, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult: ...


def validate_params(params) -> None:
    """Raise ValueError when a field is outside its declared range or choices."""
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        rng = f.metadata.get("range")
        if rng is not None and v is not None:
            lo, hi = rng
            if not (lo <= v <= hi):
                raise ValueError(f"parameter {f.name}={v!r} is outside its range [{lo}, {hi}]")
        ch = f.metadata.get("choices")
        if ch is not None and v not in ch:
            raise ValueError(f"parameter {f.name}={v!r} is not one of {', '.join(map(str, ch))}")


def _coerce(f: dataclasses.Field, text: str):
    t = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type), str)
    if t is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"parameter {f.name} expects true/false, got {text!r}")
    try:
        return t(text)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {f.name} expects {t.__name__}, got {text!r}") from None


def make_params(params_cls: type, overrides: dict[str, Any] | None = None):
    """Build a Params instance from defaults plus ``overrides`` (strings are parsed), validated."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    kw = {}
    for k, v in (overrides or {}).items():
        if k not in fields:
            raise ValueError(f"unknown parameter '{k}' for {params_cls.__qualname__}; "
                             f"known: {', '.join(sorted(fields))}")
        kw[k] = _coerce(fields[k], v) if isinstance(v, str) else v
    p = params_cls(**kw)
    validate_params(p)
    return p


def parse_param_args(items: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (CLI ``--param``)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--param expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out
