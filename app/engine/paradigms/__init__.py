"""Registry of registration paradigms: key -> "module:Class", imported lazily.

Importing this package must stay cheap (the GUI lists paradigms at start-up without
importing torch).
"""
from __future__ import annotations

import importlib

from .base import Registrar, make_params, param, parse_param_args, validate_params  # noqa: F401

REGISTRY: dict[str, str] = {
    "iterative": "app.engine.paradigms.iterative:IterativeRegistrar",
    "unsupervised": "app.engine.paradigms.unsupervised:UnsupervisedRegistrar",
    "weakly": "app.engine.paradigms.weakly:WeaklyRegistrar",
    "instance": "app.engine.paradigms.instance:InstanceRegistrar",
}

DESCRIPTIONS: dict[str, str] = {
    "iterative": "Conventional: SimpleITK rigid -> affine -> deformable optimisation, multi-resolution",
    "unsupervised": "Unsupervised end-to-end: learned affine + U-Net field (optionally diffeomorphic), image similarity",
    "weakly": "Weakly supervised: as unsupervised, trained with Dice on warped labels (labels needed only in training)",
    "instance": "One-shot instance optimisation: a field optimised on this pair alone (Adam, multi-level)",
}


def available() -> list[str]:
    """Registered paradigm keys, in display order."""
    return list(REGISTRY)


def get(key: str) -> Registrar:
    """Instantiate the registrar for ``key`` (imports its module on first use)."""
    if key not in REGISTRY:
        raise ValueError(f"unknown paradigm '{key}'; available: {', '.join(REGISTRY)}")
    mod, cls = REGISTRY[key].split(":")
    return getattr(importlib.import_module(mod), cls)()


def register_paradigm(key: str, target: str, description: str) -> None:
    """Add a paradigm (``target`` = "module:Class")."""
    REGISTRY[key] = target
    DESCRIPTIONS[key] = description
