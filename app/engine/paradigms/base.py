"""The paradigm interface: a ``Registrar`` with a typed ``Params`` dataclass.

Each parameter is a dataclass field whose ``metadata`` may carry ``help`` (one line),
``range`` ``(lo, hi)`` for numbers and ``choices`` for strings; the GUI builds its form from
these and the CLI validates ``--param NAME=VALUE`` against them.

A field may be a tuple of numbers (``levels: tuple[int, ...] = param((4, 2, 1), ...)``): it is
written ``4,2,1`` on the command line and in the GUI (:func:`parse_number_list`,
:func:`format_number_list`) and its ``range`` applies to every element.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import typing
from dataclasses import field
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

from ..types import Landmarks, LabelMap, ProgressFn, RegistrationResult, Transform, Volume


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
    """One paradigm. ``register`` maps fixed physical points to moving physical points (LPS mm):
    ``warped(x) = moving(T(x))``; with ``initial`` (a Transform, e.g. a pipeline's previous stage) it
    starts from it and returns the whole chain ``initial.then(own)``.

    A learned paradigm also declares (class attributes, no torch import at module level):
    ``TrainConfig`` (a subclass of :class:`app.engine.training.config.LoopConfig`), ``trainer``
    (``"module:Class"`` of a :class:`app.engine.training.loop.Trainer`) and ``network_kinds`` (the
    :mod:`app.engine.nn.registry` kinds its checkpoints may hold; others are refused).
    """

    key: ClassVar[str]
    Params: ClassVar[type]
    description: ClassVar[str]
    learned: ClassVar[bool]

    def register(self, fixed: Volume, moving: Volume, params, *,
                 fixed_labels: Optional[LabelMap] = None, moving_labels: Optional[LabelMap] = None,
                 fixed_points: Optional[Landmarks] = None, moving_points: Optional[Landmarks] = None,
                 checkpoint=None, initial: Optional[Transform] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None, device: str = "auto") -> RegistrationResult: ...


def parse_number_list(text, type: type = int, name: str = "value") -> tuple:
    """``"4,2,1"`` -> ``(4, 2, 1)``: the one parser of comma-separated number lists.

    Parameters
    ----------
    text : str, number or sequence of numbers
        Numbers separated by commas and/or spaces, optionally in brackets (``"(4, 2, 1)"``,
        ``"[4 2 1]"``); a single number or a sequence is taken as is.
    type : int or float
        Element type; ``int`` refuses fractions (``"2.5"``) but takes ``"2.0"``.
    name : str
        The parameter's name, for the error message.

    Returns
    -------
    tuple of ``type``, at least one element.

    Raises
    ------
    ValueError
        Naming ``name`` and the text, for an empty list or an element that is not a ``type``.
    """
    if type not in (int, float):
        raise ValueError(f"parse_number_list: type must be int or float, got {type!r}")
    if isinstance(text, (list, tuple)):
        items = list(text)
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        items = [text]
    else:
        body = str(text).strip()
        if body[:1] in "([" and body[-1:] in ")]":
            body = body[1:-1]
        items = [t for t in re.split(r"[,\s]+", body) if t]
    kind = "integers" if type is int else "numbers"
    out = []
    for it in items:
        try:
            v = float(it)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be comma-separated {kind} like '4,2,1', got {text!r}") from None
        if type is int:
            if v != int(v):
                raise ValueError(f"{name} must be comma-separated {kind} like '4,2,1', got {text!r}")
            v = int(v)
        out.append(v)
    if not out:
        raise ValueError(f"{name} needs at least one number (comma-separated {kind} like '4,2,1'), got {text!r}")
    return tuple(out)


def format_number_list(values) -> str:
    """``(4, 2, 1)`` -> ``"4,2,1"`` (the inverse of :func:`parse_number_list`)."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _field_types(params_cls: type) -> dict[str, Any]:
    """Resolved annotations of a Params dataclass (``from __future__ import annotations`` makes strings)."""
    try:
        return typing.get_type_hints(params_cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the raw strings
        return {f.name: f.type for f in dataclasses.fields(params_cls)}


def tuple_element_type(annotation, default=None) -> Optional[type]:
    """int or float when a field is a tuple of numbers (from its annotation or default), else None."""
    if typing.get_origin(annotation) is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if args and all(a in (int, float) for a in args):
            return float if float in args else int
    if isinstance(annotation, str) and annotation.replace(" ", "").startswith("tuple["):
        return float if "float" in annotation else int
    if isinstance(default, tuple) and default and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in default):
        return float if any(isinstance(v, float) for v in default) else int
    return None


def validate_params(params) -> None:
    """Raise ValueError when a field is outside its declared range or choices (tuples: per element)."""
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        rng = f.metadata.get("range")
        if rng is not None and v is not None:
            lo, hi = rng
            values = v if isinstance(v, (tuple, list)) else (v,)
            if isinstance(v, (tuple, list)) and not v:
                raise ValueError(f"parameter {f.name} needs at least one value")
            for e in values:
                if not (lo <= e <= hi):
                    where = f" (element {e!r})" if isinstance(v, (tuple, list)) else ""
                    raise ValueError(f"parameter {f.name}={_show(v)}{where} is outside its range [{lo}, {hi}]")
        ch = f.metadata.get("choices")
        if ch is not None and v not in ch:
            raise ValueError(f"parameter {f.name}={v!r} is not one of {', '.join(map(str, ch))}")


def _show(v) -> str:
    return repr(format_number_list(v)) if isinstance(v, (tuple, list)) else repr(v)


def _coerce(f: dataclasses.Field, text: str, annotation=None):
    annotation = f.type if annotation is None else annotation
    elem = tuple_element_type(annotation, f.default)
    if elem is not None:
        return parse_number_list(text, elem, f"parameter {f.name}")
    t = annotation if isinstance(annotation, type) else {"int": int, "float": float, "bool": bool,
                                                         "str": str}.get(str(annotation), str)
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
    """Build a Params instance from defaults plus ``overrides`` (strings are parsed), validated.

    Tuple fields take ``"4,2,1"``, a number or a list (e.g. read back from a JSON record).
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = _field_types(params_cls)
    kw = {}
    for k, v in (overrides or {}).items():
        if k not in fields:
            raise ValueError(f"unknown parameter '{k}' for {params_cls.__qualname__}; "
                             f"known: {', '.join(sorted(fields))}")
        f = fields[k]
        elem = tuple_element_type(hints.get(k, f.type), f.default)
        if elem is not None:
            kw[k] = parse_number_list(v, elem, f"parameter {k}")
        else:
            kw[k] = _coerce(f, v, hints.get(k, f.type)) if isinstance(v, str) else v
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
